"""The ``rnorm`` command line.

Training commands (``rnorm fit|validate|test|predict`` on LightningCLI) are not implemented yet;
until then the command offers only what exists: listing the registered normalizers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import rnorm
from rnorm import norms


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rnorm`` console script and of ``python -m rnorm``."""
    parser = argparse.ArgumentParser(prog="rnorm", description="Normalized recurrent networks.")
    parser.add_argument("--version", action="version", version=f"rnorm {rnorm.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("normalizers", help="list every registered normalization strategy (plugins included)")
    args = parser.parse_args(argv)
    if args.command == "normalizers":
        entries = norms.available()
        width = max(map(len, entries))
        for name, description in entries.items():
            print(f"{name:<{width}}  {description}")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
