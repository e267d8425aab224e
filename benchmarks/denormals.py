"""What flushing denormals to zero is worth on the sequential-MNIST training workload.

    python benchmarks/denormals.py --threads 2 --json denormals.json
    python benchmarks/denormals.py --threads 2 --fit-data-dir DATA/mnist   # also `rnorm fit`, with and without

With the loss on the last of 784 steps, gradients fade back through time and can reach the denormal
range, which x86 computes with slow microcode assists. The op's CPU implementations flush denormals
in the calling thread around their loops (``rnorm.kernels.native.denormals_flushed``); ``rnorm fit``
does not set ``torch.set_flush_denormal`` process-wide. This measures both decisions:

- per strategy (``--norms``), one training call (forward and backward of the last step's sum) of
  ``NormLSTM`` with the kernels' flushing as shipped and with it disabled, and of ``nn.LSTM`` (the
  same weights) with the last-step loss, the loss on every step, and the last-step loss with
  ``torch.set_flush_denormal(True)``, all interleaved, medians after ``--warmup`` rounds; the
  configurations' initialization, inputs uniform in [0, 1], as ``rnn_speed.py --init config --input
  uniform`` does;
- with ``--fit-data-dir``, ``rnorm fit --config FIT_CONFIG`` for ``--fit-steps`` A and B updates, in
  fresh processes with and without the process-wide flush; the difference of the two wall times
  over ``B - A`` is the time per update without the start-up.

Prints JSON (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

# rnn_speed is a sibling script, not a package: import it from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rnn_speed

from rnorm.kernels import native
from rnorm.nn import NormLSTM
from rnorm.utils.atomic import atomic_write_bytes

FLUSHED_FIT = "import sys, torch; torch.set_flush_denormal(True); from rnorm.cli import main; sys.exit(main(sys.argv[1:]))"
PLAIN_FIT = "import sys; from rnorm.cli import main; sys.exit(main(sys.argv[1:]))"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default="none,bn", help="comma-separated strategies on every site (default none,bn)")
    parser.add_argument("--steps", type=int, default=784, help="sequence length T (default 784)")
    parser.add_argument("--batch", type=int, default=100, help="batch size B (default 100, the configurations')")
    parser.add_argument("--hidden", type=int, default=100, help="hidden size H (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--fit-data-dir", default=None, help="MNIST folder: also time `rnorm fit` (default: skip)")
    parser.add_argument("--fit-config", default="pmnist/lstm", help="configuration for the fit (default pmnist/lstm)")
    parser.add_argument("--fit-steps", default="10,40", help="the two update counts A,B (default 10,40)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "hidden", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    try:
        args.fit_steps = [int(n) for n in args.fit_steps.split(",")]
    except ValueError:
        parser.error(f"--fit-steps must be two integers A,B, got {args.fit_steps!r}")
    if len(args.fit_steps) != 2 or not 0 < args.fit_steps[0] < args.fit_steps[1]:
        parser.error(f"--fit-steps must be two integers 0 < A < B, got {args.fit_steps}")
    args.norms = [n for n in args.norms.split(",") if n]
    for name in args.norms:
        try:
            rnn_speed.sites_of(name)
        except (KeyError, ValueError) as error:
            parser.error(str(error))
    return args


def training_call(model: nn.Module, x: torch.Tensor, loss: str, flush: str) -> Callable[[], None]:
    """One training call; ``flush`` is ``"shipped"`` (the op's scoped flushing, as shipped),
    ``"disabled"`` (the op's flushing turned off) or ``"process"`` (``torch.set_flush_denormal``)."""
    call = rnn_speed.make_call(model, x, "train", loss)

    def run() -> None:
        shipped = native.denormals_flushed
        if flush == "disabled":
            native.denormals_flushed = contextlib.nullcontext  # the op looks it up at each call
        if flush == "process":
            torch.set_flush_denormal(True)
        try:
            call()
        finally:
            native.denormals_flushed = shipped
            if flush == "process":
                torch.set_flush_denormal(False)

    return run


def bench_layers(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds of each variant for strategy ``name``, interleaved."""
    init = rnn_speed.config_init()
    torch.manual_seed(0)
    model = NormLSTM(1, args.hidden, **rnn_speed.sites_of(name), **init)
    lstm = nn.LSTM(1, args.hidden, batch_first=True)
    torch.manual_seed(0)
    rnn_speed.copy_into_lstm(NormLSTM(1, args.hidden, **init), lstm)
    x = torch.rand(args.batch, args.steps, 1, generator=torch.Generator().manual_seed(0))
    calls = {
        "normlstm_kernels_flush": training_call(model, x, "last", "shipped"),
        "normlstm_no_flush": training_call(model, x, "last", "disabled"),
        "lstm_last": training_call(lstm, x, "last", "shipped"),
        "lstm_sum": training_call(lstm, x, "sum", "shipped"),
        "lstm_last_process_flush": training_call(lstm, x, "last", "process"),
    }
    times: dict[str, list[float]] = {key: [] for key in calls}
    for round_ in range(args.warmup + args.repeats):
        for key, call in calls.items():
            elapsed, _ = rnn_speed.timed(call, x.device)
            if round_ >= args.warmup:
                times[key].append(elapsed)
    return {key: round(statistics.median(values), 2) for key, values in times.items()}


def bench_fit(args: argparse.Namespace) -> dict[str, object]:
    """Wall seconds of ``rnorm fit`` for the two update counts, with and without the process-wide flush."""
    seconds: dict[str, dict[int, float]] = {"plain": {}, "process_flush": {}}
    with tempfile.TemporaryDirectory() as root:
        for steps in args.fit_steps:
            for key, program in (("plain", PLAIN_FIT), ("process_flush", FLUSHED_FIT)):
                command = [
                    sys.executable, "-c", program, "fit", "--config", args.fit_config,
                    "--data.init_args.data_dir", args.fit_data_dir, "--trainer.max_steps", str(steps),
                    "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(Path(root) / f"{key}{steps}"),
                    "--test_after_fit", "false", "--population_statistics.num_batches", "1",
                ]  # fmt: skip
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"rnorm fit failed ({done.returncode}):\n{done.stderr[-2000:]}")
                seconds[key][steps] = round(time.perf_counter() - start, 2)
    low, high = args.fit_steps
    per_update = {key: round((s[high] - s[low]) / (high - low), 4) for key, s in seconds.items()}
    return {"config": args.fit_config, "seconds": seconds, "seconds_per_update": per_update}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, object] = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "compiled_kernels": native.available()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/denormals.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"T": args.steps, "B": args.batch, "H": args.hidden, "repeats": args.repeats, "warmup": args.warmup},
        "layers_ms": {name: bench_layers(name, args) for name in args.norms},
    }  # fmt: skip
    if args.fit_data_dir:
        report["fit"] = bench_fit(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        atomic_write_bytes(Path(args.json), (text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
