"""The PNG charts are written, decodable, and sized for the number of layers they show."""

from __future__ import annotations

import numpy as np
from PIL import Image

from orchestrator.common import plots

BITS = [6, 5, 4, 3, 2]


def _indicators(layers: int, seed: int = 0) -> tuple[list[str], list[list[float]], list[list[float]]]:
    rng = np.random.default_rng(seed)
    names = [f"layer{index // 3 + 1}.{index % 3}.conv{index % 2 + 1}" for index in range(layers)]
    weight = [[0.01 * 2 ** (6 - b) * rng.uniform(0.8, 1.2) for b in BITS] for _ in names]
    act = [[0.1 * 2 ** ((6 - b) / 2) * rng.uniform(0.8, 1.2) for b in BITS] for _ in names]
    return names, weight, act


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_indicator_heatmap_grows_with_the_layers(tmp_path):
    names, weight, act = _indicators(4)
    small = plots.indicator_heatmap(names, BITS, weight, act, tmp_path / "small.png", title="tiny")
    names, weight, act = _indicators(60)
    large = plots.indicator_heatmap(names, BITS, weight, act, tmp_path / "nested" / "large.png", title="resnet50")

    assert small.stat().st_size > 0 and large.stat().st_size > 0
    (small_width, small_height), (large_width, large_height) = _png_size(small), _png_size(large)
    assert large_width == small_width
    assert large_height > 2 * small_height


def test_non_monotonic_cells_mark_the_lower_bit_entry():
    weight = [
        [0.01, 0.02, 0.04, 0.08, 0.16],  # grows as bits fall: nothing marked
        [0.01, 0.02, 0.015, 0.08, 0.05],  # 4 bits below 5 bits, 2 bits below 3 bits
    ]
    mask = plots.non_monotonic_cells(BITS, weight)
    assert mask.tolist() == [[False] * 5, [False, False, True, False, True]]
    # Column order does not matter: neighbours are by bit-width.
    reordered = plots.non_monotonic_cells([2, 4, 3], [[0.05, 0.03, 0.02]])
    assert reordered.tolist() == [[False, False, True]]


def test_pareto_plot_with_both_series_and_a_failed_trial(tmp_path):
    rows = [
        {"budget": "W2A2", "kind": "mpq", "bitops_g": 0.9, "top1": 0.61},
        {"budget": "W3A3", "kind": "mpq", "bitops_g": 2.1, "top1": 0.70},
        {"budget": "G0.5", "kind": "mpq", "bitops_g": 0.5, "top1": None},
        {"budget": "W2A2", "kind": "uniform", "bitops_g": 0.9, "top1": 0.55},
        {"budget": "W4A4", "kind": "uniform", "bitops_g": 3.7, "top1": 0.74},
    ]
    path = plots.pareto_plot(rows, tmp_path / "pareto.png")
    assert path.stat().st_size > 0
    assert _png_size(path)[0] > 600
    only_baselines = plots.pareto_plot(rows[3:], tmp_path / "baselines.png", title="uniform only")
    assert only_baselines.stat().st_size > 0


def test_policy_bits_chart_widens_with_the_layers(tmp_path):
    few = plots.policy_bits_chart(["a", "b", "c"], [4, 3, 2], [6, 4, 2], tmp_path / "few.png")
    names = [f"features.{index}.conv" for index in range(70)]
    wbits = [2 + index % 5 for index in range(70)]
    abits = [6 - index % 5 for index in range(70)]
    many = plots.policy_bits_chart(names, wbits, abits, tmp_path / "many.png", title="W3A3 policy")
    assert few.stat().st_size > 0
    assert _png_size(many)[0] > 1.5 * _png_size(few)[0]
