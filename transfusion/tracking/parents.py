"""One MLflow parent run per pipeline run (a ``dvc repro``, a ``dvc exp run``), its stage runs
nested under it, lineage on every run.

How the stage processes DVC starts one by one find their parent: every stage of one pipeline run
shares :func:`transfusion.lineage.invocation_key` (the ``dvc`` process above them). The first stage
that runs creates the parent tagged with that key (under the store's lock); the next ones find it
by the tag. A stage nests under it with ``mlflow.parentRunId``, sets it RUNNING while it works and
to its own end status after. The closing stage ``track`` (always run, last) links every stage DVC
skipped to the earlier run that produced its outputs (same ``dvc.lock`` entry), tags each stage
run with its ``dvc.lock`` hashes, copies the headline metrics and registers the model
(:mod:`transfusion.tracking.registry`).
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from transfusion import lineage
from transfusion.config import Params
from transfusion.tracking.store import first_use_lock, log_metrics, log_params, tracking_uri

PIPELINE_TAG = "transfusion.pipeline"  # the pipeline run's key, on the parent
ROLE_TAG = "transfusion.role"  # pipeline | stage | cached
PARENT_TAG = "mlflow.parentRunId"
LOCK_TAG = "dvc.lock_md5"  # md5 of the stage's dvc.lock entry, once DVC wrote it
STATE_TAG = "transfusion.pipeline_state"  # md5 over the stages' dvc.lock entries, on the parent
PRODUCED_BY = "transfusion.produced_by"  # on a cached stage: the run that produced its outputs
NOTE_TAG = "mlflow.note.content"
HEADLINE = re.compile(
    r"(geneval_(overall|single_object|two_objects|counting|colors|position|color_attr)(_se)?"
    r"|blank_rate(_se)?|caption_exact|caption_text_exact|caption_token_f1"
    r"|fid_(judge|inception)(_real_train_vs_test)?|text_bits_per_byte)"
)
TRAIN_HEADLINE = {"wall_s": "train_wall_s", "images_per_s": "train_images_per_s"}


def run_tags(params: Params) -> dict[str, str]:
    """Lineage every run carries: git commit and dirty flag, params hash, DVC stage and experiment."""
    commit, dirty = lineage.git_state()
    tags = {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}
    tags["params_hash"] = params.digest()
    if lineage.experiment_name():
        tags["dvc_experiment"] = lineage.experiment_name()
    return tags


def _find(client, exp_id: str, key: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    return runs[0] if runs else None


def _create(client, exp_id: str, key: str, params: Params) -> str:
    """The parent: named after the DVC experiment, else ``<commit>-<params hash>``; its params
    are those that differ from the committed params.yaml."""
    tags = run_tags(params) | {PIPELINE_TAG: key, ROLE_TAG: "pipeline"}
    commit = tags["git_commit"][:7] if tags["git_commit"] != "unknown" else "no-commit"
    name = lineage.experiment_name() or f"{commit}-{params.digest()[:8]}"
    run = client.create_run(exp_id, run_name=name, tags=tags)
    diff = dict(sorted(lineage.params_diff(params.model_dump(mode="json"), lineage.baseline_params()).items()))
    log_params(client, run.info.run_id, diff)
    client.set_tag(run.info.run_id, "params_changed", ", ".join(diff) or "none")
    return run.info.run_id


def open_parent(client, exp_id: str, params: Params) -> str | None:
    """The parent run of this stage's pipeline run, created by its first stage; None outside DVC."""
    key = lineage.invocation_key()
    if key is None:
        return None
    with first_use_lock(tracking_uri(params.tracking)):
        found = _find(client, exp_id, key)
        parent = found.info.run_id if found else _create(client, exp_id, key, params)
    client.update_run(parent, status="RUNNING")
    return parent


def log_inputs(mlflow, stages: list[str], params: Params) -> None:
    """The inputs of ``stages`` as MLflow datasets of the active run, each path once: the pinned
    archives (``data``: the raw data enters there, by their sha256) and what other stages wrote
    (``dvc.lock`` md5; the context names the stage that reads it and the one that wrote it). A
    stage run logs its own; a parent, its pipeline's (the runs table's Dataset column)."""
    root, seen = Path.cwd(), set()
    if "data" in stages:
        for inp in lineage.raw_inputs(params.data):
            mlflow.log_input(_dataset(root, inp), context="data (pinned archive)")
    if not (root / "dvc.yaml").is_file():
        return
    paths = {k: str(v) for k, v in params.paths.model_dump(mode="json").items()}
    for stage in stages:
        for inp in lineage.stage_inputs(root, stage, paths):
            if inp.path not in seen:
                seen.add(inp.path)
                mlflow.log_input(_dataset(root, inp), context=f"{stage} (from {inp.producer})")


