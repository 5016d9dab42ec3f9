"""The device check for the day a GPU is lent: one script, under 8 minutes on one H200.

    bash benchmarks/gpu_check.sh [OUT_DIR]            (README, "Checking a GPU")

1. The GPU tests (``tests/test_gpu.py``): FlexAttention against sdpa forward and backward, bf16
   training steps that learn, sampling (KV-cached or not, flex and sdpa).
2. One training step (forward, backward, AdamW; bf16 autocast) of the tiny, base and small presets at
   their own batch shape and attention: step time, tokens/s, achieved TFLOPS and MFU (FLOPs as
   ``transfusion plan`` counts them), and the peak memory beside the plan's estimate for that step.
3. A 200-step training of the default (tiny) model on CUDA through the training loop (no Ray),
   with its closing probes.

Each part is written to OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md as soon as it ends, so a
run stopped by its time limit keeps what it measured. ``--device cpu --quick`` runs the same parts
on CPU, shortened (tests/test_gpu_check.py keeps the script working where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transfusion import plan as P  # noqa: E402
from transfusion.config import load_params  # noqa: E402

PRESETS = {"tiny": [], "base": ["pipelines/cpu-quality.yaml"], "small": ["pipelines/gpu-1.yaml"]}


def params(overlays: list[str], overrides: list[str]):
    return load_params([REPO / "params.yaml", *(REPO / o for o in overlays)], overrides)


def gpu_peak(device: str) -> float | None:
    """The bf16 dense peak TFLOPS of this GPU, where the plan's table knows it."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()  # e.g. "NVIDIA H200": the plan's GPUs by model
    return next((gpu.bf16_tflops for gpu in P.GPUS.values() if gpu.name.split()[0] in name), None)


# ---------------------------------------------------------------------------------------------
# 1. the GPU tests
# ---------------------------------------------------------------------------------------------
def gpu_tests(out: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        (out / "gpu_tests.log").write_text(str(err.stdout or ""))
        return {"returncode": None, "summary": f"stopped after {timeout} s", "seconds": timeout}
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    summary = lines[-1].strip("= ") if lines else "no summary (see gpu_tests.log)"
    return {"returncode": proc.returncode, "summary": summary, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# 2. one training step per preset
# ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_row(name: str, device: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of preset ``name`` on one synthetic batch of its shape."""
    from transfusion.model import TransfusionModel

    cfg = params(PRESETS[name], [])
    config = P.model_config(cfg)
    if device == "cpu" and config.attention == "flex":  # flex has no CPU backward
        config = config.model_copy(update={"attention": "sdpa"})
    bf16 = device == "cuda" or P.precision_is_bf16(cfg)
    torch.manual_seed(0)
    model = TransfusionModel(config).to(device).train()
    batch = P.synthetic_batch(config, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i: int) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch, torch.Generator().manual_seed(i), loss_weight=5.0, noise_limit=0.5).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):  # compiles (flex), allocates AdamW's state
        step(i)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return _row(name, config, model, batch, bf16, seconds, device)


def _row(name: str, config, model, batch, bf16: bool, seconds: float, device: str) -> dict:
    shape = P.StepShape.of_batch(batch)
    acts, forward, _ = P.batch_estimate(config, model, batch, bf16)
    flops = 3 * forward
    total = sum(p.numel() for p in model.parameters())
    estimate = sum(P.state_bytes(model, bf16).values()) + sum(acts.values())  # weights, grads, AdamW, no EMA
    peak = gpu_peak(device)
    return {
        "preset": name,
        "attention": config.attention,
        "precision": "bf16" if bf16 else "fp32",
        "params": total,
        "rows": shape.rows,
        "length": shape.length,
        "images": shape.images,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": shape.tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / P.GB if device == "cuda" else None,
        "plan_memory_gb": estimate / P.GB,
    }


# ---------------------------------------------------------------------------------------------
# 3. a short training through the loop
# ---------------------------------------------------------------------------------------------
def training(out: Path, device: str, steps: int, quick: bool, files: list[Path]) -> dict:
    from transfusion.train.loop import train_loop
    from transfusion.train.run import TrainRun

    overrides = [
        f"train.steps={steps}",
        "train.use_ray=false",
        f"train.use_gpu={str(device == 'cuda').lower()}",
        f"paths.checkpoints={out / 'checkpoints'}",
        f"paths.runs={out / 'runs'}",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 8)}",
        f"train.eval_every={steps}",
        f"train.sample_every={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
    ]
    if quick:  # the probes at the end, shrunk
        overrides += [f"train.probe.{k}={v}" for k, v in (("val_examples", 8), ("prompts_per_category", 1))]
        overrides += ["train.probe.captions=8", "train.probe.binding_scenes=3", "train.probe.sampling.steps=3"]
    run = TrainRun.from_params(load_params(files, overrides))
    start = time.perf_counter()
    metrics = train_loop(run)
    keep = ("final_loss", "final_lm_loss", "final_diffusion_loss", "images_per_s", "tokens_per_s")
    probes = {k: metrics[k] for k in ("ema_quick_geneval_overall", "ema_quick_caption_exact") if k in metrics}
    return {"steps": steps, "seconds": time.perf_counter() - start} | {k: metrics[k] for k in keep} | probes


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device_name']}, torch {env['torch']}, {env['date']}", ""]
    if "tests" in report:
        t = report["tests"]
        lines += [
            "## 1. GPU tests",
            "",
            f"`pytest -m gpu tests/test_gpu.py`: {t['summary']} ({t['seconds']:.0f} s)",
            "",
        ]
    if report.get("steps"):
        lines += ["## 2. One training step (forward, backward, AdamW)", ""]
        lines += [
            "| preset | attention | precision | params | rows × tokens | images | step ms | tokens/s | TFLOPS "
            "| MFU | peak memory GB | plan's estimate GB |",
            "|" + "---|" * 12,
        ]
        for r in report["steps"]:
            lines.append(
                f"| {r['preset']} | {r['attention']} | {r['precision']} | {r['params'] / 1e6:.1f} M "
                f"| {r['rows']} × {r['length']} | {r['images']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
                f"| {r['tflops']:.2f} | {_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_memory_gb'], '.2f')} "
                f"| {r['plan_memory_gb']:.2f} |"
            )
        lines.append("")
    if "training" in report:
        t = report["training"]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in t.items() if k not in ("steps", "seconds"))
        lines += [f"## 3. {t['steps']}-step training of the default model", "", f"{t['seconds']:.0f} s: {shown}", ""]
    return "\n".join(lines)


def write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few steps of each part (the CPU smoke run)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--params", type=Path, action="append", help="the training part's params (default params.yaml)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (run with --device cpu --quick for the smoke run)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report: dict = {"environment": {"device_name": name, "torch": torch.__version__, "date": time.strftime("%F")}}
    if not args.skip_tests:
        report["tests"] = gpu_tests(args.out, timeout=60 if args.quick else 240)
        write(args.out, report)
    steps, warmup = (2, 1) if args.quick else (20, 5)
    report["steps"] = []
    for preset in ("tiny",) if args.quick else PRESETS:
        report["steps"].append(step_row(preset, args.device, steps, warmup))
        write(args.out, report)
    files = args.params or [REPO / "params.yaml"]
    report["training"] = training(args.out, args.device, 4 if args.quick else 200, args.quick, files)
    write(args.out, report)
    print(markdown(report))
    return 0 if report.get("tests", {}).get("returncode", 0) in (0, 5) else 1  # 5: no test collected


if __name__ == "__main__":
    sys.exit(main())
