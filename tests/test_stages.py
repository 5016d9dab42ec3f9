"""The four first stages on the tiny params: outputs, latent scaling, decode round trip, MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transfusion.data.latents import LatentReader, load_meta, shard_tasks
from transfusion.data.prepare import load_image_split, read_text_split
from transfusion.data.scenes import parse_caption, satisfies
from transfusion.data.shards import read_shards
from transfusion.vae import decode, encode, load_vae, psnr


def test_data_outputs(tiny_pipeline):
    p = tiny_pipeline
    for split, n in (("train", 400), ("val", 40), ("test", 60)):
        part = load_image_split(p.paths.scenes, split)
        assert part.images.shape == (n, 32, 32, 3) and part.images.dtype == np.uint8
        assert all(satisfies(r["content"], parse_caption(r["caption"])) for r in part.records)
    works = json.loads((p.paths.text / "works.json").read_text())
    assert len(works["val"]) == 1 and len(works["test"]) == 1 and len(works["train"]) == 6
    assert not set(works["train"]) & set(works["test"])
    assert read_text_split(p.paths.text, "test").strip()
    assert p.paths.data_examples.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_scenes_use_only_mnist_test_digits(tiny_pipeline, tiny_mnist):
    with np.load(tiny_mnist) as npz:
        n_test = len(npz["x_test"])
    records = load_image_split(tiny_pipeline.paths.scenes, "test").records
    assert max(i for r in records for i in r["mnist_index"]) < n_test


def test_tokenizer_stage_output(tiny_pipeline):
    from transfusion.data.tokenizer import image_token_ids, load_tokenizer

    tok = load_tokenizer(tiny_pipeline.paths.tokenizer)
    assert 256 + 5 < len(tok) <= 512  # the tiny corpus has fewer merges than the budget
    boi, eoi = image_token_ids(tok)
    assert tok("a red 4<boi><eoi>")["input_ids"][-2:] == [boi, eoi]


def test_latents_have_unit_variance_and_decode_back(tiny_pipeline):
    p = tiny_pipeline
    meta = load_meta(p.paths.latents)
    rows = list(LatentReader(p.paths.latents, "train"))
    train, train_records = torch.stack([z for z, _ in rows]).numpy(), [r for _, r in rows]
    assert train.shape == (400, 4, 8, 8)
    assert float(train.std()) == pytest.approx(1.0, abs=1e-3)  # the reader scales to unit variance
    vae = load_vae(p.paths.vae)
    # the shards hold the VAE's posterior means of the train images, in order; the reader x factor
    shards, _ = read_shards(p.paths.latents / "train", "latents")
    train_images = load_image_split(p.paths.scenes, "train").images
    raw = encode(vae, train_images[:16]).numpy()
    np.testing.assert_allclose(shards[:16], raw, rtol=0, atol=1e-5)
    np.testing.assert_allclose(train, shards * meta["scaling_factor"], rtol=1e-6)
    assert [r["caption"] for r in train_records[:16]] == [
        r["caption"] for r in load_image_split(p.paths.scenes, "train").records[:16]
    ]

    test_images = load_image_split(p.paths.scenes, "test").images
    stored, records = read_shards(p.paths.latents / "test", "latents")
    decoded = decode(vae, torch.from_numpy(stored))
    reconstructed = decode(vae, encode(vae, test_images))
    assert np.abs(decoded.astype(int) - reconstructed.astype(int)).max() <= 1
    assert psnr(test_images, decoded) == pytest.approx(psnr(test_images, reconstructed), abs=0.05)
    assert [r["caption"] for r in records] == [r["caption"] for r in load_image_split(p.paths.scenes, "test").records]
    metrics = json.loads(p.paths.latents_metrics.read_text())
    assert metrics["decode_test_psnr"] == pytest.approx(psnr(test_images, decoded), abs=0.05)
    assert metrics["shards_encoded"] == len(shard_tasks(p.paths.scenes)) and metrics["images_per_s"] > 0


def test_streaming_reader_shards_rows_across_workers(tiny_pipeline):
    root = tiny_pipeline.paths.latents
    everything = [(r["shard"], r["row"]) for _, r in LatentReader(root, "train")]
    assert len(everything) == 400 and len(set(everything)) == 400
    parts = [[(r["shard"], r["row"]) for _, r in LatentReader(root, "train", rank=k, world_size=3)] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(everything)
    assert [len(x) for x in parts] == [len(LatentReader(root, "train", rank=k, world_size=3)) for k in range(3)]

    a = [r["row"] for _, r in LatentReader(root, "train", shuffle=True, seed=1)]
    b = [r["row"] for _, r in LatentReader(root, "train", shuffle=True, seed=1)]
    c = [r["row"] for _, r in LatentReader(root, "train", shuffle=True, seed=2)]
    assert a == b and a != c and sorted(a) == sorted(r for _, r in everything)

    latent, record = next(iter(LatentReader(root, "val")))
    assert latent.shape == (4, 8, 8) and latent.dtype == torch.float32 and "caption" in record
    repeated = LatentReader(root, "val", repeat=True)
    assert sum(1 for _, _ in zip(range(100), repeated)) == 100  # cycles past the 40 rows


def test_mlflow_runs_hold_params_metrics_and_tags(tiny_pipeline):
    from transfusion.lineage import git_state
    from transfusion.tracking import find_runs

    runs = {r["name"]: r for r in find_runs(tiny_pipeline.tracking)}
    assert {"data", "tokenizer", "vae", "latents"} <= set(runs)  # (other tests add judge, train runs)
    vae_run = runs["vae"]
    assert vae_run["status"] == "FINISHED"
    assert vae_run["tags"]["dvc_stage"] == "vae"
    assert vae_run["tags"]["params_hash"] == tiny_pipeline.digest()
    assert vae_run["tags"]["git_commit"] == git_state()[0]
    assert vae_run["params"]["vae.steps"] == "30"
    vae_metrics = json.loads(tiny_pipeline.paths.vae_metrics.read_text())
    assert vae_run["metrics"]["test_psnr"] == pytest.approx(vae_metrics["test_psnr"])
    assert {"loss", "mse", "kl", "lr"} <= set(vae_run["metrics"])
    assert runs["latents"]["metrics"]["scaled_test_std"] == pytest.approx(1.0, abs=0.1)
    assert runs["data"]["metrics"]["train_images"] == 400


def test_mlflow_uri_from_environment(tiny_params, tmp_path, monkeypatch):
    from transfusion.errors import MissingInput
    from transfusion.tracking import find_runs, stage_run

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run(tiny_params, "probe") as run:
        run.log_metrics({"x": 1.5})
    assert (tmp_path / "elsewhere.db").is_file()
    assert [r["metrics"] for r in find_runs(tiny_params.tracking, "probe")] == [{"x": 1.5}]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(MissingInput, match="no tracking database there"):  # the params' own: never created
        find_runs(tiny_params.tracking, "probe")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_does_not_redirect_later_runs(tiny_params, tmp_path):
    import os

    from transfusion.tracking import stage_run

    with stage_run(tiny_params, "probe"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


NEW = {"registered_model": "transfusion", "system_metrics": False, "system_metrics_interval_s": 10}


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    from transfusion.config import TrackingConfig
    from transfusion.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    cfg = lambda uri: TrackingConfig(experiment="x", tracking_uri=uri, artifact_location=None, **NEW)  # noqa: E731
    assert tracking_uri(cfg("sqlite:///mlflow.db")) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(cfg("sqlite:////abs/x.db")) == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg("sqlite:///mlflow.db")) == "http://127.0.0.1:5000"


def test_artifact_location_follows_the_store(tmp_path, monkeypatch):
    """Artifacts sit beside a sqlite database (not in the current folder); a tracking server keeps
    its own (its --artifacts-destination); a URI is taken as given."""
    from transfusion.config import TrackingConfig
    from transfusion.tracking import artifact_location

    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(experiment="x", tracking_uri="unused", artifact_location="mlartifacts", **NEW)
    db = tmp_path / "elsewhere" / "mlflow.db"
    assert artifact_location(cfg, f"sqlite:///{db}") == (db.parent / "mlartifacts").as_uri()
    assert artifact_location(cfg, "http://127.0.0.1:5000") is None
    assert artifact_location(cfg, "file:///srv/mlruns") == (tmp_path / "mlartifacts").as_uri()
    s3 = cfg.model_copy(update={"artifact_location": "s3://bucket/mlflow"})
    assert artifact_location(s3, "http://127.0.0.1:5000") == "s3://bucket/mlflow"
    assert artifact_location(cfg.model_copy(update={"artifact_location": None}), f"sqlite:///{db}") is None


def test_runs_reads_only_and_refuses_bad_stage_names(tiny_params, tmp_path):
    """`transfusion runs` never builds a filter from an unchecked name, and a mistyped sqlite URI
    is an error instead of a new empty database."""
    import yaml
    from typer.testing import CliRunner

    from cli import app

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(tiny_params.model_dump(mode="json")))
    r = CliRunner().invoke(app, ["runs", "-p", str(params), "--stage", "x' OR '1'='1"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: --stage \"x' OR '1'='1\": a stage name is")
    typo = tmp_path / "mlfow.db"
    r = CliRunner().invoke(app, ["runs", "-p", str(params), "-S", f"tracking.tracking_uri=sqlite:///{typo}"])
    assert r.exit_code == 2 and "no tracking database there" in r.output
    assert not typo.exists()


def test_two_stages_starting_at_once_on_a_fresh_database(tiny_params, tmp_path):
    """`dvc queue start -j 2` on a fresh clone: two processes open their first run on a sqlite
    file that does not exist yet; both succeed, in one experiment."""
    import subprocess
    import sys

    import yaml

    from transfusion.tracking import find_runs

    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(tiny_params.model_dump(mode="json")))
    code = (
        "import sys; from transfusion.config import load_params; from transfusion.tracking import stage_run\n"
        "with stage_run(load_params(sys.argv[1]), sys.argv[2]) as run: run.log_metrics({'x': 1.0})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(params), stage], stderr=subprocess.PIPE, text=True)
        for stage in ("vae", "judge")
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sorted(r["name"] for r in find_runs(tiny_params.tracking)) == ["judge", "vae"]
