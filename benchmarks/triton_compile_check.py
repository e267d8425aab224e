"""Compile the Triton kernels for a GPU target on a machine without one: what the interpreter does not check.

Triton's interpreter (how the CPU tests run the kernels) executes them with numpy and checks none of
what the GPU compiler needs: ``tl.dot`` operands of at least 16 in every dimension, power-of-two
blocks, types the hardware has. This script runs NormLSTM's Triton loops on small CPU tensors with
every kernel launch recorded instead of run, for the models and shapes given, then compiles each
recorded launch (its constexprs and argument types) down to a cubin for the target
(``--arch 90``: Hopper, the H200), with the ``ptxas`` that ships with Triton. No GPU is needed.

    python benchmarks/triton_compile_check.py                       # every strategy, the benchmark's shapes
    python benchmarks/triton_compile_check.py --norms bn,ln --shapes pmnist --json launches.json
    python benchmarks/triton_compile_check.py --json launches.json --record-only
    python benchmarks/triton_compile_check.py --from-json launches.json   # compile only (any Triton, no torch)

``--json`` writes the recorded launches; ``--from-json`` compiles such a file without torch or
rnorm's host code (only ``triton`` and ``rnorm/kernels/triton/kernels.py`` are imported), e.g. in a
virtual environment holding another Triton version. Exit status 1 if a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNELS_FILE = Path(__file__).resolve().parent.parent / "rnorm" / "kernels" / "triton" / "kernels.py"
#: Shared memory one block may use on a Hopper GPU (227 KiB).
SHARED_LIMIT = 227 * 1024
#: name -> (T, B, D, H), as benchmarks/rnn_speed.py's, with T cut short (the kernels do not depend on T).
SHAPES = {"pmnist": (3, 64, 1, 100), "ptb": (3, 64, 50, 1000), "text8": (3, 128, 27, 2000)}


def _load_kernels():
    """rnorm/kernels/triton/kernels.py as compiled (not interpreted) JIT functions, imported on its own."""
    spec = importlib.util.spec_from_file_location("rnorm_triton_kernels_compiled", KERNELS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _type_of(value: object) -> str:
    """Triton's signature type of a runtime argument recorded as a string or a number."""
    if isinstance(value, str):
        return value  # a tensor, recorded as "*fp32" etc.
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


def record(norms: list[str], shapes: list[str]) -> list[dict]:
    """Run the Triton loops with every launch recorded: ``[{kernel, args, constexprs, num_warps}]``, unique."""
    os.environ["TRITON_INTERPRET"] = "1"  # the host code runs on CPU tensors; nothing is launched
    import torch
    import triton.language as tl

    from rnorm.kernels.triton import kernels as k
    from rnorm.kernels.triton import loops
    from rnorm.nn import NormLSTM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rnn_speed import sites_of

    type_names = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.bool: "i1"}
    launches: dict[str, dict] = {}

    class Recorder:
        def __init__(self, name: str, fn) -> None:
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                parameters = inspect.signature(self.fn.fn).parameters
                values = dict(zip(parameters, args)) | kwargs
                constexprs = {n: values[n] for n, p in parameters.items() if p.annotation in (tl.constexpr, "tl.constexpr")}
                runtime = {n: values[n] for n in parameters if n not in constexprs}
                entry = {
                    "kernel": self.name,
                    "args": {n: f"*{type_names[v.dtype]}" if hasattr(v, "dtype") else _type_of(v) for n, v in runtime.items()},
                    "constexprs": {n: _plain(v) for n, v in constexprs.items()},
                    "num_warps": kwargs.get("num_warps", 4),
                }
                launches.setdefault(json.dumps(entry, sort_keys=True), entry)

            return launch

    for name in ("write_table", "forward_step", "backward_step", "row_normalize", "row_backward", "batch_normalize_steps", "batch_backward_steps"):
        setattr(k, name, Recorder(name, getattr(k, name)))
    loops.INTERPRET = False  # the plans then say "compiled": half-precision operands in bf16/fp16
    real_check = loops._check_mode
    loops._check_mode = lambda: None
    try:
        for shape in shapes:
            steps, batch, inputs, hidden = SHAPES[shape]
            for norm in norms:
                sites = sites_of(norm)
                model = NormLSTM(inputs, hidden, batch_first=False, impl="triton", **sites)
                x = torch.randn(steps, batch, inputs)
                lengths = torch.tensor([steps] * (batch - 1) + [steps - 1])
                for autocast in (False, True):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        model.train()
                        out, _ = model(x, lengths)
                        out.sum().backward()
                        model.eval()
                        with torch.no_grad():
                            model(x, lengths)
                            model(x)
    finally:
        loops._check_mode = real_check
    return list(launches.values())


