"""`limpq run`: the whole pipeline of a config on Ray (local Ray when no cluster is given)."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set indicators.epochs=1 (YAML value syntax)")


def load_config_from_args(args: argparse.Namespace):
    import yaml

    from orchestrator.config import load_config
    from orchestrator.errors import ConfigError

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return load_config(args.config, overrides)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the pipeline: FP -> indicators -> budget sweep")
    add_config_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config_from_args(args)
    from orchestrator.distributed.pipeline import run_pipeline

    run_pipeline(cfg)
    return 0
