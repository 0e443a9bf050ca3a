"""Figures shared by scripts/plot_runs.py and scripts/measure_sharpness.py (matplotlib, files only)."""

import math
from pathlib import Path


def draw_panels(panels, output, title=None, xlabel="optimizer step", columns=2):
    """A PNG of panels [(title, [(label, steps, values), ...])], one line per label; empty panels say so."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.75 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, lines) in zip(axes.flat, panels):
        drawn = 0
        for label, steps, values in lines:
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=label)
                drawn += 1
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
