"""The exact multiple-choice knapsack solver behind the search, on generic instances: brute force on small
ones, the MILP solver (HiGHS at gap 0) on larger ones, with the search narrowed so that every path runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orchestrator.search import mckp
from orchestrator.search.mckp import MultipleChoiceKnapsack, solve_mckp


def brute_force(cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray) -> float | None:
    layers = np.arange(cost.shape[0])
    best = None
    for combo in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        value = cost[layers, combo].sum()
        if np.isfinite(value) and np.all(rows[:, layers, combo].sum(axis=1) <= rhs) and (best is None or value < best):
            best = value
    return best


def test_matches_brute_force_on_small_random_instances():
    rng = np.random.default_rng(0)
    outcomes = {"optimal": 0, "infeasible": 0}
    for _ in range(300):
        num_layers, num_choices, num_rows = rng.integers(1, 5), rng.integers(1, 8), rng.integers(1, 4)
        cost = rng.random((num_layers, num_choices))
        cost[rng.random(cost.shape) < 0.15] = np.inf  # unselectable (non-monotonic) entries
        if rng.random() < 0.5:
            rows = rng.integers(0, 20, (num_rows, num_layers, num_choices)).astype(float)
        else:
            rows = rng.random((num_rows, num_layers, num_choices)) * 10
        totals = rows.min(axis=2).sum(axis=1), rows.max(axis=2).sum(axis=1)
        rhs = totals[0] + (totals[1] - totals[0]) * rng.uniform(-0.1, 0.8, num_rows)
        expected = brute_force(cost, rows, rhs)
        solution = solve_mckp(cost, rows, rhs)
        if expected is None:
            assert solution is None
            outcomes["infeasible"] += 1
            continue
        assert solution is not None and solution.objective == pytest.approx(expected, rel=1e-12)
        chosen = rows[:, np.arange(num_layers), solution.choice].sum(axis=1)
        assert np.all(chosen <= rhs + 1e-12 * np.maximum(np.abs(rhs), 1))
        outcomes["optimal"] += 1
    assert min(outcomes.values()) > 20


def bit_width_instance(rng, num_layers: int, num_rows: int):
    """Indicator-like costs (falling with bits) and BitOps / size / latency / bits rows over 25 (w, a) pairs."""
    bits = np.array([6, 5, 4, 3, 2])
    pair_w, pair_a = np.repeat(bits, 5), np.tile(bits, 5)
    weight = np.sort(rng.random((num_layers, 5)), axis=1) * 0.1 + 0.01
    act = np.sort(rng.random((num_layers, 5)), axis=1) * 0.1 + 0.01
    cost = act[:, np.tile(np.arange(5), 5)] + 2 * weight[:, np.repeat(np.arange(5), 5)]
    cost[rng.random(cost.shape) < 0.05] = np.inf
    macs = rng.integers(1, 50, num_layers) * 1000.0
    params = rng.integers(1, 50, num_layers) * 100.0
    candidates = [macs[:, None] * (pair_w * pair_a)[None], params[:, None] * pair_w[None],
                  rng.random(cost.shape) * pair_w * pair_a, np.broadcast_to(pair_w * 1.0, cost.shape)]
    rows = np.stack([candidates[i] for i in rng.choice(len(candidates), num_rows, replace=False)])
    low, high = rows.min(axis=2).sum(axis=1), rows.max(axis=2).sum(axis=1)
    return cost, rows, low + (high - low) * rng.uniform(0.05, 0.6, num_rows)


@pytest.mark.parametrize("narrow", [False, True])
def test_matches_milp_reference_on_larger_instances(narrow, monkeypatch):
    if narrow:  # every search is cut, so incumbents, repeated searches and the MILP fallback all run
        monkeypatch.setattr(mckp, "SEARCH_WIDTHS", (4, 16))
        monkeypatch.setattr(mckp, "HEURISTIC_WIDTH", 2)
    rng = np.random.default_rng(1 if narrow else 2)
    methods = set()
    for _ in range(25):
        cost, rows, rhs = bit_width_instance(rng, int(rng.integers(6, 14)), int(rng.integers(1, 4)))
        solution = solve_mckp(cost, rows, rhs)
        reference = mckp._milp(cost, rows, rhs, np.isfinite(cost))
        if reference is None:
            assert solution is None
            continue
        methods.add(solution.method)
        assert solution.objective == pytest.approx(cost[np.arange(cost.shape[0]), reference].sum(), rel=1e-9)
    assert methods == ({"milp", "branch-and-bound"} if narrow else {"branch-and-bound"})


def test_one_knapsack_solves_a_budget_sweep_exactly():
    rng = np.random.default_rng(3)
    cost, rows, _ = bit_width_instance(rng, 8, 2)
    knapsack = MultipleChoiceKnapsack(cost, rows)
    low, high = rows.min(axis=2).sum(axis=1), rows.max(axis=2).sum(axis=1)
    previous = np.inf
    for share in np.linspace(0.05, 1.0, 12):  # growing budgets: the optimum can only improve
        rhs = low + (high - low) * share
        solution = knapsack.solve(rhs)
        assert solution.objective == pytest.approx(solve_mckp(cost, rows, rhs).objective, rel=1e-12)
        assert solution.objective <= previous + 1e-12
        previous = solution.objective
