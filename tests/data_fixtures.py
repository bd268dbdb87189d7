"""Small image datasets for the data tests, written with PIL (no download)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.config.schema import PipelineConfig
from orchestrator.data.layout import (
    DatasetIndex,
    check_dataset,
    index_dataset,
    prepare_dataset,
)
from orchestrator.data.local import EncodedImageDataset, build_datasets
from orchestrator.data.transforms import transforms_for


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


def checked_index(cfg: PipelineConfig) -> DatasetIndex:
    """The dataset of `cfg` listed and checked, as preflight does."""
    index = index_dataset(cfg.data)
    check_dataset(index, cfg.model.num_classes)
    return index


def datasets_of(cfg: PipelineConfig, train_fraction: float = 1.0) -> tuple[EncodedImageDataset, EncodedImageDataset]:
    """The in-process (train, val) datasets of `cfg`, as one-shot scoring builds them."""
    return build_datasets(prepare_dataset(cfg.data), transforms_for(cfg.data, cfg.model.input_size),
                          cfg.model.num_classes, cfg.seed, train_fraction)


def ray_training_data(cfg: PipelineConfig, counter, train_fraction: float = 1.0):
    """The ray.data reading plan of `cfg` with `counter` (a SkipCounter), as a Train stage builds it."""
    from orchestrator.data.transforms import augments_for
    from orchestrator.distributed.datasets import training_data  # Ray: only the Ray tests load it

    return training_data(prepare_dataset(cfg.data), augments_for(cfg.data, cfg.model.input_size),
                         input_size=cfg.model.input_size, num_classes=cfg.model.num_classes, seed=cfg.seed,
                         skip_counter=counter, train_fraction=train_fraction)


def ray_datasets_of(cfg: PipelineConfig, counter, train_fraction: float = 1.0, epoch: int = 0) -> dict:
    """{"train", "val"}: one worker's ray.data datasets of `cfg` in `epoch`."""
    from orchestrator.distributed.datasets import epoch_dataset

    data = ray_training_data(cfg, counter, train_fraction)
    return {split: epoch_dataset(data, split, epoch) for split in ("train", "val")}