def _dataset(root: Path, inp: lineage.Input):
    """An MLflow dataset for an input: a URL as given, a path as its file:// URI."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = inp.path if "://" in inp.path else (root / inp.path).resolve().as_uri()
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source, name=inp.name, digest=inp.digest.removesuffix(".dir")[:36])


# ---------------------------------------------------------------------------------------------
# closing a pipeline run (the `track` stage)
# ---------------------------------------------------------------------------------------------
def _children(client, exp_id: str, parent: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {r.data.tags.get("dvc_stage"): r for r in runs if r.data.tags.get(ROLE_TAG) != "pipeline"}


def _producer(client, exp_id: str, stage: str, digest: str):
    """The newest finished run of ``stage`` whose dvc.lock entry was ``digest``."""
    query = f"tags.dvc_stage = '{stage}' and tags.`{LOCK_TAG}` = '{digest}' and tags.`{ROLE_TAG}` = 'stage'"
    query += " and attributes.status = 'FINISHED'"
    runs = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _lock_tags(entry: dict) -> dict[str, str]:
    tags = {LOCK_TAG: lineage.lock_digest(entry)}
    tags |= {f"dvc.dep.{path}"[:250]: md5 for path, md5 in lineage.dep_hashes(entry).items()}
    return tags


def _link_cached(client, exp_id: str, parent: str, stage: str, entry: dict) -> Any:
    """A FINISHED marker run under the parent for a stage DVC skipped, naming the run that
    produced its outputs (nothing re-run, nothing re-logged). Returns that producer (or None)."""
    tags = _lock_tags(entry)
    producer = _producer(client, exp_id, stage, tags[LOCK_TAG])
    if producer is not None:
        origin = client.get_run(producer.data.tags.get(PARENT_TAG)) if producer.data.tags.get(PARENT_TAG) else None
        where = f" in pipeline run '{origin.info.run_name}'" if origin else ""
        note = f"DVC skipped this stage (cached): its outputs are those of run {producer.info.run_id}{where}."
    else:
        note = f"DVC skipped this stage (cached); no run in this experiment recorded dvc.lock md5 {tags[LOCK_TAG]}."
    tags |= {PARENT_TAG: parent, ROLE_TAG: "cached", "dvc_stage": stage, NOTE_TAG: note}
    tags[PRODUCED_BY] = producer.info.run_id if producer else "unknown"
    run = client.create_run(exp_id, run_name=f"{stage} (cached)", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return producer


def _headline(client, runs: dict[str, Any], params: Params) -> dict[str, float]:
    """GenEval-style, blank rate, captioning, FID and its floor, bits/byte from the eval run;
    wall time and images/s from the train run (their metrics files when no run is known)."""
    import json

    def metrics(stage: str, path: Path) -> dict[str, float]:
        if runs.get(stage) is not None:
            return dict(client.get_run(runs[stage].info.run_id).data.metrics)
        return json.loads(path.read_text()) if path.is_file() else {}

    evaluation = metrics("eval", params.paths.eval_metrics)
    train = metrics("train", params.paths.train_metrics)
    out = {k: float(v) for k, v in evaluation.items() if HEADLINE.fullmatch(k)}
    return out | {new: float(train[old]) for old, new in TRAIN_HEADLINE.items() if old in train}


def _pipeline_state(lock: dict, stages: list[str]) -> str:
    return lineage.short_hash("".join(lineage.lock_digest(lock[s]) for s in stages), 32)


def _newest_parent(client, exp_id: str):
    query, newest = f"tags.`{ROLE_TAG}` = 'pipeline'", ["attributes.start_time DESC"]
    runs = client.search_runs([exp_id], filter_string=query, order_by=newest, max_results=1)
    return runs[0] if runs else None


def close_pipeline(mlflow, client, exp_id: str, params: Params) -> dict[str, Any]:
    """Close this pipeline run's parent (see the module doc); a pipeline run in which DVC ran
    nothing (every stage cached, same state as the newest parent) creates no parent."""
    root = Path.cwd()
    lock = lineage.read_lock(root)
    stages = [s for s in lineage.pipeline_stages(root) if s in lock]
    state = _pipeline_state(lock, stages)
    key = lineage.invocation_key() or f"manual:{socket.gethostname()}:{os.getpid()}:{time.time():.2f}"
    with first_use_lock(tracking_uri(params.tracking)):
        found = _find(client, exp_id, key)
        newest = _newest_parent(client, exp_id) if found is None else None
        if newest is not None and newest.data.tags.get(STATE_TAG) == state:
            return {"pipeline_run": newest.info.run_id, "name": newest.info.run_name, "ran": 0, "unchanged": True}
        parent = found.info.run_id if found else _create(client, exp_id, key, params)
    children, sources = _children(client, exp_id, parent), {}
    for stage in stages:
        if stage in children:
            for k, v in _lock_tags(lock[stage]).items():
                client.set_tag(children[stage].info.run_id, k, v)
            sources[stage] = children[stage]
        else:
            sources[stage] = _link_cached(client, exp_id, parent, stage, lock[stage])
    with mlflow.start_run(run_id=parent):
        log_inputs(mlflow, stages, params)
    headline = _headline(client, sources, params)
    if headline:
        log_metrics(client, parent, dict(sorted(headline.items())))
    client.set_tag(parent, STATE_TAG, state)
    ran = sum(1 for s in stages if s in children)
    name = client.get_run(parent).info.run_name
    return {"pipeline_run": parent, "name": name, "ran": ran, "metrics": headline, "unchanged": False}
