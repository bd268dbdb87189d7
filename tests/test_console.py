"""What reaches the console and what only the log file, and the per-epoch progress bars."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import mlflow  # noqa: F401  imported before the set-up, as in a test session: MLflow has set up its own logging
import pytest
import tqdm

from orchestrator.common.console import log_to_file, setup_console
from orchestrator.train.progress import Progress


@pytest.fixture
def console(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.CaptureFixture:
    """The `limpq` command's logging set-up, undone afterwards (pytest's own handlers put back)."""
    monkeypatch.delenv("MLFLOW_CONFIGURE_LOGGING", raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    setup_console()
    yield capsys
    for handler in root.handlers:
        handler.close()
    root.handlers, root.level = saved_handlers, saved_level
    logging.captureWarnings(False)


def test_own_messages_and_errors_reach_the_console_library_chatter_only_the_file(console, tmp_path: Path) -> None:
    log_file = log_to_file(tmp_path / "logs" / "limpq.log")
    logging.getLogger("limpq").info("fp: training")
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    logging.getLogger("ray.tune").warning("token authentication is enabled")
    logging.getLogger("ray.tune").error("trial W3A3 failed")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("mlflow.pytorch").warning("model logged without a signature")

    printed = console.readouterr().err
    assert "fp: training" in printed and "trial W3A3 failed" in printed
    assert "model logged without a signature" in printed  # a library warning about our use of it
    for chatter in ("Started a local Ray instance", "token authentication", "Creating initial MLflow"):
        assert chatter not in printed
    written = log_file.read_text()
    for line in ("fp: training", "Started a local Ray instance", "token authentication", "trial W3A3 failed",
                 "Creating initial MLflow database tables", "without a signature"):
        assert line in written
    assert log_to_file(tmp_path / "logs" / "limpq.log") == log_file
    assert sum(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers) == 1


def test_one_bar_per_epoch_with_step_and_loss() -> None:
    stream = io.StringIO()
    bars: list[tqdm.tqdm] = []

    def bar(**kwargs):
        bars.append(tqdm.tqdm(file=stream, mininterval=0, **kwargs))
        return bars[-1]

    progress = Progress("fp", epochs=2, steps_per_epoch=3, bar=bar)
    for epoch in range(2):
        for step in range(3):
            progress.update(epoch, step, images=8, metrics={"loss": 2.0 - step, "top1": 0.1 * step})
    progress.close()

    assert [b.n for b in bars] == [3, 3] and [b.total for b in bars] == [3, 3]
    shown = stream.getvalue()
    assert "fp epoch 1/2" in shown and "fp epoch 2/2 loss=0.000 top1=0.200" in shown and "3/3" in shown


def test_resumed_epoch_starts_part_way_and_other_ranks_draw_nothing() -> None:
    made = []

    def bar(**kwargs):
        made.append(tqdm.tqdm(file=io.StringIO(), **kwargs))
        return made[-1]

    resumed = Progress("indicators", epochs=3, steps_per_epoch=10, bar=bar)
    resumed.update(epoch=1, step=4, images=8, metrics={"loss": 1.0})
    assert made[-1].n == 5
    resumed.close()

    silent = Progress("indicators", epochs=3, steps_per_epoch=10, bar=bar, enabled=False)
    silent.update(epoch=0, step=0, images=8, metrics={"loss": 1.0})
    silent.close()
    assert len(made) == 1 and silent.images_per_second > 0
