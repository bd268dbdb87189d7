"""`limpq search`: the bit-width ILP for one budget, or a sweep over many, from an indicators file.

Starts fast: a cached cost table is plain JSON, so neither torch nor torchvision is imported unless the
model has to be traced (the first time a model, input size, cost model and fixed-layer set is used).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from orchestrator.cli.model import at_least, model_kwargs
from orchestrator.config.schema import MAX_BUDGETS, Budget
from orchestrator.common.errors import UserError
from orchestrator.common.fileio import writable_directory, writable_file
from orchestrator.search.indicators import load_indicators
from orchestrator.search.costs import cost_table
from orchestrator.search.ilp import Searcher
from orchestrator.search.policy import export_nncf, export_yaml, save_policy
from orchestrator.search.sweep import (
    expand_budgets,
    parse_values,
    parse_wa,
    solve_budgets,
)

SWEEP_HELP = """\
sweeps (each point is solved in-process; --out-dir gets one policy per point and sweep.csv):
  --sweep-wa 2,2 3,3 3,4          uniform-W/A BitOps budgets
  --sweep-bitops 20:60:200         BitOps budgets in G: numbers or START:STOP:COUNT (inclusive)
  --sweep-cr 8 10 12               compression ratios (same number/range syntax)
  --sweep-size-mb 6:12:13          sizes in MB
  --sweep-latency 5 7.5 10         latency budgets in ms (needs --latency-table)
Several sweep axes give every combination; fixed budget flags (e.g. --compression-ratio 12.2) apply to
every point unless that constraint is swept. An infeasible point is a row of sweep.csv with its reason.

