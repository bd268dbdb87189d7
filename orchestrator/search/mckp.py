"""Exact solver for the bit-width ILP of docs/method.md §7, seen as a multiple-choice knapsack: every layer takes
exactly one of its (weight bits, activation bits) choices, a few linear budget rows must hold, and the
summed cost is minimal.

Why not hand the whole ILP to a MILP solver: proving optimality at gap 0 is what costs the time (PuLP +
HiGHS at gap 0 needs about 0.2-0.5 s on ResNet50; CBC with its default gap stops early at a worse
policy). The structure allows a few milliseconds:
  1. choices dominated inside their layer (no cheaper and no smaller in any row) are dropped;
  2. the LP relaxation (HiGHS in-process, warm-started across the budgets of a sweep) gives a lower
     bound LB and Lagrange multipliers lambda;
  3. a start policy (the LP optimum rounded, or the previous budget's optimum) and a narrow search around
     it give an upper bound UB;
  4. reduced-cost fixing: for any lambda >= 0 and feasible x, cost(x) >= LB(lambda) + the summed
     Lagrangian reduced costs of x's choices, so choices whose reduced cost exceeds UB - LB(lambda) are
     dropped; layers left with few choices are merged pairwise into joint levels;
  5. a breadth-first branch and bound over the levels prunes partial policies by feasibility, by a lower
     bound on the rest (Lagrange planes and exactly solved one-row LPs, the best taken) and by duplicate
     resource use. Run with a width limit it is a heuristic that improves UB; the first run that cuts
     nothing off is exact.
If that would take more than the last width, the reduced model goes to PuLP + HiGHS at gap 0 instead, so
the answer is exact either way.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from dataclasses import dataclass

import highspy
import numpy as np

# Tuned on ResNet50/152 budgets (benchmarks/bench_search.py); any values give exact answers, only speed varies.
SEARCH_WIDTHS = (512, 8192, 131072)  # partial policies kept per level in successive exact tries; then MILP
HEURISTIC_SHARE = 0.15  # the quick search considers reduced costs within this share of the start's gap
HEURISTIC_WIDTH = 32
MERGED_OPTIONS = 32  # neighbouring levels are merged while their joint options stay this few
RELATIVE_TOLERANCE = 1e-12  # on budget rows: sums of integer costs are exact in float64, latencies are not
OBJECTIVE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MckpSolution:
    choice: np.ndarray  # per layer, the index of the chosen column
    objective: float
    method: str  # "lp", "branch-and-bound" or "milp": which step proved optimality


_highs_lock = threading.Lock()
_highs_instance = None


def _shared_highs():
    """One HiGHS instance per process, created with stdout muted: HiGHS prints its banner on the C++ side
    when the first instance is built, which would corrupt `--json` output."""
    global _highs_instance
    if _highs_instance is None:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                _highs_instance = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _highs_instance.setOptionValue("output_flag", False)
    return _highs_instance


def _prune_dominated(cost: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Alive mask (L, K): a choice is dropped when another of its layer is no worse in cost and in every
    row, and strictly better somewhere (exact ties keep the lower index)."""
    num_choices = cost.shape[1]
    no_worse = cost[:, :, None] <= cost[:, None, :]  # [l, i, j]: i no worse than j
    same = cost[:, :, None] == cost[:, None, :]
    for row in rows:
        no_worse &= row[:, :, None] <= row[:, None, :]
        same &= row[:, :, None] == row[:, None, :]
    lower_index = np.arange(num_choices)[:, None] < np.arange(num_choices)[None, :]
    dominates = no_worse & (~same | lower_index[None])
    dominates &= np.isfinite(cost)[:, :, None]
    dominates[:, np.arange(num_choices), np.arange(num_choices)] = False
    return np.isfinite(cost) & ~dominates.any(axis=1)


