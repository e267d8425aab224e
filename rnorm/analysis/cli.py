"""``rnorm analyze COMMAND``: one subcommand per analysis module.

Options are spelled with underscores, as in LightningCLI (``--ckpt_path``, ``--output_dir``,
``--no_plot``); the dashed spellings (``--output-dir``) are accepted too, in one place:
:func:`underscore_options` rewrites a dashed long option to the underscore option of that name
before parsing, so each subcommand declares only the underscore spelling.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence


def build_parser() -> argparse.ArgumentParser:
    """The ``rnorm analyze`` parser, one subcommand per analysis (each module's ``add_parser``)."""
    from rnorm.analysis import curves, gradient_flow, normprop_gradient, population_stats, tanh_derivative

    parser = argparse.ArgumentParser(prog="rnorm analyze", description="Reproduce the papers' analysis figures.")
    commands = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for module in (gradient_flow, tanh_derivative, population_stats, normprop_gradient, curves):
        module.add_parser(commands)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and its subcommands' parsers, recursively."""
    yield parser
    for action in parser._actions:  # argparse has no public way to list them
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _parsers(subparser)


def underscore_options(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """``args`` with each dashed long option (``--output-dir``, ``--output-dir=x``) spelled as the
    underscore option the parser declares (``--output_dir``); anything else, and everything after
    ``--``, unchanged.

    >>> parser = argparse.ArgumentParser()
    >>> _ = parser.add_argument("--output_dir")
    >>> underscore_options(parser, ["--output-dir=a", "--output-dir", "b", "--other-x", "--", "--output-dir"])
    ['--output_dir=a', '--output_dir', 'b', '--other-x', '--', '--output-dir']
    """
    declared = {option for p in _parsers(parser) for action in p._actions for option in action.option_strings}
    rewritten = list(args)
    for i, arg in enumerate(rewritten):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        alias = "--" + name[2:].replace("-", "_")
        if name.startswith("--") and name not in declared and alias in declared:
            rewritten[i] = alias + equals + value
    return rewritten


def main(argv: Sequence[str]) -> int:
    """Run one analysis and print every file it wrote."""
    parser = build_parser()
    args = parser.parse_args(underscore_options(parser, argv))
    for path in args.run(args):
        print(f"wrote {path}")
    return 0
