"""Searched policies: per-layer (weight bits, activation bits), their totals, the policy JSON v1 of
docs/method.md §13, and exports to other tools (the published fine-tuning YAML lists, an NNCF-style precision list)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.schema import uniform_label
from orchestrator.common.errors import UserError
from orchestrator.common.fileio import readable_file, write_json_atomic, write_text_atomic
from orchestrator.search.indicators import strip_ddp_prefix
from orchestrator.search.costs import FIXED_LAYER_BITS, CostTable

POLICY_FORMAT = "limpq-policy/v1"
GIGA = 1e9
MEGABYTE_BITS = 8 * 1024 * 1024  # "MB" as the published search script reports model sizes
TOTAL_KEYS = ("bitops_g", "bitops_g_with_fixed", "bitops_g_total", "size_mb", "compression_ratio", "avg_wbits",
              "avg_abits", "latency_ms")


@dataclass(frozen=True)
class LayerBits:
    name: str
    wbits: int
    abits: int


@dataclass(frozen=True)
class PolicyTotals:
    bitops_g: float  # searchable layers only, as the BitOps constraint counts them
    bitops_g_with_fixed: float  # plus the fixed layers at 8-bit weights and activations
    bitops_g_total: float | None  # plus the multiplies left in float at 32 x 32 bits: every MAC (None: older file)
    size_mb: float  # all conv/linear weights, fixed layers at 8 bits
    compression_ratio: float  # FP32 size / size
    avg_wbits: float
    avg_abits: float
    latency_ms: float | None  # searchable layers, when a latency table was given


def policy_totals(costs: CostTable, wbits: list[int], abits: list[int],
                  latency: list[float] | None = None) -> PolicyTotals:
    """Totals of a policy given as per-layer bits in the cost table's searchable order."""
    bitops = sum(layer.bitops(w, a) for layer, w, a in zip(costs.searchable, wbits, abits))
    weight_bits = costs.fixed_weight_bits + sum(layer.params * w for layer, w in zip(costs.searchable, wbits))
    return PolicyTotals(
        bitops_g=bitops / GIGA,
        bitops_g_with_fixed=(bitops + costs.fixed_bitops) / GIGA,
        bitops_g_total=(bitops + costs.fixed_bitops + costs.float_bitops) / GIGA,
        size_mb=weight_bits / MEGABYTE_BITS,
        compression_ratio=costs.fp32_bits / weight_bits,
        avg_wbits=sum(wbits) / len(wbits),
        avg_abits=sum(abits) / len(abits),
        latency_ms=None if latency is None else float(sum(latency)),
    )


