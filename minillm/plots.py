"""Charts drawn with matplotlib (the `plots` extra): the loss curves of a run. No Lightning, no torch: the report
imports it too."""

from __future__ import annotations

import csv
from pathlib import Path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOTS_HINT = "matplotlib is not installed (pip install 'minillm-lab[plots]'; in a checkout: pip install -e '.[plots]')"


def read_metric(csv_path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def plot_losses(csv_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = read_metric(csv_path, key)
        if steps:
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
