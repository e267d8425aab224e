"""Collection settings for the whole repository (doctests included)."""

# Importing rnorm/__main__.py runs the command line; it has no doctests anyway.
collect_ignore = ["rnorm/__main__.py"]
