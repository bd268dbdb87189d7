"""`limpq run`: the whole pipeline of a config on Ray (local Ray when no cluster is given)."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, config_flag: bool = True) -> None:
    if config_flag:
        parser.add_argument("--config", required=True, help="pipeline YAML (see jobs/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set indicators.epochs=1 (YAML value syntax; "
                             "list items by index: search.budgets.0.name=x)")


def load_config_from_args(args: argparse.Namespace, path: str | None = None):
    """The config of `--config` (or `path`) with the `--set` overrides, through the whole preflight
    check: every mistake knowable before training is a one-line ConfigError here, before Ray starts
    or an MLflow run exists."""
    from orchestrator.config import load_config, parse_overrides
    from orchestrator.preflight import preflight

    cfg = load_config(path or args.config, parse_overrides(args.overrides))
    preflight(cfg)
    return cfg


def check_cluster(cfg) -> None:
    """On a given cluster (ray.address or RAY_ADDRESS, as under `ray job submit`): connect, and refuse
    workers the cluster can never hold before any stage starts. The embedded local Ray is sized
    for the config, so nothing is started for it here."""
    import os

    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return
    from orchestrator.distributed.capacity import cluster_capacity
    from orchestrator.distributed.runtime import ensure_ray
    from orchestrator.preflight import check_cluster_resources

    ensure_ray(cfg)
    capacity = cluster_capacity()
    if capacity is not None:
        check_cluster_resources(cfg, capacity)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the pipeline: FP -> indicators -> budget sweep")
    add_config_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config_from_args(args)
    check_cluster(cfg)
    from orchestrator.distributed.pipeline import run_pipeline

    run_pipeline(cfg)
    return 0
