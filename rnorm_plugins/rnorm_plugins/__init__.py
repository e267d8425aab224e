"""Example plugin package for :mod:`rnorm`: strategies added through the ``rnorm.normalizers`` entry points.

Installing the distribution (``pip install -e rnorm_plugins``) makes ``"rms"`` a strategy name
everywhere :mod:`rnorm` takes one, with no import in user code; the registry loads it on its first
lookup.
"""

from rnorm_plugins.rms import RMSNorm

__all__ = ["RMSNorm"]