class _RelaxationLP:
    """The LP relaxation of one knapsack in the shared HiGHS instance. Budgets change only row bounds, so
    solving the next budget of a sweep warm-starts from the last basis."""

    _loaded: object = None  # the relaxation whose model HiGHS holds now

    def __init__(self, cost: np.ndarray, rows: np.ndarray, columns: np.ndarray):
        self.num_layers, self.num_choices = cost.shape
        self.num_rows = rows.shape[0]
        self.layer_of, self.column_of = np.nonzero(columns)
        # Budget rows scaled to O(1) for HiGHS's absolute tolerances; the exact search never sees the scaling.
        self.scale = np.maximum(np.abs(rows[:, self.layer_of, self.column_of]).max(axis=1, initial=0.0)
                                * self.num_layers, 1e-300)
        self.cost = cost[self.layer_of, self.column_of]
        self.coefficients = rows[:, self.layer_of, self.column_of] / self.scale[:, None]

    def _load(self, highs, rhs_scaled: np.ndarray) -> None:
        num_cols, per_col = self.layer_of.size, 1 + self.num_rows
        starts = np.arange(0, per_col * num_cols + 1, per_col, dtype=np.int32)
        index = np.empty(per_col * num_cols, dtype=np.int32)
        value = np.empty(per_col * num_cols)
        index[0::per_col], value[0::per_col] = self.layer_of, 1.0
        for j in range(self.num_rows):
            index[1 + j::per_col] = self.num_layers + j
            value[1 + j::per_col] = self.coefficients[j]
        row_lower = np.concatenate([np.ones(self.num_layers), np.full(self.num_rows, -np.inf)])
        row_upper = np.concatenate([np.ones(self.num_layers), rhs_scaled])
        highs.clearModel()
        highs.setOptionValue("presolve", "off")
        highs.setOptionValue("simplex_strategy", 4)  # primal simplex: measured fastest on these LPs
        highs.passModel(num_cols, self.num_layers + self.num_rows, index.size, 1, 1, 0.0, self.cost,
                        np.zeros(num_cols), np.full(num_cols, np.inf), row_lower, row_upper, starts, index, value,
                        np.zeros(num_cols, dtype=np.int32))
        _RelaxationLP._loaded = self

    def solve(self, rhs: np.ndarray):
        """(status, lambda per row, x (L, K)); status "optimal", "infeasible" or "failed"."""
        rhs_scaled = rhs / self.scale
        with _highs_lock:
            highs = _shared_highs()
            if _RelaxationLP._loaded is not self:
                self._load(highs, rhs_scaled)
            else:
                budget_rows = np.arange(self.num_layers, self.num_layers + self.num_rows, dtype=np.int32)
                highs.changeRowsBounds(self.num_rows, budget_rows, np.full(self.num_rows, -np.inf), rhs_scaled)
            highs.run()
            status = highs.getModelStatus()
            if status == highspy.HighsModelStatus.kInfeasible:
                return "infeasible", None, None
            if status != highspy.HighsModelStatus.kOptimal:
                _RelaxationLP._loaded = None
                return "failed", None, None
            solution = highs.getSolution()
            duals = np.array(solution.row_dual[self.num_layers:])
            x = np.zeros((self.num_layers, self.num_choices))
            x[self.layer_of, self.column_of] = solution.col_value
        return "optimal", np.maximum(-duals, 0.0) / self.scale, x


def _multiplier_set(lambdas: np.ndarray) -> np.ndarray:
    """Multipliers whose Lagrangian bounds are maximised together: the LP optimum first, then scaled
    copies (partial policies leave the rest a different budget, whose LP multipliers differ) and zero."""
    candidates = [lambdas * s for s in (1.0, 0.0, 0.5, 0.8, 0.9, 1.1, 1.25, 2.0)]
    for j in range(len(lambdas)) if len(lambdas) > 1 else ():
        for s in (0.5, 2.0):
            varied = lambdas.copy()
            varied[j] *= s
            candidates.append(varied)
    return np.array(candidates)


@dataclass
class _Levels:
    """The layers still undecided, as the search visits them; a level may stand for a group of layers
    whose joint choices were enumerated up front (fewer, wider levels: numpy's per-call overhead, not
    arithmetic, dominates this search)."""

    cost: np.ndarray  # (n, P), np.inf where a level has fewer options
    rows: np.ndarray  # (m, n, P)
    picks: np.ndarray  # (n, P, G): the column each member layer takes in that option
    members: np.ndarray  # (n, G): member layers, -1 for padding
    chosen: np.ndarray  # (L,) columns of the layers with a single option left (others overwritten)
    fixed_cost: float
    fixed_rows: np.ndarray  # (m,)


