"""Per-layer cost tables (MACs, weight count) for the bit-width search, traced once and cached on disk.

Tracing needs torch and a model build (seconds); a search needs only the numbers. A cached table is plain
JSON, so loading it imports neither torch nor torchvision. The cache lives in $LIMPQ_CACHE_DIR/costs
(default ~/.cache/limpq/costs): one file per model, input size, class count, accounting and fixed-layer
set; one trace writes the files of every accounting. Delete the folder to re-trace.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from orchestrator.errors import UserError
from orchestrator.fileio import write_json_atomic

if TYPE_CHECKING:
    from orchestrator.modelinfo import LayerInfo

Accounting = Literal["exact", "limpq-official"]
ACCOUNTINGS: tuple[str, ...] = ("exact", "limpq-official")
COST_TABLE_FORMAT = "limpq-costs/v1"
FIXED_LAYER_BITS = 8  # SPEC 1.2: fixed layers run at 8-bit weights (and 8-bit activations for BitOps reports)


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" or "linear"
    macs: int
    params: int


@dataclass(frozen=True)
class CostTable:
    """What the ILP needs to know about a model: searchable and fixed layers in forward order."""

    model: str
    input_size: int
    num_classes: int
    accounting: str
    searchable: tuple[LayerCost, ...]
    fixed: tuple[LayerCost, ...]

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
        return FIXED_LAYER_BITS * FIXED_LAYER_BITS * sum(la.macs for la in self.fixed)

    def to_dict(self) -> dict:
        return {
            "format": COST_TABLE_FORMAT,
            "model": self.model,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "accounting": self.accounting,
            "searchable": [asdict(la) for la in self.searchable],
            "fixed": [asdict(la) for la in self.fixed],
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
        )


def official_macs(layer: LayerInfo) -> int:
    """MACs as the published search script counts them: output height and width from the unfloored
    stride division, their product truncated to an integer (SPEC 1.5)."""
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
) -> CostTable:
    """A cost table from traced layers; `fixed_layers` None means SPEC 1.2's default."""
    from orchestrator.modelinfo import (
        split_layers,  # imports torch; a cached table loads without it
    )

    if accounting not in ACCOUNTINGS:
        raise UserError(f"cost model {accounting!r} unknown; choose one of {', '.join(ACCOUNTINGS)}")
    macs_of = official_macs if accounting == "limpq-official" else (lambda layer: layer.macs)
    searchable, fixed = split_layers(layers, fixed_layers)

    def costs(group: list[LayerInfo]) -> tuple[LayerCost, ...]:
        return tuple(LayerCost(la.name, la.kind, int(macs_of(la)), int(la.weight_numel)) for la in group)

    return CostTable(model, input_size, num_classes, accounting, costs(searchable), costs(fixed))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIMPQ_CACHE_DIR") or Path.home() / ".cache" / "limpq") / "costs"


def _cache_path(cache_dir: Path, model: str, input_size: int, num_classes: int, accounting: str,
                fixed_layers: list[str] | None) -> Path:
    fixed_key = "default" if fixed_layers is None else hashlib.sha256("\n".join(fixed_layers).encode()).hexdigest()[:12]
    return cache_dir / f"{model}_{input_size}px_{num_classes}cls_{accounting}_{fixed_key}.json"


def cost_table(
    model: str,
    input_size: int,
    accounting: Accounting = "exact",
    fixed_layers: list[str] | None = None,
    num_classes: int = 1000,
    cache_dir: str | Path | None = None,
) -> CostTable:
    """The cost table of a torchvision model, traced on first use and read from the cache after."""
    if accounting not in ACCOUNTINGS:
        raise UserError(f"cost model {accounting!r} unknown; choose one of {', '.join(ACCOUNTINGS)}")
    if input_size < 8:
        raise UserError(f"input size {input_size} is too small (at least 8)")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(cache_dir, model, input_size, num_classes, accounting, fixed_layers)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") == COST_TABLE_FORMAT:
                return CostTable.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt below
    from orchestrator.modelinfo import (  # torch, only to trace a new table
        build_model,
        trace_layers,
    )

    layers = trace_layers(build_model(model, num_classes=num_classes), input_size)
    tables = {name: costs_from_layers(layers, name, fixed_layers, model, input_size, num_classes) for name in ACCOUNTINGS}
    try:  # one trace serves every accounting
        for name, table in tables.items():
            write_json_atomic(_cache_path(cache_dir, model, input_size, num_classes, name, fixed_layers), table.to_dict())
    except OSError:
        pass  # a read-only cache only costs speed
    return tables[accounting]
