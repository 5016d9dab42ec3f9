"""Training: the plain loop learns; Ray Train with 2 workers survives a crash and resumes into
the same MLflow run; NaN stops the run keeping a loadable checkpoint; bad checkpoints are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import free_port, section, wait_for_http
from transfusion.config import Params
from transfusion.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

FAULT = section("train").fault  # no faults (params.yaml)


def train_params(base: Params, tmp_path, **train) -> Params:
    """The tiny pipeline's params with training outputs and tracking under ``tmp_path``."""
    paths = base.paths.model_copy(
        update={
            "checkpoints": tmp_path / "ck",
            "model": tmp_path / "model",
            "runs": tmp_path / "runs",
            "train_metrics": tmp_path / "train.json",
            "train_loss_plot": tmp_path / "loss.csv",
            "train_samples": tmp_path / "samples.png",
            "train_probes": tmp_path / "probes.csv",
            "judge": tmp_path / "no-judge",  # probes without the quick judged evaluation (tests/test_eval.py has it)
        }
    )
    tracking = base.tracking.model_copy(
        update={
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "mlartifacts"),
        }
    )
    tc = base.train.model_copy(update=train)
    return base.model_copy(update={"paths": paths, "tracking": tracking, "train": tc})


def test_plain_loop_lowers_the_loss_and_writes_only_checkpoints(tiny_pipeline, tmp_path):
    from torch.optim.swa_utils import AveragedModel

    from transfusion.model import TransfusionModel
    from transfusion.train.loop import load_trained, train_loop
    from transfusion.train.run import TrainRun

    p = train_params(
        tiny_pipeline,
        tmp_path,
        use_ray=False,
        steps=60,
        batch_size=8,
        lr=3e-3,
        log_every=5,
        checkpoint_every=30,
        sample_every=60,
        warmup_steps=5,
        eval_every=25,
    )
    cfg = TrainRun.from_params(p)
    metrics = train_loop(cfg)
    assert metrics["steps"] == 60 and metrics["tokens_per_s"] > 0 and metrics["images_per_s"] > 0
    assert [c.name for c in list_checkpoints(p.paths.checkpoints)] == ["step-00000030", "step-00000060"]
    for output in ("model", "train_metrics", "train_loss_plot", "train_samples", "train_probes"):
        assert not getattr(p.paths, output).exists(), output  # the stage writes the outputs, not the loop

    result = load_trained(cfg, metrics)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 12 and result.history[-1]["step"] == 60
    assert losses[-1] < 0.7 * losses[0], losses
    # the exported weights are the EMA of the final checkpoint, not its raw weights
    raw = TransfusionModel(result.model.config)
    ema = AveragedModel(raw, use_buffers=True)
    load_checkpoint(latest_checkpoint(p.paths.checkpoints), raw, ema=ema)
    for (name, a), b in zip(result.model.state_dict().items(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), raw.state_dict().values()))
    # conditioning probes at every eval_every steps and at the end, raw and EMA, against images seen
    probes = result.probes
    assert [r["step"] for r in probes] == [25, 50, 60]
    assert 0 < probes[0]["images_seen"] < probes[1]["images_seen"] < probes[2]["images_seen"] == metrics["images_seen"]
    assert not any(k.startswith("quick_") for k in probes[0])  # no judge here
    # the final probe row is of the weights that were exported: probing the loaded EMA model
    # again (outside the loop, the same val rows and seed) gives the same numbers
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.eval.probe import load_probe_data, probe_rows, run_probes
    from transfusion.pipeline import TransfusionPipeline

    pc = cfg.train.probe
    rows = max(probe_rows(pc), 7 * pc.binding_scenes)
    data = load_probe_data(cfg.paths.latents, load_tokenizer(cfg.paths.tokenizer), rows, cfg.paths.judge, cfg.palette)
    pipe = TransfusionPipeline.from_parts(result.model, cfg.paths.tokenizer, cfg.paths.vae, cfg.paths.latents)
    again = run_probes(pipe, data, pc, cfg.probe_sampling, seed=cfg.train.seed)
    for key in ("diffusion_cond_b0", "diffusion_uncond_b3", "caption_loss", "caption_loss_shuffled"):
        assert again[key] == pytest.approx(probes[-1]["ema_" + key], rel=1e-5), key
        assert probes[-1][key] != pytest.approx(probes[-1]["ema_" + key], rel=1e-5), key  # raw and EMA differ


