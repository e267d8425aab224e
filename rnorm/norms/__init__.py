"""The registry of normalization strategies and the strategies themselves.

>>> from rnorm import norms
>>> sorted(norms.available())[:3]
['bn', 'ln', 'none']
>>> norms.create("bn", site="recurrent", num_features=8)
TimeBatchNorm(site='recurrent', num_features=8, eps=1e-05, momentum=0.1, learn_beta=False)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from rnorm.norms.base import SITES, FusedStep, Normalizer
from rnorm.norms.batch_norm import BatchStatisticsNorm, SequenceBatchNorm, TimeBatchNorm, set_statistics_sync
from rnorm.norms.identity import Identity
from rnorm.norms.layer_norm import LayerNorm
from rnorm.norms.norm_prop import NormProp
from rnorm.norms.population import estimate_population_statistics
from rnorm.norms.registry import ENTRY_POINT_GROUP, NORMALIZERS, Registry, register
from rnorm.norms.weight_norm import WeightNorm

#: What a layer accepts where a strategy is expected: a registered name, a Normalizer subclass,
#: a ``functools.partial`` of one, or a built instance (copied for every layer and direction).
NormalizerSpec = str | type | functools.partial | Normalizer


def available() -> dict[str, str]:
    """Every registered strategy name (plugins included), sorted, with its one-line description."""
    return NORMALIZERS.available()


def get(name: str) -> type[Normalizer]:
    """The strategy class registered under ``name``; ``ValueError`` listing the names if unknown."""
    return NORMALIZERS.get(name)


def create(name: str, **kwargs: Any) -> Normalizer:
    """Build the strategy registered under ``name``: ``create("bn", site="cell", num_features=100)``."""
    return get(name)(**kwargs)


def resolve(spec: NormalizerSpec, **kwargs: Any) -> Callable[..., Normalizer]:
    """A factory ``(site=..., num_features=...) -> Normalizer`` from any accepted specification.

    ``kwargs`` are hyperparameters bound into the factory (only for names, classes and partials:
    a built instance carries its own).
    """
    if isinstance(spec, Normalizer):
        if kwargs:
            raise ValueError(f"Hyperparameters {sorted(kwargs)} cannot be applied to an already built {type(spec).__name__}.")
        return functools.partial(_copy_instance, spec)
    if isinstance(spec, str):
        return functools.partial(get(spec), **kwargs)
    target = spec.func if isinstance(spec, functools.partial) else spec
    if isinstance(target, type) and issubclass(target, Normalizer):
        return functools.partial(spec, **kwargs)
    raise TypeError(
        f"Expected a normalizer name, a Normalizer subclass, a partial of one or a built Normalizer, "
        f"but got {spec!r} of type {type(spec).__name__}."
    )


def _copy_instance(prototype: Normalizer, *, site: str, num_features: int) -> Normalizer:
    if prototype.site != site or prototype.num_features != num_features:
        raise ValueError(
            f"The built {type(prototype).__name__} normalizes site={prototype.site!r} with "
            f"num_features={prototype.num_features}, but it was given for site={site!r} with "
            f"num_features={num_features}."
        )
    return copy.deepcopy(prototype)


__all__ = [
    "ENTRY_POINT_GROUP",
    "BatchStatisticsNorm",
    "FusedStep",
    "NORMALIZERS",
    "SITES",
    "Identity",
    "LayerNorm",
    "NormProp",
    "Normalizer",
    "NormalizerSpec",
    "Registry",
    "SequenceBatchNorm",
    "TimeBatchNorm",
    "WeightNorm",
    "available",
    "create",
    "estimate_population_statistics",
    "get",
    "register",
    "resolve",
    "set_statistics_sync",
]
