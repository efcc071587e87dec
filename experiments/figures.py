"""One way every experiment plot is written: laid out, saved, closed (an open figure per
plot would pile up over a report's many plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: "plt.Figure", path: Path, dpi: int = 100) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
