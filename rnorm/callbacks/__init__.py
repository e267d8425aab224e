"""Lightning callbacks of rnorm."""

from rnorm.callbacks.monitoring import NormMonitor
from rnorm.callbacks.population import PopulationStatistics
from rnorm.callbacks.predictions import PredictionWriter
from rnorm.callbacks.progress import CompactProgressBar, EpochLines
from rnorm.callbacks.run_directory import RemoveFailedRunDirectory
from rnorm.callbacks.samples import SampleGrids
from rnorm.callbacks.seeding import EpochSeed

__all__ = [
    "CompactProgressBar",
    "EpochLines",
    "EpochSeed",
    "NormMonitor",
    "PopulationStatistics",
    "PredictionWriter",
    "RemoveFailedRunDirectory",
    "SampleGrids",
]
