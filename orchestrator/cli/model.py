"""`limpq model info`: every layer and every other multiply of one forward pass, with its MACs, weights
and whether it is searched, fixed (8-bit) or left in float; the totals the search and budgets use.
`limpq model check`: one step of every pipeline stage in-process on a random batch
(orchestrator.models.check)."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from orchestrator.common.errors import UserError
from orchestrator.models.user_module import error_summary
from orchestrator.search.costs import costs_from_layers


def at_least(low: int):
    """An argparse type: an integer >= `low` (a usage error, exit 2, otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def model_kwargs(text: str | None) -> dict:
    """`--model-kwargs` JSON as a dict."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as error:
        raise UserError(f"--model-kwargs: not valid JSON ({error})") from None
    if not isinstance(kwargs, dict):
        raise UserError("--model-kwargs: give a JSON object, e.g. '{\"image_size\": 64}'")
    return kwargs


def model_info(arch: str, input_size: int, num_classes: int = 1000, kwargs: dict | None = None,
               fixed_layers: list[str] | None = None, cross_check: bool = False) -> dict:
    """The `limpq model info --json` document of a model at `input_size` (batch 1)."""
    # torch and torchvision only for this command: every other CLI command starts without them
    from orchestrator.models.info import build_model, flop_counter_macs, trace_model

    model = build_model(arch, num_classes, kwargs=kwargs)
    try:
        trace = trace_model(model, input_size, num_classes)
    except UserError:
        raise
    except Exception as error:  # a model that does not run at this size (a user's code too): one line
        raise UserError(f"--input-size: {arch} does not run at {input_size}x{input_size} "
                        f"({error_summary(error)}); choose a size it accepts") from None
    costs = costs_from_layers(list(trace.layers), "exact", fixed_layers, arch, input_size, num_classes,
                              trace.float_ops)
    fixed = {layer.name for layer in costs.fixed}
    status = {layer.name: "fixed" if layer.name in fixed else "searchable" for layer in trace.layers}
    rows = [{"name": layer.name, "kind": layer.kind, "macs": layer.macs, "params": layer.weight_numel,
             "status": status[layer.name], "quantized_with": None} for layer in trace.layers]
    # an attention's products run at its output projection's activation bits: that layer's status
    rows += [{"name": op.name, "kind": op.kind, "macs": op.macs, "params": op.params,
              "status": status.get(op.quantized_with, "float"),
              "quantized_with": op.quantized_with if op.quantized_with in status else None} for op in trace.float_ops]
    totals = {"total_macs": costs.total_macs, "searchable_macs": costs.searchable_macs,
              "fixed_macs": costs.fixed_macs, "float_macs": costs.float_macs,
              "quantized_share": costs.quantized_share,
              "params": sum(row["params"] for row in rows)}
    if cross_check:
        totals["flop_counter_macs"] = flop_counter_macs(model, input_size)
    return {"format": "limpq-model-info/v1", "model": arch, "input_size": input_size, "num_classes": num_classes,
            "kwargs": dict(kwargs or {}), "layers": rows, "totals": totals}


def _print_layer_table(info: dict) -> None:
    rows, totals = info["layers"], info["totals"]
    total = totals["total_macs"] or 1
    width = max([len(row["name"] or "(model)") for row in rows] + [5])
    print(f"{'layer':<{width}}  {'kind':<9}  {'MACs (M)':>10}  {'share':>6}  {'params (K)':>10}  status")
    for row in rows:
        tie = f" (both operands at {row['quantized_with']}'s activation bits)" if row["quantized_with"] else ""
        print(f"{row['name'] or '(model)':<{width}}  {row['kind']:<9}  {row['macs'] / 1e6:>10.3f}  "
              f"{100 * row['macs'] / total:>5.2f}%  {row['params'] / 1e3:>10.1f}  {row['status']}{tie}")
    print(f"{info['model']} at {info['input_size']}x{info['input_size']}, batch 1: "
          f"total_macs {totals['total_macs']:,} | searchable_macs {totals['searchable_macs']:,} | "
          f"fixed_macs {totals['fixed_macs']:,} | float_macs {totals['float_macs']:,}")
    print(f"quantized share {100 * totals['quantized_share']:.2f}% (searchable and fixed layers); "
          f"{totals['params']:,} weights")
    if "flop_counter_macs" in totals:
        reference = totals["flop_counter_macs"]
        gap = (totals["total_macs"] - reference) / reference if reference else 0.0
        print(f"torch.utils.flop_counter: {reference:,} MACs ({100 * gap:+.2f}%)")


def _info(args: argparse.Namespace) -> int:
    info = model_info(args.arch, args.input_size, args.num_classes, model_kwargs(args.model_kwargs),
                      args.fixed_layers, args.cross_check)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_layer_table(info)
    return 0


def _check(args: argparse.Namespace) -> int:
    from orchestrator.models.check import check_model_stages, stage_check_config

    try:
        cfg = stage_check_config(args.arch, args.input_size, args.num_classes, model_kwargs(args.model_kwargs),
                                 tuple(args.bits))
    except ValidationError as error:  # --input-size and --num-classes are checked by argparse: the bits
        raise UserError(f"--bits: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    check = check_model_stages(cfg)
    if args.json:
        json.dump(check.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for stage in check.passed:
            print(f"{stage:<14} ok    {check.seconds[stage]:7.1f} s")
        if check.ok:
            print(f"{args.arch} at {args.input_size}x{args.input_size}: every stage ran (quantized share "
                  f"{100 * check.quantized_share:.2f}%, {check.searchable_layers} searchable layers)")
        else:
            print(f"{check.failed:<14} FAILED {check.error}")
    return 0 if check.ok else 1


def _add_model_arguments(parser: argparse.ArgumentParser, num_classes: int) -> None:
    parser.add_argument("--arch", required=True,
                        help="torchvision model name, or your own model as package.module:callable")
    parser.add_argument("--input-size", type=at_least(8), required=True, metavar="N",
                        help="square input resolution")
    parser.add_argument("--num-classes", type=at_least(2), default=num_classes, metavar="K",
                        help=f"classifier outputs ({num_classes})")
    parser.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the model (as model.kwargs)")


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("model", help="what a model computes: layers, MACs, quantized share")
    commands = group.add_subparsers(dest="model_command", required=True)
    info = commands.add_parser(
        "info", help="every layer and multiply of one forward pass (batch 1): kind, MACs, weights, "
                     "searchable/fixed/float, and the totals")
    _add_model_arguments(info, num_classes=1000)
    info.add_argument("--fixed-layers", nargs="+", metavar="NAME",
                      help="layers kept out of the search (default: first conv and the classifier)")
    info.add_argument("--cross-check", action="store_true",
                      help="also count the forward with torch.utils.flop_counter (FLOPs / 2)")
    info.add_argument("--json", action="store_true", help="print the JSON document and nothing else")
    info.set_defaults(func=_info)

    check = commands.add_parser(
        "check", help="one step of every stage in-process on a random batch: trace, joint training, search, "
                      "fine-tuning (exit 1 naming the stage that fails)")
    _add_model_arguments(check, num_classes=10)
    check.add_argument("--bits", type=int, nargs="+", default=[4, 2], metavar="B",
                       help="candidate bit-widths of the joint step (4 2)")
    check.add_argument("--json", action="store_true", help="print the result as JSON and nothing else")
    check.set_defaults(func=_check)
