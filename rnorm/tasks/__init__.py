"""LightningModules, one per task of the papers."""

from rnorm.tasks.attentive_reader import AttentiveReader
from rnorm.tasks.base import EncoderFactory, RecurrentTask
from rnorm.tasks.classification import SequenceClassifier
from rnorm.tasks.draw import DRAW
from rnorm.tasks.language_model import CharLanguageModel

__all__ = ["AttentiveReader", "CharLanguageModel", "DRAW", "EncoderFactory", "RecurrentTask", "SequenceClassifier"]
