"""The shapes of the benchmark reports: text tables, and charts with matplotlib loaded on demand (headless).

`table(lines)` aligns a header and its rows in columns with a rule under the header. matplotlib is
optional: `pyplot()` is None without it, and a chart writer then returns NO_MATPLOTLIB as its note instead
of a file. `save_figure` titles, lays out, writes and closes a figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(lines: Sequence[Sequence[str]]) -> list[str]:
    """`lines[0]` (the header) and the rows below it in left-aligned columns two spaces apart, a rule of
    dashes under the header, trailing spaces stripped."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return out


NO_MATPLOTLIB = "matplotlib is not installed: no chart (pip install matplotlib)"


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend (no display needed), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, title: str, filename: str, dpi: int = 120) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(filename, dpi=dpi)
    plt.close(fig)
