"""Matplotlib figures without pyplot: made on an Agg canvas, so nothing touches global backend
state and a figure is freed once it goes out of scope; written as PNGs atomically."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loralab.io_utils import atomic_write_bytes


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches, constrained layout, on its own canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_plot(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temp file in the same folder + rename); return the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
