"""`limpq` console script: a thin dispatcher over command groups.

Each group lives in its own module with `register(subparsers)`; heavy libraries (torch, ray, mlflow)
are imported inside the command functions so that e.g. `limpq search` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from orchestrator.errors import UserError

COMMAND_MODULES = ("data", "indicators", "search", "pipeline", "config", "submit", "evaluate")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"limpq: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `limpq search --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("limpq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
