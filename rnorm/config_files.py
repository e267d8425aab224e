"""rnorm's YAML configurations, by name, wherever rnorm is installed.

The repository's ``configs/`` folder is installed as the package ``rnorm.configs`` (a wheel
carries it; an editable install maps it). A configuration's **name** is its path below that
folder without the suffix: ``quickstart``, ``pmnist/bnlstm``. ``rnorm fit --config NAME`` accepts
a name wherever it accepts a file, also written ``configs/pmnist/bnlstm.yaml`` as in the
configurations' own headers; **a file that exists wins** over a name. ``rnorm configs`` lists the
names, ``rnorm configs NAME`` prints one.

>>> "quickstart" in available() and find("configs/quickstart.yaml") == find("quickstart")
True
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

__all__ = ["available", "config_root", "find", "resolve_config_arguments"]

SUFFIXES = (".yaml", ".yml")
CONFIG_OPTIONS = ("--config", "-c")


def config_root() -> Path:
    """The folder of the installed configurations (the package ``rnorm.configs``)."""
    spec = importlib.util.find_spec("rnorm.configs")
    if spec is None or spec.origin is None:  # pragma: no cover - a broken install
        raise FileNotFoundError("rnorm's configurations are not installed (the package rnorm.configs is missing)")
    return Path(spec.origin).parent


def available() -> dict[str, str]:
    """Every configuration name, sorted, with the first line of its header comment."""
    root = config_root()
    names = {_name(path, root): path for suffix in SUFFIXES for path in root.rglob(f"*{suffix}")}
    return {name: _description(names[name]) for name in sorted(names)}


def find(name: str) -> Path | None:
    """The installed configuration called ``name`` (``pmnist/bnlstm``, ``pmnist/bnlstm.yaml`` or
    ``configs/pmnist/bnlstm.yaml``), or ``None``."""
    key = name.replace("\\", "/").removeprefix("./").removeprefix("configs/")
    for suffix in SUFFIXES:
        key = key.removesuffix(suffix)
    root = config_root()
    for suffix in SUFFIXES:
        path = root / f"{key}{suffix}"
        if path.is_file() and path.resolve().is_relative_to(root.resolve()):  # no escape with `..`
            return path
    return None


def resolve_config_arguments(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value that is not a file replaced by the installed
    configuration of that name.

    Raises:
        FileNotFoundError: a value is neither a file nor a configuration name.
    """
    resolved = list(args)
    for i, arg in enumerate(resolved):
        option, equals, value = arg.partition("=")
        if option not in CONFIG_OPTIONS:
            continue
        if equals:
            resolved[i] = f"{option}={_resolve(value)}"
        elif i + 1 < len(resolved):
            resolved[i + 1] = _resolve(resolved[i + 1])
    return resolved


def _resolve(value: str) -> str:
    if Path(value).is_file():
        return value
    path = find(value)
    if path is None:
        raise FileNotFoundError(
            f"No configuration file {value!r}, and no installed configuration of that name. "
            "`rnorm configs` lists the names (e.g. quickstart, pmnist/bnlstm)."
        )
    return str(path)


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _description(path: Path) -> str:
    """The first line of the file's header comment, without the ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return text
    return ""
