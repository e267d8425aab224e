#!/usr/bin/env bash
# The GPU check, one command for a machine with an NVIDIA GPU (docs/performance.md, "Running the GPU check").
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default: a new folder under /tmp)
#
# Needs python3 with torch (CUDA), triton and pytest; no network, no install, no jsonargparse: rnorm is
# imported from this checkout (PYTHONPATH), without its compiled CPU kernels, which CUDA does not use.
# Stages, each with its own time limit (475 s together) so that the whole stays under 8 minutes:
#   1. what is there: GPU, driver, torch, triton; that rnorm.nn, rnorm.kernels and the benchmark import
#      without jsonargparse or rnorm.cli;
#   2. the CUDA tests: the Triton kernels against the reference loop (tests/kernels/test_triton.py,
#      float32, bf16, TF32, captured graphs), test_fused's CUDA comparison (which takes cuDNN for
#      none and wn) and torch's LSTM path on one weight buffer (tests/kernels/test_cudnn.py);
#   3. benchmarks/triton_variants.py: graphs on/off, tl.dot or torch.mm products, TF32, at pMNIST and PTB;
#   4. benchmarks/rnn_speed.py on the papers' shapes, every strategy, training and inference, peak memory;
#   5. the same with TF32 products (cuDNN's LSTM uses TF32 by default), at PTB and text8.
# Writes gpu_check.log, tests.xml, variants.json, speed.json, speed_tf32.json under $OUT; prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RNORM_DISABLE_PLUGIN_AUTOLOAD=1
unset TRITON_INTERPRET
log="$OUT/gpu_check.log"
status=()
started=$SECONDS

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run with a time limit, log everything, remember the result
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  local begin=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  status+=("$name: exit $rc after $((SECONDS - begin)) s")
  echo "=== $name: exit $rc after $((SECONDS - begin)) s" | tee -a "$log"
}

stage machine 40 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; python3 -c "
import sys, torch, triton
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)
print(\"device\", torch.cuda.get_device_name(0), \"allow_tf32 matmul/cudnn\", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(\".\")[0] == \"jsonargparse\" or name == \"rnorm.cli\" or name.startswith(\"lightning.pytorch.cli\"):
            raise ImportError(\"refused in the GPU check: \" + name)
sys.meta_path.insert(0, Refuse())
sys.path.insert(0, \"benchmarks\")
import rnorm.nn, rnorm.kernels, rnn_speed, triton_variants
from rnorm.kernels import resolve_backend
print(\"imports without jsonargparse: ok; fused on cuda float32 runs\", resolve_backend(\"auto\", torch.device(\"cuda\"), torch.float32, False))
"'
stage tests 150 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/kernels/test_triton.py "tests/nn/test_fused.py::test_cuda_matches_reference" \
  "tests/kernels/test_cudnn.py::test_cuda_runs_cudnn_on_one_weight_buffer"
stage variants 70 python3 benchmarks/triton_variants.py --json "$OUT/variants.json"
stage speed 170 python3 benchmarks/rnn_speed.py --device cuda --shapes pmnist,ptb,text8 --norms all \
  --modes train,infer --repeats 3 --warmup 2 --json "$OUT/speed.json"
stage speed_tf32 45 python3 benchmarks/rnn_speed.py --device cuda --shapes ptb,text8 --norms bn,ln,none \
  --modes train,infer --repeats 3 --warmup 2 --tf32 --json "$OUT/speed_tf32.json"

{
  echo "=== summary ($((SECONDS - started)) s in all; files in $OUT)"
  printf '%s\n' "${status[@]}"
} | tee -a "$log"
