"""Conditioning curves for the README: quick GenEval-style accuracy and caption exact match
(EMA weights) against images seen, from one or more ``plots/train_probes.csv`` files.

    python scripts/plot_probes.py OUT.png LABEL=CSV [LABEL=CSV ...]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(out: str, series: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for item in series:
        label, path = item.split("=", 1)
        rows = list(csv.DictReader(Path(path).open()))
        seen = [float(r["images_seen"]) / 1000 for r in rows]
        for ax, key in zip(axes, ("ema_quick_geneval_overall", "ema_quick_caption_exact")):
            ax.plot(seen, [float(r[key]) for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("GenEval-style overall (quick, GenEval's rule)", "caption exact (100 val scenes)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("images seen (thousands)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
