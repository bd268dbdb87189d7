"""PNG charts of the method's outputs: indicator heatmaps, the accuracy/BitOps Pareto plot, per-layer
bit-width charts. Matplotlib's object API (Agg output): no pyplot, so no global backend or
figure state, and safe in any process (Ray workers included)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

DPI = 120
_MPQ_COLOR, _UNIFORM_COLOR = "tab:blue", "tab:orange"


def _label_fontsize(count: int) -> float:
    """Tick labels shrink as layers are added, down to a size still legible at full resolution."""
    return max(5.0, min(9.0, 400.0 / max(count, 1)))


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def non_monotonic_cells(bits: Sequence[int], values: Sequence[Sequence[float]]) -> np.ndarray:
    """Mask (layers x bits) of entries whose step size is below the next higher candidate's: the
    artefacts of joint training that the search must never choose (docs/method.md §4)."""
    table = np.asarray(values, dtype=float)
    mask = np.zeros(table.shape, dtype=bool)
    ascending = sorted(range(len(bits)), key=lambda column: bits[column])
    for lower, higher in zip(ascending, ascending[1:]):
        mask[:, lower] = table[:, lower] < table[:, higher]
    return mask


def _heatmap_panel(figure: Figure, axes: Axes, layer_names: Sequence[str], bits: Sequence[int],
                   values: Sequence[Sequence[float]], title: str) -> None:
    table = np.asarray(values, dtype=float)
    positive = table[np.isfinite(table) & (table > 0)]
    if positive.size and positive.size == table.size and positive.max() > positive.min():
        norm: Normalize = LogNorm(vmin=positive.min(), vmax=positive.max())
    else:
        norm = Normalize()
    image = axes.imshow(table, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.08, pad=0.02, label="step size")
    rows, columns = np.nonzero(non_monotonic_cells(bits, table))
    axes.scatter(columns, rows, marker="x", color="red", s=18, linewidths=1.2)
    axes.set_xticks(range(len(bits)), [str(b) for b in bits])
    axes.set_xlabel("bit-width")
    axes.set_yticks(range(len(layer_names)), layer_names, fontsize=_label_fontsize(len(layer_names)))
    axes.set_title(title)


def indicator_heatmap(layer_names: Sequence[str], bits: Sequence[int], weight: Sequence[Sequence[float]],
                      act: Sequence[Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Layers (rows) x bit-widths (columns) of the weight and activation indicators side by side, each
    on its own log colour scale; a red x marks a non-monotonic entry."""
    height = max(4.0, 1.6 + 0.18 * len(layer_names))
    figure = Figure(figsize=(11, height), layout="constrained")
    weight_axes, act_axes = figure.subplots(1, 2)
    _heatmap_panel(figure, weight_axes, layer_names, bits, weight, "weight step size")
    _heatmap_panel(figure, act_axes, layer_names, bits, act, "activation step size")
    act_axes.tick_params(labelleft=False)
    subtitle = "x: smaller than at the next higher bit-width (never chosen by the search)"
    figure.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return _save(figure, path)


def pareto_plot(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Top-1 vs GBitOps of the searched (mixed-precision) and uniform policies, one labelled series each.

    Each row holds `budget` (the point's label), `kind` ("mpq" or "uniform"), `bitops_g` and `top1`;
    rows without a finite top1 (failed trials) are left out.
    """
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axes = figure.subplots()
    series = (
        ("mpq", "mixed precision (LIMPQ)", _MPQ_COLOR, "o"),
        ("uniform", "uniform precision", _UNIFORM_COLOR, "s"),
    )
    for kind, legend, color, marker in series:
        points = sorted(
            (row for row in rows if row.get("kind") == kind and _is_finite(row.get("top1"))),
            key=lambda row: row["bitops_g"],
        )
        if not points:
            continue
        xs = [row["bitops_g"] for row in points]
        ys = [row["top1"] for row in points]
        axes.plot(xs, ys, color=color, marker=marker, label=legend, linewidth=1.2, markersize=6)
        for row in points:
            axes.annotate(str(row["budget"]), (row["bitops_g"], row["top1"]), textcoords="offset points",
                          xytext=(4, 5), fontsize=8, color=color)
    axes.margins(x=0.1, y=0.1)  # room for the labels of the outermost points
    axes.set_xlabel("GBitOps (searchable layers)")
    axes.set_ylabel("top-1 accuracy")
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    axes.set_title(title or "Accuracy vs BitOps")
    return _save(figure, path)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def policy_bits_chart(layer_names: Sequence[str], wbits: Sequence[int], abits: Sequence[int],
                      path: str | Path, title: str = "") -> Path:
    """Bars per layer (in model order) of the weight and activation bit-widths of one policy."""
    count = len(layer_names)
    figure = Figure(figsize=(max(8.0, 1.5 + 0.22 * count), 4.8), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(count)
    width = 0.4
    axes.bar(positions - width / 2, wbits, width, label="weight bits", color=_MPQ_COLOR)
    axes.bar(positions + width / 2, abits, width, label="activation bits", color=_UNIFORM_COLOR)
    axes.set_xticks(positions, layer_names, rotation=90, fontsize=_label_fontsize(count))
    axes.set_xlim(-0.7, count - 0.3)
    top = max([*wbits, *abits, 1])
    axes.set_yticks(range(0, top + 1))
    axes.set_ylim(0, top + 0.6)
    axes.set_ylabel("bits")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8, frameon=False)
    axes.set_title(title or "Bit-widths per layer", loc="left")
    return _save(figure, path)
