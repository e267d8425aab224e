"""LightningDataModules for the papers' tasks, and the file formats they read."""

from rnorm.data.idx import IDXFormatError, read_idx, write_idx
from rnorm.data.mnist import EpochSeededRandomSampler, SequentialMNISTDataModule
from rnorm.data.text import CharLMDataModule, CharWindows, EpochCropSampler

__all__ = [
    "CharLMDataModule",
    "CharWindows",
    "EpochCropSampler",
    "EpochSeededRandomSampler",
    "IDXFormatError",
    "SequentialMNISTDataModule",
    "read_idx",
    "write_idx",
]
