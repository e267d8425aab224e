"""One forward step of the fused recurrence's elementwise work: the hand-written C++ kernel against
the same step written in torch and compiled by Inductor.

    python benchmarks/step_binding.py --shapes pmnist,ptb --threads 2 --json step.json

The issue behind it asked whether an Inductor-compiled step could replace the hand-written C++ (and
its binding) within about 15 %. Both are timed on the same buffers, interleaved, per step, without the
GEMMs (which both would call the same way): BN-LSTM (``bn`` on every site), training mode (batch
statistics of the input and recurrent terms and of the cell, gates, cell, output, padding), float32.
Prints JSON (and writes it with ``--json``): median microseconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rnorm.kernels import native
from rnorm.utils.atomic import atomic_write_bytes

SHAPES = {"pmnist": (784, 64, 100), "ptb": (100, 64, 1000), "text8": (180, 128, 2000)}  # (T, B, H)
EPS = 1e-5


def torch_step(u_in, u_rec, c_prev, gamma_in, gamma_rec, gamma_c, beta_c, shift, w):
    """The step's work after its GEMMs, as in rnorm/kernels/torch_loop.py (z-space, docs/fused_backward.md eq. 4-9)."""

    def batch_norm(u):
        mean = w @ u
        centered = u - mean
        var = w @ (centered * centered)
        return centered * torch.rsqrt(var + EPS), mean, var

    x_in, mean_in, var_in = batch_norm(u_in)
    x_rec, mean_rec, var_rec = batch_norm(u_rec)
    act = torch.sigmoid(x_in * gamma_in + x_rec * gamma_rec + shift)
    hidden = c_prev.shape[1]
    i, f, g, o = act[:, :hidden], act[:, hidden : 2 * hidden], act[:, 2 * hidden : 3 * hidden] * 2 - 1, act[:, 3 * hidden :]
    c = f * c_prev + i * g
    x_c, mean_c, var_c = batch_norm(c)
    tanh_c = torch.sigmoid(x_c * gamma_c + beta_c) * 2 - 1
    h = o * tanh_c
    return h, c, act, tanh_c, x_in, x_rec, x_c, mean_in, var_in, mean_rec, var_rec, mean_c, var_c


def bench(shape: str, repeats: int) -> dict:
    steps, batch, hidden = SHAPES[shape]
    steps = min(steps, 100)  # the per-step cost does not depend on T
    gates = 4 * hidden
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    new = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # -- the C++ kernel: a training plan with batch statistics on every site ---------------------
    ext = native.load()
    buffers = native.ForwardBuffers(
        z=new(batch, gates), act=new(steps, batch, gates), tanh_cell=new(steps, batch, hidden),
        states_h=new(steps + 1, batch, hidden), states_c=new(steps + 1, batch, hidden),
        shift=new(1, gates), weights=torch.full((1, batch), 1.0 / batch),
        input_u=new(steps, batch, gates), input_scale=new(1, gates), input_rstd=new(steps, 1, gates),
        input_mean=new(steps, 1, gates), input_var=new(steps, 1, gates),
        recurrent_u=new(steps, batch, gates), recurrent_scale=new(1, gates), recurrent_rstd=new(steps, 1, gates),
        recurrent_mean=new(steps, 1, gates), recurrent_var=new(steps, 1, gates),
        cell_u=new(steps, batch, hidden), cell_scale=new(1, hidden), cell_shift=new(1, hidden), cell_rstd=new(steps, 1, hidden),
        cell_mean=new(steps, 1, hidden), cell_var=new(steps, 1, hidden),
    )
    fresh_u = (buffers.input_u.clone(), buffers.recurrent_u.clone())
    plan = ext.forward_plan(buffers, steps, batch, hidden, True, False, (2, 2, 2), (EPS, EPS, EPS))
    # -- the same step in torch, compiled by Inductor -------------------------------------------
    compiled = torch.compile(torch_step, dynamic=False)
    inputs = (new(batch, gates), new(batch, gates), new(batch, hidden), new(gates), new(gates), new(hidden), new(hidden), new(gates), torch.full((1, batch), 1.0 / batch))
    for _ in range(3):
        compiled(*inputs)
    times = {"native": [], "inductor": []}
    with native.denormals_flushed():
        for _ in range(repeats):
            buffers.input_u.copy_(fresh_u[0])
            buffers.recurrent_u.copy_(fresh_u[1])
            start = time.perf_counter()
            for t in range(steps):
                ext.forward(plan, t)
            times["native"].append((time.perf_counter() - start) / steps * 1e6)
            start = time.perf_counter()
            for _ in range(steps):
                compiled(*inputs)
            times["inductor"].append((time.perf_counter() - start) / steps * 1e6)
    native_us, inductor_us = statistics.median(times["native"]), statistics.median(times["inductor"])
    return {"shape": shape, "B": batch, "H": hidden, "native_us": native_us, "inductor_us": inductor_us, "ratio": inductor_us / native_us}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="pmnist,ptb")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not native.available():
        parser.error("the compiled CPU kernels are not built")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench(shape, args.repeats) for shape in args.shapes.split(",")]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        atomic_write_bytes(args.json, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
