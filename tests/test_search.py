"""Bit-width search: published-policy conformance, optimality against brute force, constraints,
infeasibility messages, cost accounting, and the `limpq search` command line."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config.schema import Budget
from orchestrator.common.errors import InfeasibleError, UserError
from orchestrator.search.indicators import Indicators, non_monotonic, save_indicators
from orchestrator.search.costs import CostTable, LayerCost, cost_table
from orchestrator.search.ilp import Searcher, solve
from orchestrator.search.policy import (
    MEGABYTE_BITS,
    load_policy,
    policy_to_nncf,
    policy_to_yaml,
)
from orchestrator.search.sweep import (
    expand_budgets,
    parse_values,
    parse_wa,
    solve_budgets,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PUBLISHED = SHARED / "peers" / "limpq-official"
needs_shared = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="../shared/peers/limpq-official is absent")
_SCRIPT = Path(sys.executable).with_name("limpq")
LIMPQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """One cost-table cache for these tests and the commands they run: each model is traced once."""
    root = tmp_path_factory.mktemp("limpq-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIMPQ_CACHE_DIR", str(root))
        yield root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LIMPQ, *args], capture_output=True, text=True)


# -- a toy search space that brute force can enumerate -------------------------------------------------

def toy_case(seed: int, num_layers: int, bits: list[int]) -> tuple[Indicators, CostTable, dict]:
    """Step sizes that mostly grow as bits fall, with a few non-monotonic entries; a latency table."""
    rng = np.random.default_rng(seed)
    names = [f"block{i}.conv" for i in range(num_layers)]
    costs = CostTable(
        model="toy", input_size=32, num_classes=10, accounting="exact",
        searchable=tuple(LayerCost(name, "conv", int(rng.integers(1, 40)) * 1024, int(rng.integers(1, 40)) * 64)
                         for name in names),
        fixed=(LayerCost("stem", "conv", 3000, 432), LayerCost("fc", "linear", 640, 640)),
    )
    descending = sorted(bits, reverse=True)
    weight, act = {}, {}
    for name in names:
        for table in (weight, act):
            steps = np.cumsum(rng.uniform(0.002, 0.05, len(bits)))
            if rng.random() < 0.5:  # one joint-training artefact
                k = int(rng.integers(1, len(bits)))
                steps[k] = steps[k - 1] * rng.uniform(0.5, 0.99)
            table[name] = {b: float(s) for b, s in zip(descending, steps)}
    indicators = Indicators("toy", bits, names, weight, act, {})
    latency = {(name, w, a): float(rng.uniform(0.1, 1.0) * w * a / 4) for name in names for w in bits for a in bits}
    return indicators, costs, latency


def enumerate_policies(indicators: Indicators, costs: CostTable, latency: dict, alpha: float) -> dict:
    """Every allowed policy's objective and resource totals (independent of the solver's code)."""
    excluded = set(non_monotonic(indicators))
    per_layer = []
    for layer in costs.searchable:
        options = [(w, a) for w in indicators.bits for a in indicators.bits
                   if (layer.name, "weight", w) not in excluded and (layer.name, "act", a) not in excluded]
        per_layer.append(options)
    columns = {key: [] for key in ("objective", "bitops", "size_bits", "latency", "sum_w", "sum_a")}
    policies = []
    for combo in itertools.product(*per_layer):
        policies.append(combo)
        columns["objective"].append(sum(indicators.act[la.name][a] + alpha * indicators.weight[la.name][w]
                                        for la, (w, a) in zip(costs.searchable, combo)))
        columns["bitops"].append(sum(la.macs * w * a for la, (w, a) in zip(costs.searchable, combo)))
        columns["size_bits"].append(costs.fixed_weight_bits + sum(la.params * w for la, (w, _) in zip(costs.searchable, combo)))
        columns["latency"].append(sum(latency[(la.name, w, a)] for la, (w, a) in zip(costs.searchable, combo)))
        columns["sum_w"].append(sum(w for w, _ in combo))
        columns["sum_a"].append(sum(a for _, a in combo))
    return {"policies": policies, **{key: np.array(value, dtype=float) for key, value in columns.items()}}


def between_achievable(values: np.ndarray, rng) -> float:
    """A budget strictly between two achievable totals (no ties at the boundary), or below them all."""
    distinct = np.unique(values)
    k = int(rng.integers(0, len(distinct)))
    return float(distinct[0] * 0.9) if k == 0 else float((distinct[k - 1] + distinct[k]) / 2)


def feasible_mask(table: dict, budget: Budget, costs: CostTable) -> np.ndarray:
    ok = np.ones(len(table["policies"]), dtype=bool)
    searchable_macs = sum(la.macs for la in costs.searchable)
    if budget.target_wbits is not None:
        ok &= table["bitops"] <= searchable_macs * budget.target_wbits * budget.target_abits
    if budget.bitops_g is not None:
        ok &= table["bitops"] <= budget.bitops_g * 1e9
    if budget.compression_ratio is not None:
        ok &= costs.fp32_bits / table["size_bits"] >= budget.compression_ratio
    if budget.size_mb is not None:
        ok &= table["size_bits"] / MEGABYTE_BITS <= budget.size_mb
    if budget.latency_ms is not None:
        ok &= table["latency"] <= budget.latency_ms
    count = len(costs.searchable)
    if budget.avg_wbits is not None:
        ok &= table["sum_w"] / count <= budget.avg_wbits
    if budget.avg_abits is not None:
        ok &= table["sum_a"] / count <= budget.avg_abits
    return ok


CONSTRAINT_KINDS = ("bitops", "size", "latency", "avg_wbits", "avg_abits")


def random_budget(kinds: tuple[str, ...], table: dict, costs: CostTable, bits: list[int], rng) -> Budget:
    fields = {}
    if "bitops" in kinds:
        if rng.random() < 0.5:
            fields.update(target_wbits=int(rng.choice(bits)), target_abits=int(rng.choice(bits)))
        else:
            fields["bitops_g"] = between_achievable(table["bitops"], rng) / 1e9
    if "size" in kinds:
        size_bits = between_achievable(table["size_bits"], rng)
        if rng.random() < 0.5:
            fields["compression_ratio"] = costs.fp32_bits / size_bits
        else:
            fields["size_mb"] = size_bits / MEGABYTE_BITS
    if "latency" in kinds:
        fields["latency_ms"] = between_achievable(table["latency"], rng)
    count = len(costs.searchable)
    if "avg_wbits" in kinds:
        fields["avg_wbits"] = between_achievable(table["sum_w"], rng) / count
    if "avg_abits" in kinds:
        fields["avg_abits"] = between_achievable(table["sum_a"], rng) / count
    return Budget(**fields)


@pytest.mark.parametrize("seed, num_layers, bits", [(0, 3, [6, 5, 4, 3, 2]), (1, 4, [4, 3, 2]), (2, 4, [5, 4, 3, 2])])
def test_optimum_matches_brute_force_for_every_constraint_combination(seed, num_layers, bits):
    indicators, costs, latency = toy_case(seed, num_layers, bits)
    alpha = 2.0
    table = enumerate_policies(indicators, costs, latency, alpha)
    searcher = Searcher(indicators, costs, alpha=alpha, latency_table=latency)
    rng = np.random.default_rng(100 + seed)
    solved = infeasible = 0
    for size in range(1, len(CONSTRAINT_KINDS) + 1):
        for kinds in itertools.combinations(CONSTRAINT_KINDS, size):
            for _ in range(2):
                budget = random_budget(kinds, table, costs, bits, rng)
                ok = feasible_mask(table, budget, costs)
                if not ok.any():
                    with pytest.raises(InfeasibleError):
                        searcher.solve(budget)
                    infeasible += 1
                    continue
                policy = searcher.solve(budget)
                assert policy.objective == pytest.approx(table["objective"][ok].min(), rel=1e-12, abs=1e-12)
                chosen = tuple((layer.wbits, layer.abits) for layer in policy.layers)
                assert ok[table["policies"].index(chosen)], f"policy breaks {budget}"
                solved += 1
    assert solved > 20 and infeasible > 0


def test_returned_policies_meet_their_budgets_and_report_totals():
    indicators, costs, latency = toy_case(3, 4, [6, 5, 4, 3, 2])
    searcher = Searcher(indicators, costs, latency_table=latency)
    budget = Budget(target_wbits=3, target_abits=4, compression_ratio=9.0, latency_ms=12.0, avg_abits=4.5)
    policy = searcher.solve(budget)
    wbits = [layer.wbits for layer in policy.layers]
    abits = [layer.abits for layer in policy.layers]
    bitops = sum(la.macs * w * a for la, w, a in zip(costs.searchable, wbits, abits))
    size_bits = costs.fixed_weight_bits + sum(la.params * w for la, w in zip(costs.searchable, wbits))
    assert bitops <= sum(la.macs for la in costs.searchable) * 12
    assert costs.fp32_bits / size_bits >= 9.0
    assert sum(latency[(la.name, w, a)] for la, w, a in zip(costs.searchable, wbits, abits)) <= 12.0
    assert np.mean(abits) <= 4.5
    totals = policy.totals
    assert totals.bitops_g == pytest.approx(bitops / 1e9)
    assert totals.bitops_g_with_fixed == pytest.approx((bitops + 64 * (3000 + 640)) / 1e9)
    assert totals.compression_ratio == pytest.approx(costs.fp32_bits / size_bits)
    assert totals.size_mb == pytest.approx(size_bits / MEGABYTE_BITS)
    assert policy.constraints == {"target_wbits": 3, "target_abits": 4, "compression_ratio": 9.0, "latency_ms": 12.0,
                                  "avg_abits": 4.5}
    excluded = set(non_monotonic(indicators))
    assert not any((layer.name, "weight", layer.wbits) in excluded or (layer.name, "act", layer.abits) in excluded
                   for layer in policy.layers)


def test_separate_weight_and_activation_candidates():
    indicators, costs, _ = toy_case(4, 3, [6, 5, 4, 3, 2])
    policy = solve(indicators, costs, Budget(bitops_g=0.002), wbits=[4, 2], abits=[6, 5])
    assert {layer.wbits for layer in policy.layers} <= {4, 2}
    assert {layer.abits for layer in policy.layers} <= {6, 5}
    with pytest.raises(UserError, match="weight bit-width.s. 8 have no indicators"):
        solve(indicators, costs, Budget(bitops_g=1.0), wbits=[8, 4])


def test_infeasible_budget_names_constraint_and_minimum_reachable():
    indicators, costs, latency = toy_case(5, 3, [6, 5, 4, 3, 2])
    table = enumerate_policies(indicators, costs, latency, 2.0)
    searcher = Searcher(indicators, costs, latency_table=latency)
    least = table["bitops"].min() / 1e9
    with pytest.raises(InfeasibleError) as error:
        searcher.solve(Budget(bitops_g=least / 2))
    match = re.fullmatch(r"BitOps budget (\S+) G is below the minimum (\S+) G reachable with bits 2\.\.6",
                         str(error.value))
    assert match and float(match.group(2)) == pytest.approx(least, rel=1e-3)
    with pytest.raises(InfeasibleError, match=r"^latency budget .* ms is below the minimum .* ms reachable"):
        searcher.solve(Budget(latency_ms=table["latency"].min() * 0.5))
    best_ratio = costs.fp32_bits / table["size_bits"].min()
    with pytest.raises(InfeasibleError, match=rf"^compression ratio .* is above the maximum {best_ratio:.4g} reachable"):
        searcher.solve(Budget(compression_ratio=best_ratio * 1.5))
    with pytest.raises(InfeasibleError, match=r"^average weight bits 1\.5 is below the minimum 2 reachable"):
        searcher.solve(Budget(avg_wbits=1.5))


def test_jointly_infeasible_budgets_name_the_other_constraint():
    indicators, costs, latency = toy_case(6, 3, [6, 5, 4, 3, 2])
    table = enumerate_policies(indicators, costs, latency, 2.0)
    # Latencies are not monotone in the bits: the fastest policies under a tight BitOps budget are slower
    # than the fastest overall, so a latency budget between the two is feasible alone, not together.
    for bitops_budget in np.unique(table["bitops"])[1:]:
        fastest_within = table["latency"][table["bitops"] <= bitops_budget].min()
        if fastest_within > table["latency"].min():
            break
    latency_budget = (fastest_within + table["latency"].min()) / 2
    budget = Budget(bitops_g=bitops_budget / 1e9, latency_ms=latency_budget)
    assert not feasible_mask(table, budget, costs).any()
    with pytest.raises(InfeasibleError) as error:
        Searcher(indicators, costs, latency_table=latency).solve(budget)
    message = str(error.value)
    assert "while meeting" in message and "\n" not in message
    assert message.startswith(("BitOps budget", "latency budget"))


def test_no_constraint_and_layer_mismatch_are_user_errors():
    indicators, costs, _ = toy_case(7, 3, [4, 3, 2])
    searcher = Searcher(indicators, costs)
    with pytest.raises(UserError, match="no constraint given"):
        searcher.solve(Budget.model_construct(**{key: None for key in Budget.model_fields}))
    other = CostTable("toy", 32, 10, "exact", (costs.searchable[0], LayerCost("new.conv", "conv", 10, 10)), costs.fixed)
    with pytest.raises(UserError) as error:
        Searcher(indicators, other)
    assert "missing 1: new.conv" in str(error.value) and "extra 2: block1.conv, block2.conv" in str(error.value)


def test_latency_table_files(tmp_path):
    indicators, costs, latency = toy_case(8, 3, [4, 3, 2])
    rows = [{"layer": f"module.{name}", "wbits": w, "abits": a, "ms": ms} for (name, w, a), ms in latency.items()]
    json_path = tmp_path / "lat.json"
    json_path.write_text(json.dumps({"rows": rows}))
    csv_path = tmp_path / "lat.csv"
    csv_path.write_text("ms,layer,wbits,abits\n" + "".join(f"{r['ms']!r},{r['layer']},{r['wbits']},{r['abits']}\n" for r in rows))
    budget = Budget(latency_ms=float(np.median(list(latency.values()))) * 3)
    from_json = Searcher(indicators, costs, latency_table=json_path).solve(budget)
    from_csv = Searcher(indicators, costs, latency_table=csv_path).solve(budget)
    assert from_json.layers == from_csv.layers and from_json.totals.latency_ms <= budget.latency_ms
    csv_path.write_text("layer,wbits,abits,ms\nblock0.conv,4,4,1.0\n")
    with pytest.raises(UserError, match="latency table lacks"):
        Searcher(indicators, costs, latency_table=csv_path)
    with pytest.raises(UserError, match="a latency budget needs a latency table"):
        Searcher(indicators, costs).solve(Budget(latency_ms=1.0))


def test_sweep_records_infeasible_budgets_and_continues(tmp_path):
    indicators, costs, _ = toy_case(9, 3, [6, 5, 4, 3, 2])
    searcher = Searcher(indicators, costs)
    budgets = expand_budgets({"compression_ratio": 2.0}, {"wa": parse_wa(["6,6", "2,2", "4x3"], "--sweep-wa"),
                                                          "bitops": [1e-9, 1.0]})
    assert len(budgets) == 6
    results = solve_budgets(searcher, budgets, tmp_path)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [row["status"] for row in rows] == ["infeasible" if r.policy is None else "optimal" for r in results]
    assert {row["status"] for row in rows} == {"optimal", "infeasible"}
    for row in rows:
        if row["status"] == "optimal":
            assert load_policy(tmp_path / row["policy"]).layers
            assert float(row["compression_ratio"]) >= 2.0
        else:
            assert "BitOps budget" in row["message"]
    assert parse_values(["1:2:3", "5"], "--sweep-cr") == [1.0, 1.5, 2.0, 5.0]
    with pytest.raises(UserError, match="--sweep-cr"):
        parse_values(["1:2"], "--sweep-cr")


# -- cost accounting --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_exact_macs_equal_torch_flop_counter(arch):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from orchestrator.models.info import build_model

    table = cost_table(arch, 224, "exact")
    model = build_model(arch).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    for layer in table.searchable + table.fixed:
        flops = counts[f"{prefix}.{layer.name}"]
        op = torch.ops.aten.convolution if layer.kind == "conv" else torch.ops.aten.addmm
        assert flops[op] == 2 * layer.macs, layer.name
    assert sum(flops for op, flops in counts["Global"].items()) == 2 * sum(la.macs for la in table.searchable + table.fixed)


def test_official_accounting_uses_unfloored_strides():
    exact = {la.name: la for la in cost_table("resnet50", 224, "exact").searchable}
    official = {la.name: la for la in cost_table("resnet50", 224, "limpq-official").searchable}
    # 3x3, stride 2, padding 1 on 56x56: (56 + 2 - 2 - 1) / 2 + 1 = 28.5 per side, 812.25 -> 812 positions
    assert official["layer2.0.conv2"].macs == 128 * 128 * 9 * 812
    assert exact["layer2.0.conv2"].macs == 128 * 128 * 9 * 28 * 28
    assert official["layer1.0.conv1"].macs == exact["layer1.0.conv1"].macs  # stride 1: identical
    assert all(official[name].params == exact[name].params for name in exact)


def test_cached_cost_table_loads_without_torch():
    cost_table("resnet18", 32, "exact")
    code = ("import sys; from orchestrator.search.costs import cost_table; "
            "t = cost_table('resnet18', 32, 'exact'); "
            "assert len(t.searchable) == 19, len(t.searchable); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command line -------------------------------------------------------------------------------

@needs_shared
def test_conformance_with_the_published_policy():
    result = cli("search", "--indicators", str(PUBLISHED / "importance_indicators_resnet50.pkl"), "--model", "resnet50",
                 "--input-size", "224", "--bits", "6", "5", "4", "3", "2", "--target-wbits", "3", "--target-abits", "4",
                 "--compression-ratio", "12.2", "--alpha", "2", "--cost-model", "limpq-official", "--json")
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    expected = json.loads((PUBLISHED / "expected_resnet50_w3a4_cr12.2.json").read_text())
    assert policy["layers"] == expected["layers"]
    printout = expected["published_printout"]
    assert policy["compression_ratio"] == pytest.approx(printout["compress_ratio"], rel=1e-12)
    assert round(policy["bitops_g_with_fixed"], 3) == printout["searched_bitops_g_incl_fixed_layers"]
    assert policy["objective"] == pytest.approx(printout["objective"], rel=1e-12)
    assert policy["format"] == "limpq-policy/v1" and policy["constraints"]["compression_ratio"] == 12.2


@pytest.fixture(scope="module")
def resnet18_indicators(tmp_path_factory) -> Path:
    """Synthetic indicators for resnet18's searchable layers (the solver only needs plausible numbers)."""
    table = cost_table("resnet18", 32, "exact")
    rng = np.random.default_rng(0)
    bits = [6, 5, 4, 3, 2]

    def steps() -> dict[int, float]:
        return {b: float(s) for b, s in zip(bits, np.cumsum(rng.uniform(0.005, 0.05, len(bits))))}

    names = table.names
    path = tmp_path_factory.mktemp("indicators") / "resnet18.json"
    save_indicators(Indicators("resnet18", bits, names, {n: steps() for n in names}, {n: steps() for n in names},
                               {"data": "synthetic"}), path)
    return path


