"""Curves of the in-training probes (EMA weights) against images seen, from one or more
``plots/train_probes.csv`` files.

    python scripts/plot_probes.py [--panels conditioning|binding] OUT.png LABEL=CSV [LABEL=CSV ...]

``conditioning`` (default): quick GenEval-style accuracy and caption exact match. ``binding``:
the relation-flip and colour-swap rankings (``transfusion.eval.binding``), reading (caption NLL)
and writing (diffusion loss), with the 0.5 chance line.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PANELS = {
    "conditioning": [
        ("ema_quick_geneval_overall", "GenEval-style overall (quick, GenEval's rule)"),
        ("ema_quick_caption_exact", "caption exact (100 val scenes)"),
    ],
    "binding": [
        ("ema_binding_read_position", "position, read (caption NLL)"),
        ("ema_binding_write_position", "position, write (diffusion loss)"),
        ("ema_binding_read_color_attr", "colour binding, read (caption NLL)"),
        ("ema_binding_write_color_attr", "colour binding, write (diffusion loss)"),
    ],
}


def main(out: str, series: list[str], panels: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = PANELS[panels]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), sharex=True, squeeze=False)
    for item in series:
        label, path = item.split("=", 1)
        rows = list(csv.DictReader(Path(path).open()))
        seen = [float(r["images_seen"]) / 1000 for r in rows]
        for ax, (key, _) in zip(axes[0], keys):
            ax.plot(seen, [float(r[key]) if r.get(key) else float("nan") for r in rows], marker="o", label=label)
    for ax, (_, title) in zip(axes[0], keys):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("images seen (thousands)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if panels == "binding":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--panels", choices=sorted(PANELS), default="conditioning")
    ap.add_argument("out")
    ap.add_argument("series", nargs="+", metavar="LABEL=CSV")
    args = ap.parse_args()
    main(args.out, args.series, args.panels)
