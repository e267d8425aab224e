"""Time the Triton implementation's variants on a GPU: CUDA graphs on and off, the recurrent product in
the kernels (``tl.dot``) or in torch.mm, TF32 products; against torch.nn.LSTM (cuDNN) at the same shape.

    python benchmarks/triton_variants.py --json variants.json

For each variant: the median milliseconds of a training call (forward and backward of the output's
sum) and of an inference call (no_grad, eval mode), and per step (divided by T), after warm-up calls
(the first compiles the kernels, the second captures the graphs). What it says which variant to
prefer is for docs/performance.md; the defaults (graphs on, ``tl.dot`` up to
``INLINE_MAX_HIDDEN`` units) are what NormLSTM runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from rnorm.kernels.triton import plan as triton_plan
from rnorm.kernels.triton.graphs import GRAPHS
from rnorm.nn import NormLSTM
from rnorm.utils.atomic import atomic_write_bytes

# rnn_speed is a sibling script, not a package: import it from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rnn_speed import SHAPES, make_call, sites_of, timed

MODES = ("train", "infer")  # train first: bn and seqbn evaluate with the statistics it records


@contextlib.contextmanager
def variant(graphs: bool, inline: bool, tf32: bool) -> Iterator[None]:
    """NormLSTM's Triton loops with graphs on or off, the product in the kernels where they can or never, TF32 or not."""
    saved = GRAPHS.enabled, triton_plan.INLINE_MAX_HIDDEN, torch.backends.cuda.matmul.allow_tf32
    GRAPHS.enabled = graphs
    triton_plan.INLINE_MAX_HIDDEN = saved[1] if inline else 0
    torch.backends.cuda.matmul.allow_tf32 = tf32
    GRAPHS.clear()
    try:
        yield
    finally:
        GRAPHS.enabled, triton_plan.INLINE_MAX_HIDDEN, torch.backends.cuda.matmul.allow_tf32 = saved
        GRAPHS.clear()


def median_ms(call: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        call()
    return statistics.median(timed(call, device)[0] for _ in range(repeats))


def mode_calls(model: torch.nn.Module, x: torch.Tensor) -> Iterator[tuple[str, Callable[[], None]]]:
    """Each mode's call (rnn_speed's), with the model put in that mode first."""
    for mode in MODES:
        model.train(mode == "train")
        yield mode, make_call(model, x, mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="pmnist,ptb")
    parser.add_argument("--norms", default="bn,ln,none")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    device = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        T, B, D, H = SHAPES[shape]
        x = torch.randn(B, T, D, device=device)
        lstm = torch.nn.LSTM(D, H, batch_first=True).to(device)
        for mode, call in mode_calls(lstm, x):
            rows.append({"shape": shape, "norm": "nn.LSTM", "variant": "cudnn", "mode": mode, "ms": median_ms(call, args.repeats, args.warmup, device), "T": T})
        for norm in args.norms.split(","):
            torch.manual_seed(0)
            model = NormLSTM(D, H, batch_first=True, impl="triton", **sites_of(norm)).to(device)
            for graphs, inline, tf32 in ((True, True, False), (False, True, False), (True, False, False), (True, True, True)):
                if not inline and H > triton_plan.INLINE_MAX_HIDDEN:
                    continue  # torch.mm already
                name = f"graphs={'on' if graphs else 'off'} product={'tl.dot' if inline and H <= triton_plan.INLINE_MAX_HIDDEN else 'torch.mm'} tf32={'on' if tf32 else 'off'}"
                with variant(graphs, inline, tf32):
                    for mode, call in mode_calls(model, x):
                        rows.append({"shape": shape, "norm": norm, "variant": name, "mode": mode, "ms": median_ms(call, args.repeats, args.warmup, device), "T": T})
                print(f"  {shape} {norm} {name}", file=sys.stderr, flush=True)
    print(f"{'shape':<8}{'norm':<9}{'variant':<46}{'mode':<7}{'ms':>9}{'us/step':>9}")
    for r in rows:
        print(f"{r['shape']:<8}{r['norm']:<9}{r['variant']:<46}{r['mode']:<7}{r['ms']:>9.2f}{1e3 * r['ms'] / r['T']:>9.1f}")
    if args.json is not None:
        report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
