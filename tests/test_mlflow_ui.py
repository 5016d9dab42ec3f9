"""MLflow's UI in headless Chromium (Debian's `chromium`, driven by playwright): the link that
`transfusion ui` prints opens on the experiment's runs table, where a pipeline run expands to
its stage runs; the bare experiment link (what MLflow 3 opens by default) lands on the GenAI
overview instead. Slow: a UI server and a browser (~1 min)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(tmp_path: Path):
    """A store with one pipeline run (parent) and two stage runs nested under it, as the
    pipeline writes them (tags only: no pipeline needed to look at them)."""
    from transfusion.config import load_params
    from transfusion.tracking.store import open_store

    params = load_params([REPO / "params.yaml"], [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    _, client, exp_id = open_store(params.tracking)
    parent = client.create_run(exp_id, run_name="seed-a", tags={"transfusion.role": "pipeline"}).info.run_id
    client.log_metric(parent, "geneval_overall", 0.5)
    for stage in ("train", "eval"):
        tags = {"mlflow.parentRunId": parent, "dvc_stage": stage, "transfusion.role": "stage"}
        client.set_terminated(client.create_run(exp_id, run_name=f"stage-{stage}", tags=tags).info.run_id)
    client.set_terminated(parent)
    return params, tmp_path / "params.yaml"


@pytest.mark.slow
def test_the_printed_link_opens_the_runs_table_and_a_pipeline_run_expands_to_its_stages(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("no chromium: install Debian's chromium (`make browser`) for this test")
    from playwright.sync_api import sync_playwright

    params, file = _store(tmp_path)
    import yaml

    file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "ui", "-p", str(file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("runs: http://127.0.0.1:"), line
        link = line.split(" ", 1)[1].strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            bare = link.split("/runs?")[0]  # what MLflow's experiment list links to
            page.goto(bare)
            page.wait_for_url("**/overview/**", timeout=60000)
            assert "workflowType=genai" in page.url  # MLflow's default: the GenAI overview
            assert page.get_by_text("seed-a").count() == 0

            page.goto(link)
            page.get_by_text("seed-a").wait_for(timeout=60000)
            assert "/runs" in page.url and "overview" not in page.url
            assert page.get_by_role("columnheader", name="Run Name").count() >= 1  # the runs table
            assert page.get_by_text("stage-train").count() == 0  # collapsed under its parent
            row = page.get_by_role("row").filter(has_text="seed-a")
            row.get_by_role("button").first.click()  # the parent's expander
            page.get_by_text("stage-train").wait_for(timeout=30000)
            assert page.get_by_text("stage-eval").count() == 1
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
