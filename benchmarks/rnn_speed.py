"""Time NormLSTM against torch.nn.LSTM on the papers' shapes, for every normalization strategy.

    python benchmarks/rnn_speed.py --device cpu --shapes pmnist,ptb --norms all --threads 2 --json out.json

For each (norm, shape, mode) both layers are built with the same sizes and dtype (fp32) on the
device and timed *interleaved* in one process (NormLSTM, then nn.LSTM, every repeat, after
warmup), so drifts in clock speed or load hit both alike. ``train`` is training mode, forward and
backward of the loss; ``infer`` is eval mode under ``torch.no_grad()``, forward only (after one
training forward, so that batch statistics have population estimates).

``--loss sum`` (the default) backpropagates the sum of every output; ``--loss last`` only the last
step's, as a classifier reading ``h_T`` does (sequential MNIST): gradients then fade over the
steps, into the denormal range on long sequences. ``--init config`` initializes the weights as
the sequential-MNIST configs do (their encoder's ``*_init`` and ``forget_bias`` options, read from
``configs/pmnist/lstm.yaml``), ``nn.LSTM`` included (the same weights); ``--init default`` leaves
each layer's own initialization; ``--input uniform`` draws inputs in [0, 1] like MNIST pixels
rather than from a standard normal.

A norm name is applied to every site its strategy supports and ``none`` elsewhere, except
``seqbn``, which only normalizes the input site and is benchmarked as BN-e* (``seqbn/bn/bn``),
the model it belongs to. So ``wn`` is ``wn/wn/none``. The ``sites`` of each result record it.

``--impl fused,cudnn`` times several of NormLSTM's implementations (one row each) interleaved in
the same loop with one nn.LSTM, so that they can be compared on a shared, noisy machine;
``--hidden N`` gives every shape N hidden units instead of its own, to find where two paths cross.

Reported: median milliseconds of each (every timed call is kept in the JSON), their ratio NormLSTM / nn.LSTM, and peak memory on CUDA
(``torch.cuda.max_memory_allocated``, reset before each measured call; ``null`` on CPU, where no
allocator statistic isolates one call). The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from rnorm import norms
from rnorm.kernels import native, resolve_backend
from rnorm.nn import RECURRENCES, NormLSTM
from rnorm.utils.atomic import atomic_write_bytes

#: name -> (T, B, D, H): sequence length, batch, input features, hidden units.
SHAPES = {
    "pmnist": (784, 64, 1, 100),
    "ptb": (100, 64, 50, 1000),
    "text8": (180, 128, 27, 2000),
}
MODES = ("train", "infer")
SITES = ("input", "recurrent", "cell")
LOSSES = ("sum", "last")
INITS = ("default", "config")
INPUTS = ("normal", "uniform")
#: The config whose encoder initialization ``--init config`` copies.
INIT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pmnist" / "lstm.yaml"
INIT_KEYS = ("input_init", "recurrent_init", "forget_bias")
CPU_MEMORY_NOTE = "peak_mb is null on CPU: torch's CPU allocator has no per-call peak statistic."


def sites_of(name: str) -> dict[str, str]:
    """The strategy of each site for a benchmarked norm name (see the module docstring)."""
    supported = norms.get(name).supported_sites
    fallback = "bn" if name == "seqbn" else "none"  # seqbn alone is not a model: BN-e* is seqbn/bn/bn
    return {f"{site}_norm": name if site in supported else fallback for site in SITES}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", default="pmnist,ptb,text8", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--norms", default="all", help="'all' (every registered strategy) or a comma list")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each layer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each layer first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every B (min 2)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every T (min 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", default="sum", choices=LOSSES, help="what train mode backpropagates (default: sum)")
    parser.add_argument("--init", default="default", choices=INITS, help="weight initialization (default: each layer's own)")
    parser.add_argument("--input", default="normal", choices=INPUTS, help="input distribution (default: standard normal)")
    parser.add_argument("--tf32", action="store_true", help="set torch.backends.cuda.matmul.allow_tf32 (TF32 products, as cuDNN's default)")
    parser.add_argument(
        "--impl",
        default="fused",
        help=f"comma list of NormLSTM's recurrence implementations, timed interleaved ({', '.join(sorted(RECURRENCES))}; default: fused)",
    )
    parser.add_argument("--hidden", type=int, default=None, help="H of every shape instead of its own (where paths cross)")
    args = parser.parse_args(argv)

    def names(value: str, known: Sequence[str], what: str) -> list[str]:
        chosen = [item.strip() for item in value.split(",") if item.strip()]
        unknown = [item for item in chosen if item not in known]
        if unknown or not chosen:
            parser.error(f"unknown {what} {unknown or value!r}; known: {', '.join(known)}")
        return chosen

    args.shapes = names(args.shapes, list(SHAPES), "shape")
    known_norms = list(norms.available())
    args.norms = known_norms if args.norms.strip() == "all" else names(args.norms, known_norms, "norm")
    args.modes = names(args.modes, list(MODES), "mode")
    args.impl = names(args.impl, sorted(RECURRENCES), "impl")
    if args.hidden is not None and args.hidden < 1:
        parser.error(f"need --hidden >= 1, but got {args.hidden}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available (torch.cuda.is_available() is False)")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, but got {args.repeats} and {args.warmup}")
    if not (args.batch_scale > 0 and args.steps_scale > 0):
        parser.error("--batch-scale and --steps-scale must be positive")
    return args


def machine_info(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        # whether impl="fused" did its per-step work in the compiled CPU kernels (rnorm.kernels._fused_step)
        "compiled_kernels": native.available() and device.type == "cpu",
        # what impl="fused" runs for float32 here: "native", "triton" or "torch"
        "fused_backend": resolve_backend("auto", device, torch.float32, False),
        # the float32 products' TF32 settings: ours follow matmul's, cuDNN's LSTM cudnn's
        "allow_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }


def config_init() -> dict[str, object]:
    """The encoder initialization options of :data:`INIT_CONFIG`."""
    import yaml  # jsonargparse's dependency

    encoder = yaml.safe_load(INIT_CONFIG.read_text())["model"]["init_args"]["encoder"]["init_args"]
    return {key: encoder[key] for key in INIT_KEYS if key in encoder}


def copy_into_lstm(source: NormLSTM, lstm: nn.LSTM) -> None:
    """``lstm`` gets ``source``'s raw weights (its bias as ``bias_ih``, ``bias_hh`` zero)."""
    with torch.no_grad():
        cell = source.cells[0]
        lstm.weight_ih_l0.copy_(cell.weight_ih)
        lstm.weight_hh_l0.copy_(cell.weight_hh)
        lstm.bias_ih_l0.copy_(cell.bias if cell.bias is not None else torch.zeros_like(lstm.bias_ih_l0))
        lstm.bias_hh_l0.zero_()


