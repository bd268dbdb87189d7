"""`limpq` console script: a thin dispatcher over command groups.

Each group lives in its own module with `register(subparsers)`; heavy libraries (torch, ray, mlflow)
are imported inside the command functions so that e.g. `limpq search` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from orchestrator.console import setup_console
from orchestrator.errors import PipelineFailed, Terminated, UserError

COMMAND_MODULES = ("data", "indicators", "search", "pipeline", "config", "submit", "evaluate", "model")


class _OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes end like every other bad input: one line on stderr, exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="limpq", description="LIMPQ mixed-precision quantization orchestrator")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"orchestrator.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"orchestrator.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


# Attributes under which Ray keeps the exception a worker or task raised: RayTaskError.cause, Ray
# Train's WorkerGroupError.worker_failures (rank -> error), ControllerError.controller_failure, and the
# UserExceptionWithTraceback that wraps each worker's error.
_RAY_WRAPPED = ("cause", "controller_failure", "_base_exc")


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError at the root of `error`, unwrapped from Ray's task and Train exceptions and
    explicit `raise ... from` causes; None when the error is something else (a bug)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = [getattr(current, name) for name in _RAY_WRAPPED
                 if isinstance(getattr(current, name, None), BaseException)]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            inner += [failures[rank] for rank in sorted(failures) if isinstance(failures[rank], BaseException)]
        # A RayTaskError raised by ray.get is also an instance of its cause's class; its text is a traceback.
        if isinstance(current, UserError) and not inner:
            return current
        pending += inner
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return None


def run_reporting_errors(command: Callable[[], int | None]) -> int:
    """Run a command as the console script does: a UserError, also one raised inside a Ray worker,
    is one line on stderr and exit status 2; anything else keeps its traceback (it is a bug)."""
    try:
        return int(command() or 0)
    except PipelineFailed as error:
        print(f"limpq: failed: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `limpq search --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("limpq: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"limpq: {stop}", file=sys.stderr)
        return 143
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        message = " ".join(str(user_error).split("\n"))
        print(f"limpq: error: {message}", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console()
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
