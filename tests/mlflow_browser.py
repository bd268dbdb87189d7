"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 over a store, and Debian's headless
`chromium` driven by Playwright (its own browser downloads are never used).

MLflow 3.17's UI is a React single-page app with hash routes (`#/experiments/ID`, `#/models`,
`#/experiments/ID/runs/RUN`): pages are checked by their rendered text once the expected words
appear, not after a fixed wait. Used by tests/test_mlflow_ui.py and, as a script, to take the
README's screenshot:

    python tests/mlflow_browser.py --tracking-uri sqlite:///mlflow.db --experiment limpq-demo \\
        --out docs/mlflow-sweep.png
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

from cluster import free_port
from orchestrator.tracking.ui import MODEL_TRAINING_QUERY as MODEL_TRAINING
from orchestrator.tracking.ui import experiment_page

PAGE_TIMEOUT_S = 90.0
TRIAL_METRICS = ("val_top1", "bitops_g", "size_mb", "compression_ratio")  # what a sweep is compared on
# Headless, and quiet on this machine's closed network (no background requests, no first-run pages).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium(install: bool = True) -> str | None:
    """The `chromium` binary; when missing, installed with apt-get where that is possible (root)."""
    found = shutil.which("chromium")
    if found or not install or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, env=env, capture_output=True, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, log_path: Path) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port over the store, its proxied artifacts beside the log
    (not in the working directory); yields its URL, then stops its whole process group (server and
    workers)."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", str(log_path.parent / "mlartifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # no background job workers (seven processes serving GenAI evaluation jobs) for a UI check
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({process.returncode}); see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {url}; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the uvicorn workers go with it
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def browser_page(chromium: str, width: int = 1600, height: int = 1000) -> Iterator[Page]:
    """One page of a headless Chromium (the given binary) driven by Playwright."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def page_text(page: Page) -> str:
    return page.evaluate("document.body ? document.body.innerText : ''") or ""


def wait_for_text(page: Page, expect: list[str], timeout: float = PAGE_TIMEOUT_S) -> str:
    """Wait until the page's text holds every string of `expect`; returns the text. Raises
    AssertionError naming what is missing, with the text the page did show."""
    try:
        page.wait_for_function("needles => document.body && needles.every(n => document.body.innerText.includes(n))",
                               arg=expect, timeout=timeout * 1000, polling=500)
    except PlaywrightError:
        text = page_text(page)
        missing = [needle for needle in expect if needle not in text]
        raise AssertionError(f"{missing} not shown within {timeout:.0f}s; the page showed: {text[:1500]!r}") from None
    return page_text(page)


def open_page(page: Page, url: str, expect: list[str], timeout: float = PAGE_TIMEOUT_S) -> str:
    page.goto(url)
    return wait_for_text(page, expect, timeout)


def expand_all_runs(page: Page) -> None:
    """Open every collapsed parent row of the runs table (their children are hidden until then).
    The expander is the button in a row's Run Name cell, drawn as a plus sign while collapsed (the
    grid recycles row elements, so the icon, not the element, tells which rows are open); each round
    opens one more level of nesting."""
    for _ in range(10):
        clicked = page.evaluate(
            "() => { const buttons = [...document.querySelectorAll("
            "'[role=gridcell][col-id=\"attributes.`Run Name`\"] button')]"
            ".filter(b => b.innerHTML.includes('V4.5h1.5'));"
            " buttons.forEach(b => b.click()); return buttons.length; }")
        if not clicked:
            return
        page.wait_for_timeout(1000)


def models_cell(page: Page, run_name: str) -> str | None:
    """The text of the runs table's Models cell in the row of run `run_name` (None: no such row). A
    row's cells sit in several row elements (pinned and scrolled parts) that share a row-index."""
    return page.evaluate(
        "runName => { const cell = [...document.querySelectorAll('[role=gridcell][col-id=\"attributes.`Run Name`\"]')]"
        ".find(c => c.innerText.trim().split(/\\s+/).pop() === runName);"
        " if (!cell) return null; const index = cell.closest('[role=row]').getAttribute('row-index');"
        " const models = document.querySelector(`[role=row][row-index=\"${index}\"] "
        "[role=gridcell][col-id=\"attributes.\\`Models\\`\"]`);"
        " return models ? models.innerText.trim() : null; }", run_name)


def wait_for_models_cell(page: Page, run_name: str, models: list[str], timeout: float = PAGE_TIMEOUT_S) -> None:
    """The Models column names one of the run's logged models and counts the others ("name +N")."""
    shown, deadline = None, time.monotonic() + timeout
    while not (shown and shown.split()[0] in models and (len(models) == 1 or f"+{len(models) - 1}" in shown)):
        if time.monotonic() > deadline:
            raise AssertionError(f"the Models cell of run {run_name} shows {shown!r}, not its logged models {models}")
        page.wait_for_timeout(500)
        shown = models_cell(page, run_name)


def close_assistant(page: Page) -> None:
    """Close the MLflow Assistant side panel (its close button is the page's top-right one), which
    otherwise takes a third of the page."""
    page.evaluate(
        "() => [...document.querySelectorAll('button[aria-label=\"Close\"]')]"
        ".filter(b => { const r = b.getBoundingClientRect(); return r.width > 0 && r.top < 80; })"
        ".forEach(b => b.click())")


