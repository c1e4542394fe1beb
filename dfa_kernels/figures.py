"""Writing a matplotlib figure, the same way for the zoo, the studies and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, dpi: int = 110, **savefig_kwargs) -> Path:
    """Lay `fig` out, write it to `path` (its folder created) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **savefig_kwargs)
    plt.close(fig)
    return path