def _compact(cost: np.ndarray, rows: np.ndarray, picks: np.ndarray, keep: np.ndarray, reduced: np.ndarray):
    """Move each level's kept options to the front and cut the padding."""
    width = max(int(keep.sum(axis=1).max(initial=1)), 1)
    front = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    level = np.arange(keep.shape[0])[:, None]
    return (np.where(keep[level, front], cost[level, front], np.inf), rows[:, level, front], picks[level, front],
            reduced[:, level, front])


def _build_levels(cost: np.ndarray, rows: np.ndarray, alive: np.ndarray, reduced: np.ndarray,
                  gaps: np.ndarray) -> _Levels:
    """Levels in search order (later layers first: in the networks we search, early layers are the cheap,
    fine-grained ones that best close the remaining budget at the end), neighbours merged in pairs while
    their joint options stay few. A joint option is kept only if its summed reduced cost fits every gap."""
    num_rows = rows.shape[0]
    counts = alive.sum(axis=1)
    chosen = np.argmax(alive, axis=1)
    single = np.nonzero(counts == 1)[0]
    fixed_cost = float(cost[single, chosen[single]].sum())
    fixed_rows = rows[:, single, chosen[single]].sum(axis=1)
    order = np.nonzero(counts > 1)[0][::-1]
    columns = np.broadcast_to(np.arange(cost.shape[1]), (order.size, cost.shape[1]))
    level_cost, level_rows, picks, level_reduced = _compact(cost[order], rows[:, order], columns[:, :, None],
                                                            alive[order], reduced[:, order])
    members = order[:, None]
    tolerance = OBJECTIVE_TOLERANCE * np.maximum(1.0, np.abs(gaps))
    while level_cost.shape[0] > 1:
        if level_cost.shape[0] % 2:  # a padding level with one free option keeps the pairing simple
            level_cost = np.vstack([level_cost, np.full((1, level_cost.shape[1]), np.inf)])
            level_cost[-1, 0] = 0.0
            level_rows = np.concatenate([level_rows, np.zeros((num_rows, 1, level_rows.shape[2]))], axis=1)
            level_reduced = np.concatenate([level_reduced, np.zeros((len(gaps), 1, level_reduced.shape[2]))], axis=1)
            picks = np.concatenate([picks, np.zeros((1, *picks.shape[1:]), dtype=picks.dtype)], axis=0)
            members = np.vstack([members, np.full((1, members.shape[1]), -1)])
        width = level_cost.shape[1]
        pair_cost = (level_cost[0::2, :, None] + level_cost[1::2, None, :]).reshape(-1, width * width)
        pair_rows = (level_rows[:, 0::2, :, None] + level_rows[:, 1::2, None, :]).reshape(num_rows, -1, width * width)
        pair_reduced = (level_reduced[:, 0::2, :, None] + level_reduced[:, 1::2, None, :]).reshape(
            len(gaps), -1, width * width)
        keep = np.isfinite(pair_cost) & np.all(pair_reduced <= (gaps + tolerance)[:, None, None], axis=0)
        if keep.sum(axis=1).max() > MERGED_OPTIONS:
            break
        pair_picks = np.concatenate([np.repeat(picks[0::2], width, axis=1), np.tile(picks[1::2], (1, width, 1))], axis=2)
        pair_cost, pair_rows, pair_picks, pair_reduced = _compact(pair_cost, pair_rows, pair_picks, keep, pair_reduced)
        keep = _prune_dominated(pair_cost, pair_rows)
        level_cost, level_rows, picks, level_reduced = _compact(pair_cost, pair_rows, pair_picks, keep, pair_reduced)
        members = np.hstack([members[0::2], members[1::2]])
    return _Levels(level_cost, level_rows, picks, members, chosen, fixed_cost, fixed_rows)


