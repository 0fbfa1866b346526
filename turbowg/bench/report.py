"""Charts of the benchmark reports: matplotlib loaded on demand (headless), one figure saved the same way.

matplotlib is optional: `pyplot()` is None without it, and a chart writer then returns NO_MATPLOTLIB as
its note instead of a file. `save_figure` titles, lays out, writes and closes a figure.
"""

from __future__ import annotations

from typing import Any

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