def _plain(value: object) -> object:
    """A constexpr as JSON: Triton dtypes by name."""
    value = getattr(value, "value", value)
    return {"dtype": str(value)} if type(value).__name__ == "dtype" else value


def compile_all(launches: list[dict], arch: int) -> int:
    """Compile every launch for ``cuda:arch``; returns the number that failed."""
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: it reads its settings then
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _load_kernels()
    target = GPUTarget("cuda", arch, 32)
    failed = 0
    for i, launch in enumerate(launches):
        fn = getattr(kernels, launch["kernel"])
        constexprs = {name: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for name, v in launch["constexprs"].items()}
        signature = dict(launch["args"]) | {name: "constexpr" for name in constexprs}
        started = time.perf_counter()
        try:
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=target, options={"num_warps": launch["num_warps"]})
            shared = compiled.metadata.shared
            status = f"ok ({len(compiled.asm['cubin'])} bytes cubin, {shared} bytes shared memory)"
            if shared > SHARED_LIMIT:
                failed += 1
                status = f"FAILED: {shared} bytes of shared memory, over the {SHARED_LIMIT} a Hopper block may have"
        except Exception as error:  # any failure: report it, go on, exit 1 at the end
            failed += 1
            status = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        flags = ", ".join(f"{n}={v}" for n, v in launch["constexprs"].items() if not isinstance(v, dict))
        print(f"[{i + 1}/{len(launches)}] {launch['kernel']} {flags}: {status} {time.perf_counter() - started:.1f} s", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default="all", help="'all' (every registered strategy) or a comma list")
    parser.add_argument("--shapes", default="pmnist,ptb,text8", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability times 10 (default 90: Hopper)")
    parser.add_argument("--json", type=Path, default=None, help="write the recorded launches here")
    parser.add_argument("--from-json", type=Path, default=None, help="compile the launches of this file only")
    parser.add_argument("--record-only", action="store_true", help="with --json: record the launches, compile nothing")
    args = parser.parse_args(argv)
    if args.from_json is None:
        # Record here, compile in a fresh process: running the host code loads Triton's interpreter,
        # which patches triton.language while it runs and is not to be mixed with compiling.
        from rnorm import norms as registry

        names = list(registry.available()) if args.norms == "all" else args.norms.split(",")
        launches = record(names, args.shapes.split(","))
        if args.record_only:
            if args.json is None:
                parser.error("--record-only needs --json")
            args.json.write_text(json.dumps(launches, indent=1) + "\n")
            print(f"{len(launches)} distinct launches written to {args.json}")
            return 0
        with tempfile.TemporaryDirectory() as folder:
            path = args.json or Path(folder) / "launches.json"
            path.write_text(json.dumps(launches, indent=1) + "\n")
            env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
            return subprocess.call([sys.executable, __file__, "--from-json", str(path), "--arch", str(args.arch)], env=env)
    launches = json.loads(args.from_json.read_text())
    print(f"{len(launches)} distinct launches")
    failed = compile_all(launches, args.arch)
    print(f"{len(launches) - failed} compiled, {failed} failed for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
