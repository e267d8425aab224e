"""A built wheel, installed in a fresh environment outside the repository, carries the configurations.

Slow (it compiles the C++ extension and runs ``rnorm fit`` in a new process): one test. Offline:
the wheel is built from a copy of the sources without build isolation, installed with
``--no-index --no-deps``, and the new environment borrows this one's dependencies (torch,
Lightning) through a ``.pth`` file rather than downloading them.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import rnorm

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "rnorm", "configs")


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_wheel_installed_elsewhere_finds_configs_by_name(tmp_path):
    source = tmp_path / "source"  # a copy: building in the repository would leave build/ behind
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(source)], cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("rnorm-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    # This environment's packages (torch, Lightning…), after the new one's own: the wheel's rnorm comes first.
    (purelib / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index", "--no-deps",
          str(wheel)], cwd=tmp_path)  # fmt: skip

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The editable rnorm_plugins of this environment is not importable there: no plugin discovery.
    env = {**os.environ, "RNORM_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": ""}
    rnorm_command = str(venv / "bin" / "rnorm")
    where = _run([str(python), "-c", "import rnorm.configs; print(rnorm.configs.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(venv)  # the wheel's copy, not the repository's
    assert _run([rnorm_command, "--version"], elsewhere, env).strip() == f"rnorm {rnorm.__version__}"
    listed = _run([rnorm_command, "configs"], elsewhere, env)
    assert "quickstart" in listed and "pmnist/bnlstm" in listed
    printed = _run([rnorm_command, "configs", "configs/pmnist/bnlstm.yaml"], elsewhere, env)  # as the headers spell it
    assert printed == (ROOT / "configs" / "pmnist" / "bnlstm.yaml").read_text()
    output = _run([rnorm_command, "fit", "--config", "quickstart", "--trainer.fast_dev_run", "true",
                   "--trainer.enable_progress_bar", "false", "--model.init_args.encoder.init_args.hidden_size", "8",
                   "--trainer.default_root_dir", str(tmp_path / "run")], elsewhere, env)  # fmt: skip
    assert "test/acc" in output
    assert list(elsewhere.iterdir()) == []