@dataclass
class Policy:
    model: str
    input_size: int
    cost_model: str
    alpha: float
    wbits_candidates: list[int]
    abits_candidates: list[int]
    layers: list[LayerBits]  # searchable layers in forward order
    fixed_layers: list[str]
    constraints: dict[str, Any]  # the budget: only the fields that were set
    totals: PolicyTotals
    objective: float | None  # None for policies not searched (uniform baselines)
    solve_seconds: float
    solver: str = ""
    label: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bits(self) -> list[int]:
        return [layer.wbits for layer in self.layers]

    @property
    def act_bits(self) -> list[int]:
        return [layer.abits for layer in self.layers]

    def assignment(self) -> dict[str, tuple[int, int]]:
        """{layer: (wbits, abits)}: what the quantized model's bit control takes."""
        return {layer.name: (layer.wbits, layer.abits) for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        totals = {key: getattr(self.totals, key) for key in TOTAL_KEYS}
        return {
            "format": POLICY_FORMAT,
            "model": self.model,
            "input_size": self.input_size,
            "cost_model": self.cost_model,
            "alpha": self.alpha,
            "label": self.label,
            "wbits_candidates": list(self.wbits_candidates),
            "abits_candidates": list(self.abits_candidates),
            "constraints": dict(self.constraints),
            "layers": [{"name": layer.name, "wbits": layer.wbits, "abits": layer.abits} for layer in self.layers],
            "fixed_layers": [{"name": name, "wbits": FIXED_LAYER_BITS} for name in self.fixed_layers],
            **totals,
            "objective": self.objective,
            "solve_seconds": self.solve_seconds,
            "solver": self.solver,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Policy:
        totals = PolicyTotals(**{key: raw.get(key) for key in TOTAL_KEYS})
        return cls(
            model=raw.get("model", ""),
            input_size=int(raw.get("input_size") or 0),
            cost_model=raw.get("cost_model", ""),
            alpha=float(raw.get("alpha", 0.0)),
            wbits_candidates=list(raw.get("wbits_candidates") or []),
            abits_candidates=list(raw.get("abits_candidates") or []),
            layers=[LayerBits(strip_ddp_prefix(entry["name"]), _bit_width(entry, "wbits"), _bit_width(entry, "abits"))
                    for entry in raw["layers"]],
            fixed_layers=[entry["name"] if isinstance(entry, dict) else entry for entry in raw.get("fixed_layers", [])],
            constraints=dict(raw.get("constraints") or {}),
            totals=totals,
            objective=None if raw.get("objective") is None else float(raw["objective"]),
            solve_seconds=float(raw.get("solve_seconds", 0.0)),
            solver=raw.get("solver", ""),
            label=raw.get("label", ""),
            provenance=dict(raw.get("provenance") or {}),
        )


def _bit_width(entry: dict[str, Any], key: str) -> int:
    """A layer's bit-width as written: an integer, never a string or a float that merely converts."""
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"layer {entry.get('name')!r}: {key} is {value!r}, not an integer bit-width")
    return value


def save_policy(policy: Policy, path: str | Path) -> None:
    write_json_atomic(path, policy.to_dict())


def load_policy(path: str | Path) -> Policy:
    path = readable_file(path, "policy file")
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != POLICY_FORMAT:
        raise UserError(f"{path}: not a {POLICY_FORMAT} policy")
    try:
        return Policy.from_dict(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: malformed policy ({type(error).__name__}: {error})") from None


def policy_to_yaml(policy: Policy) -> str:
    """The lists the published fine-tuning config reads (`weight_bits`, `act_bits`, searchable layers in
    forward order), with the layer names alongside for people."""
    names = "\n".join(f"#   {i:3d} {layer.name}: W{layer.wbits}A{layer.abits}" for i, layer in enumerate(policy.layers))
    return (
        f"# LIMPQ policy {policy.label or ''} for {policy.model} at {policy.input_size}px ({policy.cost_model} costs)\n"
        f"# BitOps {policy.totals.bitops_g_with_fixed:.3f} G with fixed layers, compression "
        f"{policy.totals.compression_ratio:.3f}x; fixed layers at {FIXED_LAYER_BITS} bits: "
        f"{', '.join(policy.fixed_layers)}\n"
        f"# layers:\n{names}\n"
        f"arch: {policy.model}\n"
        f"weight_bits: [{', '.join(str(b) for b in policy.weight_bits)}]\n"
        f"act_bits:    [{', '.join(str(b) for b in policy.act_bits)}]\n"
    )


def policy_to_nncf(policy: Policy) -> dict[str, Any]:
    """An NNCF-style manual precision list: [bits, scope] pairs, weight scopes `<layer>|WEIGHT` and input
    activation scopes `<layer>|INPUT` named by module (map them to your graph's scope names if they differ)."""
    scopes: list[list] = []
    for layer in policy.layers:
        scopes.append([layer.wbits, f"{layer.name}|WEIGHT"])
        scopes.append([layer.abits, f"{layer.name}|INPUT"])
    for name in policy.fixed_layers:
        scopes.append([FIXED_LAYER_BITS, f"{name}|WEIGHT"])
    return {
        "compression": {
            "algorithm": "quantization",
            "initializer": {"precision": {"type": "manual", "bitwidth_per_scope": scopes}},
        }
    }


def export_yaml(policy: Policy, path: str | Path) -> None:
    write_text_atomic(path, policy_to_yaml(policy))


def export_nncf(policy: Policy, path: str | Path) -> None:
    write_json_atomic(path, policy_to_nncf(policy))


def uniform_baseline(costs: CostTable, bits: int, alpha: float = 0.0) -> Policy:
    """The uniform W{bits}A{bits} policy with the same totals as a searched one (not searched: no
    objective)."""
    count = len(costs.searchable)
    return Policy(
        model=costs.model, input_size=costs.input_size, cost_model=costs.accounting, alpha=alpha,
        wbits_candidates=[bits], abits_candidates=[bits],
        layers=[LayerBits(layer.name, bits, bits) for layer in costs.searchable],
        fixed_layers=[layer.name for layer in costs.fixed],
        constraints={"target_wbits": bits, "target_abits": bits},
        totals=policy_totals(costs, [bits] * count, [bits] * count),
        objective=None, solve_seconds=0.0, solver="uniform", label=uniform_label(bits),
    )


def given_policy(path: str | Path, costs: CostTable, bits: list[int], label: str = "") -> Policy:
    """The policy in a file, for the model and input size of `costs`: its layers are exactly the
    cost table's searchable ones at bit-widths in `bits` (the joint model's, which every fine-tuning
    and one-shot score starts from), and its totals are recomputed here, never trusted from the file."""
    policy = load_policy(path)
    if policy.model and policy.model != costs.model:
        raise UserError(f"{path}: a policy for model {policy.model}, but the config's model.arch is {costs.model}; "
                        f"search one for {costs.model}")
    if policy.input_size and policy.input_size != costs.input_size:
        raise UserError(f"{path}: a policy searched at input size {policy.input_size}, but the config's "
                        f"model.input_size is {costs.input_size}; search one at {costs.input_size}")
    chosen = policy.assignment()
    missing = [name for name in costs.names if name not in chosen]
    extra = [name for name in chosen if name not in costs.names]
    if missing or extra:
        what = f"lacks layer {missing[0]}" if missing else f"names layer {extra[0]}, which is not searchable"
        raise UserError(f"{path}: {what} of {costs.model} ({len(costs.names)} searchable layers); search one for "
                        "this model")
    outside = sorted({b for pair in chosen.values() for b in pair} - set(bits))
    if outside:
        raise UserError(f"{path}: bit-widths {outside} are not among indicators.bits {bits}, which the joint "
                        "model holds step sizes for; use those or add them")
    layers = [LayerBits(name, *chosen[name]) for name in costs.names]
    return Policy(
        model=costs.model, input_size=costs.input_size, cost_model=costs.accounting, alpha=policy.alpha,
        wbits_candidates=sorted(set(bits)), abits_candidates=sorted(set(bits)), layers=layers,
        fixed_layers=[layer.name for layer in costs.fixed], constraints={"policy": str(path)},
        totals=policy_totals(costs, [layer.wbits for layer in layers], [layer.abits for layer in layers]),
        objective=None, solve_seconds=0.0, solver="given", label=label or policy.label,
        provenance={**policy.provenance, "file": str(path)},
    )
