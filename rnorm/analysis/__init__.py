"""Analysis tools behind ``rnorm analyze``: the papers' figures, on the user's own models.

* ``gradient-flow``: ‖∂loss/∂h_t‖ over t for several initial γ (BN Fig. 1a);
* ``tanh-derivative``: E[tanh'(x)] and its interquartile range for x ~ N(0, σ²) (BN Fig. 1b);
* ``population-stats``: per-step population statistics of a trained checkpoint (BN Fig. 5);
* ``normprop-gradient``: ‖∂h_t/∂h_{t-1}‖ of a Norm-Prop step over γ_x, γ_h (NP Fig. 1);
* ``curves``: one logged metric of several training runs against updates (BN Fig. 2, 3a).

Each writes its numbers (CSV) and a PNG figure (needs matplotlib: ``pip install rnorm[plots]``) to
an output folder and prints where.
"""
