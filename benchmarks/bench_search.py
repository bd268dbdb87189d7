"""Bit-width search speed on the ResNet50 conformance case (docs/method.md §7.6): our solver against a straightforward
PuLP + CBC build of the same ILP, in one process; then `limpq search` end to end and a 200-budget sweep.

    .venv/bin/python benchmarks/bench_search.py [--solves 50] [--baseline-runs 5] [--cli-runs 5]

Goals: median solve <= 10 ms and >= 15x faster than PuLP + CBC; `limpq search` <= 1.5 s; 200-budget sweep
<= 2 s. Times are wall clock (CPU time alongside: on a shared machine the two differ). Ratios print last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO.parent / "shared" / "peers" / "limpq-official"
INDICATORS = PUBLISHED / "importance_indicators_resnet50.pkl"
CASE = ["--model", "resnet50", "--input-size", "224", "--bits", "6", "5", "4", "3", "2", "--target-wbits", "3",
        "--target-abits", "4", "--compression-ratio", "12.2", "--alpha", "2", "--cost-model", "limpq-official"]
SWEEP = ["--model", "resnet50", "--cost-model", "limpq-official", "--compression-ratio", "12.2",
         "--sweep-bitops", "20:100:200"]


def timed(function, runs: int) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds, last result)."""
    walls, cpus, result = [], [], None
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def straightforward_pulp(indicators, costs, bits: list[int], target_w: int, target_a: int, ratio: float,
                         alpha: float, solver) -> tuple[list[tuple[int, int]], float]:
    """The ILP as the published script builds it: one binary per layer x wbits x abits, non-monotonic
    entries priced 1e8, lpSum constraints, the solver's default settings."""
    import pulp

    from orchestrator.search.indicators import non_monotonic

    excluded = set(non_monotonic(indicators))
    layers = costs.searchable
    problem = pulp.LpProblem("bit_width_allocation", pulp.LpMinimize)
    x = {(i, w, a): problem.add_variable(f"l{i}_w{w}_a{a}", 0, 1, cat=pulp.LpInteger)
         for i in range(len(layers)) for w in bits for a in bits}

    def step(name: str, kind: str, b: int) -> float:
        return 1e8 if (name, kind, b) in excluded else getattr(indicators, kind)[name][b]

    problem += pulp.lpSum((step(layers[i].name, "act", a) + alpha * step(layers[i].name, "weight", w)) * var
                          for (i, w, a), var in x.items())
    for i in range(len(layers)):
        problem += pulp.lpSum(x[i, w, a] for w in bits for a in bits) == 1
    problem += pulp.lpSum(layers[i].macs * w * a * var for (i, w, a), var in x.items()) <= \
        sum(layer.macs for layer in layers) * target_w * target_a
    problem += costs.fixed_weight_bits + pulp.lpSum(layers[i].params * w * var for (i, w, a), var in x.items()) <= \
        costs.fp32_bits / ratio
    problem.solve(solver)
    chosen = [next((w, a) for w in bits for a in bits if x[i, w, a].value() > 0.5) for i in range(len(layers))]
    objective = sum(indicators.act[layer.name][a] + alpha * indicators.weight[layer.name][w]
                    for layer, (w, a) in zip(layers, chosen))
    return chosen, objective


def run_cli(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())", *args],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solves", type=int, default=50)
    parser.add_argument("--baseline-runs", type=int, default=5)
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--sweep-runs", type=int, default=3)
    args = parser.parse_args()
    if not INDICATORS.is_file():
        sys.exit(f"needs the published indicators at {INDICATORS}")
    warnings.simplefilter("ignore", DeprecationWarning)
    with tempfile.TemporaryDirectory(prefix="limpq-bench-") as scratch:
        measure(args, Path(scratch))


