"""The ``rnorm`` command line.

``rnorm fit|validate|test|predict --config CONFIG``: Lightning's ``LightningCLI``
(:mod:`rnorm.lightning_cli`); ``CONFIG`` is a YAML file or the name of an installed configuration
(``quickstart``, ``pmnist/bnlstm``: :mod:`rnorm.config_files`). ``rnorm normalizers`` lists the
registered normalization strategies, ``rnorm configs`` the installed configurations, and
``rnorm analyze …`` reproduces the papers' analysis figures (:mod:`rnorm.analysis`).

This module imports neither Lightning nor torch: ``rnorm --help``, ``--version`` and ``configs``
answer at once, ``normalizers`` after importing torch only.

Errors in the user's input — a wrong option value, a missing data folder, a malformed data file
or checkpoint, an unknown strategy — are printed as one message, with exit status 1 (2 for a
command line the parser rejects), instead of a traceback; ``--debug`` (anywhere on the command
line) or the environment variable ``RNORM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import rnorm

HELP = """usage: rnorm {fit,validate,test,predict} --config CONFIG [options]
       rnorm configs [NAME]
       rnorm normalizers
       rnorm analyze ANALYSIS [options]
       rnorm --version

Commands:
  fit, validate, test, predict   Lightning's commands; see `rnorm fit --help`
  configs [NAME]                 list the installed configurations, or print one
  normalizers                    list the registered normalization strategies
  analyze ANALYSIS               the papers' analysis figures; see `rnorm analyze --help`

CONFIG is a YAML file or an installed configuration's name: `rnorm fit --config quickstart`.
--debug (or RNORM_DEBUG=1) shows the traceback of an error.
"""

DEBUG_ENV = "RNORM_DEBUG"
DEBUG_FLAG = "--debug"


def print_normalizers() -> None:
    """Print every registered strategy with its one-line description."""
    from rnorm import norms

    _print_table(norms.available())


def print_configs(args: Sequence[str]) -> int:
    """``rnorm configs``: every installed configuration with its description; ``rnorm configs NAME``: its YAML."""
    from rnorm import config_files

    if not args:
        _print_table(config_files.available())
        return 0
    if len(args) > 1 or args[0].startswith("-"):
        print("usage: rnorm configs [NAME]", file=sys.stderr)
        return 2
    path = config_files.find(args[0])
    if path is None:
        names = ", ".join(config_files.available())
        raise FileNotFoundError(f"No installed configuration named {args[0]!r}. Available names: {names}.")
    sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0


def _print_table(entries: dict[str, str]) -> None:
    width = max(map(len, entries), default=0)
    for name, description in entries.items():
        print(f"{name:<{width}}  {description}")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a problem with the user's input rather than a bug.

    rnorm's checks raise ``ValueError`` (and its subclasses: format errors of data files and
    checkpoints, configuration errors) or ``FileNotFoundError`` naming what is wrong; so does
    Lightning's ``MisconfigurationException``, and the analyses' ``PlotsUnavailable`` (matplotlib
    is missing). The same types raised inside other libraries, and every other exception, keep
    their traceback.
    """
    if type(error).__name__ == "MisconfigurationException":
        return True
    if not isinstance(error, (ValueError, FileNotFoundError, ImportError)):
        return False
    if isinstance(error, ImportError):
        from rnorm.analysis.output import PlotsUnavailable

        return isinstance(error, PlotsUnavailable)  # says how to install matplotlib, or to do without
    return _raised_in_rnorm(error)


def _raised_in_rnorm(error: BaseException) -> bool:
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    package = Path(rnorm.__file__).resolve().parent
    return Path(traceback.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rnorm`` console script and of ``python -m rnorm``; returns the exit status."""
    from_python = argv is not None
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [arg for arg in args if arg != DEBUG_FLAG]
    try:
        return _run(args, from_python)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"rnorm: error: {error}", file=sys.stderr)
        print(f"(rnorm {DEBUG_FLAG} … or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 1


def _run(args: list[str], from_python: bool) -> int:
    command = args[0] if args else None
    if command == "normalizers":
        print_normalizers()
        return 0
    if command == "configs":
        return print_configs(args[1:])
    if command == "analyze":
        from rnorm.analysis.cli import main as analyze

        return analyze(args[1:])
    if command == "--version":
        print(f"rnorm {rnorm.__version__}")
        return 0
    if command is None or command in ("-h", "--help"):
        print(HELP, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    from rnorm.lightning_cli import run

    return run(args, from_python)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
