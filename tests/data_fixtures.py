"""Small image datasets for the data tests, written with PIL (no download)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.config import PipelineConfig


def write_tiny_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 24, seed: int = 0) -> None:
    """`root/{train,val}/c<k>/*.png|*.JPEG`, mixed formats and extension cases."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for label in range(classes):
            class_dir = root / split / f"c{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                name = f"{index:03d}.png" if index % 2 else f"{index:03d}.JPEG"
                Image.fromarray(pixels).save(class_dir / name)


def add_corrupt_files(split_dir: Path) -> list[str]:
    """A truncated JPEG and a zero-byte file; returns their keys (paths relative to the split)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, "JPEG")
    encoded = buffer.getvalue()
    (split_dir / "c0" / "truncated.jpg").write_bytes(encoded[: len(encoded) // 2])
    (split_dir / "c1" / "empty.jpeg").write_bytes(b"")
    (split_dir / "c1" / "notes.txt").write_text("not an image; ignored by extension")
    return ["c0/truncated.jpg", "c1/empty.jpeg"]


def data_config(path: Path, fmt: str = "folder", input_size: int = 16, num_classes: int = 10, **data) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {"path": str(path), "format": fmt, **data},
        "model": {"num_classes": num_classes, "input_size": input_size},
    })