def measure(args: argparse.Namespace, scratch: Path) -> None:
    import pulp

    from orchestrator.config.schema import Budget
    from orchestrator.search.indicators import load_indicators
    from orchestrator.search.costs import cost_table
    from orchestrator.search.ilp import Searcher, solve

    cache = str(scratch / "cache")
    env = {**os.environ, "LIMPQ_CACHE_DIR": cache}
    os.environ["LIMPQ_CACHE_DIR"] = cache
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes inflate wall times)")
    started = time.perf_counter()
    costs = cost_table("resnet50", 224, "limpq-official")  # traced once here, cached for everything below
    print(f"cost table traced and cached in {time.perf_counter() - started:.2f} s (not part of any timing)")
    indicators = load_indicators(INDICATORS)
    budget = Budget(target_wbits=3, target_abits=4, compression_ratio=12.2)
    bits = [6, 5, 4, 3, 2]

    ours_wall, ours_cpu, policy = timed(lambda: solve(indicators, costs, budget, alpha=2.0), args.solves)
    print(f"ours: solve() from scratch (cost matrix, LP, search): median {ours_wall * 1e3:.2f} ms wall, "
          f"{ours_cpu * 1e3:.2f} ms CPU over {args.solves}; objective {policy.objective:.9f} ({policy.solver})")

    cbc_wall, cbc_cpu, (cbc_policy, cbc_objective) = timed(
        lambda: straightforward_pulp(indicators, costs, bits, 3, 4, 12.2, 2.0, pulp.PULP_CBC_CMD(msg=False)),
        args.baseline_runs)
    same = cbc_policy == [(layer.wbits, layer.abits) for layer in policy.layers]
    print(f"baseline: straightforward PuLP + CBC (default settings): median {cbc_wall * 1e3:.1f} ms wall over "
          f"{args.baseline_runs}; objective {cbc_objective:.9f} ({'same policy' if same else 'a worse policy: CBC stops at its default gap'})")
    highs_wall, _, (_, highs_objective) = timed(
        lambda: straightforward_pulp(indicators, costs, bits, 3, 4, 12.2, 2.0,
                                     pulp.HiGHS(msg=False, gapRel=0.0, gapAbs=0.0)), min(3, args.baseline_runs))
    print(f"reference: the same build with PuLP + HiGHS at gap 0 (exact): median {highs_wall * 1e3:.1f} ms wall; "
          f"objective {highs_objective:.9f}")

    searcher = Searcher(indicators, costs)
    sweep_budgets = [Budget(bitops_g=20 + 80 * i / 199, compression_ratio=12.2) for i in range(200)]
    wall, cpu = time.perf_counter(), time.process_time()
    for point in sweep_budgets:
        searcher.solve(point)
    sweep_solve_wall, sweep_solve_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"ours: 200 budgets on one Searcher, in-process: {sweep_solve_wall:.2f} s wall, {sweep_solve_cpu:.2f} s CPU")

    cli_args = ["search", "--indicators", str(INDICATORS), *CASE, "--json"]
    run_cli(cli_args, env)  # warm the file cache
    cli_wall, _, _ = timed(lambda: run_cli(cli_args, env), args.cli_runs)
    print(f"ours: `limpq search ... --json` end to end (new process, cached cost table): median {cli_wall:.3f} s "
          f"over {args.cli_runs}")
    sweep_args = ["search", "--indicators", str(INDICATORS), *SWEEP, "--out-dir", str(scratch / "sweep")]
    sweep_wall, _, _ = timed(lambda: run_cli(sweep_args, env), args.sweep_runs)
    print(f"ours: `limpq search --sweep-bitops 20:100:200 --compression-ratio 12.2` end to end (200 policies + CSV): "
          f"median {sweep_wall:.2f} s over {args.sweep_runs}")

    print("--- ratios and goals ---")
    print(f"solve: PuLP+CBC / ours = {cbc_wall / ours_wall:.1f}x (goal >= 15x); ours {ours_wall * 1e3:.2f} ms "
          f"(goal <= 10 ms); PuLP+HiGHS exact / ours = {highs_wall / ours_wall:.1f}x")
    print(f"limpq search wall = {cli_wall:.3f} s (goal <= 1.5 s); 200-budget sweep wall = {sweep_wall:.2f} s "
          f"(goal <= 2 s)")


if __name__ == "__main__":
    main()