def make_call(model: nn.Module, x: torch.Tensor, mode: str, loss: str = "sum") -> Callable[[], None]:
    """One benchmarked call of ``model`` on ``x`` ``(B, T, D)`` in ``mode``, training on ``loss``."""
    if mode == "train":

        def call() -> None:
            output, _ = model(x)
            (output.sum() if loss == "sum" else output[:, -1].sum()).backward()
            model.zero_grad(set_to_none=True)

    else:

        def call() -> None:
            with torch.no_grad():
                model(x)

    return call


def timed(call: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """Milliseconds of one call, and its peak memory in MiB on CUDA (else ``None``)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return elapsed, peak


def bench_one(name: str, shape: str, mode: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per implementation in ``args.impl``: each NormLSTM and nn.LSTM timed interleaved."""
    T, B, D, H = SHAPES[shape]
    T = max(2, round(T * args.steps_scale))
    B = max(2, round(B * args.batch_scale))  # batch statistics need 2 samples
    H = H if args.hidden is None else args.hidden
    sites = sites_of(name)
    torch.manual_seed(args.seed)
    init = config_init() if args.init == "config" else {}
    ours = {impl: NormLSTM(D, H, batch_first=True, impl=impl, **sites, **init).to(device, torch.float32) for impl in args.impl}
    first = next(iter(ours.values()))
    for model in ours.values():
        model.load_state_dict(first.state_dict())
    theirs = nn.LSTM(D, H, batch_first=True).to(device, torch.float32)
    if init:
        copy_into_lstm(NormLSTM(D, H, **init).to(device, torch.float32), theirs)
    x = torch.rand(B, T, D, device=device) if args.input == "uniform" else torch.randn(B, T, D, device=device)
    if mode == "infer":
        for model in ours.values():
            with torch.no_grad():
                model.train()(x)  # population statistics for bn / seqbn
            model.eval()
        theirs.eval()
    else:
        for model in ours.values():
            model.train()
        theirs.train()
    calls = {impl: make_call(model, x, mode, args.loss) for impl, model in ours.items()}
    calls["lstm"] = make_call(theirs, x, mode, args.loss)
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {key: [] for key in calls}
    peaks: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, call in calls.items():  # interleaved: each NormLSTM, then nn.LSTM, every repeat
            elapsed, peak = timed(call, device)
            times[key].append(elapsed)
            if peak is not None:
                peaks[key].append(peak)
    lstm_ms = statistics.median(times["lstm"])
    rows = []
    for impl in args.impl:
        normlstm_ms = statistics.median(times[impl])
        rows.append(
            {
                "norm": name,
                "sites": "/".join(sites[f"{site}_norm"] for site in SITES),
                "shape": shape,
                "T": T,
                "B": B,
                "D": D,
                "H": H,
                "mode": mode,
                "loss": args.loss if mode == "train" else None,
                "init": args.init,
                "input": args.input,
                "impl": impl,
                "normlstm_ms": normlstm_ms,
                "lstm_ms": lstm_ms,
                "ratio": normlstm_ms / lstm_ms,
                "normlstm_all_ms": times[impl],
                "lstm_all_ms": times["lstm"],
                "peak_mb": max(peaks[impl]) if peaks[impl] else None,
                "lstm_peak_mb": max(peaks["lstm"]) if peaks["lstm"] else None,
            }
        )
    return rows


def format_table(results: list[dict]) -> str:
    header = f"{'norm':<9}{'sites':<28}{'shape':<8}{'T':>5}{'B':>5}{'H':>6}  {'mode':<6}{'impl':<12}"
    header += f"{'NormLSTM ms':>13}{'nn.LSTM ms':>12}{'ratio':>8}{'peak MiB':>10}"
    lines = [header, "-" * len(header)]
    for r in results:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"{r['norm']:<9}{r['sites']:<28}{r['shape']:<8}{r['T']:>5}{r['B']:>5}{r['H']:>6}  {r['mode']:<6}{r['impl']:<12}"
            f"{r['normlstm_ms']:>13.1f}{r['lstm_ms']:>12.1f}{r['ratio']:>7.1f}x{peak:>10}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    started = time.perf_counter()
    results = []
    for shape in args.shapes:
        for name in args.norms:
            for mode in args.modes:
                for result in bench_one(name, shape, mode, args, device):
                    results.append(result)
                    print(f"  {name} {shape} {mode} {result['impl']}: ratio {result['ratio']:.2f}", file=sys.stderr, flush=True)
    print(format_table(results))
    if "fused" in args.impl:
        work = {"native": "compiled CPU kernels (rnorm.kernels._fused_step)", "triton": "Triton kernels (rnorm.kernels.triton)", "torch": "torch operations"}
        print("fused per-step work: " + work[resolve_backend("auto", device, torch.float32, False)] + " (torch's LSTM where it is faster: docs/performance.md)")
    print(f"loss {args.loss}, init {args.init}, input {args.input}")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    if args.json is not None:
        report = {
            "machine": machine_info(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/rnn_speed.py", *(sys.argv[1:] if argv is None else argv)]),
            "settings": {
                "repeats": args.repeats,
                "warmup": args.warmup,
                "steps_scale": args.steps_scale,
                "batch_scale": args.batch_scale,
                "dtype": "float32",
                "statistic": "median",
                "loss": args.loss,
                "init": args.init,
                "input": args.input,
            },
            "notes": {
                "sites": "input/recurrent/cell: the name on every site it supports, 'none' elsewhere; "
                "seqbn is BN-e* (seqbn/bn/bn)",
                "ratio": "normlstm_ms / lstm_ms",
                "all_ms": "normlstm_all_ms, lstm_all_ms: every timed call in order (repeats interleaved)",
                "peak_mb": CPU_MEMORY_NOTE if device.type == "cpu" else "torch.cuda.max_memory_allocated per call, MiB",
            },
            "total_s": elapsed,
            "results": results,
        }
        if not all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in results):
            raise RuntimeError("A timing ratio is not a positive finite number.")
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
