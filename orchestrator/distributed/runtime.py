"""Connect to Ray: join the cluster a job was submitted to, or start the embedded local default.

A local Ray comes with its dashboard on 127.0.0.1 (Train and Data progress, worker logs) and keeps
its internals off the console: worker processes forward only warnings and errors, our progress bars
(Ray's distributed tqdm) and our own log lines; the rest stays in the session's log directory.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import warnings
from pathlib import Path

import ray
from ray.data import DataContext

from orchestrator.config.schema import PipelineConfig
from orchestrator.common.console import log_to_file
from orchestrator.compat import check_versions, train_report_logger_name

log = logging.getLogger("limpq")

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")  # its filter: ray_data_logging.py
# For every Train RunConfig(logging_config=...): Ray Train's INFO lines ("Moving model to device", every
# reported checkpoint) and warnings about its own machinery (a slow resource request on a busy machine)
# stay in <session>/logs/train/; a failure that matters reaches the console as an error.
TRAIN_LOGGING = ray.LoggingConfig(log_level="ERROR")

_context = None  # what ray.init returned when this process started or joined Ray
_started_here = False  # this process started its own (fixed-size) local Ray


def local_cpu_count(cfg: PipelineConfig) -> int:
    """Logical CPUs for an embedded local Ray: twice the cores (at least 4), and always two more than
    the Train workers reserve, because they hold theirs for the whole run and Ray Data needs CPUs of its
    own to feed them, or it hangs."""
    return max(4, 2 * (os.cpu_count() or 1), math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 2)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (each held until all are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


# Loggers whose INFO lines in workers are set-up detail (Ray Train configures workers' root logger
# to print INFO): the MLflow store's schema checks, and Train's per-report line, which Ray names
# after its source file rather than under "ray.train", where RunConfig's logging_config would reach.
WORKER_QUIET_LOGGERS = ("alembic", "mlflow", train_report_logger_name())


def quiet_ray_internals() -> None:
    """Runs in every Ray worker process at start (runtime_env worker_process_setup_hook). Ray's
    deprecation warnings about its own internal calls are for Ray's developers, not our users."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    for name in WORKER_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _worker_env(dashboard_port: int) -> dict[str, str]:
    return {
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's own stderr handler would bypass the levels above
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # Ray Train routes print() through its logger, which adds an empty line after each of the
        # distributed tqdm's state lines; plain stdout reaches the driver as is.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # It watches for nodes being drained (spot preemption), which one local machine is not, and
        # its start logs an error line per Train run (ray-project/ray#53727).
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),
        # Ray Data's per-operator bars would interleave with ours; the dashboard's Data view has them.
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Ray Train's placement-group cleaner asks the state API without an address: with several Ray
        # instances on one machine it cannot tell which is ours and prints a traceback per stage.
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
    }


def ensure_ray(cfg: PipelineConfig) -> None:
    """Idempotent. Under `ray job submit` RAY_ADDRESS points at the cluster and `ray.init()` joins it."""
    global _context, _started_here
    if ray.is_initialized():
        return
    log_file = log_to_file(cfg.run_dir / "logs" / "limpq.log")
    # Ray's driver-side records go through our handlers (console: errors; file: everything).
    logging.getLogger("ray").propagate = True
    DataContext.get_current().enable_progress_bars = False
    # Ray Tune's newer console output prints its experiment box and result paths even at verbose=0;
    # its classic output honours verbose=0 (our sweep's setting): the bars and final table say it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # ray.init replaces the SIGTERM handler with sys.exit(15), which would skip closing the runs
    # (orchestrator.distributed.interrupts): ours is put back once Ray is up.
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        log.info("joining Ray cluster at %s", address)
        _context = ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        [port] = free_ports(1)
        log.info("starting local Ray (%d logical CPUs)", local_cpu_count(cfg))
        _started_here = True
        _context = ray.init(
            # "local": a new instance even when `ray start` left one on this machine, which plain
            # ray.init() would join (and then refuse num_cpus)
            # include_dashboard left to Ray (None): started (ray[default] is installed), but a dashboard
            # that fails to come up on a swamped machine is logged, not the end of the run, as True makes it
            address="local", num_cpus=local_cpu_count(cfg), dashboard_host="127.0.0.1", dashboard_port=port,
            log_to_driver=True, configure_logging=False,
            runtime_env={"env_vars": _worker_env(port), "worker_process_setup_hook": quiet_ray_internals},
        )
    if threading.current_thread() is threading.main_thread() and sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    log.info("logs: %s; Ray's in %s", log_file, Path(_context.address_info["session_dir"]) / "logs")
    check_versions()
    url = dashboard_url()
    if url:
        log.info("Ray dashboard (Train and Data progress while this runs): %s; if it asks for a token, "
                 "`ray get-auth-token` prints it", url)


def stop_ray() -> None:
    """Leave Ray (shutting down the local Ray this process started): this driver's trials, Train
    workers and tasks end with it."""
    global _context, _started_here
    if ray.is_initialized():
        ray.shutdown()
    _context, _started_here = None, False


def started_local_ray() -> bool:
    """True when this process started its own local Ray: its size is fixed and known."""
    return _started_here and ray.is_initialized()


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster this process started or joined (None before that, or when the
    cluster runs without one)."""
    if _context is None or not ray.is_initialized():
        return None
    address = _context.address_info.get("webui_url")
    return f"http://{address}" if address else None
