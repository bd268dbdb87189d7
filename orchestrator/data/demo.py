"""The demo dataset: scikit-learn's bundled handwritten digits as an ImageNet-style folder.

1,797 real 8x8 digits ship inside scikit-learn, so the demo needs no download. They are upscaled to
RGB PNGs and split per class into `train/<digit>/*.png` and `val/<digit>/*.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import replaced_on_success

MANIFEST_NAME = "limpq-dataset.json"
MANIFEST_FORMAT = "limpq-digits/v1"
DIGITS_MAX_VALUE = 16  # load_digits pixels are counts 0..16


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: round(val_fraction * n_c) of each class, chosen by seed."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen = rng.permutation(members)[: round(val_fraction * len(members))]
        is_val[chosen] = True
    return is_val


def _read_manifest(out_dir: Path) -> dict | None:
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def write_digits_dataset(out_dir: str | Path, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the digits as `out_dir/{train,val}/<digit>/<index>.png`; returns the dataset manifest.

    Idempotent: an `out_dir` that already holds this dataset is left alone. The files are written to
    a temporary sibling and renamed into place last, so an interrupted run never leaves a partial
    dataset behind that looks complete.
    """
    if image_size < 8:
        raise UserError(f"image size must be at least 8 (the digits are 8x8), got {image_size}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out_dir = Path(out_dir)
    wanted = {"format": MANIFEST_FORMAT, "image_size": image_size, "val_fraction": val_fraction, "seed": seed}
    existing = _read_manifest(out_dir)
    if existing is not None:
        if {key: existing.get(key) for key in wanted} != wanted:
            settings = ", ".join(f"{key}={existing.get(key)}" for key in wanted if key != "format")
            raise UserError(f"{out_dir}: holds a digits dataset built with other settings ({settings}); "
                            "remove it or choose another directory")
        return existing
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not a digits dataset; remove it or choose another directory")

    from sklearn.datasets import (
        load_digits,  # scikit-learn takes seconds to import; only a first build needs it
    )

    digits = load_digits()
    images = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    labels = digits.target
    is_val = _stratified_split(labels, val_fraction, seed)

    counts = {"train": int((~is_val).sum()), "val": int(is_val.sum())}
    manifest = {**wanted, "num_classes": len(digits.target_names), "counts": counts}
    try:
        with replaced_on_success(out_dir, directory=True) as staging:
            for index, (pixels, label, in_val) in enumerate(zip(images, labels, is_val)):
                class_dir = staging / ("val" if in_val else "train") / str(label)
                class_dir.mkdir(parents=True, exist_ok=True)
                image = Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BICUBIC)
                image.convert("RGB").save(class_dir / f"{index:04d}.png")
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError:
        # Another process (e.g. a second Ray worker) finished the same dataset first.
        if _read_manifest(out_dir) != manifest:
            raise
    return manifest
