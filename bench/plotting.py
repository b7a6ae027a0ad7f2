"""The figures' common start and finish: pyplot on the Agg backend (files only, no display), and one call
that labels a figure, lays it out, writes it and closes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported when a command first draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, ax: Any = None, xlabel: str | None = None, ylabel: str | None = None,
                title: str | None = None, suptitle: str | None = None, title_size: float = 10,
                legend_size: float | None = None, dpi: int = 110) -> None:
    """Labels `ax` (xlabel, ylabel, title; a legend when legend_size is given), titles the whole figure
    (suptitle), then tight_layout, writes `path` at `dpi` and closes the figure."""
    if ax is not None:
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        if ylabel is not None:
            ax.set_ylabel(ylabel)
        if title is not None:
            ax.set_title(title, fontsize=title_size)
        if legend_size is not None:
            ax.legend(fontsize=legend_size)
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
