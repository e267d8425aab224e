"""`rnorm fit --trainer.strategy ddp` end to end: two CPU processes (gloo) train, validate and test.

That synchronized statistics equal one process's statistics of the concatenated batch is checked
at the module level in tests/functional/test_distributed.py; this runs the whole command.
"""

import re
import subprocess
import sys
from pathlib import Path

import torch


def test_fit_with_ddp_on_two_cpu_processes(tmp_path):
    command = [
        sys.executable, "-m", "rnorm", "fit",
        "--config", "configs/quickstart.yaml",
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.init_args.encoder.init_args.hidden_size", "8",
        "--population_statistics.num_batches", "2",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"test/acc\s+[0-9.]+", output), output[-2000:]
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    # Exact population statistics were estimated (under DDP: from both processes' batches).
    assert state["encoder.cells.0.recurrent_norm.running_mean"].shape == (28, 4 * 8)  # T_max = 28 rows, 4H features
    assert (state["encoder.cells.0.recurrent_norm.num_batches_tracked"] == 2).all()
