"""A smoke sweep as a user sees it: `python sweeps/taxibj.py --smoke` in an empty folder (the session's
`smoke_sweep`, conftest.py), then the MLflow store it wrote, and MLflow's own UI on it in the system Chromium
(headless, driven over the DevTools protocol).

- test_sweep_records_what_users_read: pruned trials are FINISHED runs tagged PRUNED with the epoch they
  stopped after (no red "Killed"), epochs counted from 1 on the parent run as in the console summary, the
  experiment marked as model training, no temporary folders left behind.
- test_mlflow_ui_in_a_browser: `mlflow server` on 127.0.0.1 on that store; the link vmrnn prints for an
  experiment opens on the runs table (not the GenAI view), the trial runs are nested under the sweep's parent
  run, a trial's forecast image is among its artifacts, and the registry shows the model with its `champion`
  alias. With VMRNN_UPDATE_SCREENSHOT=1 it also writes the README's picture, docs/images/mlflow-runs.png.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from browser import Browser, chromium_path
from conftest import REPO
from procs import MlflowServer, free_port
from vmrnn.tracking import tags as T
from vmrnn.tracking.experiments import ui_url
from vmrnn.tune import defaults as D

pytestmark = pytest.mark.slow

SCREENSHOT = REPO / "docs" / "images" / "mlflow-runs.png"


@pytest.fixture(scope="module")
def sweep(smoke_sweep):
    """The session's smoke sweep (conftest.py): its folder, store URI, console output and leftovers."""
    return {**smoke_sweep, "root": smoke_sweep["clone"]}


def _experiment(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.get_experiment_by_name("vmrnn-taxibj")


@pytest.mark.timeout(600)
def test_sweep_records_what_users_read(sweep):
    assert not sweep["leftovers"], f"temporary folders left behind: {sweep['leftovers']}"
    client, exp = _experiment(sweep["uri"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.TAG_ROLE}` = '{T.ROLE_SWEEP}'")
    trials = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{T.TAG_PARENT_RUN}` = '{parent.info.run_id}'"
    )
    assert len(trials) == 3
    for run in trials:
        status = run.data.tags[T.TAG_TRIAL_STATUS]
        assert run.info.status == D.MLFLOW_STATUS[status] != "KILLED", (status, run.info.status)
        if status == D.TRIAL_PRUNED:  # stopped early: a normal end, with the last epoch it ran
            assert run.info.status == "FINISHED"
            epoch = int(run.data.tags[T.TAG_PRUNED_AT_EPOCH])
            assert 1 <= epoch <= 2 and run.data.metrics["pruned_at_epoch"] == epoch
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mse"))
        assert steps and steps[0] == 1, "MLflow steps count epochs from 1"
    # The console's "best after epoch N" is the parent's best_epoch and the best trial's.
    best = int(re.search(r"best after epoch (\d+)", sweep["out"]).group(1))
    assert parent.data.metrics["best_epoch"] == best
    best_run = client.get_run(parent.data.tags[T.TAG_BEST_RUN_ID])
    assert best_run.data.tags[T.TAG_BEST_EPOCH] == str(best)


@pytest.mark.timeout(600)
@pytest.mark.skipif(chromium_path() is None, reason="needs the system Chromium (Debian: apt-get install -y chromium)")
def test_mlflow_ui_in_a_browser(sweep):
    client, exp = _experiment(sweep["uri"])
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.TAG_ROLE}` = '{T.ROLE_SWEEP}'")
    trials = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{T.TAG_PARENT_RUN}` = '{parent.info.run_id}'"
    )
    port = free_port()
    # serves the UI; the store is the sweep's mlflow.db
    server = MlflowServer(sweep["root"], port, serve_artifacts=True).start()
    browser = None
    try:
        browser = Browser(sweep["root"] / "chromium")
        shot = asyncio.run(
            check_ui(browser, f"http://127.0.0.1:{port}", exp.experiment_id, parent, trials, sweep["root"])
        )
    finally:
        if browser is not None:
            browser.stop()
        server.stop()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VMRNN_UPDATE_SCREENSHOT"):
        small_png(shot, SCREENSHOT)


async def check_ui(browser: Browser, server: str, experiment_id: str, parent, trials, out: Path) -> Path:
    page = await browser.page()
    try:
        # The experiment, by the link vmrnn prints: the runs table of the model-training view, not GenAI's.
        await page.goto(ui_url(experiment_id, server=server))
        text = await page.wait_for_text("Run Name", parent.info.run_name, "4 matching runs")
        assert "Model registry" in text and "Detect Issues" not in text and "Token Usage" not in text
        # Nested: the trials hide under the parent run until it is expanded.
        names = [t.info.run_name for t in trials]
        assert not any(name in text for name in names), "the trial runs are nested under the sweep's parent"
        await _close_assistant(page)
        await page.eval("""document.querySelector("[data-component-id$='runnamecellrenderer.tsx_46']").click()""")
        await page.wait_for_text(*names)
        shot = await page.screenshot(out / "mlflow-runs.png")

        # A trial's forecast image among its artifacts.
        trial = next(t for t in trials if t.data.tags.get(T.TAG_TRIAL_STATUS) == D.TRIAL_FINISHED)
        await page.goto(ui_url(experiment_id, trial.info.run_id, server=server).replace("?", "/artifacts?"))
        await page.wait_for_text("forecasts", "metrics")
        await page.click_text("forecasts")
        await page.wait_for_text("forecast_strip.png", "forecast.gif")

        # The registry: the model with its champion alias.
        await page.goto(f"{server}/#/models/{D.registered_model_name('taxibj')}")
        text = await page.wait_for_text("Version 1", "champion")
        assert "@ champion" in " ".join(text.split()), "the alias is shown on the version"
        return shot
    finally:
        await page.close()


async def _close_assistant(page) -> None:
    """MLflow's assistant panel opens by itself on a first visit; a user closes it (it would cover the table)."""
    await page.eval(
        """(() => { const b = document.querySelector("[data-component-id='mlflow.assistant.chat_panel.close']");
                    if (b) b.click(); })()"""
    )


def small_png(src: Path, dest: Path, width: int = 960) -> Path:
    """The screenshot scaled to `width` pixels and reduced to a palette: a small PNG for the README."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=64, method=Image.MEDIANCUT).save(dest, optimize=True)
    return dest
