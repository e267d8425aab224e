"""The time loop without launch overhead: each loop's T steps captured once in a CUDA graph and replayed.

A time loop of the Triton implementation is a :class:`Program`: its workspace (the states used in
turn, the product operands, the table of buffer addresses) and a function that launches every step.
The kernels read the addresses of the call's buffers from the table (:mod:`~rnorm.kernels.triton.kernels`),
so a graph captured once replays for every later call with the same plan: the host rewrites the
table and the workspace's inputs, then replays. Programs are cached per (plan, stream).

When a loop runs as captured graph, and when its launches run one by one:

* **CPU** (the interpreter, ``TRITON_INTERPRET=1``): always launched; the same step functions run.
* **First call of a plan** (warm-up): launched, which compiles every kernel the loop uses; the
  second call captures, and replays from then on.
* **Capture failed** (an error while capturing): launched, for that plan from then on, with a
  warning naming the error once.
* **Inside someone else's capture** (``torch.cuda.graph`` or ``torch.compile(mode="reduce-overhead")``
  around the model): launched, so that the launches become part of that graph.
* **Graphs switched off** (:data:`GRAPHS`\\ ``.enabled = False``, for measurements): launched.

Why graphs rather than one persistent kernel: the persistent kernel would need a grid-wide barrier
between steps (every program waits for every ``h_t``), which the interpreter, running programs one
after another, cannot execute; graphs keep the per-step kernels that the CPU tests run. See
``docs/performance.md``.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GRAPHS", "GraphCache", "Program"]


@dataclass
class Program:
    """One loop for one plan: its workspace tensors by name, and ``launch()`` running every step."""

    workspace: dict[str, Tensor]
    launch: Callable[[], None]
    calls: int = 0  #: how many times it ran
    graph: torch.cuda.CUDAGraph | None = None
    failed: str | None = None  #: why capturing failed, if it did
    mode: str = "launched"  #: how the last call ran: "launched" or "replayed"


class GraphCache:
    """Programs by key (the plan, the device and the stream), the least recently used dropped beyond ``capacity``.

    Attributes:
        enabled: capture and replay CUDA graphs (``False``: always launch; for measurements).
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.enabled = True
        self._programs: OrderedDict[Hashable, Program] = OrderedDict()
        self._lock = threading.Lock()

    def program(self, key: Hashable, build: Callable[[], Program]) -> Program:
        """The program of ``key``, built on first use."""
        with self._lock:
            program = self._programs.get(key)
            if program is None:
                program = self._programs[key] = build()
                while len(self._programs) > self.capacity:
                    self._programs.popitem(last=False)
            self._programs.move_to_end(key)
            return program

    def programs(self) -> tuple[Program, ...]:
        """The cached programs, least recently used first."""
        with self._lock:
            return tuple(self._programs.values())

    def clear(self) -> None:
        """Forget every program (their workspaces and graphs)."""
        with self._lock:
            self._programs.clear()

    def run(self, program: Program, device: torch.device) -> None:
        """Run ``program``'s loop once: replay its graph, capture it, or launch its steps (see the module docstring)."""
        program.calls += 1
        if not self._may_capture(program, device):
            program.launch()
            program.mode = "launched"
            return
        if program.graph is None:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    program.launch()
            except Exception as error:  # any capture failure falls back, once, loudly
                program.failed = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"rnorm: capturing the Triton time loop in a CUDA graph failed ({program.failed}); "
                    "its kernels are launched one by one for this shape from now on.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                program.launch()
                program.mode = "launched"
                return
            program.graph = graph
        program.graph.replay()
        program.mode = "replayed"

    def _may_capture(self, program: Program, device: torch.device) -> bool:
        return (
            self.enabled
            and device.type == "cuda"
            and program.calls > 1  # the first call compiles the kernels
            and program.failed is None
            and not torch.cuda.is_current_stream_capturing()
        )


#: The cache the Triton implementation uses.
GRAPHS = GraphCache()


def stream_key(device: torch.device) -> Hashable:
    """What, besides the plan, a program's workspace is private to: the device and its current stream."""
    if device.type == "cuda":
        return (str(device), torch.cuda.current_stream(device).cuda_stream)
    return (str(device),)
