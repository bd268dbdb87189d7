"""Latency look-up tables for the search: measured milliseconds per (layer, weight bits, activation bits).

CSV with a header naming the columns `layer,wbits,abits,ms` (any order, other columns ignored), or JSON:
a list of rows `{"layer", "wbits", "abits", "ms"}` or `[layer, wbits, abits, ms]`, optionally under a
top-level `"rows"` key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import readable_file
from orchestrator.search.indicators import strip_ddp_prefix

LatencyTable = dict[tuple[str, int, int], float]
COLUMNS = ("layer", "wbits", "abits", "ms")


def _row_entry(path: Path, where: str, values: dict) -> tuple[tuple[str, int, int], float]:
    try:
        layer = strip_ddp_prefix(str(values["layer"]).strip())
        wbits, abits = int(values["wbits"]), int(values["abits"])
        ms = float(values["ms"])
    except KeyError as missing:
        raise UserError(f"{path}: {where} lacks {missing}") from None
    except (TypeError, ValueError):
        raise UserError(f"{path}: {where} is not layer, integer wbits, integer abits, number ms: {values}") from None
    if not layer:
        raise UserError(f"{path}: {where} has an empty layer name")
    if not (math.isfinite(ms) and ms >= 0):
        raise UserError(f"{path}: {where} has latency {ms}; latencies are finite and not negative")
    return (layer, wbits, abits), ms


def load_latency_table(path: str | Path) -> LatencyTable:
    path = readable_file(path, "latency table")
    text = path.read_text()
    entries: list[tuple[str, dict]] = []
    if text.lstrip().startswith(("[", "{")):
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
        rows = raw.get("rows") if isinstance(raw, dict) else raw
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a list of rows (layer, wbits, abits, ms)")
        for number, row in enumerate(rows, start=1):
            if isinstance(row, list) and len(row) == len(COLUMNS):
                row = dict(zip(COLUMNS, row))
            if not isinstance(row, dict):
                raise UserError(f"{path}: row {number} is neither an object nor [layer, wbits, abits, ms]")
            entries.append((f"row {number}", row))
    else:
        reader = csv.DictReader(text.splitlines())
        header = [name.strip() for name in reader.fieldnames or []]
        absent = [name for name in COLUMNS if name not in header]
        if absent:
            raise UserError(f"{path}: CSV header lacks column(s) {', '.join(absent)}; expected {','.join(COLUMNS)}")
        reader.fieldnames = header
        entries = [(f"line {number}", row) for number, row in enumerate(reader, start=2)]
    table: LatencyTable = {}
    for where, row in entries:
        key, ms = _row_entry(path, where, row)
        if key in table:
            raise UserError(f"{path}: {where} repeats layer {key[0]} at W{key[1]}A{key[2]}")
        table[key] = ms
    if not table:
        raise UserError(f"{path}: latency table has no rows")
    return table
