"""End-to-end training throughput of the default config through Ray Train, 1 vs 2 workers.

    python benchmarks/train_ray.py [--steps 60] [--params params.yaml]

Runs the real training stage (`stages.train.run`, Ray Train, DDP over gloo on CPU) for a few
steps on the latents and tokenizer the pipeline produced, writing only under a temp folder, and
prints steps/s and tokens/s of the loop (rank 0's timing, start-up excluded) and the wall time
including Ray start-up. Each worker gets `cpus` CPUs; on a 2-core machine 2 workers share them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    from stages import train
    from transfusion.config import load_params

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for workers in (1, 2):
            root = Path(tmp) / f"w{workers}"
            cpus = max(1, 2 // workers)
            p = load_params(
                args.params,
                [
                    f"train.num_workers={workers}",
                    f"train.cpus_per_worker={cpus}",
                    f"train.steps={args.steps}",
                    "train.warmup_steps=5",
                    "train.log_every=10",
                    f"train.checkpoint_every={args.steps}",
                    f"train.sample_every={args.steps}",
                    "train.sampling.steps=2",
                    f"paths.checkpoints={root}/ck",
                    f"paths.model={root}/model",
                    f"paths.runs={root}/runs",
                    f"paths.train_metrics={root}/m.json",
                    f"paths.train_loss_plot={root}/loss.csv",
                    f"paths.train_samples={root}/s.png",
                    f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
                ],
            )
            start = time.perf_counter()
            m = train.run(p)
            wall = time.perf_counter() - start
            rows.append((workers, cpus, m["steps"] / m["wall_s"], m["tokens_per_s"], m["images_per_s"], wall))
            print(json.dumps(m), flush=True)
    print(f"default config, {args.steps} steps, batch {p.train.batch_size} examples per worker")
    print("| workers | CPUs each | steps/s | tokens/s | images/s | wall incl. Ray start (s) |")
    print("|---|---|---|---|---|---|")
    for w, c, sps, tps, ips, wall in rows:
        print(f"| {w} | {c} | {sps:.2f} | {tps:,.0f} | {ips:,.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
