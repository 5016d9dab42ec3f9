"""From one machine to a cluster: checkpoints and the workers' inputs in object storage (an
S3-compatible server on loopback), Ray Train reporting checkpoints there and a killed worker
resuming from the bucket."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from test_train import train_params

from conftest import alive, section

FAULT = section("train").fault


def _one_ray_worker(tiny_pipeline, tmp_path, max_failures: int, **fault):
    """12 steps on one Ray worker, checkpoints every 4, with ``fault`` injected."""
    return train_params(
        tiny_pipeline, tmp_path, use_ray=True, num_workers=1, cpus_per_worker=1, steps=12, checkpoint_every=4,
        max_failures=max_failures, fault=FAULT.model_copy(update=fault),
    )  # fmt: skip


def _bucket(uri: str):
    from transfusion.storage import Store

    return Store(uri)


def test_store_round_trip_and_uri_join(s3_server, tmp_path):
    from transfusion.storage import Store, join

    uri = s3_server.format(name="roundtrip")
    assert join(uri, "checkpoints").split("?")[0].endswith("/roundtrip/checkpoints")
    assert join(uri, "checkpoints").split("?")[1] == uri.split("?")[1]
    assert join("/a/b/", "c") == "/a/b/c"
    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "model.bin").write_bytes(b"\0" * 3000)
    (folder / "sub" / "x.txt").write_text("x")
    store = Store(join(uri, "checkpoints"))
    store.put(folder, "step-00000001")
    assert store.names() == ["step-00000001"]
    back = store.get("step-00000001", tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == [
        "manifest.json",
        "model.bin",
        "sub/x.txt",
    ]
    assert (back / "model.bin").read_bytes() == b"\0" * 3000
    assert store.read("step-00000001/sub/x.txt") == b"x" and store.read("step-00000001/nope") is None
    store.delete()
    assert store.names() == []


def test_a_bad_storage_uri_is_one_line():
    from transfusion.errors import BadInput
    from transfusion.storage import Store

    with pytest.raises(BadInput, match="nosuchscheme://x: not a storage URI pyarrow can open"):
        Store("nosuchscheme://x")


def test_checkpoints_in_object_storage_resume_without_the_local_copy(tiny_pipeline, tmp_path, s3_server):
    """The plain loop with ``train.storage`` in a bucket: checkpoints are uploaded there (the
    newest ``keep_checkpoints``), and ``--resume`` continues from the bucket's copy after the
    local staging folder is gone."""
    import shutil

    from stages import train
    from transfusion.storage import join
    from transfusion.tracking import find_runs

    uri = s3_server.format(name="plain")
    p = train_params(
        tiny_pipeline, tmp_path, use_ray=False, steps=8, checkpoint_every=4, keep_checkpoints=1, log_every=2,
        sample_every=8, eval_every=8, warmup_steps=1, storage=uri,
    )  # fmt: skip
    first = train.run(p)
    bucket = _bucket(join(uri, "checkpoints"))
    assert bucket.names() == ["step-00000008"]
    state = json.loads(bucket.read("step-00000008/trainer.json"))
    assert state["step"] == 8 and state["run_id"] == first["mlflow_run_id"]

    shutil.rmtree(p.paths.checkpoints)  # the driver's staging copy: resume must read the bucket
    longer = p.model_copy(update={"train": p.train.model_copy(update={"steps": 12})})
    more = train.run(longer, resume=True)
    assert more["resumed_at_step"] == 8 and more["steps_this_run"] == 4 and more["resumed"] == 1.0
    assert more["mlflow_run_id"] == first["mlflow_run_id"]
    assert bucket.names() == ["step-00000012"]
    assert [r["run_id"] for r in find_runs(p.tracking, "train")] == [first["mlflow_run_id"]]


@pytest.mark.slow  # two Ray workers, one killed, a restart from the bucket: ~2-3 min (make test-all)
def test_ray_workers_read_inputs_from_the_bucket_and_resume_from_it_after_a_kill(
    tiny_pipeline, tmp_path, s3_server, ray_local
):
    from mlflow import MlflowClient

    from stages import train
    from transfusion.storage import join
    from transfusion.tracking import tracking_uri

    uri = s3_server.format(name="ray")
    p = train_params(
        tiny_pipeline, tmp_path, use_ray=True, num_workers=2, cpus_per_worker=1, steps=12, checkpoint_every=4,
        log_every=2, sample_every=12, eval_every=12, warmup_steps=1, max_failures=1, storage=uri,
        fault=FAULT.model_copy(update={"kill_at_step": 6}),
    )  # fmt: skip
    metrics = train.run(p)  # rank 1 is SIGKILLed at step 6; Ray restarts both from the bucket's step 4
    assert metrics["steps"] == 12 and metrics["resumed_at_step"] == 4 and metrics["steps_this_run"] == 8
    assert json.loads(p.paths.train_metrics.read_text())["resumed"] == 1.0

    inputs = _bucket(join(uri, "inputs"))
    assert {"latents", "text", "tokenizer", "vae"} <= set(inputs.names())
    assert any(f.endswith("meta.json") for f in inputs.files("latents"))
    checkpoints = _bucket(join(uri, "checkpoints"))
    assert checkpoints.names() == ["step-00000008", "step-00000012"]  # keep_checkpoints 2
    state = json.loads(checkpoints.read("step-00000012/trainer.json"))
    assert set(state["data"]) == {"0", "1"} and all("collate" in d for d in state["data"].values())

    # each step is in the MLflow run once, although steps 5-6 ran twice
    client = MlflowClient(tracking_uri(p.tracking))
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(2, 13, 2))
    assert (p.paths.model / "model.safetensors").is_file()


@pytest.mark.slow  # Ray: ~1 min
def test_nan_under_ray_stops_at_once_without_a_retry(tiny_pipeline, tmp_path, ray_local):
    """A divergence is not a worker fault: no restart (a retry would resume from step 4 and end
    as a worker failure), the loop's one line, the last good checkpoint kept."""
    from stages import train
    from transfusion.train.loop import TrainingDiverged

    p = _one_ray_worker(tiny_pipeline, tmp_path, max_failures=2, nan_at_step=7)
    with pytest.raises(TrainingDiverged) as err:
        train.run(p)
    message = str(err.value)
    assert "\n" not in message and "at step 7" in message
    assert message.endswith(f"last good checkpoint: {p.paths.checkpoints.resolve() / 'step-00000004'}")
    assert not p.paths.model.exists()


