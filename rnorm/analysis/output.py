"""Writing analysis results: numbers as CSV/JSON and figures as PNG, atomically; matplotlib optional."""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rnorm.utils.atomic import atomic_write_bytes

MATPLOTLIB_MISSING = (
    "This analysis draws its figure with matplotlib, which is not installed: install it with "
    "`pip install rnorm[plots]` (or `pip install matplotlib`), or add --no_plot to write only the numbers (CSV)."
)


class PlotsUnavailable(ImportError):
    """matplotlib is missing; the message says how to install it, or to run with ``--no_plot``."""


def require_pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend; :class:`PlotsUnavailable` if missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise PlotsUnavailable(MATPLOTLIB_MISSING) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write rows under a header to ``path`` (never half-written); returns the path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return Path(path)


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG to ``path`` (never half-written) and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    require_pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def add_analysis_parser(
    subparsers: Any, name: str, help: str, description: str | None, run: Callable[[argparse.Namespace], list[Path]]
) -> argparse.ArgumentParser:
    """Add one ``rnorm analyze`` subcommand with the options every analysis has.

    ``--output_dir`` (a :class:`~pathlib.Path`, default ``analysis``) and ``--no_plot`` (stored as
    ``plot``: write the numbers only, without matplotlib); ``run(namespace)`` is set as the
    ``run`` default and returns the written paths. The caller adds its own options, spelled with
    underscores (the dashed spellings are accepted by :func:`rnorm.analysis.cli.underscore_options`).
    """
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--output_dir", type=Path, default=Path("analysis"), help="folder to write to (default: analysis/)")
    parser.add_argument("--no_plot", dest="plot", action="store_false", help="write only the CSV (no matplotlib needed)")
    parser.set_defaults(run=run)
    return parser
