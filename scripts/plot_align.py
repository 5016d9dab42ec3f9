"""Reward and KL curves of align experiments, side by side: ``plots/align_methods.png``.

Reads ``plots/align.csv`` from each named DVC experiment (``git show <exp>:plots/align.csv``,
experiments by name as ``dvc exp list`` shows them) and draws the training reward (a 10-iteration
moving mean) and, where there is one, the KL to the trained model.

    python scripts/plot_align.py grpo-ray grpo-two-objects raft raft-replay-lr1e-4
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
from pathlib import Path

import numpy as np


def rows_of(experiment: str) -> list[dict[str, float]]:
    ref = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", f"refs/exps/*/*/{experiment}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not ref:
        raise SystemExit(f"{experiment}: no such DVC experiment (dvc exp list)")
    text = subprocess.run(["git", "show", f"{ref[0]}:plots/align.csv"], capture_output=True, text=True, check=True)
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text.stdout))]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("plots/align_methods.png"))
    args = ap.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in args.experiments:
        rows = rows_of(name)
        it = [r["iteration"] for r in rows]
        reward = np.convolve([r["reward"] for r in rows], np.ones(10) / 10, mode="valid")  # iterations 10..
        left.plot(it[9:], reward, label=name)
        if "kl" in rows[0]:
            right.plot(it, [r["kl"] for r in rows], label=name)
    left.set(xlabel="iteration", ylabel="training reward (10-iteration mean)", title="judged GenEval reward")
    right.set(xlabel="iteration", ylabel="KL to the trained model", title="Flow-GRPO's KL")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
