"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 over a store, and headless Chromium
(Debian's `chromium`) driven through the DevTools protocol, with aiohttp (a Ray dashboard dependency)
as the websocket client.

MLflow 3.17's UI is a React single-page app with hash routes (`#/experiments/ID`, `#/models`,
`#/experiments/ID/runs/RUN`): pages are checked by their rendered text (`document.body.innerText`)
once the expected words appear, not after a fixed wait. Used by tests/test_mlflow_ui.py and, as a
script, to take the README's screenshot:

    python tests/mlflow_browser.py --tracking-uri sqlite:///mlflow.db --experiment limpq-demo \\
        --out docs/mlflow-sweep.png
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.mlflow_ui import MODEL_TRAINING_QUERY as MODEL_TRAINING
from orchestrator.mlflow_ui import experiment_page

PAGE_TIMEOUT_S = 90.0
TRIAL_METRICS = ("val_top1", "bitops_g", "size_mb", "compression_ratio")  # what a sweep is compared on


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    """`mlflow server` on a free 127.0.0.1 port over the store; yields its URL, then stops its whole
    process group (server and workers)."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
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


class Browser:
    """One headless Chromium page over the DevTools protocol."""

    def __init__(self, chromium: str, width: int = 1600, height: int = 1000) -> None:
        self.chromium, self.width, self.height = chromium, width, height

    async def __aenter__(self) -> Browser:
        import aiohttp

        self._profile = tempfile.mkdtemp(prefix="limpq-chromium-")
        self._process = await asyncio.create_subprocess_exec(
            self.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        endpoint = await asyncio.wait_for(self._devtools_endpoint(), timeout=60)
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://{endpoint}/json/list") as response:
            page = next(t for t in await response.json() if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._next_id = 0
        await self.call("Page.enable")
        await self.call("Emulation.setDeviceMetricsOverride",
                        width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)
        return self

    async def _devtools_endpoint(self) -> str:
        while line := await self._process.stderr.readline():
            found = re.search(rb"DevTools listening on ws://([^/]+)/", line)
            if found:
                return found.group(1).decode()
        raise RuntimeError("chromium exited before opening its DevTools port")

    async def __aexit__(self, *exc_info: object) -> None:
        await self._ws.close()
        await self._session.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        await self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def call(self, method: str, **params: object) -> dict:
        self._next_id += 1
        call_id = self._next_id
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._ws.receive()).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> object:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def open(self, url: str, expect: list[str], timeout: float = PAGE_TIMEOUT_S) -> str:
        """Load `url` and wait until the page's text holds every string of `expect`; returns the text.
        Raises AssertionError naming what is missing, with the text the page did show."""
        await self.call("Page.navigate", url=url)
        return await self.wait_for(expect, timeout)

    async def wait_for(self, expect: list[str], timeout: float = PAGE_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = await self.evaluate("document.body ? document.body.innerText : ''") or ""
            if all(needle in text for needle in expect):
                return text
            await asyncio.sleep(0.5)
        missing = [needle for needle in expect if needle not in text]
        raise AssertionError(f"{missing} not shown within {timeout:.0f}s; the page showed: {text[:1500]!r}")

    async def expand_all_runs(self) -> None:
        """Open every collapsed parent row of the runs table (their children are hidden until then).
        The expander is the button in a row's Run Name cell, drawn as a plus sign while collapsed
        (the grid recycles row elements, so the icon, not the element, tells which rows are open);
        each round opens one more level of nesting."""
        for _ in range(10):
            clicked = await self.evaluate(
                "(() => { const buttons = [...document.querySelectorAll("
                "'[role=gridcell][col-id=\"attributes.`Run Name`\"] button')]"
                ".filter(b => b.innerHTML.includes('V4.5h1.5'));"
                " buttons.forEach(b => b.click()); return buttons.length; })()")
            if not clicked:
                return
            await asyncio.sleep(1.0)

    async def models_cell(self, run_name: str) -> str | None:
        """The text of the runs table's Models cell in the row of run `run_name` (None: no such row).
        A row's cells sit in several row elements (pinned and scrolled parts) that share a row-index."""
        return await self.evaluate(
            "(() => { const cell = [...document.querySelectorAll('[role=gridcell][col-id=\"attributes.`Run Name`\"]')]"
            f".find(c => c.innerText.trim().split(/\\s+/).pop() === {json.dumps(run_name)});"
            " if (!cell) return null; const index = cell.closest('[role=row]').getAttribute('row-index');"
            " const models = document.querySelector(`[role=row][row-index=\"${index}\"] "
            "[role=gridcell][col-id=\"attributes.\\`Models\\`\"]`);"
            " return models ? models.innerText.trim() : null; })()")

    async def close_assistant(self) -> None:
        """Close the MLflow Assistant side panel (its close button is the page's top-right one),
        which otherwise takes a third of the page."""
        await self.evaluate(
            "(() => { const buttons = [...document.querySelectorAll('button[aria-label=\"Close\"]')]"
            ".filter(b => { const r = b.getBoundingClientRect(); return r.width > 0 && r.top < 80; });"
            " buttons.forEach(b => b.click()); return buttons.length; })()")

    async def show_metric_columns(self, names: list[str]) -> None:
        """Add these metrics as columns of the runs table, each found through the column selector's
        search box (the selector's tree only renders what fits)."""
        await self.evaluate("[...document.querySelectorAll('button')]"
                            ".filter(b => b.innerText.trim() === 'Columns').forEach(b => b.click())")
        await asyncio.sleep(1.0)
        for name in names:
            await self.evaluate(  # React reads the value through the input event, not the attribute
                "(() => { const box = document.querySelector('[role=dialog] input[placeholder=\"Search columns\"]');"
                " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, "
                f"{json.dumps(name)}); box.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")
            await asyncio.sleep(0.7)
            await self.evaluate(
                "[...document.querySelectorAll('[role=dialog] .du-bois-light-tree-treenode')]"
                f".filter(n => n.innerText.trim() === {json.dumps(name)})"
                ".forEach(n => (n.querySelector('.du-bois-light-tree-checkbox') || n).click())")
        await self.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape",
                        windowsVirtualKeyCode=27)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


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
    from mlflow import MlflowClient

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


