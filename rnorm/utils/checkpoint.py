"""Loading checkpoints from outside safely: tensors and plain data only, never code.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, and unpickling can run any
code the file's author chose; rnorm never does it for a file it is given. :func:`load_checkpoint`
loads with ``weights_only=True`` and turns every failure into a :class:`CheckpointError` that names
the file and says what is wrong with it, without PyTorch's advice to retry with
``weights_only=False``.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "task_globals"]


class CheckpointError(ValueError):
    """A file given as a checkpoint cannot be loaded safely: not a checkpoint, truncated, or holding code."""


def task_globals() -> list[Any]:
    """What a task's hyperparameters hold when it was built from Python rather than the CLI.

    ``SequenceClassifier(functools.partial(NormLSTM, …), optimizer=torch.optim.Adam)`` saves the
    partial and the classes themselves. Allowing these exact objects is safe: unpickling can then
    build a ``functools.partial`` of one of them, or refer to the class, but never call it.
    """
    from torch.optim import lr_scheduler

    from rnorm.nn import NormLSTM, NormLSTMCell

    optimizers = [obj for obj in vars(torch.optim).values() if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)]
    schedulers = [
        obj for obj in vars(lr_scheduler).values() if isinstance(obj, type) and issubclass(obj, lr_scheduler.LRScheduler)
    ]
    return [functools.partial, NormLSTM, NormLSTMCell, *optimizers, *schedulers]


def load_checkpoint(path: str | os.PathLike, *, allow: Iterable[Any] = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Args:
        path: the checkpoint (a Lightning ``.ckpt`` or any file written by ``torch.save``).
        allow: classes and functions the file may refer to besides tensors and plain data (see
            :func:`task_globals`); they are referred to, never called.
        mmap: map the tensors' storage instead of reading it (a cheap validity check).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file is not a checkpoint (not a ``torch.save`` archive, truncated), or
            it holds objects other than tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {str(path)!r}.")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(
            f"{str(path)!r} is not a valid rnorm/Lightning checkpoint: it is not a torch.save archive "
            "(a zip file), or it is truncated."
        )
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{str(path)!r} is not a valid rnorm/Lightning checkpoint that can be loaded safely: {_reason(err)} "
            "rnorm loads only tensors and plain data from a checkpoint, never code."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a valid rnorm/Lightning checkpoint (corrupt or truncated?): {_reason(err)}"
        ) from None


def _reason(err: BaseException) -> str:
    """PyTorch's explanation of a failed load, without its advice to load unsafely or to file an issue."""
    advice = (
        "weights_only", "Weights only load failed", "trusted source", "Check the documentation", "Please file an issue",
        "internal miniz error",
    )  # fmt: skip
    kept = []
    for paragraph in str(err).replace(". ", ".\n").splitlines():
        paragraph = paragraph.strip().removeprefix("WeightsUnpickler error:").strip()
        if paragraph and not any(phrase in paragraph for phrase in advice):
            kept.append(paragraph)
    reason = " ".join(kept) or type(err).__name__
    return reason if reason.endswith(".") else reason + "."
