"""What a person sees on the console, and where everything else goes.

The console gets this project's own messages (stage transitions, results) at INFO, errors from
everything, and warnings from libraries other than Ray. Ray's driver-side warnings are about Ray's
own machinery (token set-up, worker counts, internal deprecations): they go to the log file with
everything else at INFO, and Ray keeps its per-process logs in its session directory
(`<session>/logs`). Stdlib only, so that every layer can import it.
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
from pathlib import Path

OWN_LOGGERS = ("limpq", "orchestrator")
# Ray reports what needs the user as errors (a failed trial, an unschedulable request is an
# autoscaler event in the worker log stream); its warnings are for people debugging Ray.
QUIET_UNTIL_ERROR = ("ray",)

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _is_under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _is_under(record.name, OWN_LOGGERS):
            return record.levelno >= logging.INFO
        if _is_under(record.name, QUIET_UNTIL_ERROR):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """Own messages as `HH:MM:SS message`; others name their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        clock = self.formatTime(record, "%H:%M:%S")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if _is_under(record.name, OWN_LOGGERS) and record.levelno < logging.WARNING:
            return f"{clock} {message}"
        return f"{clock} {record.levelname} {record.name}: {message}"


class _ConsoleHandler(logging.Handler):
    """Writes through `builtins.print`: once Ray's distributed tqdm draws bars on this console it
    patches `print` to clear them first and redraw them after, so log lines never cut a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            builtins.print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def setup_console(level: int = logging.INFO) -> None:
    """Console logging for the `limpq` command; call once, at start."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    # Imported first, MLflow and Ray have put their own stderr handlers on their loggers (Ray's also
    # stops propagation): undo that, so their records go through the filter below and to the file.
    for library in ("mlflow", "ray"):
        if library in sys.modules:
            library_logger = logging.getLogger(library)
            library_logger.handlers.clear()
            library_logger.propagate = True
    # a bar per artifact fetched from a finished stage's run: noise next to the training bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = logging.getLogger()
    root.setLevel(level)
    if any(isinstance(handler, _ConsoleHandler) for handler in root.handlers):
        return
    handler = _ConsoleHandler()
    handler.addFilter(_ConsoleFilter())
    handler.setFormatter(_ConsoleFormatter())
    root.addHandler(handler)
    logging.captureWarnings(True)


def log_to_file(path: Path) -> Path:
    """Also write every record at INFO and above (Ray's and MLflow's included) to `path`; idempotent.
    Returns the path, for telling the user where to look."""
    path = Path(path).resolve()
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(handler)
    return path