BitOps budgets count searchable layers only (docs/method.md §7); reports add the fixed layers at 8x8 bits, and
bitops_g_total also the multiplies left in float (attention matmuls) at 32x32 bits.
MB are 2^20 bytes, as in the published search script.
"""


def _budget_fields(args: argparse.Namespace) -> dict:
    fields = {
        "target_wbits": args.target_wbits, "target_abits": args.target_abits, "bitops_g": args.bitops_budget,
        "compression_ratio": args.compression_ratio, "size_mb": args.size_mb, "latency_ms": args.latency_budget,
        "avg_wbits": args.avg_wbits, "avg_abits": args.avg_abits,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _sweep_axes(args: argparse.Namespace) -> dict[str, list]:
    axes: dict[str, list] = {}
    if args.sweep_wa:
        axes["wa"] = parse_wa(args.sweep_wa, "--sweep-wa")
    for axis, flag in (("bitops", "sweep_bitops"), ("cr", "sweep_cr"), ("size_mb", "sweep_size_mb"),
                       ("latency", "sweep_latency")):
        tokens = getattr(args, flag)
        if tokens:
            axes[axis] = parse_values(tokens, "--" + flag.replace("_", "-"))
    return axes


def _make_budget(fields: dict):
    try:
        return Budget(**fields)
    except ValidationError as error:
        first = error.errors()[0]
        flag = {"target_wbits": "--target-wbits", "target_abits": "--target-abits", "bitops_g": "--bitops-budget",
                "compression_ratio": "--compression-ratio", "size_mb": "--size-mb", "latency_ms": "--latency-budget",
                "avg_wbits": "--avg-wbits", "avg_abits": "--avg-abits"}.get(str(first["loc"][0]) if first["loc"] else "")
        message = first["msg"].removeprefix("Value error, ")
        if message == "a budget needs at least one constraint":
            message = ("no constraint given: use --target-wbits/--target-abits or --bitops-budget, "
                       "--compression-ratio or --size-mb, --latency-budget, --avg-wbits/--avg-abits, or a --sweep-*")
        raise UserError(f"{flag}: {message}" if flag else message) from None


def _print_policy(policy, costs) -> None:
    macs = {layer.name: layer.macs for layer in costs.searchable}
    params = {layer.name: layer.params for layer in costs.searchable}
    width = max(len(layer.name) for layer in policy.layers)
    print(f"{'layer':<{width}}  {'MACs (M)':>10}  {'params (K)':>10}  wbits  abits")
    for layer in policy.layers:
        print(f"{layer.name:<{width}}  {macs[layer.name] / 1e6:>10.2f}  {params[layer.name] / 1e3:>10.1f}  "
              f"{layer.wbits:>5}  {layer.abits:>5}")
    totals = policy.totals
    print(f"fixed layers at 8 bits: {', '.join(policy.fixed_layers) or 'none'}")
    print(f"BitOps {totals.bitops_g:.3f} G searchable, {totals.bitops_g_with_fixed:.3f} G with fixed layers | "
          f"size {totals.size_mb:.3f} MB | compression {totals.compression_ratio:.3f}x vs FP32 | "
          f"avg bits W {totals.avg_wbits:.2f} A {totals.avg_abits:.2f}"
          + (f" | latency {totals.latency_ms:.3f} ms" if totals.latency_ms is not None else ""))
    if costs.float_ops:
        print(f"{100 * costs.float_macs / costs.total_macs:.2f}% of the MACs stay in float (attention matmuls, weights "
              f"read outside a layer): BitOps {totals.bitops_g_total:.3f} G with them at 32x32 bits")
    print(f"objective {policy.objective:.6f} | solved in {policy.solve_seconds * 1e3:.1f} ms ({policy.solver})")


def _search(args: argparse.Namespace) -> int:
    axes = _sweep_axes(args)
    points = math.prod(len(values) for values in axes.values())
    if points > MAX_BUDGETS:
        raise UserError(f"the sweep asks for {points:,} budgets (the product of its axes); at most "
                        f"{MAX_BUDGETS:,} are solved in one command: use fewer values per axis")
    if axes and not args.out_dir:
        raise UserError("--out-dir: a sweep writes one policy per budget there; give a directory")
    if not axes and args.out_dir:
        raise UserError("--out-dir is for sweeps; use --output FILE for one policy")
    if axes and (args.output or args.export_yaml or args.export_nncf):
        raise UserError("--output/--export-yaml/--export-nncf write one policy; a sweep writes to --out-dir")
    if args.latency_budget is not None and not args.latency_table:
        raise UserError("--latency-budget needs --latency-table FILE")
    budget = None if axes else _make_budget(_budget_fields(args))  # a sweep's budgets are checked as it expands them
    for flag, path in (("--output", args.output), ("--export-yaml", args.export_yaml), ("--export-nncf", args.export_nncf)):
        if path:
            writable_file(path, flag)
    if args.out_dir:
        writable_directory(args.out_dir, "--out-dir")
    indicators = load_indicators(args.indicators)
    model = args.model or indicators.model
    if not model:
        raise UserError(f"--model: {args.indicators} does not name its model; give --model (a torchvision name)")
    costs = cost_table(model, args.input_size, args.cost_model, args.fixed_layers, args.num_classes,
                       kwargs=model_kwargs(args.model_kwargs))
    bits = args.bits or indicators.bits
    searcher = Searcher(indicators, costs, args.wbits or bits, args.abits or bits, args.alpha, args.latency_table,
                        indicators_source=args.indicators)
    provenance = {"indicators": args.indicators}
    if axes:
        return _sweep(args, searcher, axes, provenance)
    policy = searcher.solve(budget)
    policy.provenance.update(provenance)
    if args.output:
        save_policy(policy, args.output)
    if args.export_yaml:
        export_yaml(policy, args.export_yaml)
    if args.export_nncf:
        export_nncf(policy, args.export_nncf)
    if args.json:
        json.dump(policy.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_policy(policy, costs)
    return 0


def _sweep(args: argparse.Namespace, searcher, axes: dict[str, list], provenance: dict) -> int:
    budgets = expand_budgets(_budget_fields(args), axes)
    results = solve_budgets(searcher, budgets, args.out_dir, provenance)
    solved = sum(result.policy is not None for result in results)
    csv_path = str(Path(args.out_dir) / "sweep.csv")
    if args.json:
        rows = [{"label": r.budget.label(), "status": "optimal" if r.policy else "infeasible",
                 "policy": r.policy_file, "message": r.message,
                 **({key: getattr(r.policy.totals, key) for key in ("bitops_g", "size_mb", "compression_ratio")}
                    if r.policy else {})} for r in results]
        json.dump({"format": "limpq-sweep/v1", "csv": csv_path, "results": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max(len(r.budget.label()) for r in results)
    print(f"{'budget':<{width}}  {'BitOps G':>9}  {'size MB':>8}  {'ratio':>7}  {'objective':>10}")
    for r in results:
        if r.policy:
            t = r.policy.totals
            print(f"{r.budget.label():<{width}}  {t.bitops_g:>9.3f}  {t.size_mb:>8.3f}  {t.compression_ratio:>7.3f}  "
                  f"{r.policy.objective:>10.6f}")
        else:
            print(f"{r.budget.label():<{width}}  infeasible: {r.message}")
    print(f"{solved} of {len(results)} budgets solved; policies and sweep.csv in {args.out_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="bit-width search (ILP) from importance indicators",
        description="Pick per-layer weight and activation bit-widths that minimise the summed importance "
                    "indicators under BitOps, size, latency or average-bits budgets (docs/method.md §7).",
        epilog=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indicators", required=True, metavar="PATH",
                        help="indicators: our JSON, the published dict JSON, or the published pickle")
    parser.add_argument("--model", help="torchvision model name or package.module:callable (default: the one the "
                                        "indicators name)")
    parser.add_argument("--input-size", type=at_least(8), default=224, metavar="N", help="input resolution for MACs (224)")
    parser.add_argument("--num-classes", type=at_least(2), default=1000, metavar="N", help="classifier outputs (1000)")
    parser.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the model (as model.kwargs)")
    parser.add_argument("--bits", type=int, nargs="+", metavar="B",
                        help="candidate bit-widths for weights and activations (default: the indicators' bits)")
    parser.add_argument("--wbits", type=int, nargs="+", metavar="B", help="weight candidates (refines --bits)")
    parser.add_argument("--abits", type=int, nargs="+", metavar="B", help="activation candidates (refines --bits)")
    budget = parser.add_argument_group("budget (at least one)")
    budget.add_argument("--target-wbits", type=int, metavar="W", help="BitOps budget as uniform W/A: weight bits")
    budget.add_argument("--target-abits", type=int, metavar="A", help="BitOps budget as uniform W/A: activation bits")
    budget.add_argument("--bitops-budget", type=float, metavar="G", help="BitOps budget in G (searchable layers)")
    budget.add_argument("--compression-ratio", type=float, metavar="CR", help="model size at most FP32 size / CR")
    budget.add_argument("--size-mb", type=float, metavar="MB", help="model size at most MB (2^20 bytes)")
    budget.add_argument("--latency-table", metavar="FILE", help="CSV or JSON rows: layer, wbits, abits, ms")
    budget.add_argument("--latency-budget", type=float, metavar="MS", help="summed table latency at most MS")
    budget.add_argument("--avg-wbits", type=float, metavar="X", help="mean weight bits at most X")
    budget.add_argument("--avg-abits", type=float, metavar="X", help="mean activation bits at most X")
    parser.add_argument("--alpha", type=float, default=2.0, help="weight of the weight indicators (default 2)")
    parser.add_argument("--cost-model", choices=("exact", "limpq-official"), default="exact",
                        help="MACs from true output sizes, or the published script's unfloored strides")
    parser.add_argument("--fixed-layers", nargs="+", metavar="NAME",
                        help="layers kept out of the search (default: first conv and the classifier)")
    output = parser.add_argument_group("output")
    output.add_argument("--output", metavar="FILE", help="write the policy JSON v1 here")
    output.add_argument("--json", action="store_true", help="print the policy JSON on stdout and nothing else")
    output.add_argument("--export-yaml", metavar="FILE", help="write weight_bits/act_bits lists (published YAML)")
    output.add_argument("--export-nncf", metavar="FILE", help="write an NNCF-style bitwidth_per_scope config")
    sweep = parser.add_argument_group("sweep (see below)")
    sweep.add_argument("--sweep-wa", nargs="+", metavar="W,A", help="uniform W/A BitOps budgets")
    sweep.add_argument("--sweep-bitops", nargs="+", metavar="G", help="BitOps budgets in G or START:STOP:COUNT")
    sweep.add_argument("--sweep-cr", nargs="+", metavar="CR", help="compression ratios or START:STOP:COUNT")
    sweep.add_argument("--sweep-size-mb", nargs="+", metavar="MB", help="sizes in MB or START:STOP:COUNT")
    sweep.add_argument("--sweep-latency", nargs="+", metavar="MS", help="latency budgets or START:STOP:COUNT")
    sweep.add_argument("--out-dir", metavar="DIR", help="where a sweep writes policies/ and sweep.csv")
    parser.set_defaults(func=_search)