def test_cli_json_prints_only_the_policy_and_writes_exports(resnet18_indicators, tmp_path):
    out, yaml_path, nncf_path = tmp_path / "p.json", tmp_path / "p.yaml", tmp_path / "nncf.json"
    result = cli("search", "--indicators", str(resnet18_indicators), "--input-size", "32", "--target-wbits", "3",
                 "--target-abits", "4", "--size-mb", "5", "--json", "--output", str(out), "--export-yaml", str(yaml_path),
                 "--export-nncf", str(nncf_path))
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert policy["model"] == "resnet18" and len(policy["layers"]) == 19 and policy["size_mb"] <= 5
    assert json.loads(out.read_text()) == policy
    exported = yaml.safe_load(yaml_path.read_text())
    assert exported["weight_bits"] == [layer["wbits"] for layer in policy["layers"]]
    assert exported["act_bits"] == [layer["abits"] for layer in policy["layers"]]
    scopes = json.loads(nncf_path.read_text())["compression"]["initializer"]["precision"]["bitwidth_per_scope"]
    assert scopes[0] == [policy["layers"][0]["wbits"], f"{policy['layers'][0]['name']}|WEIGHT"]
    loaded = load_policy(out)
    assert policy_to_nncf(loaded) == json.loads(nncf_path.read_text()) and policy_to_yaml(loaded) == yaml_path.read_text()


