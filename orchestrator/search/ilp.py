"""The bit-width ILP of docs/method.md §7: variables per layer x (weight bits, activation bits), objective
sum I_a(l, a) + alpha * I_w(l, w), budget rows for BitOps, size, latency and average bits.

`Searcher` builds the cost matrix once per (indicators, cost table, candidates, alpha, latency table) and
solves it for any number of budgets (`limpq search --sweep-*`, each Ray Tune trial for its budget);
`solve` is the one-budget shortcut. The exact solver is orchestrator.search.mckp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config.schema import Budget
from orchestrator.common.errors import InfeasibleError, UserError
from orchestrator.search.indicators import Indicators, check_layers, non_monotonic
from orchestrator.search.costs import CostTable
from orchestrator.search.latency import LatencyTable, load_latency_table
from orchestrator.search.mckp import MultipleChoiceKnapsack
from orchestrator.search.policy import (
    GIGA,
    MEGABYTE_BITS,
    LayerBits,
    Policy,
    policy_totals,
)

BUDGET_FIELDS = ("target_wbits", "target_abits", "bitops_g", "compression_ratio", "size_mb", "latency_ms",
                 "avg_wbits", "avg_abits")


@dataclass(frozen=True)
class Constraint:
    """One budget row: sum over layers of row[l, choice] <= limit."""

    key: str  # "bitops", "size", "latency", "avg_wbits" or "avg_abits"
    description: str  # e.g. "BitOps budget 48.28 G (as uniform W3A4)"
    limit: float
    detail: str = ""  # how the budget was given, when that differs from the description's number


def _number(value: float) -> str:
    return f"{value:.4g}"


def _distinct(budget: float, reached: float) -> tuple[str, str]:
    """Both numbers with enough digits that a reader sees they differ."""
    for digits in range(4, 13):
        a, b = f"{budget:.{digits}g}", f"{reached:.{digits}g}"
        if a != b:
            return a, b
    return repr(budget), repr(reached)


def _bits_text(bits: list[int]) -> str:
    ordered = sorted(bits)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return ",".join(str(b) for b in ordered)


class Searcher:
    """The search space of one model and one indicators file, solved for many budgets."""

    def __init__(self, indicators: Indicators, costs: CostTable, wbits: list[int] | None = None,
                 abits: list[int] | None = None, alpha: float = 2.0,
                 latency_table: LatencyTable | str | Path | None = None, indicators_source: str = "indicators"):
        check_layers(indicators, costs.names, source=indicators_source)
        self.costs, self.alpha = costs, float(alpha)
        if not (np.isfinite(self.alpha) and self.alpha >= 0):
            raise UserError(f"alpha must be a finite number >= 0, got {alpha}")
        self.wbits = self._candidates(indicators, wbits, "weight")
        self.abits = self._candidates(indicators, abits, "activation")
        self.names = costs.names
        num_w, num_a = len(self.wbits), len(self.abits)
        self.pair_w = np.repeat(np.array(self.wbits), num_a)
        self.pair_a = np.tile(np.array(self.abits), num_w)
        excluded = set(non_monotonic(indicators))
        weight = np.array([[np.inf if (name, "weight", b) in excluded else indicators.weight[name][b]
                            for b in self.wbits] for name in self.names])
        act = np.array([[np.inf if (name, "act", b) in excluded else indicators.act[name][b]
                         for b in self.abits] for name in self.names])
        for kind, table, bits in (("weight", weight, self.wbits), ("activation", act, self.abits)):
            stuck = [name for name, row in zip(self.names, table) if not np.isfinite(row).any()]
            if stuck:
                raise UserError(f"every {kind} candidate ({_bits_text(bits)}) of layer(s) {', '.join(stuck)} is a "
                                "non-monotonic indicator entry; add higher bit-widths to the candidates")
        self.cost = self.alpha * np.repeat(weight, num_a, axis=1) + np.tile(act, (1, num_w))
        self.macs = np.array([layer.macs for layer in costs.searchable], dtype=float)
        self.act_macs = np.array([layer.act_macs for layer in costs.searchable], dtype=float)
        self.params = np.array([layer.params for layer in costs.searchable], dtype=float)
        if isinstance(latency_table, (str, Path)):
            latency_table = load_latency_table(latency_table)
        self.latency = None if latency_table is None else self._latency_matrix(latency_table)
        self._knapsacks: dict[tuple[str, ...], MultipleChoiceKnapsack] = {}

    @staticmethod
    def _candidates(indicators: Indicators, bits: list[int] | None, kind: str) -> list[int]:
        bits = list(indicators.bits if bits is None else bits)
        if not bits:
            raise UserError(f"empty list of {kind} bit-width candidates")
        unknown = [b for b in bits if b not in indicators.bits]
        if unknown:
            raise UserError(f"{kind} bit-width(s) {', '.join(map(str, unknown))} have no indicators; "
                            f"the indicators cover {_bits_text(indicators.bits)}")
        if len(set(bits)) != len(bits):
            raise UserError(f"duplicate {kind} bit-widths in {bits}")
        return bits

    def _latency_matrix(self, table: LatencyTable) -> np.ndarray:
        known = set(self.names) | {layer.name for layer in self.costs.fixed}
        unknown = sorted({layer for layer, _, _ in table if layer not in known})
        if unknown:
            raise UserError(f"latency table names layers the model does not have: {', '.join(unknown[:5])}"
                            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        missing = [(name, w, a) for name in self.names for w, a in zip(self.pair_w, self.pair_a)
                   if (name, int(w), int(a)) not in table]
        if missing:
            examples = ", ".join(f"{name} W{w}A{a}" for name, w, a in missing[:3])
            raise UserError(f"latency table lacks {len(missing)} (layer, wbits, abits) entries the search needs, "
                            f"e.g. {examples}")
        return np.array([[table[(name, int(w), int(a))] for w, a in zip(self.pair_w, self.pair_a)]
                         for name in self.names])

    # -- constraints -------------------------------------------------------------------------------

    def _row(self, key: str) -> np.ndarray:
        if key == "bitops":  # docs/method.md §7; act_macs: products of two activations, both at the activation bits
            return (self.macs[:, None] * (self.pair_w * self.pair_a)[None, :]
                    + self.act_macs[:, None] * (self.pair_a * self.pair_a)[None, :])
        if key == "size":
            return self.params[:, None] * self.pair_w[None, :].astype(float)
        if key == "latency":
            return self.latency
        if key == "avg_wbits":
            return np.broadcast_to(self.pair_w.astype(float), self.cost.shape)
        return np.broadcast_to(self.pair_a.astype(float), self.cost.shape)

    def constraints(self, budget: Budget) -> list[Constraint]:
        """The budget as rows over searchable layers; BitOps and size budgets given twice keep the tighter."""
        found: dict[str, Constraint] = {}

        def add(constraint: Constraint) -> None:
            if constraint.key not in found or constraint.limit < found[constraint.key].limit:
                found[constraint.key] = constraint

        if budget.target_wbits is not None or budget.target_abits is not None:
            if budget.target_wbits is None or budget.target_abits is None:
                raise UserError("a uniform BitOps budget needs both target weight and target activation bits")
            limit = (float(self.macs.sum()) * budget.target_wbits * budget.target_abits
                     + float(self.act_macs.sum()) * budget.target_abits * budget.target_abits)
            uniform = f" (as uniform W{budget.target_wbits}A{budget.target_abits})"
            add(Constraint("bitops", f"BitOps budget {_number(limit / GIGA)} G{uniform}", limit, uniform))
        if budget.bitops_g is not None:
            add(Constraint("bitops", f"BitOps budget {_number(budget.bitops_g)} G", budget.bitops_g * GIGA))
        fixed_bits = self.costs.fixed_weight_bits
        if budget.compression_ratio is not None:
            add(Constraint("size", f"compression ratio {_number(budget.compression_ratio)}",
                           self.costs.fp32_bits / budget.compression_ratio - fixed_bits))
        if budget.size_mb is not None:
            add(Constraint("size", f"size budget {_number(budget.size_mb)} MB", budget.size_mb * MEGABYTE_BITS - fixed_bits))
        if budget.latency_ms is not None:
            if self.latency is None:
                raise UserError("a latency budget needs a latency table (--latency-table FILE)")
            add(Constraint("latency", f"latency budget {_number(budget.latency_ms)} ms", budget.latency_ms))
        count = len(self.names)
        if budget.avg_wbits is not None:
            add(Constraint("avg_wbits", f"average weight bits {_number(budget.avg_wbits)}", budget.avg_wbits * count))
        if budget.avg_abits is not None:
            add(Constraint("avg_abits", f"average activation bits {_number(budget.avg_abits)}", budget.avg_abits * count))
        if not found:
            raise UserError("no constraint given: set a BitOps budget (target W/A bits or G), a compression ratio "
                            "or size, a latency budget, or average bits")
        return list(found.values())

    def _knapsack(self, keys: tuple[str, ...]) -> MultipleChoiceKnapsack:
        if keys not in self._knapsacks:
            self._knapsacks[keys] = MultipleChoiceKnapsack(self.cost, np.stack([self._row(key) for key in keys]))
        return self._knapsacks[keys]

    # -- solving -----------------------------------------------------------------------------------

    def solve(self, budget: Budget) -> Policy:
        """The optimal policy for `budget`; InfeasibleError naming the constraint that cannot be met."""
        constraints = self.constraints(budget)
        started = time.perf_counter()
        keys = tuple(c.key for c in constraints)
        solution = self._knapsack(keys).solve(np.array([c.limit for c in constraints]))
        elapsed = time.perf_counter() - started
        if solution is None:
            raise InfeasibleError(self._explain_infeasible(constraints))
        wbits = [int(w) for w in self.pair_w[solution.choice]]
        abits = [int(a) for a in self.pair_a[solution.choice]]
        latency = None if self.latency is None else list(self.latency[np.arange(len(self.names)), solution.choice])
        return Policy(
            model=self.costs.model,
            input_size=self.costs.input_size,
            cost_model=self.costs.accounting,
            alpha=self.alpha,
            wbits_candidates=list(self.wbits),
            abits_candidates=list(self.abits),
            layers=[LayerBits(name, w, a) for name, w, a in zip(self.names, wbits, abits)],
            fixed_layers=[layer.name for layer in self.costs.fixed],
            constraints={key: getattr(budget, key) for key in BUDGET_FIELDS if getattr(budget, key) is not None},
            totals=policy_totals(self.costs, wbits, abits, latency),
            objective=solution.objective,
            solve_seconds=elapsed,
            solver=solution.method,
            label=budget.label(),
        )

    def _explain_infeasible(self, constraints: list[Constraint]) -> str:
        """One line: the first constraint whose smallest reachable value (alone, then together with the
        others) exceeds its budget."""
        for alone in (True, False):
            for index, constraint in enumerate(constraints):
                others = [] if alone else constraints[:index] + constraints[index + 1:]
                reached = self._minimum(constraint.key, others)
                if reached is not None and reached > constraint.limit * (1 + 1e-12):
                    return self._infeasible_message(constraint, reached, others)
        return "the constraints cannot be met together: " + "; ".join(c.description for c in constraints)

    def _minimum(self, key: str, others: list[Constraint]) -> float | None:
        """Smallest total of row `key` over policies meeting `others` (None when those cannot be met)."""
        row = self._row(key)
        selectable = np.where(np.isfinite(self.cost), row, np.inf)
        if not others:
            return float(selectable.min(axis=1).sum())
        rows = np.stack([self._row(c.key) for c in others])
        solution = MultipleChoiceKnapsack(selectable, rows).solve(np.array([c.limit for c in others]))
        return None if solution is None else solution.objective

    def _infeasible_message(self, constraint: Constraint, reached: float, others: list[Constraint]) -> str:
        if constraint.key == "bitops":
            bits = (f"bits {_bits_text(self.wbits)}" if self.wbits == self.abits else
                    f"weight bits {_bits_text(self.wbits)} and activation bits {_bits_text(self.abits)}")
        elif constraint.key in ("size", "avg_wbits"):
            bits = f"weight bits {_bits_text(self.wbits)}"
        elif constraint.key == "avg_abits":
            bits = f"activation bits {_bits_text(self.abits)}"
        else:
            bits = f"weight bits {_bits_text(self.wbits)} and activation bits {_bits_text(self.abits)}"
        also = f" while meeting {' and '.join(c.description for c in others)}" if others else ""
        count = len(self.names)
        fixed_bits = self.costs.fixed_weight_bits
        if constraint.key == "bitops":
            budget, least = _distinct(constraint.limit / GIGA, reached / GIGA)
            return f"BitOps budget {budget} G{constraint.detail} is below the minimum {least} G reachable with {bits}{also}"
        if constraint.key == "size":
            smallest_mb = (reached + fixed_bits) / MEGABYTE_BITS
            largest_ratio = self.costs.fp32_bits / (reached + fixed_bits)
            if constraint.description.startswith("compression"):
                asked = self.costs.fp32_bits / (constraint.limit + fixed_bits)
                budget, best = _distinct(asked, largest_ratio)
                return (f"compression ratio {budget} is above the maximum {best} reachable with {bits}{also} "
                        f"(smallest model {_number(smallest_mb)} MB)")
            budget, least = _distinct((constraint.limit + fixed_bits) / MEGABYTE_BITS, smallest_mb)
            return f"size budget {budget} MB is below the minimum {least} MB reachable with {bits}{also}"
        if constraint.key == "latency":
            budget, least = _distinct(constraint.limit, reached)
            return f"latency budget {budget} ms is below the minimum {least} ms reachable with {bits}{also}"
        kind = "weight" if constraint.key == "avg_wbits" else "activation"
        budget, least = _distinct(constraint.limit / count, reached / count)
        return f"average {kind} bits {budget} is below the minimum {least} reachable with {bits}{also}"


def solve(indicators: Indicators, costs: CostTable, budget: Budget, alpha: float = 2.0,
          wbits: list[int] | None = None, abits: list[int] | None = None,
          latency_table: LatencyTable | str | Path | None = None) -> Policy:
    """The optimal policy for one budget (a fresh Searcher; use Searcher directly for many budgets)."""
    return Searcher(indicators, costs, wbits, abits, alpha, latency_table).solve(budget)