class _OneRowBound:
    """A lower bound on the cost of levels i.. given the budget left, tighter than fixed Lagrange planes:
    all rows but `primary` are priced in with fixed multipliers, the primary row stays a constraint, and
    that one-row LP is solved exactly. For one budget row, the LP of a multiple-choice knapsack is a
    greedy walk along each level's lower convex hull of (resource, cost) points, steepest descent first,
    so its value is a piecewise-linear function of the budget, tabulated here once per search."""

    def __init__(self, cost: np.ndarray, rows: np.ndarray, primary: int, prices: np.ndarray):
        depth, width = cost.shape
        levels = np.arange(depth)
        valid = np.isfinite(cost)
        resource = np.where(valid, rows[primary], np.inf)
        priced = np.where(valid, cost + np.tensordot(prices, rows, axes=1), np.inf)
        lowest = resource.min(axis=1, initial=np.inf)
        start = np.argmin(np.where(resource == lowest[:, None], priced, np.inf), axis=1)
        at_resource, at_cost = resource[levels, start], priced[levels, start]
        self.start_resource = np.append(np.cumsum(at_resource[::-1])[::-1], 0.0)
        self.start_cost = np.append(np.cumsum(at_cost[::-1])[::-1], 0.0)
        owner, rises, drops = [], [], []
        for _step in range(width):
            rise = resource - at_resource[:, None]
            drop = priced - at_cost[:, None]
            useful = valid & (rise > 0) & (drop < 0)
            slope = np.where(useful, drop / np.where(useful, rise, 1.0), np.inf)
            nearest = np.argmin(slope, axis=1)
            moving = np.nonzero(np.isfinite(slope[levels, nearest]))[0]
            if moving.size == 0:
                break
            target = nearest[moving]
            owner.append(moving)
            rises.append(rise[moving, target])
            drops.append(drop[moving, target])
            at_resource[moving], at_cost[moving] = resource[moving, target], priced[moving, target]
        owner, rises, drops = (np.concatenate(v) if v else np.zeros(0) for v in (owner, rises, drops))
        steepest = np.argsort(drops / np.where(rises > 0, rises, 1.0), kind="stable")
        owner, rises, drops = owner[steepest], rises[steepest], drops[steepest]
        in_suffix = owner[None, :] >= np.arange(depth + 1)[:, None]
        self.budget_used = np.hstack([np.zeros((depth + 1, 1)), np.cumsum(np.where(in_suffix, rises, 0.0), axis=1)])
        self.cost_saved = np.hstack([np.zeros((depth + 1, 1)), np.cumsum(np.where(in_suffix, drops, 0.0), axis=1)])
        self.primary, self.prices = primary, prices


