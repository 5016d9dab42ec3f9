"""Fault injection: every interruption resumes into the run it interrupted.

Each case asserts the final state: a resumed run repeats the uninterrupted run's losses and logs
each step to MLflow once; Ctrl-C exits 130 with the run KILLED; a broken newest checkpoint is
refused with a line naming the previous good one; SIGKILL at random steps, five times over, then
``--resume`` each time ends where the uninterrupted run ends. (NaN with and without Ray,
Ray restarts: tests/test_train.py and tests/test_cluster.py.)
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import train_params

from conftest import REPO, alive, descendants, section

FAULT = section("train").fault
SHORT = dict(use_ray=False, steps=12, checkpoint_every=4, log_every=1, eval_every=12, sample_every=12, warmup_steps=1)


def _losses(p) -> list[tuple[str, ...]]:
    """The loss rows (step, loss, LM, diffusion, lr, grad norm) as written, to 6 digits; the
    throughput columns are timings and differ between any two runs."""
    rows = [line.split(",") for line in p.paths.train_loss_plot.read_text().splitlines()]
    keep = [rows[0].index(k) for k in ("step", "loss", "lm_loss", "diffusion_loss", "lr", "grad_norm")]
    return [tuple(row[i] for i in keep) for row in rows]


def _mlflow_steps(p, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    from transfusion.tracking import tracking_uri

    history = MlflowClient(tracking_uri(p.tracking)).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def test_a_resumed_run_repeats_the_uninterrupted_losses_and_logs_each_step_once(tiny_pipeline, tmp_path):
    from stages import train

    whole = train_params(tiny_pipeline, tmp_path / "whole", **SHORT)
    reference = train.run(whole)

    cut = train_params(tiny_pipeline, tmp_path / "cut", **SHORT, fault=FAULT.model_copy(update={"crash_at_step": 7}))
    with pytest.raises(RuntimeError, match="injected crash at step 7"):
        train.run(cut)  # steps 5 and 6 are logged, then lost with the process: the newest checkpoint is step 4
    assert not cut.paths.model.exists() and not cut.paths.train_metrics.exists()
    resumed = train.run(cut.model_copy(update={"train": cut.train.model_copy(update={"fault": FAULT})}), resume=True)

    assert resumed["resumed_at_step"] == 4 and resumed["resumed"] == 1.0
    assert _losses(cut) == _losses(whole)  # every logged loss, LM and diffusion term, to 6 digits
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-6)
    steps = _mlflow_steps(cut, resumed["mlflow_run_id"])
    assert [s for s, _ in steps] == list(range(1, 13))  # once each, although 5-6 ran twice
    assert [v for _, v in steps] == pytest.approx([v for _, v in _mlflow_steps(whole, reference["mlflow_run_id"])])


def test_the_caption_dropout_rng_round_trips():
    import torch

    from transfusion.data.collate import Collator
    from transfusion.layout import SpecialIds

    special = SpecialIds(bos=0, eos=1, pad=2, boi=3, eoi=4)
    a = Collator(special, 4, 64, caption_dropout=0.5, seed=3)
    for _ in range(7):
        torch.rand((), generator=a.generator)
    saved = a.state()
    expected = [float(torch.rand((), generator=a.generator)) for _ in range(5)]
    b = Collator(special, 4, 64, caption_dropout=0.5, seed=99)
    b.load_state(saved)
    assert [float(torch.rand((), generator=b.generator)) for _ in range(5)] == expected


def test_a_truncated_newest_checkpoint_names_the_previous_good_one(tiny_pipeline, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from stages import train

    p = train_params(tiny_pipeline, tmp_path, **SHORT | {"steps": 8})
    train.run(p)
    newest, previous = p.paths.checkpoints / "step-00000008", p.paths.checkpoints / "step-00000004"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 3])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(p.model_dump(mode="json")))

    result = CliRunner().invoke(app, ["train", "-p", str(params_file), "--resume"])
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith(f"error: {newest}: model.safetensors is truncated")
    assert line.endswith(f"resume from the previous one: transfusion train --resume {previous}")

    result = CliRunner().invoke(app, ["train", str(previous), "-p", str(params_file), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads(p.paths.train_metrics.read_text())["resumed_at_step"] == 4
    assert sorted(c.name for c in p.paths.checkpoints.iterdir() if c.name.startswith("step-")) == [
        "step-00000004",
        "step-00000008",
    ]


def _cli_params(p, path: Path) -> Path:
    path.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    return path


def _start(params_file: Path, *extra: str, log: Path, command: str = "train") -> subprocess.Popen:
    """``python cli.py COMMAND`` (train) in its own process group with Ctrl-C's default action, as a
    terminal starts it (a test suite started in the background by a shell without job control
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), command, "-p", str(params_file), *extra],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"never saw {text!r}: " + log.read_text()[-2000:])
        time.sleep(0.2)


