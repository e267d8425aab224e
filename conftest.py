"""Collection settings for the whole repository (doctests included)."""

# Importing rnorm/__main__.py runs the command line; it has no doctests anyway.
# The Triton kernels' modules import triton and fix, when imported, whether Triton's interpreter runs
# them (TRITON_INTERPRET): collecting them would import them before tests/kernels/test_triton.py
# chooses, and fail where triton is not installed. They have no doctests either.
collect_ignore = ["rnorm/__main__.py", "rnorm/kernels/triton/kernels.py", "rnorm/kernels/triton/loops.py"]
