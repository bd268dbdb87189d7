"""Many budgets solved in one process: one policy file per budget and a CSV of totals. An infeasible
budget is a row of the CSV, not the end of the sweep."""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config.schema import MAX_BUDGETS, Budget
from orchestrator.common.errors import InfeasibleError, UserError
from orchestrator.common.fileio import write_text_atomic
from orchestrator.search.ilp import BUDGET_FIELDS, Searcher
from orchestrator.search.policy import TOTAL_KEYS, Policy, save_policy

# sweep axis -> the Budget fields it sets
SWEEP_AXES = {
    "wa": ("target_wbits", "target_abits"),
    "bitops": ("bitops_g",),
    "cr": ("compression_ratio",),
    "size_mb": ("size_mb",),
    "latency": ("latency_ms",),
}
# Budget columns carry a "budget_" prefix: the achieved totals use the same names.
CSV_COLUMNS = ("index", "label", "status", *(f"budget_{key}" for key in BUDGET_FIELDS), *TOTAL_KEYS, "objective",
               "solve_seconds", "solver", "policy", "message")


def parse_values(tokens: list[str], flag: str) -> list[float]:
    """Numbers and inclusive ranges START:STOP:COUNT (COUNT evenly spaced values), in the order given."""
    values: list[float] = []
    for token in tokens:
        parts = token.split(":")
        try:
            if len(parts) == 1:
                values.append(float(token))
                continue
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise UserError(f"{flag}: {token!r} is neither a number nor START:STOP:COUNT") from None
        if count < 1:
            raise UserError(f"{flag}: {token!r} asks for {count} values")
        if count > MAX_BUDGETS:  # refused before a list of that many values is built
            raise UserError(f"the sweep asks for {count:,} budgets ({flag} {token}); at most {MAX_BUDGETS:,} are "
                            "solved in one command: use fewer values per axis")
        step = 0.0 if count == 1 else (stop - start) / (count - 1)
        values.extend(start + i * step for i in range(count))
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UserError(f"{flag}: budgets are positive numbers, got {bad[0]:g}")
    return values


def parse_wa(tokens: list[str], flag: str) -> list[tuple[int, int]]:
    """Uniform W/A pairs written W,A (or WxA, or W3A4)."""
    pairs = []
    for token in tokens:
        match = re.fullmatch(r"[Ww]?(\d+)\s*(?:,|x|[Aa])\s*(\d+)", token.strip())
        if not match:
            raise UserError(f"{flag}: {token!r} is not a W,A pair such as 3,4")
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def expand_budgets(base: dict[str, Any], axes: dict[str, list]) -> list[Budget]:
    """The Cartesian product of the swept axes, each point on top of the fixed `base` budget fields."""
    names = list(axes)
    budgets = []
    for point in itertools.product(*(axes[name] for name in names)):
        fields = dict(base)
        for name, value in zip(names, point):
            fields.update(zip(SWEEP_AXES[name], value if isinstance(value, tuple) else (value,)))
        try:
            budgets.append(Budget(**fields))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "budget"
            raise UserError(f"sweep budget {fields}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    return budgets


@dataclass
class SweepResult:
    index: int
    budget: Budget
    policy: Policy | None
    message: str  # why there is no policy
    policy_file: str


POLICY_FILE = re.compile(r"\d{4}_[A-Za-z0-9.+_-]*\.json")  # what `_filename` writes


def _filename(index: int, label: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9.+-]+', '_', label)}.json"


def solve_budgets(searcher: Searcher, budgets: list[Budget], out_dir: str | Path,
              provenance: dict[str, Any] | None = None) -> list[SweepResult]:
    """Solve every budget; write out_dir/policies/<index>_<label>.json and out_dir/sweep.csv. Policy
    files an earlier sweep left in out_dir/policies are removed first, so the folder holds this
    sweep's policies and no stale one."""
    out_dir = Path(out_dir)
    policy_dir = out_dir / "policies"
    policy_dir.mkdir(parents=True, exist_ok=True)
    for stale in policy_dir.iterdir():
        if POLICY_FILE.fullmatch(stale.name):
            stale.unlink()
    results = []
    for index, budget in enumerate(budgets):
        try:
            policy = searcher.solve(budget)
        except InfeasibleError as error:
            results.append(SweepResult(index, budget, None, str(error), ""))
            continue
        policy.provenance.update(provenance or {})
        path = policy_dir / _filename(index, policy.label)
        save_policy(policy, path)
        results.append(SweepResult(index, budget, policy, "", str(path.relative_to(out_dir))))
    write_text_atomic(out_dir / "sweep.csv", sweep_csv(results))
    return results


def sweep_csv(results: list[SweepResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        row: dict[str, Any] = {"index": result.index, "label": result.budget.label(),
                               "status": "optimal" if result.policy else "infeasible",
                               "policy": result.policy_file, "message": result.message}
        row.update({f"budget_{key}": getattr(result.budget, key) for key in BUDGET_FIELDS})
        if result.policy:
            row.update({key: getattr(result.policy.totals, key) for key in TOTAL_KEYS})
            row.update(objective=result.policy.objective, solve_seconds=result.policy.solve_seconds,
                       solver=result.policy.solver)
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()
