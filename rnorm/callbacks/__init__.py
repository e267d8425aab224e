"""Lightning callbacks of rnorm."""

from rnorm.callbacks.monitoring import NormMonitor
from rnorm.callbacks.population import PopulationStatistics
from rnorm.callbacks.seeding import EpochSeed

__all__ = ["EpochSeed", "NormMonitor", "PopulationStatistics"]
