"""What every benchmark plot ends with: grid, legend, layout, the PNG written (folders made), the figure closed."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, ax, path: str | Path) -> Path:
    """Grid + legend on ``ax``, tight layout, write ``path`` (parents created), free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
