"""Matplotlib figures (matplotlib is optional: ``pip install ponder[plot]``; imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (raises ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (parent folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def accuracy_vs_macs(series: dict[str, Sequence[tuple[float, float]]], path: str | Path,
                     title: str = "accuracy vs cost") -> Path:
    """One line (or point) per model: ``series[label] = [(macs_per_image, accuracy_percent), ...]``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in series.items():
        pts = sorted(pts)
        xs = [p[0] / 1e6 for p in pts]
        ys = [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=label, linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel("mean MACs per image (millions)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)