def test_cli_table_lists_layers_and_totals(resnet18_indicators):
    result = cli("search", "--indicators", str(resnet18_indicators), "--input-size", "32", "--bitops-budget", "0.5",
                 "--avg-wbits", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "MACs", "(M)", "params", "(K)", "wbits", "abits"]
    assert lines[1].startswith("layer1.0.conv1 ")
    assert any(line.startswith("BitOps ") and "compression" in line for line in lines)


@pytest.mark.parametrize("args, expected", [
    (["--indicators", "missing.json", "--target-wbits", "3", "--target-abits", "3"], "indicators file not found"),
    (["--target-wbits", "2", "--target-abits", "2", "--compression-ratio", "100"], "compression ratio 100 is above the maximum"),
    (["--bitops-budget", "0.001"], "is below the minimum"),
    ([], "no constraint given"),
    (["--target-wbits", "3"], "target_wbits and target_abits go together"),
    (["--target-wbits", "3", "--target-abits", "3", "MISMATCHED"], "missing 1: layer4.1.conv2; extra 1: layer9.conv"),
    (["--latency-budget", "3"], "--latency-budget needs --latency-table"),
    (["--bits", "8", "4", "--bitops-budget", "1"], "bit-width(s) 8 have no indicators"),
    (["--sweep-cr", "8", "10"], "--out-dir"),
])
def test_cli_bad_input_exits_2_with_one_line(resnet18_indicators, tmp_path, args, expected):
    indicators = resnet18_indicators
    if "MISMATCHED" in args:
        raw = json.loads(resnet18_indicators.read_text())
        raw["layers"][-1]["name"] = "layer9.conv"
        indicators = tmp_path / "mismatched.json"
        indicators.write_text(json.dumps(raw))
        args = [arg for arg in args if arg != "MISMATCHED"]
    if "--indicators" not in args:
        args = ["--indicators", str(indicators), "--input-size", "32", *args]
    result = cli("search", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert expected in result.stderr


def test_cli_sweep_writes_policies_and_csv(resnet18_indicators, tmp_path):
    result = cli("search", "--indicators", str(resnet18_indicators), "--input-size", "32", "--compression-ratio", "6",
                 "--sweep-wa", "2,2", "3,4", "6,6", "--sweep-cr", "4", "1000", "--out-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == len(summary["results"]) == 6
    statuses = {(row["budget_target_wbits"], row["budget_compression_ratio"]): row["status"] for row in rows}
    assert statuses[("6", "1000.0")] == "infeasible" and statuses[("3", "4.0")] == "optimal"
    for row in rows:
        if row["status"] == "optimal":
            policy = load_policy(tmp_path / row["policy"])
            assert policy.totals.compression_ratio >= float(row["budget_compression_ratio"])
            assert math.isclose(policy.totals.bitops_g, float(row["bitops_g"]))


def test_searched_policy_and_uniform_baseline_share_layers_and_totals(resnet18_indicators):
    from orchestrator.search.indicators import load_indicators
    from orchestrator.search.policy import uniform_baseline

    costs = cost_table("resnet18", 32)
    searcher = Searcher(load_indicators(resnet18_indicators), costs, [4, 3, 2], [4, 3], alpha=1.5)
    document = searcher.solve(Budget(target_wbits=3, target_abits=3)).to_dict()
    uniform = uniform_baseline(costs, 3, alpha=1.5).to_dict()
    assert document["format"] == uniform["format"] == "limpq-policy/v1"
    assert [layer["name"] for layer in document["layers"]] == [layer["name"] for layer in uniform["layers"]]
    assert {layer["wbits"] for layer in document["layers"]} <= {4, 3, 2} and document["alpha"] == 1.5
    assert document["bitops_g"] <= uniform["bitops_g"] * (1 + 1e-12)
    assert uniform["objective"] is None and uniform["label"] == "uniform-W3A3"
    assert uniform["avg_wbits"] == uniform["avg_abits"] == 3