_RAY_TWIN_NOISE = re.compile(
    r"Exception in thread PlacementGroupCleanerMonitor:\nTraceback.*?"
    r"ConnectionError: Found multiple active Ray instances[^\n]*\n",
    re.S,
)


def _ours(log: str) -> str:
    """A run's log less one known Ray start-up message: Ray Train's PlacementGroupCleaner asks the
    state API for its controller without an address, and its thread dies with "Found multiple
    active Ray instances" when another Ray runs on the machine -- in the suite, the tests' own
    (``ray_local``). It comes before the first step, whatever the stop."""
    return _RAY_TWIN_NOISE.sub("", log)


@pytest.mark.parametrize("use_ray", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ctrl_c_exits_130_and_marks_the_run_killed(tiny_pipeline, tmp_path, use_ray):
    from transfusion.tracking import find_runs

    p = train_params(tiny_pipeline, tmp_path, **SHORT | {"steps": 400, "use_ray": use_ray, "cpus_per_worker": 1})
    params_file = _cli_params(p, tmp_path / "params.yaml")
    log = tmp_path / "train.log"
    proc = _start(params_file, log=log)
    _wait_for(log, "[train] step 3/400", proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
    lines = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    assert lines == ["error: interrupted (a training run continues with `transfusion train --resume`)"]
    assert "Traceback" not in _ours(log.read_text())
    (run,) = find_runs(p.tracking, "train")
    assert run["status"] == "KILLED"
    assert not p.paths.model.exists()


@pytest.mark.slow  # five SIGKILLs and resumes of a CLI process: ~3 min (make test-all)
def test_sigkill_at_random_steps_five_times_then_resume_ends_like_the_uninterrupted_run(tiny_pipeline, tmp_path):
    from stages import train
    from transfusion.tracking import find_runs

    steps = dict(SHORT, steps=40, checkpoint_every=3, log_every=1, eval_every=40, sample_every=40)
    whole = train_params(tiny_pipeline, tmp_path / "whole", **steps)
    reference = train.run(whole)

    p = train_params(tiny_pipeline, tmp_path / "cut", **steps)
    params_file = _cli_params(p, tmp_path / "params.yaml")
    rng, extra = random.Random(0), []
    for attempt in range(5):
        log = tmp_path / f"attempt-{attempt}.log"
        proc = _start(params_file, *extra, log=log)
        # the first attempt runs past its first checkpoint (step 3); later ones die anywhere
        target = rng.randint(4, 8) if attempt == 0 else rng.randint(1, 5)
        _wait_for(log, "[train] step ", proc)
        deadline = time.monotonic() + 300
        while log.read_text().count("[train] step ") < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert not p.paths.model.exists()  # a killed run exports nothing
        extra = ["--resume"]
    log = tmp_path / "final.log"
    proc = _start(params_file, "--resume", log=log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    metrics = json.loads(p.paths.train_metrics.read_text())
    assert metrics["steps"] == 40 and metrics["resumed"] == 1.0
    assert _losses(p) == _losses(whole)
    (run,) = find_runs(p.tracking, "train")  # one MLflow run across the six processes
    run_steps = _mlflow_steps(p, run["run_id"])
    assert [s for s, _ in run_steps] == list(range(1, 41))
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-6)


def test_a_yaml_alias_bomb_is_refused_within_a_second_and_200_mb(tmp_path):
    """Nine levels of aliases under a real key (9**9 values expanded): refused before anything
    walks or prints the expansion. Measured in a child process capped at 200 MB more address
    space than it had after its imports, so a regression fails instead of eating the machine."""
    from test_bad_inputs import ALIAS_BOMB

    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    script = f"""
import json, resource, time
from transfusion.config import ParamsError, load_params
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))
start = time.perf_counter()
try:
    load_params([{str(REPO / "params.yaml")!r}, {str(tmp_path / "bomb.yaml")!r}])
    message = None
except ParamsError as err:
    message = str(err)
print(json.dumps({{"seconds": time.perf_counter() - start, "message": message}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["message"] and "aliases expand to more than" in out["message"] and len(out["message"]) < 300
    assert out["seconds"] < 1.0


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize(
    "split, damage, expected",
    [
        ("train", _cut, "bytes, its header says"),  # the last train shard: read last of all
        ("val", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 64), "(truncated or altered)"),
        ("test", lambda p: p.unlink(), "missing (expected 60 rows in it)"),
        ("train", lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "not a readable shard"),
        ("val", lambda p: p.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]"), "not a readable shard"),
    ],
)
def test_a_bad_latent_shard_is_named_before_training_starts(tiny_pipeline, tmp_path, split, damage, expected):
    import shutil

    from stages import train
    from transfusion.errors import DataError

    latents = tmp_path / "latents"
    shutil.copytree(tiny_pipeline.paths.latents, latents)
    bad = sorted((latents / split).glob("latents-*.safetensors"))[-1]
    damage(bad)
    p = train_params(tiny_pipeline, tmp_path, **SHORT | {"steps": 20})
    p = p.model_copy(update={"paths": p.paths.model_copy(update={"latents": latents})})
    with pytest.raises(DataError) as err:
        train.run(p)
    assert str(err.value).startswith(f"{bad}: ") and expected in str(err.value)
    assert not p.paths.checkpoints.exists() and not p.paths.model.exists()  # no step ran


@pytest.mark.parametrize("use_ray", [False, True])
def test_sigterm_exits_143_with_one_line_and_marks_the_run_killed(tiny_pipeline, tmp_path, use_ray):
    """SIGTERM to the CLI process alone, as Kubernetes sends it: one line, exit 143, the MLflow run
    KILLED, nothing exported; under Ray, no process the run started survives it."""
    from transfusion.tracking import find_runs

    steps = SHORT | {"steps": 400, "use_ray": use_ray, "cpus_per_worker": 1, "preempt_checkpoint": False}
    p = train_params(tiny_pipeline, tmp_path, **steps)
    log = tmp_path / "train.log"
    proc = _start(_cli_params(p, tmp_path / "params.yaml"), log=log)
    _wait_for(log, "[train] step 3/400", proc)
    started = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-2000:]
    lines = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    assert lines == ["error: terminated by SIGTERM (a training run continues with `transfusion train --resume`)"]
    assert "Traceback" not in _ours(log.read_text()) and "SIGTERM received" not in log.read_text()
    (run,) = find_runs(p.tracking, "train")
    assert run["status"] == "KILLED"
    assert not p.paths.model.exists()
    deadline = time.monotonic() + 30
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(started), [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in alive(started)]


def test_a_preempted_run_checkpoints_the_step_in_flight_and_resumes_with_identical_losses(tiny_pipeline, tmp_path):
    """``train.preempt_checkpoint``: SIGTERM mid-run saves the step in flight (off the
    checkpoint_every schedule) and exits 143; --resume goes on from that very step and ends with
    the uninterrupted run's losses, each step logged once."""
    from stages import train
    from transfusion.tracking import find_runs

    steps = SHORT | {"steps": 60, "checkpoint_every": 60, "eval_every": 60, "sample_every": 60}
    whole = train_params(tiny_pipeline, tmp_path / "whole", **steps | {"preempt_checkpoint": True})
    reference = train.run(whole)

    p = train_params(tiny_pipeline, tmp_path / "cut", **steps | {"preempt_checkpoint": True})
    params_file = _cli_params(p, tmp_path / "params.yaml")
    log = tmp_path / "train.log"
    proc = _start(params_file, log=log)
    _wait_for(log, "[train] step 3/60", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-2000:]
    (line,) = [x for x in log.read_text().splitlines() if x.startswith("error:")]
    stopped = int(line.split("checkpoint of step ")[1].split()[0])
    assert 3 <= stopped < 60
    assert line == (
        f"error: terminated by SIGTERM after saving the checkpoint of step {stopped} "
        "(a training run continues with `transfusion train --resume`)"
    )
    assert [c.name for c in p.paths.checkpoints.iterdir() if c.name.startswith("step-")] == [f"step-{stopped:08d}"]

    log = tmp_path / "resumed.log"
    proc = _start(params_file, "--resume", log=log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    metrics = json.loads(p.paths.train_metrics.read_text())
    assert metrics["resumed_at_step"] == stopped
    assert _losses(p) == _losses(whole)
    assert metrics["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-6)
    (run,) = find_runs(p.tracking, "train")  # one MLflow run across both processes
    assert [s for s, _ in _mlflow_steps(p, run["run_id"])] == list(range(1, 61))
