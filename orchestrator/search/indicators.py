"""Importance indicators (docs/method.md §4): the learned step size of every searchable layer at every candidate
bit-width, for weights and activations, and the files that carry them.

Reads our JSON v1, the published dict JSON and the published pickle (through an unpickler that builds
plain data only); writes JSON v1. Plain data only: no torch here, so the search can load indicators fast.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import readable_file, write_json_atomic

INDICATORS_FORMAT = "limpq-indicators/v1"
KINDS = ("weight", "act")


def strip_ddp_prefix(name: str) -> str:
    return name.removeprefix("module.")


@dataclass
class Indicators:
    model: str  # torchvision arch name, "" if unknown
    bits: list[int]  # candidate bits, as given (e.g. [6, 5, 4, 3, 2])
    layers: list[str]  # searchable layers in forward order, no "module." prefix
    weight: dict[str, dict[int, float]]  # layer -> bit -> step size
    act: dict[str, dict[int, float]]
    provenance: dict[str, Any] = field(default_factory=dict)  # run id, epochs, data, ... (free-form)

    def __post_init__(self) -> None:
        """Normalise names (no DDP prefix) and bit keys (int), and check every layer has every bit."""
        self.bits = [int(b) for b in self.bits]
        self.layers = [strip_ddp_prefix(name) for name in self.layers]
        if not self.bits:
            raise UserError("indicators: empty list of bit-widths")
        if len(set(self.bits)) != len(self.bits):
            raise UserError(f"indicators: duplicate bit-widths in {self.bits}")
        if len(set(self.layers)) != len(self.layers):
            raise UserError("indicators: duplicate layer names")
        for kind in KINDS:
            table = {strip_ddp_prefix(name): {int(b): float(s) for b, s in steps.items()}
                     for name, steps in getattr(self, kind).items()}
            absent = [name for name in self.layers if name not in table]
            if absent:
                raise UserError(f"indicators: no {kind} step sizes for layers {', '.join(absent[:5])}"
                                + (f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""))
            for name in self.layers:
                steps = table[name]
                if sorted(steps) != sorted(self.bits):
                    raise UserError(f"indicators: {kind} of layer {name} has bits {sorted(steps)}, "
                                    f"expected {sorted(self.bits)}")
                # finite, not positive: the indicator is the raw parameter (docs/method.md §2.1), which one
                # optimizer step can carry below the quantizer's 1e-5 floor (swin_v2_t's 2-bit proj)
                bad = [b for b, s in steps.items() if not math.isfinite(s)]
                if bad:
                    raise UserError(f"indicators: {kind} step size of layer {name} at {bad[0]} bits is "
                                    f"{steps[bad[0]]!r}; step sizes are finite numbers")
            setattr(self, kind, {name: table[name] for name in self.layers})


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, strings and numbers only: any global (class or function) is refused
    before it is looked up, so nothing in the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


class _RefusedGlobal(Exception):
    pass


def _read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            return _PlainDataUnpickler(handle).load()
    except _RefusedGlobal as refused:
        raise UserError(f"{path}: refused to unpickle {refused}: an indicators pickle may hold only plain "
                        "data (dict, list, str, int, float)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError) as error:
        raise UserError(f"{path}: not a readable indicators pickle ({type(error).__name__}: {error})") from None


def _from_published(raw: dict[str, Any]) -> Indicators:
    """The published layout: {"weight": {layer: {"6": s}}, "act": {...}, "layer_name": [layer, ...]}."""
    weight, act = raw.get("weight"), raw.get("act")
    if not isinstance(weight, dict) or not isinstance(act, dict) or not weight:
        raise UserError("expected 'weight' and 'act' mappings of layer -> bit -> step size")
    layers = raw.get("layer_name") or list(weight)
    first = next(iter(weight.values()))
    if not isinstance(first, dict):
        raise UserError("expected 'weight' to map each layer to {bit: step size}")
    return Indicators(model="", bits=[int(b) for b in first], layers=list(layers), weight=weight, act=act,
                      provenance={"source": "published"})


def _from_v1(raw: dict[str, Any]) -> Indicators:
    layers = raw.get("layers")
    if not isinstance(layers, list):
        raise UserError("expected a 'layers' list")
    try:
        names = [entry["name"] for entry in layers]
        weight = {entry["name"]: entry["weight"] for entry in layers}
        act = {entry["name"]: entry["act"] for entry in layers}
    except (KeyError, TypeError) as error:
        raise UserError(f"each entry of 'layers' needs 'name', 'weight' and 'act' (missing {error})") from None
    return Indicators(model=str(raw.get("model") or ""), bits=list(raw.get("bits") or []), layers=names,
                      weight=weight, act=act, provenance=dict(raw.get("provenance") or {}))


def load_indicators(path: str | Path) -> Indicators:
    """Our JSON v1, the published dict JSON, or the published pickle (plain data only)."""
    path = readable_file(path, "indicators file")
    head = path.read_bytes()[:64].lstrip()
    looks_pickled = head.startswith(b"\x80")  # the PROTO opcode; no JSON text starts with this byte
    if not looks_pickled and (path.suffix.lower() == ".json" or head.startswith((b"{", b"[", b"\xef\xbb\xbf"))):
        try:
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
    else:
        raw = _read_pickle(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level, found {type(raw).__name__}")
    try:
        if "format" in raw:
            if raw["format"] != INDICATORS_FORMAT:
                raise UserError(f"format {raw['format']!r} is not {INDICATORS_FORMAT!r}")
            return _from_v1(raw)
        return _from_published(raw)
    except UserError as error:
        raise UserError(f"{path}: {str(error).removeprefix('indicators: ')}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path}: malformed indicators ({error})") from None


def indicators_to_dict(ind: Indicators) -> dict[str, Any]:
    """JSON v1 (docs/method.md §13); bit keys become strings as JSON requires."""
    return {
        "format": INDICATORS_FORMAT,
        "model": ind.model,
        "bits": list(ind.bits),
        "layers": [
            {"name": name,
             "weight": {str(b): ind.weight[name][b] for b in ind.bits},
             "act": {str(b): ind.act[name][b] for b in ind.bits}}
            for name in ind.layers
        ],
        # free-form: paths, timestamps and the like are written as their text
        "provenance": json.loads(json.dumps(ind.provenance, default=str)),
    }


def save_indicators(ind: Indicators, path: str | Path) -> None:
    write_json_atomic(path, indicators_to_dict(ind))


def non_monotonic(ind: Indicators) -> list[tuple[str, str, int]]:
    """(layer, "weight"|"act", bit) where the step size at `bit` is below the one at the next higher of
    the indicators' bit-widths: a joint-training artefact the search must never pick (docs/method.md §4). It is a
    property of the indicators, so it holds whichever candidates a search then uses."""
    descending = sorted(ind.bits, reverse=True)
    found = []
    for name in ind.layers:
        for kind in KINDS:
            steps = getattr(ind, kind)[name]
            found.extend((name, kind, low) for high, low in zip(descending, descending[1:]) if steps[low] < steps[high])
    return found


def check_layers(ind: Indicators, expected_names: list[str], source: str = "indicators") -> None:
    """UserError listing the model's searchable layers the indicators lack, and the ones they have extra."""
    expected = [strip_ddp_prefix(name) for name in expected_names]
    have, wanted = set(ind.layers), set(expected)
    missing = [name for name in expected if name not in have]
    extra = [name for name in ind.layers if name not in wanted]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(missing)}")
    if extra:
        parts.append(f"extra {len(extra)}: {', '.join(extra)}")
    raise UserError(f"{source}: layer names do not match the model's {len(expected)} searchable layers; "
                    + "; ".join(parts))
