"""LightningDataModules for the papers' tasks, and the file formats they read."""

from rnorm.data.batching import TrainingBatchSampler
from rnorm.data.binarized_mnist import AmatFormatError, BinarizedMNISTDataModule, read_amat
from rnorm.data.idx import IDXFormatError, read_idx, write_idx
from rnorm.data.mnist import EpochSeededRandomSampler, SequentialMNISTDataModule
from rnorm.data.qa import QADataModule, QAExample, QAFormatError, parse_question_file
from rnorm.data.qa_synthetic import write_synthetic_corpus
from rnorm.data.text import CharLMDataModule, CharWindows, EpochCropSampler

__all__ = [
    "AmatFormatError",
    "BinarizedMNISTDataModule",
    "CharLMDataModule",
    "CharWindows",
    "EpochCropSampler",
    "EpochSeededRandomSampler",
    "IDXFormatError",
    "QADataModule",
    "QAExample",
    "QAFormatError",
    "SequentialMNISTDataModule",
    "TrainingBatchSampler",
    "parse_question_file",
    "read_amat",
    "read_idx",
    "write_idx",
    "write_synthetic_corpus",
]
