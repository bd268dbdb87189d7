"""`limpq run`: the whole pipeline of a config on Ray (local Ray when no cluster is given); and the
config arguments and checks every config-reading command shares.

Like every CLI module, this one imports torch, Ray and MLflow inside the functions that need them:
`limpq` builds every command's parser at start, and `limpq search` must not pay for them.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from orchestrator.config.loading import load_config, parse_overrides
from orchestrator.config.schema import PipelineConfig

if TYPE_CHECKING:
    from orchestrator.checks.preflight import CheckedConfig


def add_config_arguments(parser: argparse.ArgumentParser, config_flag: bool = True) -> None:
    if config_flag:
        parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set indicators.epochs=1 (YAML value syntax; "
                             "list items by index: search.budgets.0.name=x or search.budgets[0].name=x)")


def load_config_from_args(args: argparse.Namespace, path: str | None = None, sweep: bool = True) -> CheckedConfig:
    """The config of `--config` (or `path`) with the `--set` overrides, through the whole preflight
    check: every mistake knowable before training is a one-line ConfigError here, before Ray starts
    or an MLflow run exists. `sweep`: the command runs the budget sweep (its budgets are checked)."""
    from orchestrator.checks.preflight import preflight

    return preflight(load_config(path or args.config, parse_overrides(args.overrides)), sweep=sweep)


def check_cluster(cfg: PipelineConfig) -> None:
    """On a given cluster (ray.address or RAY_ADDRESS, as under `ray job submit`): connect, and refuse
    workers the cluster can never hold before any stage starts. The embedded local Ray is sized
    for the config, so nothing is started for it here."""
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return
    from orchestrator.distributed.capacity import cluster_capacity
    from orchestrator.distributed.runtime import ensure_ray
    from orchestrator.checks.preflight import check_cluster_resources

    ensure_ray(cfg)
    capacity = cluster_capacity()
    if capacity is not None:
        check_cluster_resources(cfg, capacity)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the pipeline: FP -> indicators -> budget sweep")
    add_config_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    checked = load_config_from_args(args)
    check_cluster(checked.config)
    from orchestrator.distributed.run import run_pipeline

    run_pipeline(checked)
    return 0