def _kill_cluster(temp_dir: Path) -> dict[int, str]:
    """Stop the cluster whose processes run under ``temp_dir`` (``ray stop`` would also stop the
    tests' own local Ray): its head processes (their command lines name ``temp_dir``) and every
    process they started -- the agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, which
    ignores SIGTERM) name no folder, so they are found as descendants, by PID. SIGKILL to all;
    returns their PIDs and command lines."""
    import psutil

    from conftest import descendants

    heads = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                heads.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    pids = {}
    for pid in heads.union(*(descendants(pid) for pid in heads)):
        try:
            pids[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return pids


@pytest.mark.slow  # `ray start` with its dashboard and job server, a submitted job: ~3 min (make test-all)
def test_ray_job_submit_trains_on_a_started_cluster_with_token_auth(tiny_pipeline, tmp_path):
    """The README's cluster path, on loopback: `ray start --head` with token authentication,
    `ray job submit --runtime-env pipelines/ray/job.yaml -- transfusion train -p params.yaml`
    from the project folder, the job succeeded, the run and its exported model read back from
    MLflow."""
    import re
    import secrets
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import REPO, free_port
    from transfusion.config import load_params
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.tracking import find_runs, tracking_uri

    # the project as a user has it after the earlier stages: code, params, training's inputs
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "cli.py", project / "cli.py")
    for folder in ("transfusion", "stages"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "pipelines" / "ray").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "ray" / "job.yaml", project / "pipelines" / "ray" / "job.yaml")
    resolved = tiny_pipeline.model_dump(mode="json")
    resolved["paths"] = load_params(REPO / "params.yaml").model_dump(mode="json")["paths"]  # relative, as shipped
    for key in ("latents", "text", "tokenizer", "vae"):
        shutil.copytree(getattr(tiny_pipeline.paths, key), project / resolved["paths"][key])
    (project / "data" / "scenes").mkdir()  # left out of the upload by job.yaml
    (project / "data" / "scenes" / "big.bin").write_bytes(os.urandom(1 << 20))
    resolved["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resolved["train"] |= {"use_ray": True, "num_workers": 1, "cpus_per_worker": 1, "steps": 4, "checkpoint_every": 2,
                          "log_every": 2, "sample_every": 4, "eval_every": 4, "warmup_steps": 1}  # fmt: skip
    (project / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    token = secrets.token_hex(32)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env |= {"PATH": f"{venv_bin}{os.pathsep}{env['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    start = subprocess.run(
        ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host",
         "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2", "--temp-dir", str(temp_dir),
         "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        refused = subprocess.run(
            ["ray", "job", "list", "--address", address],
            env=env | {"RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0  # the job server wants the cluster's token
        job = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--runtime-env", "pipelines/ray/job.yaml", "--",
             "transfusion", "train", "-p", "params.yaml"],
            cwd=project, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        log = job.stdout + job.stderr
        assert job.returncode == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-4000:]
        assert "big.bin" not in log
    finally:
        cluster = _kill_cluster(temp_dir)
    deadline = time.monotonic() + 30
    while alive(set(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = " ".join(cluster.values())
    assert "ray::DashboardAgent" in names and "ray::RuntimeEnvAgent" in names  # the ones that used to survive
    assert not alive(set(cluster)), [cluster[pid][:80] for pid in alive(set(cluster))]

    tracking = load_params(project / "params.yaml").tracking
    (run,) = find_runs(tracking, "train")
    assert run["status"] == "FINISHED" and run["metrics"]["steps_this_run"] == 4 and run["metrics"]["final_loss"] > 0
    pipe = TransfusionPipeline.from_uri(f"runs:/{run['run_id']}/model", tracking_uri(tracking))
    assert pipe.sample_images(["a 7"], steps=2).shape == (1, 32, 32, 3)


def test_a_loopback_tracking_server_is_named_by_the_node_ip_on_a_cluster():
    from transfusion.train.ray_train import worker_tracking_uri

    assert worker_tracking_uri("http://127.0.0.1:5000", nodes=3, node_ip="10.0.0.5") == "http://10.0.0.5:5000"
    assert worker_tracking_uri("http://localhost:5000/", nodes=2, node_ip="10.0.0.5") == "http://10.0.0.5:5000/"
    assert worker_tracking_uri("http://127.0.0.1:5000", nodes=1, node_ip="10.0.0.5") == "http://127.0.0.1:5000"
    assert (
        worker_tracking_uri("http://mlflow.internal:5000", nodes=3, node_ip="10.0.0.5") == "http://mlflow.internal:5000"
    )
    assert worker_tracking_uri("sqlite:////tmp/x.db", nodes=3, node_ip="10.0.0.5") == "sqlite:////tmp/x.db"
    assert worker_tracking_uri(None, nodes=3, node_ip="10.0.0.5") is None


@pytest.mark.slow  # Ray: ~1 min
def test_a_worker_failure_past_its_retries_is_one_short_line(tiny_pipeline, tmp_path, ray_local):
    from stages import train
    from transfusion.train.loop import TrainingFailed

    p = _one_ray_worker(tiny_pipeline, tmp_path, max_failures=0, crash_at_step=6)
    with pytest.raises(TrainingFailed) as err:
        train.run(p)
    message = str(err.value)
    assert message == (
        "training failed on a Ray worker (after 0 restarts): "
        "rank 0: RuntimeError: injected crash at step 6 (train.fault.crash_at_step)"
    )