def show_metric_columns(page: Page, names: list[str]) -> None:
    """Add these metrics as columns of the runs table, each found through the column selector's
    search box (the selector's tree only renders what fits)."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.locator("[role=dialog] input[placeholder='Search columns']")
    for name in names:
        search.fill(name)
        page.locator("[role=dialog] .du-bois-light-tree-treenode").filter(has_text=name).first.click()
    page.keyboard.press("Escape")


@dataclass
class Expectations:
    """What the UI must show for a pipeline's store (names as the pipeline gives them)."""

    root_run: str
    nested_runs: list[str] = field(default_factory=list)
    registered_model: str | None = None
    model_versions: int = 0
    trial_run: str | None = None
    trial_metrics: list[str] = field(default_factory=list)
    trial_artifacts: list[str] = field(default_factory=list)
    trial_models: list[str] = field(default_factory=list)  # the names of the trial run's logged models


def expectations_from_store(tracking_uri: str, experiment_name: str) -> Expectations:
    """What the UI must show for whatever a pipeline wrote: its top-level run and every run under it,
    the registered model its runs produced with all its versions, and a trial (a run under another
    one with `val_top1`) with the metrics a sweep is compared on and its top-level artifacts."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise AssertionError(f"no experiment {experiment_name!r} in {tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    roots = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    nested = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    if not roots:
        raise AssertionError(f"experiment {experiment_name!r} has no runs")
    run_ids = {run.info.run_id for run in runs}
    versions = [version for version in client.search_model_versions(max_results=1000) if version.run_id in run_ids]
    models = sorted({version.name for version in versions})
    trial = next((run for run in nested if "val_top1" in run.data.metrics), None)
    expected = Expectations(root_run=roots[0].info.run_name, nested_runs=sorted({r.info.run_name for r in nested}))
    if models:
        expected.registered_model = models[0]
        expected.model_versions = sum(version.name == models[0] for version in versions)
    if trial is not None:
        expected.trial_run = trial.info.run_name
        expected.trial_metrics = [key for key in TRIAL_METRICS if key in trial.data.metrics]
        expected.trial_artifacts = [Path(a.path).name for a in client.list_artifacts(trial.info.run_id)][:6]
        expected.trial_models = [model.name for model in client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{trial.info.run_id}'")]
    return expected


def _run_id(client: MlflowClient, experiment_id: str, run_name: str) -> str:
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1)
    if not runs:
        raise AssertionError(f"no run named {run_name!r} in the store")
    return runs[0].info.run_id


def check_pages(url: str, tracking_uri: str, experiment_name: str, expected: Expectations, chromium: str,
                timeout: float = PAGE_TIMEOUT_S) -> None:
    """Check in Chromium, against the MLflow UI at `url` serving `tracking_uri`: the experiment's runs
    table lists the root run and, expanded, its nested runs; the Models pages list the registered
    model and its versions; the trial run's page shows its metrics, its Artifacts tab its artifacts.
    Raises AssertionError naming what a page did not show."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise AssertionError(f"no experiment {experiment_name!r} in {tracking_uri}")
    experiment_id = experiment.experiment_id
    with browser_page(chromium) as page:
        open_page(page, experiment_page(url, experiment_id), [expected.root_run, "Run Name"], timeout)
        if expected.nested_runs:
            expand_all_runs(page)
            wait_for_text(page, expected.nested_runs, timeout)
        if expected.trial_models:
            wait_for_models_cell(page, expected.trial_run, expected.trial_models, timeout)
        if expected.registered_model:
            open_page(page, f"{url}/#/models?{MODEL_TRAINING}", [expected.registered_model], timeout)
            versions = [f"Version {n}" for n in range(1, expected.model_versions + 1)]
            open_page(page, f"{url}/#/models/{expected.registered_model}?{MODEL_TRAINING}", versions, timeout)
        if expected.trial_run:
            run_page = f"{url}/#/experiments/{experiment_id}/runs/{_run_id(client, experiment_id, expected.trial_run)}"
            open_page(page, f"{run_page}?{MODEL_TRAINING}", [expected.trial_run, *expected.trial_metrics], timeout)
            open_page(page, f"{run_page}/artifacts?{MODEL_TRAINING}", expected.trial_artifacts, timeout)


def screenshot_experiment(tracking_uri: str, experiment_name: str, out: Path, chromium: str, workdir: Path,
                          metrics: list[str], width: int = 1600, height: int = 1000) -> Path:
    """A PNG of the experiment's runs table with every nested run expanded and `metrics` as columns."""
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name!r} in {tracking_uri}")
    with mlflow_server(tracking_uri, workdir / "mlflow-server.log") as url, \
            browser_page(chromium, width, height) as page:
        open_page(page, experiment_page(url, experiment.experiment_id), ["Run Name"])
        show_metric_columns(page, metrics)
        close_assistant(page)
        expand_all_runs(page)
        page.wait_for_timeout(2000)  # row heights and column widths settle
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot an experiment's runs table in the MLflow UI")
    parser.add_argument("--tracking-uri", required=True, help="the pipeline's store, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-sweep.png"))
    parser.add_argument("--size", default="1920x1000", help="window WIDTHxHEIGHT")
    parser.add_argument("--metrics", default="val_top1,size_mb,bitops_g,compression_ratio",
                        help="comma-separated metrics shown as columns")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium is not installed and could not be (apt-get install chromium, as root)")
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as workdir:
        out = screenshot_experiment(args.tracking_uri, args.experiment, args.out, chromium, Path(workdir),
                                    args.metrics.split(","), width=width, height=height)
    print(out)


if __name__ == "__main__":
    main()
