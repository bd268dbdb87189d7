"""`limpq indicators`: inspect importance indicators files (training them is another subcommand)."""

from __future__ import annotations

import argparse

from orchestrator.cli.run import (
    add_config_arguments,
    check_cluster,
    load_config_from_args,
)
from orchestrator.search.indicators import Indicators, load_indicators, non_monotonic

NON_MONOTONIC_MARK = "*"


def _show(args: argparse.Namespace) -> int:
    print_table(load_indicators(args.file))
    return 0


def _train(args: argparse.Namespace) -> int:
    checked = load_config_from_args(args, sweep=False)
    check_cluster(checked.config)
    from orchestrator.distributed.run import run_indicators

    path = run_indicators(checked)
    print_table(load_indicators(path))
    print(f"indicators: {path}")
    return 0


def print_table(ind: Indicators) -> None:
    """Step sizes per layer and bit-width, non-monotonic entries marked."""
    flagged = set(non_monotonic(ind))
    bits = ind.bits
    width = max([len("layer")] + [len(name) for name in ind.layers])
    cell = 10
    header_bits = "".join(f"{f'w{b}':>{cell}}" for b in bits) + "  " + "".join(f"{f'a{b}':>{cell}}" for b in bits)
    print(f"indicators of {ind.model or 'an unnamed model'}: {len(ind.layers)} layers, bits {' '.join(map(str, bits))}")
    print(f"{'layer':<{width}}{header_bits}")
    for name in ind.layers:
        cells = []
        for kind, table in (("weight", ind.weight), ("act", ind.act)):
            cells.append("".join(
                f"{table[name][b]:>{cell - 1}.5f}{NON_MONOTONIC_MARK if (name, kind, b) in flagged else ' '}"
                for b in bits))
        print(f"{name:<{width}}{cells[0]}  {cells[1]}")
    weight_count = sum(kind == "weight" for _, kind, _ in flagged)
    print(f"{len(flagged)} non-monotonic entries ({weight_count} weight, {len(flagged) - weight_count} act) marked "
          f"{NON_MONOTONIC_MARK}: step size below the next higher bit-width's; the search never picks them")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("indicators", help="importance indicators: inspect (and train)")
    commands = group.add_subparsers(dest="indicators_command", required=True)

    show = commands.add_parser("show", help="table of step sizes per layer and bit-width, odd entries flagged")
    show.add_argument("file", help="indicators: our JSON, the published dict JSON, or the published pickle")
    show.set_defaults(func=_show)

    train = commands.add_parser("train", help="FP weights (if needed) and joint indicator training on Ray Train")
    add_config_arguments(train)
    train.set_defaults(func=_train)
