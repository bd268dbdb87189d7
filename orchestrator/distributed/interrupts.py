"""How the driver reacts to Ctrl-C and SIGTERM, in one place.

The policy: an interrupt (SIGINT, or SIGTERM from `ray job stop` and most schedulers) raises in the
main thread, the pipeline marks every open MLflow run of its tree KILLED, and the process exits
130 / 143. Two things would get in the way, and both are handled here:
- Ray Train's `fit()` and Ray Tune's `Tuner.fit()` install their own SIGINT handlers when called on
  the main thread (Train's stays installed after fit returns and later turns Ctrl-C into
  `sys.exit(0)`; Tune's stops the sweep and returns as if it had finished). Called off the main
  thread they install none (they check), so `run_off_main_thread` runs them on a helper thread.
- Python raises nothing for SIGTERM: `terminate_as_exception` turns it into `Terminated` (the CLI
  holds it for every command; `ray.init` installs a handler of its own, which
  `orchestrator.distributed.runtime.ensure_ray` replaces by ours again).
After the runs are closed and Ray is shut down, a helper thread may still be inside Ray's fit:
`fit_interrupted()` tells the CLI to end the process at once rather than through the interpreter's exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from orchestrator.common.errors import Terminated

T = TypeVar("T")


_fit_threads: list[threading.Thread] = []  # the helper threads of run_off_main_thread, while they run


def fit_interrupted() -> bool:
    """An interrupt left a `run_off_main_thread` helper inside Ray (its fit does not return once Ray
    is shut down): the process must end with `os._exit`, since the interpreter's exit would tear down
    Ray's core worker under that thread and abort (SIGABRT, exit 134)."""
    return any(thread.is_alive() for thread in _fit_threads)


def run_off_main_thread(fit: Callable[[], T], name: str) -> T:
    """`fit()` on a helper thread, its result or exception handed back to the caller; Ctrl-C and
    SIGTERM keep raising in the main thread meanwhile. The thread is a daemon: an interrupted process
    exits without waiting for it (its Ray workers and trials end with the driver)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    _fit_threads.append(thread)
    thread.start()
    thread.join()
    _fit_threads.remove(thread)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread while the block runs, so every open run is
    closed KILLED like after Ctrl-C."""
    def raise_terminated(signum, _frame):
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals to the host
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
