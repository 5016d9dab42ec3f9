"""End to end: `dvc repro` of the real dvc.yaml on the real params shrunk by pipelines/cpu-tiny.yaml.

Uses the pinned raw archives (cached under the repo's .cache/archives after the first download).
Checks that a second repro does nothing, that a VAE param change re-runs only what depends on
the VAE (vae, latents, train, eval), and that `dvc push` to a remote, a fresh clone and `dvc pull`
give a clean `dvc status` and a working `transfusion generate`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from transfusion.config import load_params

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def test_dvc_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "cli.py", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for folder in ("transfusion", "stages"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = load_params([REPO / "params.yaml", REPO / "pipelines" / "cpu-tiny.yaml"])
    resolved = params.model_dump(mode="json")
    resolved["paths"]["cache"] = str(REPO / ".cache" / "archives")
    resolved["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    first = _run(["dvc", "repro"], repo)
    assert sorted(_ran(first)) == sorted(["data", "tokenizer", "vae", "latents", "train", "judge", "eval"])
    for key in (
        "data_metrics",
        "tokenizer_metrics",
        "vae_metrics",
        "latents_metrics",
        "train_metrics",
        "judge_metrics",
        "eval_metrics",
    ):
        assert json.loads((repo / resolved["paths"][key]).read_text())
    assert json.loads((repo / "metrics/latents.json").read_text())["scaled_train_std"] > 0.99
    assert (repo / "dvc.lock").is_file()

    second = _run(["dvc", "repro"], repo)
    assert _ran(second) == [], second

    resolved["vae"]["steps"] = 20
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    third = _run(["dvc", "repro"], repo)
    assert _ran(third) == ["vae", "latents", "train", "eval"], third

    metrics = _run(["dvc", "metrics", "show", "--json"], repo)
    assert "test_psnr" in metrics and "scaling_factor" in metrics and "final_diffusion_loss" in metrics
    assert (repo / resolved["paths"]["model"] / "model.safetensors").is_file()
    evaluation = json.loads((repo / resolved["paths"]["eval_metrics"]).read_text())
    assert {"text_bits_per_byte", "text_perplexity", "caption_exact", "judge_ok"} <= set(evaluation)
    if evaluation["judge_ok"]:  # judge-based scores only from a judge that passed its bar
        assert "geneval_overall" in evaluation and "fid_judge" in evaluation
    else:
        assert not any(k.startswith(("geneval_", "fid_")) for k in evaluation)
    assert (repo / resolved["paths"]["geneval"] / "00000" / "metadata.jsonl").is_file()
    # the judge runs before training: the in-training probes include the quick judged evaluation
    probes = (repo / resolved["paths"]["train_probes"]).read_text().splitlines()
    assert {"images_seen", "ema_quick_geneval_overall", "ema_quick_caption_exact", "diffusion_uncond_b3"} <= set(
        probes[0].split(",")
    )
    assert len(probes) == 1 + 2  # eval_every 6 of 12 steps
    sweep = repo / resolved["paths"]["cfg_sweep_plot"]
    assert sweep.read_text().splitlines()[0] == "cfg_scale,geneval_overall,scene_match_overall"
    assert len(sweep.read_text().splitlines()) == (1 + 2 if evaluation["judge_ok"] else 1)  # cfg_sweep [1, 3]

    # a teammate's clone gets every output through a DVC remote (a local folder; S3 works the same)
    _run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo)
    _run(["dvc", "push"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "pipeline"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / resolved["paths"]["model"]).exists()
    _run(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone)
    for key in ("scenes", "latents", "tokenizer", "vae", "judge", "model"):
        assert (clone / resolved["paths"][key]).is_dir(), key
    png = tmp_path / "from-clone.png"
    _run(["python", "cli.py", "generate", "a 7", "-n", "1", "--steps", "2", "--out", str(png)], clone)
    assert png.read_bytes()[:4] == b"\x89PNG"