def _first_step(p: Params) -> dict:
    """The log sums of the first optimizer step of ``p``'s run, from the same initial weights."""
    from transfusion.train.loop import Runtime, TrainState, _optimizer_step
    from transfusion.train.run import TrainRun

    cfg, rt = TrainRun.from_params(p), Runtime()
    torch.manual_seed(0)
    st = TrainState(cfg, rt)
    return _optimizer_step(st, cfg, rt, step=1) | {"bf16": st.bf16}


def test_grad_accum_gives_the_gradient_of_the_larger_batch(tiny_pipeline, tmp_path):
    """Text-only chunks of one length: 2 micro-batches of 4 examples have the loss and the
    gradient norm of one batch of 8 (the same 8 examples, the same weights)."""
    text_only = tiny_pipeline.mixture.model_copy(update={"caption_to_image": 0.0, "image_to_caption": 0.0})
    base = train_params(tiny_pipeline, tmp_path, use_ray=False, precision="fp32").model_copy(
        update={"mixture": text_only}
    )
    one = _first_step(base.model_copy(update={"train": base.train.model_copy(update={"batch_size": 8})}))
    two = _first_step(
        base.model_copy(update={"train": base.train.model_copy(update={"batch_size": 4, "grad_accum": 2})})
    )
    assert one["tokens"] == two["tokens"] > 0 and one["images"] == two["images"] == 0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    half = _first_step(base.model_copy(update={"train": base.train.model_copy(update={"batch_size": 4})}))
    assert half["grad_norm"] != pytest.approx(one["grad_norm"], rel=1e-3)  # a different batch: a different gradient


def test_bf16_precision_runs_under_autocast(tiny_pipeline, tmp_path):
    """``train.precision: bf16`` trains under bf16 autocast: finite, close to fp32, not equal to it."""
    fp32 = _first_step(train_params(tiny_pipeline, tmp_path, use_ray=False, precision="fp32"))
    bf16 = _first_step(train_params(tiny_pipeline, tmp_path, use_ray=False, precision="bf16"))
    assert bf16["bf16"] and not fp32["bf16"]
    assert torch.isfinite(torch.tensor([bf16["loss"], bf16["grad_norm"]])).all()
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05) and bf16["loss"] != fp32["loss"]


def test_nan_stops_the_run_and_keeps_a_loadable_checkpoint(tiny_pipeline, tmp_path):
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.model import TransfusionModel
    from transfusion.train.loop import TrainingDiverged, train_loop
    from transfusion.train.run import TrainRun

    p = train_params(
        tiny_pipeline,
        tmp_path,
        use_ray=False,
        steps=12,
        checkpoint_every=4,
        fault=FAULT.model_copy(update={"nan_at_step": 7}),
    )
    with pytest.raises(TrainingDiverged, match="at step 7") as err:
        train_loop(TrainRun.from_params(p))
    last = latest_checkpoint(p.paths.checkpoints)
    assert last.name == "step-00000004" and str(last) in str(err.value)
    model = TransfusionModel.from_params(p.model, p.diffusion, p.sampling, load_tokenizer(p.paths.tokenizer), (4, 8, 8))
    state = load_checkpoint(last, model)
    assert state["step"] == 4
    assert all(torch.isfinite(q).all() for q in model.parameters())


