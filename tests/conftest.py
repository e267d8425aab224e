"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels' tests (tests/kernels/test_triton.py) run in Triton's interpreter,
# which has to be chosen before triton is first imported: triton.jit decides then, for triton's own
# library functions too, and torch imports triton by itself (torch.library.opcheck, torch.compile).
# It changes nothing else on the CPU: only Triton kernels read it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it: the models in tests are tiny, and two
    threads on two busy cores made long loops (784 pixel steps) several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _touch(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    """Unpickles by calling ``_touch(marker)``: what a crafted checkpoint would do with any function."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


@pytest.fixture
def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would create ``marker``: ``(checkpoint, marker)``."""
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    assert not marker.exists()
    return path, marker