def _search(levels: _Levels, rhs: np.ndarray, multipliers: np.ndarray, upper_bound: float,
            width: int) -> tuple[np.ndarray | None, bool]:
    """Breadth-first branch and bound over the levels, keeping at most `width` partial policies (those with
    the best bounds). Returns (best policy costing at most upper_bound or None, whether the width cut
    anything off). Without a cut the answer is exact: all other pruning is by feasibility, by a lower
    bound, or of a partial policy using the same resources as a cheaper one.

    A partial policy is one column of `state`: its cost, then its use of every row."""
    limit = rhs + RELATIVE_TOLERANCE * np.maximum(np.abs(rhs), 1.0)
    cost, rows = levels.cost, levels.rows
    depth, num_rows = cost.shape[0], rows.shape[0]
    counts = np.isfinite(cost).sum(axis=1)
    options = np.concatenate([cost[None], rows])  # (1 + m, n, P); options sit at the front of each level
    rest_row = np.zeros((num_rows, depth + 1))
    rest_row[:, :depth] = np.cumsum(np.where(np.isfinite(cost)[None], rows, np.inf).min(axis=2)[:, ::-1], axis=1)[:, ::-1]
    if np.any(levels.fixed_rows + rest_row[:, 0] > limit):
        return None, False
    room = limit[:, None] - rest_row[:, 1:]  # what a partial policy may use so that the rest still fits
    # Lower bounds on the rest, all of the form  state cost + coefficients . state rows + offset (+ a
    # one-row LP value): Lagrange planes first, then the one-row bounds.
    lagrangian = cost[None] + np.einsum("nm,mlk->nlk", multipliers, rows)
    rest_lagrangian = np.zeros((len(multipliers), depth + 1))
    rest_lagrangian[:, :depth] = np.cumsum(lagrangian.min(axis=2)[:, ::-1], axis=1)[:, ::-1]
    # One-row bounds: each row in turn kept as a constraint, the others priced at the LP multipliers.
    lp_multipliers = multipliers[0]
    one_rows = [_OneRowBound(cost, rows, primary, np.where(np.arange(num_rows) == primary, 0.0, lp_multipliers))
                for primary in range(num_rows)]
    coefficients = np.vstack([multipliers] + [one_row.prices for one_row in one_rows])
    coefficients = np.hstack([np.ones((len(coefficients), 1)), coefficients])
    offsets = np.vstack([rest_lagrangian[:, 1:] - (multipliers @ rhs)[:, None]]
                        + [one_row.start_cost[None, 1:] - one_row.prices @ rhs for one_row in one_rows])
    headroom = [rhs[one_row.primary] - one_row.start_resource[1:] for one_row in one_rows]
    tolerance = OBJECTIVE_TOLERANCE * max(1.0, abs(upper_bound)) if np.isfinite(upper_bound) else 0.0
    ceiling = upper_bound + tolerance
    state = np.concatenate([[levels.fixed_cost], levels.fixed_rows])[:, None]
    parents, taken = [], []
    truncated = False
    for i in range(depth):
        count = counts[i]
        new = (state[:, :, None] + options[:, i, None, :count]).reshape(1 + num_rows, -1)
        bounds = coefficients @ new
        bounds += offsets[:, i:i + 1]
        for j, one_row in enumerate(one_rows, start=len(multipliers)):
            bounds[j] += np.interp(headroom[j - len(multipliers)][i] - new[1 + one_row.primary],
                                   one_row.budget_used[i + 1], one_row.cost_saved[i + 1])
        bound = bounds.max(axis=0)
        keep = np.all(new[1:] <= room[:, i:i + 1], axis=0)
        keep &= bound <= ceiling
        index = np.flatnonzero(keep)
        if index.size == 0:
            return None, truncated
        new, bound = new[:, index], bound[index]
        # Partial policies with equal resource use: only the cheapest can lead to the optimum.
        order = np.lexsort(new)
        grouped = new[1:, order]
        first = np.empty(order.size, dtype=bool)
        first[0] = True
        np.any(grouped[:, 1:] != grouped[:, :-1], axis=0, out=first[1:])
        order = order[first]
        if order.size > width:
            order = order[np.argpartition(bound[order], width)[:width]]
            truncated = True
        index, state = index[order], new[:, order]
        parents.append(index // count)
        taken.append(index % count)
    chosen = levels.chosen.copy()
    best = int(np.argmin(state[0]))
    for i in range(depth - 1, -1, -1):
        real = levels.members[i] >= 0
        chosen[levels.members[i][real]] = levels.picks[i, taken[i][best]][real]
        best = int(parents[i][best])
    return chosen, truncated


def _milp(cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray, alive: np.ndarray) -> np.ndarray | None:
    """The reduced ILP through PuLP + HiGHS at gap 0; None when infeasible. Rows are scaled for HiGHS's
    tolerances and the answer re-checked in unscaled arithmetic, tightening a row it overshoots."""
    import pulp  # 0.3 s to import, for the rare instance the exact search leaves open

    _shared_highs()  # HiGHS's banner is printed once per process: make sure it went to /dev/null
    layer_of, column_of = np.nonzero(alive)
    limit = rhs.astype(float).copy()
    for _attempt in range(4):
        problem = pulp.LpProblem("bit_width_search", pulp.LpMinimize)
        x = [problem.add_variable(f"x_{layer}_{column}", cat=pulp.LpBinary) for layer, column in zip(layer_of, column_of)]
        problem += pulp.lpSum(float(cost[layer, column]) * var for var, layer, column in zip(x, layer_of, column_of))
        for layer in range(cost.shape[0]):
            problem += pulp.lpSum(var for var, owner in zip(x, layer_of) if owner == layer) == 1
        for j in range(rows.shape[0]):
            scale = max(abs(limit[j]), 1.0)
            problem += pulp.lpSum(float(rows[j, layer, column] / scale) * var
                                  for var, layer, column in zip(x, layer_of, column_of)) <= limit[j] / scale
        status = problem.solve(pulp.HiGHS(msg=False, gapRel=0.0, gapAbs=0.0))
        if pulp.LpStatus[status] != "Optimal":
            return None
        chosen = np.zeros(cost.shape[0], dtype=int)
        for var, layer, column in zip(x, layer_of, column_of):
            if var.value() > 0.5:
                chosen[layer] = column
        used = rows[:, np.arange(cost.shape[0]), chosen].sum(axis=1)
        over = used - (rhs + RELATIVE_TOLERANCE * np.maximum(np.abs(rhs), 1.0))
        if np.all(over <= 0):
            return chosen
        limit = np.where(over > 0, limit - over - 1e-9 * np.maximum(np.abs(limit), 1.0), limit)
    return None


class MultipleChoiceKnapsack:
    """Minimise sum_l cost[l, k_l] subject to sum_l rows[j, l, k_l] <= rhs[j] for every row j, one choice k_l
    per layer. cost: (L, K), np.inf where a choice is not allowed; rows: (m, L, K). Build once, solve for
    many budgets."""

    def __init__(self, cost: np.ndarray, rows: np.ndarray):
        self.cost = np.asarray(cost, dtype=float)
        self.rows = np.asarray(rows, dtype=float).reshape(-1, *self.cost.shape)
        self.alive = _prune_dominated(self.cost, self.rows)
        self._relaxation: _RelaxationLP | None = None
        self._previous: np.ndarray | None = None  # the last optimum: a start for the next budget

    def solve(self, rhs: np.ndarray) -> MckpSolution | None:
        """The optimum for budgets `rhs` (m,), or None when no choice of one column per layer fits."""
        cost, rows = self.cost, self.rows
        rhs = np.asarray(rhs, dtype=float).reshape(-1)
        layers = np.arange(cost.shape[0])
        if not self.alive.any(axis=1).all():
            return None
        limit = rhs + RELATIVE_TOLERANCE * np.maximum(np.abs(rhs), 1.0)
        min_rows = np.where(self.alive[None], rows, np.inf).min(axis=2)
        if np.any(min_rows.sum(axis=1) > limit):
            return None
        # A choice that cannot fit even with every other layer at its smallest is never selectable.
        others = min_rows.sum(axis=1)[:, None] - min_rows
        alive = self.alive & np.all(rows + others[:, :, None] <= limit[:, None, None], axis=0)
        if not alive.any(axis=1).all():
            return None

        def answer(chosen: np.ndarray, method: str) -> MckpSolution:
            return MckpSolution(chosen, float(cost[layers, chosen].sum()), method)

        if rows.shape[0] == 0:
            return answer(np.argmin(np.where(alive, cost, np.inf), axis=1), "lp")
        if self._relaxation is None:
            self._relaxation = _RelaxationLP(cost, rows, self.alive)
        status, lambdas, x = self._relaxation.solve(rhs)
        if status == "infeasible":
            return None
        if status == "failed":
            chosen = _milp(cost, rows, rhs, alive)
            return None if chosen is None else answer(chosen, "milp")
        if np.all((x < 1e-9) | (x > 1 - 1e-9)):
            chosen = np.argmax(x, axis=1)
            if alive[layers, chosen].all() and np.all(rows[:, layers, chosen].sum(axis=1) <= limit):
                return answer(chosen, "lp")
        multipliers = _multiplier_set(lambdas)
        incumbent, upper_bound = None, np.inf
        # Starts: the LP optimum rounded, and in a sweep the optimum of the budget before, if it still fits.
        for candidate in (_round_relaxation(x, cost, rows, limit), self._previous):
            if (candidate is not None and alive[layers, candidate].all()
                    and np.all(rows[:, layers, candidate].sum(axis=1) <= limit)
                    and cost[layers, candidate].sum() < upper_bound):
                incumbent, upper_bound = candidate, float(cost[layers, candidate].sum())
        # A quick narrow search for a better upper bound (not exact): with a start, among the choices that
        # look best (reduced cost within a share of the start's gap); without one, among all.
        reduced, gaps = _reduced_costs(cost, rows, rhs, alive, multipliers[:1], upper_bound)
        promising = alive.copy()
        if incumbent is not None:
            gaps = gaps * HEURISTIC_SHARE
            promising &= reduced[0] <= gaps[0]
            promising[layers, incumbent] = True
        found, _ = _search(_build_levels(cost, rows, promising, reduced, gaps), rhs, multipliers, upper_bound,
                           HEURISTIC_WIDTH)
        if found is not None and cost[layers, found].sum() <= upper_bound:
            incumbent, upper_bound = found, float(cost[layers, found].sum())
        # Searches of growing width: a cut one still gives a policy whose cost bounds and prunes the next;
        # the first search that cuts nothing off is exact.
        for width in SEARCH_WIDTHS:
            reduced, gaps = _reduced_costs(cost, rows, rhs, alive, multipliers, upper_bound)
            alive = alive & np.all(reduced <= (gaps + OBJECTIVE_TOLERANCE * np.maximum(1.0, np.abs(gaps)))[:, None, None], axis=0)
            if incumbent is not None:
                alive[layers, incumbent] = True
            levels = _build_levels(cost, rows, alive, reduced, gaps)
            found, truncated = _search(levels, rhs, multipliers, upper_bound, width)
            if found is not None and cost[layers, found].sum() <= upper_bound:
                incumbent, upper_bound = found, float(cost[layers, found].sum())
            if not truncated:
                self._previous = incumbent
                return None if incumbent is None else answer(incumbent, "branch-and-bound")
        chosen = _milp(cost, rows, rhs, alive)
        if chosen is None:
            return None if incumbent is None else answer(incumbent, "milp")
        return answer(chosen, "milp")


def _round_relaxation(x: np.ndarray, cost: np.ndarray, rows: np.ndarray, limit: np.ndarray) -> np.ndarray | None:
    """The cheapest feasible policy that keeps every layer the LP leaves whole and gives each layer it
    splits one of its split choices (a basic LP optimum splits at most one layer per budget row); None if
    no such policy fits."""
    chosen = np.argmax(x, axis=1)
    split = np.nonzero(np.any((x > 1e-9) & (x < 1 - 1e-9), axis=1))[0]
    layers = np.arange(x.shape[0])
    if split.size:
        supports = [np.nonzero(x[layer] > 1e-9)[0] for layer in split]
        if np.prod([len(support) for support in supports]) > 256:
            return None
        combos = np.array(list(itertools.product(*supports)))  # (C, split)
        base_rows = rows[:, layers, chosen].sum(axis=1) - rows[:, split, chosen[split]].sum(axis=1)
        combo_rows = base_rows[:, None] + rows[:, split, combos].sum(axis=2)
        combo_cost = cost[split, combos].sum(axis=1)
        fits = np.all(combo_rows <= limit[:, None], axis=0)
        if not fits.any():
            return None
        chosen[split] = combos[np.argmin(np.where(fits, combo_cost, np.inf))]
    return chosen if np.all(rows[:, layers, chosen].sum(axis=1) <= limit) else None


def _reduced_costs(cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray, alive: np.ndarray,
                   multipliers: np.ndarray, upper_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Lagrangian reduced costs (n, L, K) and the gap each may use (n,). For any lambda >= 0 and feasible
    x: cost(x) >= LB(lambda) + the sum of the reduced costs of the choices in x, so a policy costing at
    most `upper_bound` uses no choice whose reduced cost exceeds upper_bound - LB(lambda)."""
    lagrangian = np.where(alive[None], cost[None] + np.einsum("nm,mlk->nlk", multipliers, rows), np.inf)
    best = lagrangian.min(axis=2)
    lower_bounds = best.sum(axis=1) - multipliers @ rhs
    return lagrangian - best[:, :, None], upper_bound - lower_bounds


def solve_mckp(cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray) -> MckpSolution | None:
    """One-off solve; see MultipleChoiceKnapsack."""
    return MultipleChoiceKnapsack(cost, rows).solve(rhs)