def _run_id(client, experiment_id: str, run_name: str) -> str:
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1)
    if not runs:
        raise AssertionError(f"no run named {run_name!r} in the store")
    return runs[0].info.run_id


async def _check_pages(browser: Browser, url: str, experiment_id: str, expected: Expectations,
                       trial_run_id: str | None, timeout: float) -> None:
    await browser.open(experiment_page(url, experiment_id), [expected.root_run, "Run Name"], timeout)
    if expected.nested_runs:
        await browser.expand_all_runs()
        await browser.wait_for(expected.nested_runs, timeout)
    if expected.trial_models:  # the Models column names one of the trial's models and counts the others
        shown, deadline = None, time.monotonic() + timeout
        while not (shown and shown.split()[0] in expected.trial_models and (len(expected.trial_models) == 1
                                                                           or f"+{len(expected.trial_models) - 1}" in shown)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the Models cell of run {expected.trial_run} shows {shown!r}, not its logged "
                                     f"models {expected.trial_models}")
            await asyncio.sleep(0.5)
            shown = await browser.models_cell(expected.trial_run)
    if expected.registered_model:
        await browser.open(f"{url}/#/models?{MODEL_TRAINING}", [expected.registered_model], timeout)
        versions = [f"Version {n}" for n in range(1, expected.model_versions + 1)]
        await browser.open(f"{url}/#/models/{expected.registered_model}?{MODEL_TRAINING}", versions, timeout)
    if trial_run_id:
        run_page = f"{url}/#/experiments/{experiment_id}/runs/{trial_run_id}"
        await browser.open(f"{run_page}?{MODEL_TRAINING}", [expected.trial_run, *expected.trial_metrics], timeout)
        await browser.open(f"{run_page}/artifacts?{MODEL_TRAINING}", expected.trial_artifacts, timeout)


def check_pages(url: str, tracking_uri: str, experiment_name: str, expected: Expectations, chromium: str,
                timeout: float = PAGE_TIMEOUT_S) -> None:
    """Check in Chromium, against the MLflow UI at `url` serving `tracking_uri`: the experiment's runs
    table lists the root run and, expanded, its nested runs; the Models pages list the registered
    model and its versions; the trial run's page shows its metrics, its Artifacts tab its artifacts.
    Raises AssertionError naming what a page did not show."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise AssertionError(f"no experiment {experiment_name!r} in {tracking_uri}")
    trial_run_id = _run_id(client, experiment.experiment_id, expected.trial_run) if expected.trial_run else None
    asyncio.run(_with_browser(chromium, lambda browser: _check_pages(
        browser, url, experiment.experiment_id, expected, trial_run_id, timeout)))


def check_ui(tracking_uri: str, experiment_name: str, expected: Expectations, chromium: str, workdir: Path) -> None:
    """`check_pages` with an `mlflow server` of its own over the store (its log in `workdir`)."""
    with mlflow_server(tracking_uri, workdir / "mlflow-server.log") as url:
        check_pages(url, tracking_uri, experiment_name, expected, chromium)


async def _with_browser(chromium: str, action, width: int = 1600, height: int = 1000):
    async with Browser(chromium, width, height) as browser:
        return await action(browser)


def screenshot_experiment(tracking_uri: str, experiment_name: str, out: Path, chromium: str, workdir: Path,
                          metrics: list[str], width: int = 1600, height: int = 1000) -> Path:
    """A PNG of the experiment's runs table with every nested run expanded and `metrics` as columns."""
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name!r} in {tracking_uri}")

    async def shoot(browser: Browser) -> Path:
        await browser.open(experiment_page(url, experiment.experiment_id), ["Run Name"])
        await browser.show_metric_columns(metrics)
        await browser.close_assistant()
        await browser.expand_all_runs()
        await asyncio.sleep(2)  # row heights and column widths settle
        return await browser.screenshot(out)

    with mlflow_server(tracking_uri, workdir / "mlflow-server.log") as url:
        return asyncio.run(_with_browser(chromium, shoot, width, height))


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
