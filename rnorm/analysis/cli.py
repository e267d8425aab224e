"""``rnorm analyze COMMAND``: one subcommand per analysis module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The ``rnorm analyze`` parser, one subcommand per analysis (each module's ``add_parser``)."""
    from rnorm.analysis import curves, gradient_flow, normprop_gradient, population_stats, tanh_derivative

    parser = argparse.ArgumentParser(prog="rnorm analyze", description="Reproduce the papers' analysis figures.")
    commands = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for module in (gradient_flow, tanh_derivative, population_stats, normprop_gradient, curves):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one analysis and print every file it wrote."""
    args = build_parser().parse_args(list(argv))
    for path in args.run(args):
        print(f"wrote {path}")
    return 0
