"""Peak memory of the data and latents stages against dataset size, and latents throughput on
1 and 2 Ray Data encoder workers.

    python benchmarks/data_scale.py [--sizes 1000 100000] [--stages data latents] [--work DIR]

For each size N it writes a synthetic WebDataset of N captioned 64 px PNGs (1,000 per tar shard;
kept in --work for the next run), then runs the real stages as the CLI does (`python cli.py data`,
`python cli.py latents`, one process at a time) on the default params with that source, a
64 px canvas and a random-weight AutoencoderKL of the default architecture saved as
`vae.pretrained` (the VAE's weights do not change the cost). While a stage runs, the proportional
set size (PSS: shared pages split between the processes that share them) of its whole process
tree -- the stage, and for latents Ray's GCS, raylet and encoder actors -- is sampled every 0.25 s;
the table gives its peak. The latents stage runs with 1 worker (2 threads) and with 2 workers
(1 thread each); images/s counts encoding from Ray's start to the last shard written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the generated WebDataset of the tests, at scale


def tree_pss(root: psutil.Process) -> int:
    """PSS in bytes of ``root`` and every descendant (RSS where PSS cannot be read)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_stage(stage: str, params: Path) -> tuple[float, float, dict]:
    """Run ``python cli.py STAGE -p PARAMS``; returns (peak PSS in MiB, wall s, its metrics)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), stage, "-p", str(params)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, root = 0, psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                peak = max(peak, tree_pss(root))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{stage} failed:\n{err[-3000:]}")
    wall = time.perf_counter() - start
    p = yaml.safe_load(params.read_text())["paths"]
    metrics = json.loads(Path(p[f"{stage}_metrics" if stage != "data" else "data_metrics"]).read_text())
    return peak / 2**20, wall, metrics


def dataset(work: Path, n: int) -> Path:
    from streamed_data import make_webdataset

    folder = work / f"wds-{n}"
    done = folder / ".complete"
    if not done.is_file():
        t = time.perf_counter()
        make_webdataset(folder, n, size=64, per_shard=1000)
        done.write_text(str(n))
        print(f"# wrote {n} images as WebDataset shards in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def team_vae(work: Path) -> Path:
    import torch

    from transfusion.config import load_params
    from transfusion.vae import build_vae

    folder = work / "vae"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        build_vae(load_params(REPO / "params.yaml").vae, image_size=64).save_pretrained(str(folder))
    return folder


def write_params(work: Path, n: int, shards: Path, vae: Path, workers: int) -> Path:
    from transfusion.config import load_params

    root = work / f"run-{n}-{workers}"
    overrides = [
        "data.source=webdataset",
        f"data.stream.urls=[{shards}]",
        "data.scenes.canvas=64",
        f"vae.pretrained={vae}",
        "latents.size=16",
        f"latents.workers={workers}",
        f"latents.cpus_per_worker={2 // workers}",
    ]
    p = load_params(REPO / "params.yaml", overrides).model_dump(mode="json")
    p["paths"] = {k: v if k == "cache" else str(root / v) for k, v in p["paths"].items()}
    p["paths"]["cache"] = str(REPO / p["paths"]["cache"])
    p["paths"]["vae"] = str(vae)  # the latents stage reads the team's VAE where it is
    p["tracking"] |= {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "mlartifacts")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return root / "params.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--stages", nargs="+", choices=["data", "latents"], default=["data", "latents"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/transfusion-data-scale"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    vae = team_vae(args.work)
    rows = []
    for n in args.sizes:
        shards = dataset(args.work, n)
        for workers in (1, 2) if "latents" in args.stages else (1,):
            params = write_params(args.work, n, shards, vae, workers)
            if workers == 1 and "data" in args.stages:
                peak, wall, m = run_stage("data", params)
                rows.append(("data", n, 1, peak, wall, m["images_per_s"]))
                print(f"# {rows[-1]}", flush=True)
            if workers == 2:  # the second run reads the data the first wrote
                p = yaml.safe_load(params.read_text())
                p["paths"]["scenes"] = p["paths"]["scenes"].replace(f"run-{n}-2", f"run-{n}-1")
                params.write_text(yaml.safe_dump(p, sort_keys=False))
            if "latents" in args.stages:
                peak, wall, m = run_stage("latents", params)
                rows.append(("latents", n, workers, peak, wall, m["images_per_s"]))
                print(f"# {rows[-1]}", flush=True)
    print(f"\n{'stage':8} {'images':>8} {'workers':>7} {'peak PSS MiB':>12} {'wall s':>7} {'images/s':>9}")
    for stage, n, workers, peak, wall, ips in rows:
        print(f"{stage:8} {n:>8} {workers:>7} {peak:>12.0f} {wall:>7.1f} {ips:>9.0f}")
    for stage, workers in (("data", 1), ("latents", 1), ("latents", 2)):
        peaks = {n: peak for s, n, w, peak, *_ in rows if s == stage and w == workers}
        if len(peaks) > 1:
            small, large = min(peaks), max(peaks)
            print(f"{stage} ({workers} worker{'s' * (workers > 1)}): peak at {large} / at {small} = "
                  f"{peaks[large] / peaks[small]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
