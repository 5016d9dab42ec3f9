"""benchmarks/gpu_check.py, the prepared device script, kept working where there is no GPU: its
CPU smoke run (--device cpu --quick) measures a training step of the tiny preset and trains 4 steps
through the loop, and writes the JSON and Markdown it will write on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import REPO


def test_gpu_check_smoke_run_on_cpu(tiny_pipeline, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_pipeline.model_dump(mode="json"), sort_keys=False))
    out = tmp_path / "check"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--skip-tests"]
    proc = subprocess.run([*cmd, "--out", str(out), "--params", str(params)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    (row,) = report["steps"]
    assert row["preset"] == "tiny" and row["step_ms"] > 0 and row["tflops"] > 0
    assert row["mfu"] is None and row["peak_memory_gb"] is None  # no GPU: no peak, no MFU
    assert row["rows"] * row["length"] >= 32  # the preset's batch shape, packed
    training = report["training"]
    assert training["steps"] == 4 and training["final_loss"] == training["final_loss"]  # a number, not NaN
    assert (out / "checkpoints").is_dir()  # the loop's own checkpoints, under OUT_DIR
    table = (out / "gpu_check.md").read_text()
    assert "| tiny | sdpa |" in table and "4-step training" in table


def test_gpu_check_refuses_without_cuda_when_asked_for_it(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "no CUDA device here" in proc.stderr