def test_bad_checkpoints_are_refused(tiny_pipeline, tmp_path):
    from transfusion.train.loop import train_loop
    from transfusion.train.run import TrainRun

    p = train_params(tiny_pipeline, tmp_path, use_ray=False, steps=4, checkpoint_every=4, sample_every=4)
    train_loop(TrainRun.from_params(p))
    ck = latest_checkpoint(p.paths.checkpoints)
    verify_checkpoint(ck)

    broken = tmp_path / "broken"
    shutil.copytree(ck, broken)
    (broken / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        verify_checkpoint(broken)
    shutil.rmtree(broken)
    shutil.copytree(ck, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        verify_checkpoint(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing or unreadable manifest.json"):
        verify_checkpoint(broken)

    # the same through the CLI: one line, exit 1
    import yaml
    from typer.testing import CliRunner

    from cli import app

    (ck / "trainer.json").write_text("{}")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", "-p", str(params_file), "--resume"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"error: {ck}: trainer.json")


def test_resume_from_the_final_checkpoint_finishes_and_exports(tiny_pipeline, tmp_path):
    """Interrupted after the last checkpoint but before the outputs: --resume exports them."""
    from stages import train
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.train.loop import train_loop
    from transfusion.train.run import TrainRun

    p = train_params(
        tiny_pipeline,
        tmp_path,
        use_ray=False,
        steps=4,
        checkpoint_every=2,
        sample_every=2,
        eval_every=4,
        log_every=2,
        warmup_steps=1,
    )
    train_loop(TrainRun.from_params(p))  # the loop finished; no stage outputs yet
    assert not p.paths.model.exists()
    metrics = train.run(p, resume=True)
    assert metrics["steps"] == 4 and metrics["steps_this_run"] == 0 and metrics["resumed_at_step"] == 4
    pipe = TransfusionPipeline.from_pretrained(p.paths.model)
    assert pipe.run_id == metrics["mlflow_run_id"]
    assert [row.split(",")[0] for row in p.paths.train_loss_plot.read_text().splitlines()] == ["step", "2", "4"]
    assert p.paths.train_samples.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(p.paths.train_metrics.read_text())["steps"] == 4


def test_training_logs_to_a_tracking_server(tiny_pipeline, tmp_path):
    """The cluster set-up: an MLflow tracking server (sqlite backend, artifacts proxied to its
    --artifacts-destination) on loopback; the training stage logs its metrics and sample grid
    through it, and a client reads both back over HTTP."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from stages import train

    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(port, "/health", server, tmp_path / "server.log", "mlflow server")
        p = train_params(
            tiny_pipeline, tmp_path, use_ray=False, steps=4, checkpoint_every=4, sample_every=4, log_every=2,
            warmup_steps=1, eval_every=4,
        )  # fmt: skip
        tracking = p.tracking.model_copy(update={"tracking_uri": uri, "artifact_location": "mlartifacts"})
        p = p.model_copy(update={"tracking": tracking})
        metrics = train.run(p)
        client = MlflowClient(uri)
        run_id = metrics["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
        assert client.get_run(run_id).data.metrics["final_loss"] == metrics["final_loss"]
        grid = client.download_artifacts(run_id, "samples/step-00000004.png", str(tmp_path / "back"))
        assert open(grid, "rb").read(4) == b"\x89PNG"
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
        assert list((store / "artifacts").rglob("step-00000004.png"))  # ... into its destination
        assert not (tmp_path / "mlartifacts").exists() and not any(tmp_path.rglob("mlartifacts"))

        # the registry through the server: the export registered, then read back by alias over HTTP
        import mlflow

        from transfusion.pipeline import TransfusionPipeline
        from transfusion.tracking import registry
        from transfusion.tracking.store import use

        use(mlflow, uri)
        assert registry.register(mlflow, client, "transfusion", run_id, p.paths.model) == "1"
        client.set_registered_model_alias("transfusion", "champion", "1")
        for alias in ("latest", "champion"):
            pipe = TransfusionPipeline.from_uri(f"models:/transfusion@{alias}", uri)  # what -m does
            assert pipe.sample_images(["a 7"], steps=2).shape == (1, pipe.image_size, pipe.image_size, 3)
        assert list((store / "artifacts").rglob("MLmodel"))  # uploaded through the server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow  # two Ray workers, a crash, a restart and a resume: ~2 min (make test-all)
def test_ray_two_workers_survive_a_crash_and_resume(tiny_pipeline, tmp_path, ray_local):
    from mlflow import MlflowClient

    from stages import train
    from transfusion.tracking import find_runs, tracking_uri

    p = train_params(
        tiny_pipeline,
        tmp_path,
        use_ray=True,
        num_workers=2,
        cpus_per_worker=1,
        steps=12,
        checkpoint_every=4,
        log_every=2,
        sample_every=12,
        max_failures=1,
        fault=FAULT.model_copy(update={"crash_at_step": 6}),
    )
    metrics = train.run(p)  # crashes at step 6, Ray restarts the workers, they resume from step 4
    assert metrics["steps"] == 12 and metrics["steps_this_run"] == 8
    runs = find_runs(p.tracking, "train")
    assert len(runs) == 1
    run_id = runs[0]["run_id"]
    client = MlflowClient(tracking_uri(p.tracking))
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 12
    for key in ("loss", "lm_loss", "diffusion_loss", "lr", "grad_norm", "tokens_per_s", "images_per_s"):
        assert client.get_metric_history(run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step-00000012.png"]
    state = json.loads((latest_checkpoint(p.paths.checkpoints) / "trainer.json").read_text())
    assert set(state["data"]) == {"0", "1"}  # each worker's data position
    # the stage's outputs, from the final checkpoint: the pipeline folder, curves, the last grid
    assert json.loads((p.paths.model / "pipeline.json").read_text())["run_id"] == run_id
    assert (p.paths.model / "model.safetensors").is_file() and (p.paths.model / "vae" / "config.json").is_file()
    assert [line.split(",")[0] for line in p.paths.train_loss_plot.read_text().splitlines()] == [
        "step",
        *map(str, range(2, 13, 2)),
    ]
    assert p.paths.train_probes.read_text().splitlines()[0].startswith("step,images_seen,")
    assert p.paths.train_samples.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(p.paths.train_metrics.read_text())["steps"] == 12 and metrics["ray_overhead_s"] > 0

    # explicit resume with more steps: same run, same step count continued
    longer = p.model_copy(update={"train": p.train.model_copy(update={"steps": 16, "fault": FAULT})})
    more = train.run(longer, resume=True)
    assert more["steps"] == 16 and more["steps_this_run"] == 4 and more["resumed"] == 1.0
    runs = find_runs(p.tracking, "train")
    assert [r["run_id"] for r in runs] == [run_id]
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 16


def test_runs_and_generate_from_a_run_uri_through_the_cli(tiny_pipeline, tmp_path):
    """`transfusion runs` lists the training run; `transfusion generate -m runs:/<id>/model`
    samples from the model that run logged."""
    import yaml
    from typer.testing import CliRunner

    from cli import app
    from stages import train

    p = train_params(
        tiny_pipeline, tmp_path, use_ray=False, steps=2, checkpoint_every=2, sample_every=2, eval_every=2,
        log_every=1, warmup_steps=1,
    )  # fmt: skip
    run_id = train.run(p)["mlflow_run_id"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    listed = CliRunner().invoke(app, ["runs", "-p", str(params_file), "--stage", "train"])
    assert listed.exit_code == 0, listed.output
    (line,) = listed.output.strip().splitlines()
    assert line.startswith(f"{run_id}  train") and "FINISHED" in line and "final_loss=" in line
    out = tmp_path / "from-run.png"
    uri = f"runs:/{run_id}/model"
    made = CliRunner().invoke(
        app, ["generate", "a 7", "-n", "1", "--steps", "2", "-m", uri, "-p", str(params_file), "--out", str(out)]
    )
    assert made.exit_code == 0, made.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    from transfusion.tracking import download_artifacts, tracking_uri

    copy = Path(download_artifacts(uri, tracking_uri(p.tracking)))  # MLflow's copy carries the manifest
    assert json.loads((copy / "manifest.json").read_text()) == json.loads((p.paths.model / "manifest.json").read_text())


def test_zero1_on_two_ray_workers_equals_ddp_and_resumes(tiny_pipeline, tmp_path, ray_local):
    """train.shard_optimizer (ZeRO-1: each of 2 workers keeps half of AdamW's moments) trains the
    same weights as plain DDP; its checkpoint gathers the whole optimizer state, and a run resumed
    from it ends where the uninterrupted one does."""
    from transfusion.train.fit import fit
    from transfusion.train.run import TrainRun

    def run(folder: str, shard: bool, resume_from: str | None = None):
        p = train_params(
            tiny_pipeline,
            tmp_path / folder,
            use_ray=True,
            num_workers=2,
            cpus_per_worker=1,
            steps=4,
            checkpoint_every=2,
            log_every=1,
            sample_every=4,
            eval_every=4,
            warmup_steps=1,
            shard_optimizer=shard,
        )
        return fit(TrainRun.from_params(p).model_copy(update={"resume_from": resume_from})), p

    ddp, ddp_params = run("ddp", shard=False)
    ddp_ck = ddp_params.paths.checkpoints
    zero, p = run("zero", shard=True)
    assert (zero.metrics["optimizer_shards"], ddp.metrics["optimizer_shards"]) == (2, 1)
    assert [r["loss"] for r in zero.history] == pytest.approx([r["loss"] for r in ddp.history], rel=1e-5)
    for (name, a), b in zip(zero.model.state_dict().items(), ddp.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the checkpoint holds the whole AdamW state, gathered from both workers: equal to DDP's
    from safetensors.torch import load_file

    moments = [load_file(str(latest_checkpoint(q) / "optimizer.safetensors")) for q in (p.paths.checkpoints, ddp_ck)]
    assert moments[0].keys() == moments[1].keys() and sum(k.endswith(".exp_avg") for k in moments[0]) > 10
    for key, value in moments[0].items():
        torch.testing.assert_close(value, moments[1][key], rtol=1e-5, atol=1e-7, msg=key)
    # resumed from step 2 of the sharded run (its store), on 2 workers again: the same end
    shutil.rmtree(p.paths.checkpoints / "step-00000004")
    resumed, _ = run("zero", shard=True, resume_from="step-00000002")
    for (name, a), b in zip(resumed.model.state_dict().items(), zero.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
