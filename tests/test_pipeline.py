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

import pytest
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


def _repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository with the project's pipeline and code."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "cli.py", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for folder in ("transfusion", "stages"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    return repo


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> tuple[Path, dict, str]:
    """A repository after its first `dvc repro` of the tiny preset: (folder, params, output)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    repo = _repo(tmp_path)
    params = load_params([REPO / "params.yaml", REPO / "pipelines" / "cpu-tiny.yaml"])
    resolved = params.model_dump(mode="json")
    resolved["paths"]["cache"] = str(REPO / ".cache" / "archives")
    resolved["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return repo, resolved, _run(["dvc", "repro"], repo)


def test_dvc_repro_end_to_end(tiny_repo, tmp_path):
    repo, resolved, first = tiny_repo
    assert sorted(_ran(first)) == sorted(
        ["data", "tokenizer", "vae", "latents", "train", "judge", "reader", "align", "eval", "track"]
    )
    for key in (
        "data_metrics",
        "tokenizer_metrics",
        "vae_metrics",
        "latents_metrics",
        "train_metrics",
        "judge_metrics",
        "reader_metrics",
        "align_metrics",
        "eval_metrics",
    ):
        assert json.loads((repo / resolved["paths"][key]).read_text())
    assert json.loads((repo / "metrics/latents.json").read_text())["scaled_test_std"] == pytest.approx(1.0, abs=0.1)
    assert (repo / "dvc.lock").is_file()

    second = _run(["dvc", "repro"], repo)
    assert _ran(second) == ["track"], second  # only the closing stage, which adds no pipeline run

    resolved["vae"]["steps"] = 20
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    third = _run(["dvc", "repro"], repo)
    assert _ran(third) == ["vae", "latents", "train", "align", "eval", "track"], third

    metrics = _run(["dvc", "metrics", "show", "--json"], repo)
    assert "test_psnr" in metrics and "scaling_factor" in metrics and "final_diffusion_loss" in metrics
    assert (repo / resolved["paths"]["model"] / "model.safetensors").is_file()
    # eval read the aligned model (align on a Ray worker, as the tiny preset says)
    aligned = json.loads((repo / resolved["paths"]["align_metrics"]).read_text())
    assert aligned["enabled"] == 1.0 and aligned["iterations"] == resolved["align"]["iterations"]
    assert (repo / resolved["paths"]["aligned_model"] / "model.safetensors").is_file()
    assert len((repo / resolved["paths"]["align_plot"]).read_text().splitlines()) == 1 + resolved["align"]["iterations"]
    evaluation = json.loads((repo / resolved["paths"]["eval_metrics"]).read_text())
    assert {"text_bits_per_byte", "text_perplexity", "caption_exact", "judge_ok"} <= set(evaluation)
    if evaluation["judge_ok"]:  # judge-based scores only from a judge that passed its bar
        assert "geneval_overall" in evaluation and "fid_judge" in evaluation
        assert {"reader_geneval_overall", "reader_gap_overall", "seen_geneval_overall"} <= set(evaluation)
    else:
        assert not any(k.startswith(("geneval_", "fid_")) for k in evaluation)
    assert (repo / resolved["paths"]["geneval"] / "00000" / "metadata.jsonl").is_file()
    # binding rankings are teacher-forced on real scenes: there with or without a judge
    assert evaluation["binding_scenes_position"] > 0 and 0.0 <= evaluation["binding_read_position"] <= 1.0
    # the judge runs before training: the in-training probes include the quick judged evaluation
    probes = (repo / resolved["paths"]["train_probes"]).read_text().splitlines()
    assert {"images_seen", "ema_quick_geneval_overall", "ema_quick_caption_exact", "diffusion_uncond_b3"} <= set(
        probes[0].split(",")
    )
    assert len(probes) == 1 + 2  # eval_every 6 of 12 steps
    sweep = repo / resolved["paths"]["cfg_sweep_plot"]
    assert sweep.read_text().splitlines()[0].startswith("cfg_scale,geneval_overall,geneval_overall_se,")
    rows = sweep.read_text().splitlines()
    assert len(rows) == (1 + 2 if evaluation["judge_ok"] else 1)  # cfg_sweep [1, 5]
    if evaluation["judge_ok"]:  # the sweep's row at the headline's scale and steps is the headline
        at_headline = dict(zip(rows[0].split(","), rows[2].split(",")))
        assert float(at_headline["cfg_scale"]) == 5.0
        assert float(at_headline["geneval_overall"]) == pytest.approx(evaluation["geneval_overall"])

    # a teammate's clone gets every output through a DVC remote (a local folder; S3 works the same)
    _run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo)
    _run(["dvc", "push"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "pipeline"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / resolved["paths"]["model"]).exists()
    _run(["dvc", "pull"], clone)
    assert " ".join(_run(["dvc", "status"], clone).split()) == "track: always changed"  # all else current
    for key in ("scenes", "latents", "tokenizer", "vae", "judge", "model"):
        assert (clone / resolved["paths"][key]).is_dir(), key
    png = tmp_path / "from-clone.png"
    _run(["python", "cli.py", "generate", "a 7", "-n", "1", "--steps", "2", "--out", str(png)], clone)
    assert png.read_bytes()[:4] == b"\x89PNG"


STAGES = ["data", "tokenizer", "vae", "latents", "train", "judge", "reader", "align", "eval"]


def _pipeline_runs(tracking) -> dict[str, dict]:
    """Every pipeline run (MLflow parent) by name, with its stage runs by stage."""
    from mlflow import MlflowClient

    from transfusion.tracking import as_dict, find_parents, tracking_uri

    client = MlflowClient(tracking_uri(tracking))
    out = {}
    for parent in find_parents(tracking, last=100):
        children = client.search_runs(
            [client.get_run(parent["run_id"]).info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent['run_id']}'",
        )
        parent["stages"] = {r.data.tags["dvc_stage"]: as_dict(r) for r in children}
        out[parent["name"]] = parent
    return out


def test_each_pipeline_run_is_an_mlflow_parent_with_its_stages_lineage_and_registered_model(tiny_repo, tmp_path):
    """The repro(s) of the e2e test and two `dvc exp run`s: one parent each, every stage nested
    (cached ones linked to the run that produced them), headline metrics equal to the eval run's,
    inputs as datasets with their dvc.lock digests; models:/transfusion@latest samples an image,
    a wrong alias is one line, `promote` sets champion, `runs --compare` shows both experiments."""
    repo, resolved, _ = tiny_repo
    _run(["dvc", "repro"], repo)  # (whatever an earlier test changed)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "base", "--allow-empty"], repo)
    tracking = load_params(repo / "params.yaml").tracking
    before = _pipeline_runs(tracking)
    assert before, "the first dvc repro made no pipeline run"
    first = list(before.values())[-1]  # the oldest: the first `dvc repro`, every stage ran
    assert sorted(first["stages"]) == sorted(STAGES)
    assert all(r["tags"]["transfusion.role"] == "stage" for r in first["stages"].values())
    for name, seed in (("seed-a", 1), ("seed-b", 2)):
        out = _run(["dvc", "exp", "run", "-n", name, "-S", f"eval.seed={seed}"], repo)
        assert _ran(out) == ["eval", "track"], out
    after = _pipeline_runs(tracking)
    assert set(after) - set(before) == {"seed-a", "seed-b"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]  # the workspace holds seed-b
    newest = next(iter(before.values()))
    for name in ("seed-a", "seed-b"):
        parent = after[name]
        assert sorted(parent["stages"]) == sorted(STAGES), name
        assert parent["status"] == "FINISHED" and parent["params"] == {"eval.seed": str(1 + (name == "seed-b"))}
        ran = parent["stages"]["eval"]
        assert ran["tags"]["transfusion.role"] == "stage" and ran["status"] == "FINISHED"
        for stage in STAGES[:-1]:  # skipped by DVC: linked to the run of the newest repro that made it
            cached = parent["stages"][stage]
            assert cached["tags"]["transfusion.role"] == "cached", stage
            assert cached["tags"]["transfusion.produced_by"] == newest["stages"][stage]["tags"].get(
                "transfusion.produced_by", newest["stages"][stage]["run_id"]
            ), stage
            assert cached["metrics"] == {} and cached["params"] == {}  # linked, not re-logged
        headline = {k: v for k, v in ran["metrics"].items() if k in parent["metrics"]}
        assert {"text_bits_per_byte", "caption_exact"} <= set(headline)
        assert parent["metrics"] == pytest.approx(
            headline | {k: parent["metrics"][k] for k in ("train_wall_s", "train_images_per_s")}
        )
    # lineage: the eval run's inputs carry the digests dvc.lock gives them; git commit and dirty flag
    from mlflow import MlflowClient

    from transfusion.tracking import tracking_uri

    client = MlflowClient(tracking_uri(tracking))
    eval_run = client.get_run(after["seed-b"]["stages"]["eval"]["run_id"])
    datasets = {d.dataset.name: d.dataset for d in eval_run.inputs.dataset_inputs}
    produced = {o["path"]: o["md5"] for entry in lock.values() for o in entry.get("outs", [])}
    assert {"aligned_model", "judge", "reader", "scenes", "text"} <= set(datasets)
    for name, dataset in datasets.items():
        assert dataset.digest == produced[resolved["paths"][name]].removesuffix(".dir"), name
        assert json.loads(dataset.source)["uri"] == (repo / resolved["paths"][name]).resolve().as_uri()
    assert eval_run.data.tags["git_dirty"] in ("true", "false") and len(eval_run.data.tags["git_commit"]) == 40
    eval_lock = {k: v for k, v in eval_run.data.tags.items() if k.startswith("dvc.dep.")}
    assert eval_lock == {f"dvc.dep.{d['path']}": d["md5"] for d in lock["eval"]["deps"]}

    # the registry: latest is the newest pipeline run's model; a wrong alias is one line
    png = tmp_path / "latest.png"
    _run(["python", "cli.py", "generate", "a 7", "-n", "1", "--steps", "2", "-m", "models:/transfusion@latest",
          "--out", str(png)], repo)  # fmt: skip
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(["python", "cli.py", "caption", str(png), "-m", "models:/transfusion@nope"], cwd=repo,
                         env=_env(), capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "models:/transfusion@nope" in bad.stderr
    promoted = _run(["python", "cli.py", "promote", "--metric", "text_bits_per_byte", "--lower-is-better"], repo)
    assert "transfusion@champion -> version" in promoted
    import mlflow

    from transfusion.tracking.store import use

    use(mlflow, tracking_uri(tracking))  # (without exporting MLFLOW_TRACKING_URI to later tests)
    drawn = mlflow.pyfunc.load_model("models:/transfusion@champion").predict(["a 7"])  # pyfunc, no pickle
    assert drawn.shape[0] == 1 and drawn.shape[-1] == 3 and str(drawn.dtype) == "uint8"
    table = _run(["python", "cli.py", "runs", "--compare", "--run", "seed-a", "--run", "seed-b"], repo)
    header, *rows = table.splitlines()
    assert header.split() == ["seed-a", "seed-b"]
    assert any(r.split() == ["param", "eval.seed", "1", "2"] for r in rows), table
    assert any(r.startswith("text_bits_per_byte") for r in rows), table
    missing = subprocess.run(["python", "cli.py", "runs", "--compare", "--run", "nope"], cwd=repo, env=_env(),
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: --compare nope: no pipeline run of that name or id in 'transfusion'"
    ]


def _caption_folder(folder: Path, n: int = 24) -> Path:
    """Free-form captioned images of several sizes: coloured shapes on a grey ground."""
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    lines = []
    folder.mkdir(parents=True)
    for i in range(n):
        colour, shape = list(colours)[i % 3], ("square", "circle")[i // 3 % 2]
        size = (40 + 8 * (i % 4), 36 + 4 * (i % 5))
        im = Image.new("RGB", size, (128, 128, 128))
        box = (8, 8, size[0] - 8, size[1] - 8)
        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colours[colour])
        im.save(folder / f"img-{i:02d}.png")
        lines.append(json.dumps({"file": f"img-{i:02d}.png", "caption": f"a {colour} {shape} on grey"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 state dict with random weights (the real file cannot be
    downloaded here): FID/KID run through the real extractor, on meaningless features."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None
    real_url = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = original
        fe.load_state_dict_from_url = real_url
    torch.save(net.state_dict(), path)
    return path


def test_dvc_repro_on_a_caption_folder_without_a_judge(tmp_path):
    """`data.source: caption_folder` end to end: no scene content, so no judge and no GenEval
    prompts; evaluation is FID/KID on Inception features, captions compared as text, and text."""
    repo = _repo(tmp_path)
    params = load_params([REPO / "params.yaml", REPO / "pipelines" / "cpu-tiny.yaml"])
    resolved = params.model_dump(mode="json")
    resolved["paths"]["cache"] = str(REPO / ".cache" / "archives")
    resolved["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resolved["data"] |= {"source": "caption_folder", "caption_folder": str(_caption_folder(tmp_path / "mine"))}
    resolved["data"] |= {"val_fraction": 0.2, "test_fraction": 0.25}
    resolved["train"] |= {"use_ray": False}
    resolved["align"] |= {"enabled": False}  # no judge, no reward: the trained model passes through
    resolved["eval"] |= {
        "feature_extractor": "inception",
        "inception_weights": str(_random_inception_weights(tmp_path / "inception.pt")),
        "fid_samples": 6,
        "prompt_file": str(tmp_path / "evaluation_metadata.jsonl"),  # GenEval prompts to draw for its scorer
    }
    prompts = [
        {"tag": "single_object", "include": [{"class": "7", "count": 1}], "prompt": "a 7"},
        {"tag": "counting", "include": [{"class": "5", "count": 3}], "exclude": [{"class": "5", "count": 4}],
         "prompt": "three 5s"},
    ]  # fmt: skip
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    out = _run(["dvc", "repro"], repo)
    assert sorted(_ran(out)) == sorted(
        ["data", "tokenizer", "vae", "latents", "train", "judge", "reader", "align", "eval", "track"]
    )
    judge = json.loads((repo / resolved["paths"]["judge_metrics"]).read_text())
    assert judge["judge_available"] == 0.0
    assert "no scene content" in (repo / resolved["paths"]["judge"] / "no-judge.json").read_text()
    evaluation = json.loads((repo / resolved["paths"]["eval_metrics"]).read_text())
    assert not any(k.startswith(("geneval_", "scene_match_", "fid_judge", "caption_exact")) for k in evaluation)
    for key in ("fid_inception", "kid_inception", "fid_inception_real_train_vs_test", "caption_token_f1"):
        assert key in evaluation and evaluation[key] == evaluation[key], key  # present, not NaN
    assert 0.0 <= evaluation["caption_text_exact"] <= 1.0 and evaluation["text_bits_per_byte"] > 0
    probes = (repo / resolved["paths"]["train_probes"]).read_text().splitlines()[0].split(",")
    assert "ema_caption_loss" in probes and not any("quick_" in k for k in probes)
    # eval.prompt_file through the stage: GenEval's layout for its own scorer, images_per_prompt each
    layout = repo / resolved["paths"]["geneval"]
    assert sorted(p.name for p in layout.iterdir()) == ["00000", "00001"]
    assert json.loads((layout / "00001" / "metadata.jsonl").read_text()) == prompts[1]
    assert len(list((layout / "00001" / "samples").glob("*.png"))) == resolved["eval"]["images_per_prompt"]


@pytest.mark.parametrize(
    ("source", "n"),
    [
        ("webdataset", 160),
        pytest.param("webdataset", 2000, marks=pytest.mark.slow),
        pytest.param("parquet", 2000, marks=pytest.mark.slow),
    ],
)
def test_dvc_repro_on_a_streamed_source_with_a_pretrained_vae(tmp_path, source, n):
    """A WebDataset / Parquet set of 64 px images with a few corrupt records, and a team's own
    AutoencoderKL: data -> latents (Ray Data, 2 workers) -> tiny train -> eval under `dvc repro`."""
    from streamed_data import make_parquet, make_webdataset, save_pretrained_vae

    repo = _repo(tmp_path)
    make = make_webdataset if source == "webdataset" else make_parquet
    shards = make(tmp_path / "shards", n, 64, 400, bad=(3, 10))
    params = load_params([REPO / "params.yaml", REPO / "pipelines" / "cpu-tiny.yaml"])
    resolved = params.model_dump(mode="json")
    resolved["paths"]["cache"] = str(REPO / ".cache" / "archives")
    resolved["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resolved["data"] |= {"source": source, "val_fraction": 0.1, "test_fraction": 0.15, "max_bad_fraction": 0.02}
    resolved["data"]["stream"] |= {"urls": [str(shards)], "caption_key": "txt" if source == "webdataset" else "text"}
    resolved["data"]["scenes"] |= {"canvas": 64, "shard_size": 64 if n < 1000 else 256}
    resolved["vae"] |= {"pretrained": str(save_pretrained_vae(tmp_path / "team-vae"))}
    resolved["latents"] |= {"size": 16, "workers": 2, "cpus_per_worker": 1}
    resolved["train"] |= {"use_ray": False}
    resolved["align"] |= {"enabled": False}
    resolved["eval"] |= {
        "feature_extractor": "inception",
        "inception_weights": str(_random_inception_weights(tmp_path / "inception.pt")),
        "fid_samples": 8,
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    out = _run(["dvc", "repro"], repo)
    assert sorted(_ran(out)) == sorted(
        ["data", "tokenizer", "vae", "latents", "train", "judge", "reader", "align", "eval", "track"]
    )
    data = json.loads((repo / resolved["paths"]["data_metrics"]).read_text())
    assert data["records_read"] == n and data["bad_records"] == 2 and len(data["bad_records_first"]) == 2
    assert data["train_images"] + data["val_images"] + data["test_images"] == n - 2
    vae = json.loads((repo / resolved["paths"]["vae_metrics"]).read_text())
    assert vae["pretrained"] == 1.0 and vae["scaling_factor_config"] == pytest.approx(0.5)
    latents = json.loads((repo / resolved["paths"]["latents_metrics"]).read_text())
    assert latents["images"] == n - 2 and latents["workers"] == 2 and latents["images_per_s"] > 0
    assert latents["decode_test_psnr"] == pytest.approx(vae["test_psnr"], abs=0.05)
    meta = json.loads((repo / resolved["paths"]["latents"] / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 16, 16]
    evaluation = json.loads((repo / resolved["paths"]["eval_metrics"]).read_text())
    assert evaluation["fid_inception"] == evaluation["fid_inception"] and evaluation["text_bits_per_byte"] > 0
    assert _ran(_run(["dvc", "repro"], repo)) == ["track"]  # nothing else is stale


@pytest.mark.slow  # two tiny train + eval experiments side by side: ~4 min (make test-all)
def test_two_queued_experiments_in_parallel_are_two_mlflow_runs(tiny_repo):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both succeed, each is its own MLflow
    run in the one database (no "database is locked"), and `dvc exp show` and MLflow agree on
    their params and metrics."""
    import time

    from transfusion.tracking import find_runs

    repo, resolved, _ = tiny_repo
    _run(["dvc", "repro"], repo)  # (whatever an earlier test changed)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "base", "--allow-empty"], repo)
    lrs = {"lr-a": "0.001", "lr-b": "0.004"}
    for name, lr in lrs.items():  # one torch thread each: two processes share the two cores
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", "-S", "train.use_ray=false"], repo)
    env = _env() | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, check=True, capture_output=True)
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
        rows = [line for line in status.splitlines() if any(n in line for n in lrs)]
        if len(rows) == 2 and all(("Success" in r or "Failed" in r) for r in rows):
            break
        time.sleep(5)
    assert all("Success" in r for r in rows), status + _run(["dvc", "queue", "logs", "lr-a"], repo)[-2000:]

    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True,
                                      text=True, check=True).stdout)  # fmt: skip
    dvc_rows = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                if rev.get("name") in lrs:
                    params = data["params"]["params.yaml"]["data"]
                    metrics = data["metrics"][resolved["paths"]["train_metrics"]]["data"]
                    dvc_rows[rev["name"]] = (str(params["train"]["lr"]), metrics["final_loss"])
    assert sorted(dvc_rows) == sorted(lrs)
    tracking = load_params(repo / "params.yaml").tracking
    runs = [r for r in find_runs(tracking, "train") if r["params"].get("train.use_ray") == "False"]
    assert len(runs) == 2 and all(r["status"] == "FINISHED" for r in runs)
    mlflow_rows = sorted((float(r["params"]["train.lr"]), r["metrics"]["final_loss"]) for r in runs)
    assert mlflow_rows == sorted((float(lr), loss) for lr, loss in dvc_rows.values())
    assert len({r["run_id"] for r in find_runs(tracking, "eval")}) >= 3  # the base run's eval + one per experiment
    # each queued experiment is its own pipeline run (parent), named after it, its train run nested
    parents = _pipeline_runs(tracking)
    assert {"lr-a", "lr-b"} <= set(parents)
    for name, lr in lrs.items():
        assert parents[name]["status"] == "FINISHED" and parents[name]["params"]["train.lr"] == lr
        assert parents[name]["stages"]["train"]["tags"]["transfusion.role"] == "stage"
        assert parents[name]["stages"]["train"]["params"]["train.lr"] == lr
