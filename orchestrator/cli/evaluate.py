"""`limpq evaluate`: score policies with the config's finished joint model, no fine-tuning (docs/method.md §13)."""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.cli.run import add_config_arguments, load_config_from_args
from orchestrator.config.schema import uniform_label
from orchestrator.common.errors import UserError
from orchestrator.search.policy import given_policy


class _InOrder(argparse.Action):
    """--policy and --uniform append to one list, so rows come out in the order given on the line."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, "scored") or [])
        items += [(self.dest, value) for value in values]
        namespace.scored = items


def _evaluate(args: argparse.Namespace) -> int:
    if not args.scored:
        raise UserError("give at least one --policy FILE or --uniform B")
    checked = load_config_from_args(args, sweep=False)
    cfg = checked.config
    if args.recalibrate_batches is None:
        args.recalibrate_batches = cfg.finetune.bn_recalibration_batches
    if args.recalibrate_batches < 0:
        raise UserError(f"--recalibrate-batches must be >= 0, got {args.recalibrate_batches}")
    from orchestrator.distributed.evaluate import score_with_finished_joint_model

    names = checked.costs.names  # the searchable layers, as the joint model holds them
    labelled = [(value, given_policy(value, checked.costs, cfg.indicators.bits).assignment()) if kind == "policy" else
                (uniform_label(value), {name: (value, value) for name in names}) for kind, value in args.scored]
    rows = score_with_finished_joint_model(checked, labelled, args.recalibrate_batches)
    if args.json:
        keys = ("policy", "bitops_g", "size_mb", "top1", "samples")
        json.dump([{key: row[key] for key in keys} for row in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max(len("policy"), *(len(row["policy"]) for row in rows))
    print(f"{'policy':<{width}}  {'BitOps G':>9}  {'size MB':>8}  {'top-1 %':>8}  {'loss':>7}  samples")
    for row in rows:
        print(f"{row['policy']:<{width}}  {row['bitops_g']:>9.4f}  {row['size_mb']:>8.4f}  {100 * row['top1']:>8.2f}  "
              f"{row['loss']:>7.4f}  {row['samples']}")
    print("joint model, no fine-tuning; BitOps of the searchable layers"
          + (f"; BN recalibrated on {args.recalibrate_batches} training batches" if args.recalibrate_batches else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score policies with the finished joint model (no fine-tuning)",
        description="Score each policy (policy JSON v1, as `limpq search --output` writes it) with the config's "
                    "finished joint indicator-training model on the config's val split, without fine-tuning: each "
                    "layer uses its step sizes at the chosen bits and the BN copy of its weight bits (docs/method.md §9).")
    add_config_arguments(parser)
    parser.add_argument("--policy", nargs="+", metavar="P.json", action=_InOrder, help="policy files to score")
    parser.add_argument("--uniform", type=int, nargs="+", metavar="B", action=_InOrder,
                        help="also score uniform W{B}A{B}")
    parser.add_argument("--recalibrate-batches", type=int, default=None, metavar="N",
                        help="recompute BN statistics on N training batches per policy first (default: the config's "
                             "finetune.bn_recalibration_batches, 8; 0: the statistics joint training left)")
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON list: {policy, bitops_g, size_mb, top1, samples} per policy")
    parser.set_defaults(func=_evaluate, scored=[])
