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

from orchestrator.common.console import setup_console
from orchestrator.common.errors import PipelineFailed, Terminated, user_error_in
from orchestrator.distributed.interrupts import fit_interrupted, terminate_as_exception

COMMAND_MODULES = ("data", "indicators", "search", "run", "config", "submit", "evaluate", "export",
                   "model")


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


def run_reporting_errors(command: Callable[[], int | None]) -> int:
    """Run a command as the console script does: a UserError, also one raised inside a Ray worker,
    and an OS error about a file (permissions, a read-only place, a full disk) are one line on stderr
    and exit status 2; anything else keeps its traceback (it is a bug)."""
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
    except OSError as error:
        if error.filename is None:  # not about a file the user named (a network error, a bug): keep the traceback
            raise
        # a path the user gave cannot be read or written (permissions, a read-only place, a full disk)
        print(f"limpq: error: {error.filename}: {error.strerror or error}", file=sys.stderr, flush=True)
        return 2
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
    with terminate_as_exception():  # SIGTERM at any stage: open runs closed KILLED, exit 143
        code = run_reporting_errors(lambda: args.func(args))
    if code in (130, 143) and fit_interrupted():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
