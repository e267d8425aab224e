"""Builds rnorm's optional CPU kernels and lists its packages; the rest is in pyproject.toml.

The packages are rnorm's own (found under ``rnorm/``) plus ``rnorm.configs``, which is the
top-level ``configs/`` folder mapped into the package, so that an installed rnorm (a wheel or an
editable install) carries its configurations; pyproject.toml cannot combine found packages with a
mapped one.

``rnorm.kernels._fused_step`` (rnorm/kernels/csrc/fused_step.cpp) does the per-step elementwise work of the
fused LSTM recurrence. It uses only the Python C API (no torch headers), so it builds in seconds
without torch in the build environment. It is optional: where it cannot be built (no C++
compiler), the install still succeeds, ``impl="fused"`` runs the same loop with torch operations
(``impl="fused_torch"``) and warns once that it does; CI sets ``RNORM_REQUIRE_NATIVE=1``, which
makes the test suite fail instead (tests/kernels/test_native.py).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, find_packages, setup

SOURCE = "rnorm/kernels/csrc/fused_step.cpp"
# The source's hash, compiled in: rnorm.kernels.native ignores (with a warning) a build whose source has
# changed since, e.g. an editable install not rebuilt after a pull.
SOURCE_SHA = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()[:16]

setup(
    packages=[*find_packages(include=["rnorm", "rnorm.*"]), "rnorm.configs"],
    package_dir={"rnorm.configs": "configs"},
    ext_modules=[
        Extension(
            "rnorm.kernels._fused_step",
            sources=[SOURCE],
            language="c++",
            define_macros=[("RNORM_SOURCE_SHA", f'"{SOURCE_SHA}"')],
            # -fopenmp-simd: honour the `omp simd` loops (vectorized reductions) without the OpenMP
            # runtime; -fno-trapping-math / -fno-math-errno: let the clamps and sqrt vectorize (the
            # kernels read neither floating-point exceptions nor errno). No -ffast-math: NaNs must
            # propagate.
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"],
            optional=True,
        )
    ]
)
