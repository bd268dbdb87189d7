"""Per-layer cost tables (MACs, weight count) for the bit-width search, traced once and cached on disk.

Tracing needs torch and a model build (seconds); a search needs only the numbers. A cached table is plain
JSON, so loading it imports neither torch nor torchvision. The cache lives in $LIMPQ_CACHE_DIR/costs
(default ~/.cache/limpq/costs): one file per torchvision model, input size, class count, model kwargs,
accounting and fixed-layer set; one trace writes the files of every accounting. Delete the folder to
re-trace. A user's model (`module:callable`) is not cached on disk, since its code may change under the
same name; within a process it is traced once per source file content (the preflight, the search and
`limpq model check` ask for its table several times).

Besides the layers' own MACs, a layer holds the MACs of the activation x activation products that run
at its activation bits (`act_macs`: an attention's q @ k^T and attn @ v, tied to its output projection),
and the table lists the multiplies that stay in float (`float_ops`: other products of activations,
weights read outside a layer), so its totals cover every MAC of the forward pass (docs/method.md §6).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import write_json_atomic
from orchestrator.models.user_module import is_import_path, source_digest

if TYPE_CHECKING:
    from orchestrator.models.info import FloatOp, LayerInfo, ModelTrace

Accounting = Literal["exact", "limpq-official"]
ACCOUNTINGS: tuple[str, ...] = ("exact", "limpq-official")
COST_TABLE_FORMAT = "limpq-costs/v2"  # v2: Linear MACs over tokens, act_macs, float_ops
FIXED_LAYER_BITS = 8  # docs/method.md §2.3: fixed layers run at 8-bit weights (and 8-bit activations for BitOps reports)
FLOAT_BITS = 32  # multiplies left in float count 32 x 32 BitOps per MAC


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" or "linear"; for a float op "weight", "attention" or "matmul" (modelinfo.FloatOp)
    macs: int
    params: int
    act_macs: int = 0  # products of two activations quantized at this layer's activation bits (docs/method.md §6)

    def bitops(self, wbits: int, abits: int) -> int:
        """docs/method.md §6: MACs x weight bits x activation bits, and both operands of `act_macs` at `abits`."""
        return self.macs * wbits * abits + self.act_macs * abits * abits


@dataclass(frozen=True)
class CostTable:
    """What the ILP needs to know about a model: searchable and fixed layers in forward order, and the
    multiplies that stay in float (reported, never searched)."""

    model: str
    input_size: int
    num_classes: int
    accounting: str
    searchable: tuple[LayerCost, ...]
    fixed: tuple[LayerCost, ...]
    float_ops: tuple[LayerCost, ...] = ()

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.searchable]

    @property
    def fp32_bits(self) -> int:
        """Size of every conv/linear weight in FP32, the reference of the compression ratio."""
        return 32 * (sum(la.params for la in self.searchable) + sum(la.params for la in self.fixed))

    @property
    def fixed_weight_bits(self) -> int:
        return FIXED_LAYER_BITS * sum(la.params for la in self.fixed)

    @property
    def fixed_bitops(self) -> int:
        return sum(la.bitops(FIXED_LAYER_BITS, FIXED_LAYER_BITS) for la in self.fixed)

    @property
    def searchable_macs(self) -> int:
        return sum(la.macs + la.act_macs for la in self.searchable)

    @property
    def fixed_macs(self) -> int:
        return sum(la.macs + la.act_macs for la in self.fixed)

    @property
    def float_macs(self) -> int:
        return sum(op.macs for op in self.float_ops)

    @property
    def total_macs(self) -> int:
        """Every multiply-accumulate of one forward pass at batch 1."""
        return self.searchable_macs + self.fixed_macs + self.float_macs

    @property
    def quantized_share(self) -> float:
        """The fraction of all MACs that run quantized (searchable and fixed layers)."""
        total = self.total_macs
        return (self.searchable_macs + self.fixed_macs) / total if total else 1.0

    @property
    def float_bitops(self) -> int:
        return FLOAT_BITS * FLOAT_BITS * self.float_macs

    def to_dict(self) -> dict:
        return {
            "format": COST_TABLE_FORMAT,
            "model": self.model,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "accounting": self.accounting,
            "searchable": [asdict(la) for la in self.searchable],
            "fixed": [asdict(la) for la in self.fixed],
            "float_ops": [asdict(op) for op in self.float_ops],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> CostTable:
        return cls(
            model=raw["model"],
            input_size=int(raw["input_size"]),
            num_classes=int(raw["num_classes"]),
            accounting=raw["accounting"],
            searchable=tuple(LayerCost(**la) for la in raw["searchable"]),
            fixed=tuple(LayerCost(**la) for la in raw["fixed"]),
            float_ops=tuple(LayerCost(**op) for op in raw.get("float_ops", ())),
        )


def official_macs(layer: LayerInfo) -> int:
    """MACs as the published search script counts them: output height and width from the unfloored
    stride division, their product truncated to an integer (docs/method.md §6)."""
    if layer.kind == "linear":
        return layer.macs
    (h, w), (kh, kw) = layer.input_hw, layer.kernel_size
    out_h = (h + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) / layer.stride[0] + 1
    out_w = (w + 2 * layer.padding[1] - layer.dilation[1] * (kw - 1) - 1) / layer.stride[1] + 1
    return layer.in_channels * layer.out_channels * int(out_h * out_w) * kh * kw // layer.groups


def costs_from_layers(
    layers: list[LayerInfo],
    accounting: Accounting = "exact",
    fixed_layers: list[str] | None = None,
    model: str = "",
    input_size: int = 0,
    num_classes: int = 0,
    float_ops: tuple[FloatOp, ...] = (),
) -> CostTable:
    """A cost table from traced layers (and the trace's float ops); `fixed_layers` None means docs/method.md §2.3's
    default."""
    from orchestrator.models.info import (
        split_layers,  # imports torch; a cached table loads without it
    )

    if accounting not in ACCOUNTINGS:
        raise UserError(f"cost model {accounting!r} unknown; choose one of {', '.join(ACCOUNTINGS)}")
    macs_of = official_macs if accounting == "limpq-official" else (lambda layer: layer.macs)
    searchable, fixed = split_layers(layers, fixed_layers)

    layer_names = {layer.name for layer in layers}
    act_macs: Counter[str] = Counter()  # an attention's products, at the activation bits of the layer they are tied to
    for op in float_ops:
        if op.quantized_with in layer_names:
            act_macs[op.quantized_with] += op.macs

    def costs(group: list[LayerInfo]) -> tuple[LayerCost, ...]:
        return tuple(LayerCost(la.name, la.kind, int(macs_of(la)), int(la.weight_numel), act_macs.get(la.name, 0))
                     for la in group)

    floats = tuple(LayerCost(op.name, op.kind, int(op.macs), int(op.params)) for op in float_ops
                   if op.quantized_with not in layer_names)
    return CostTable(model, input_size, num_classes, accounting, costs(searchable), costs(fixed), floats)


def float_ops_text(costs: CostTable, count: int = 3) -> str:
    """The largest float operations with their shares of all MACs, e.g. `blocks.0.attn (attention) 1.2%`."""
    total = costs.total_macs or 1
    ops = sorted(costs.float_ops, key=lambda op: -op.macs)
    text = ", ".join(f"{op.name or '(model)'} ({op.kind}) {100 * op.macs / total:.1f}%" for op in ops[:count])
    return text + (f" and {len(ops) - count} more" if len(ops) > count else "")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIMPQ_CACHE_DIR") or Path.home() / ".cache" / "limpq") / "costs"


def _cache_path(cache_dir: Path, model: str, input_size: int, num_classes: int, accounting: str,
                fixed_layers: list[str] | None, kwargs: Mapping[str, Any]) -> Path:
    fixed_key = "default" if fixed_layers is None else hashlib.sha256("\n".join(fixed_layers).encode()).hexdigest()[:12]
    kwargs_key = f"_{hashlib.sha256(json.dumps(dict(kwargs), sort_keys=True, default=str).encode()).hexdigest()[:12]}" \
        if kwargs else ""
    return cache_dir / f"{model}_{input_size}px_{num_classes}cls{kwargs_key}_{accounting}_{fixed_key}.json"


def cost_table(
    model: str,
    input_size: int,
    accounting: Accounting = "exact",
    fixed_layers: list[str] | None = None,
    num_classes: int = 1000,
    cache_dir: str | Path | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> CostTable:
    """The cost table of a model (`orchestrator.models.info.build_model`'s arch and kwargs): a torchvision
    model's is traced on first use and read from the cache after; a user's model once per process and
    source."""
    if accounting not in ACCOUNTINGS:
        raise UserError(f"cost model {accounting!r} unknown; choose one of {', '.join(ACCOUNTINGS)}")
    if input_size < 8:
        raise UserError(f"input size {input_size} is too small (at least 8)")
    kwargs = dict(kwargs or {})
    if is_import_path(model):
        return _traced_tables(model, input_size, num_classes, fixed_layers, kwargs)[accounting]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(cache_dir, model, input_size, num_classes, accounting, fixed_layers, kwargs)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") == COST_TABLE_FORMAT:
                return CostTable.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below
    tables = _traced_tables(model, input_size, num_classes, fixed_layers, kwargs)
    try:  # one trace serves every accounting
        for name, table in tables.items():
            write_json_atomic(_cache_path(cache_dir, model, input_size, num_classes, name, fixed_layers, kwargs),
                              table.to_dict())
    except OSError:
        pass  # a read-only cache only costs speed
    return tables[accounting]


def _traced_tables(model: str, input_size: int, num_classes: int, fixed_layers: list[str] | None,
                   kwargs: dict[str, Any]) -> dict[str, CostTable]:
    """The table of every accounting from one trace of the model."""
    trace = _trace(model, input_size, num_classes, kwargs)
    return {name: costs_from_layers(list(trace.layers), name, fixed_layers, model, input_size, num_classes,
                                    trace.float_ops) for name in ACCOUNTINGS}


_traces: dict[tuple, ModelTrace] = {}


def _trace(model: str, input_size: int, num_classes: int, kwargs: dict[str, Any]) -> ModelTrace:
    """`trace_model` of the built model, once per process for the same model, arguments and (for a
    user's model) source file content: an edited and reloaded module is traced again."""
    from orchestrator.models.info import (  # torch, only to trace a new table
        build_model,
        trace_model,
    )

    key = (model, input_size, num_classes, json.dumps(kwargs, sort_keys=True, default=str),
           source_digest(model) if is_import_path(model) else "")
    if key not in _traces:
        _traces[key] = trace_model(build_model(model, num_classes=num_classes, kwargs=kwargs), input_size, num_classes)
    return _traces[key]
