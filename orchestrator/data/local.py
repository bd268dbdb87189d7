"""In-process torch datasets over the folder and Parquet layouts (for the plain training loops).

Unreadable images (truncated, empty, not an image) are found once, when the dataset is built, by a
cheap full decode of every selected sample; they are left out and counted in `dataset.skipped`, so
any DataLoader setup (workers or not) sees only good samples. That check reads every image once
more, which is fine at in-process scale; the ray.data pipeline checks while it decodes instead.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from orchestrator.config import PipelineConfig
from orchestrator.data.layout import (
    check_labels,
    check_parquet_shards,
    content_key,
    dataset_root,
    in_fraction,
    list_classes,
    list_folder_split,
    parquet_shards,
)
from orchestrator.data.storage import Location
from orchestrator.data.transforms import ImageTransform, decode_image, is_decodable, transforms_for

log = logging.getLogger(__name__)


class EncodedImageDataset(Dataset):
    """(float32 CHW tensor, int label) samples from encoded images held as file locations or bytes."""

    def __init__(self, sources: list[Location | bytes], labels: list[int], keys: list[str], transform: ImageTransform,
                 classes: list[str] | None = None, skipped_keys: list[str] | None = None) -> None:
        self.sources = sources
        self.labels = labels
        self.keys = keys
        self.transform = transform
        self.classes = classes
        self.skipped_keys = skipped_keys or []

    @property
    def skipped(self) -> int:
        """How many unreadable images were left out."""
        return len(self.skipped_keys)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = self.sources[index]
        encoded = source if isinstance(source, bytes) else source.read_bytes()
        return self.transform(decode_image(encoded)), self.labels[index]


def _read_source(source: Location | bytes) -> bytes | None:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError:
        return None


def _select(sources: list[Location | bytes], labels: list[int], keys: list[str], fraction: float, seed: int,
            transform: ImageTransform, classes: list[str] | None, where: Location) -> EncodedImageDataset:
    kept_sources, kept_labels, kept_keys, skipped = [], [], [], []
    for source, label, key in zip(sources, labels, keys):
        if not in_fraction(key, fraction, seed):
            continue
        encoded = _read_source(source)
        if encoded is None or not is_decodable(encoded):
            skipped.append(key)
            continue
        kept_sources.append(source)
        kept_labels.append(label)
        kept_keys.append(key)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", where, len(skipped), ", ".join(skipped[:3]))
    return EncodedImageDataset(kept_sources, kept_labels, kept_keys, transform, classes, skipped)


def _folder_split(split_dir: Location, classes: list[str], fraction: float, seed: int,
                  transform: ImageTransform) -> EncodedImageDataset:
    listing = list_folder_split(split_dir, classes)
    sources: list[Location | bytes] = [split_dir / key for key in listing.keys]
    return _select(sources, listing.labels, listing.keys, fraction, seed, transform, classes, split_dir)


def _parquet_split(split_dir: Location, fraction: float, seed: int, transform: ImageTransform) -> EncodedImageDataset:
    import pyarrow.parquet as pq

    sources: list[Location | bytes] = []
    labels: list[int] = []
    keys: list[str] = []
    class_names: dict[int, str] = {}
    shards = parquet_shards(split_dir)
    check_parquet_shards(shards)
    for shard in shards:
        table = pq.read_table(shard.location.path, filesystem=shard.location.filesystem)
        images = [image or b"" for image in table.column("image").to_pylist()]
        shard_labels = [int(label) for label in table.column("label").to_pylist()]
        paths = table.column("path").to_pylist() if "path" in table.column_names else [None] * len(images)
        if "class_name" in table.column_names:
            class_names.update(zip(shard_labels, table.column("class_name").to_pylist()))
        sources += images
        labels += shard_labels
        keys += [path or content_key(image) for path, image in zip(paths, images)]
    classes = [class_names.get(label, str(label)) for label in range(max(class_names) + 1)] if class_names else None
    return _select(sources, labels, keys, fraction, seed, transform, classes, split_dir)


def build_datasets(cfg: PipelineConfig, train_fraction: float = 1.0) -> tuple[EncodedImageDataset, EncodedImageDataset]:
    """(train, val) datasets of `cfg.data`; train uses the train transforms and a `train_fraction`
    subset chosen by `cfg.seed`, val the eval transforms and every sample."""
    root = dataset_root(cfg)
    train_tf, eval_tf = transforms_for(cfg)
    if cfg.data.format == "folder":
        classes = list_classes(root / "train")
        train = _folder_split(root / "train", classes, train_fraction, cfg.seed, train_tf)
        val = _folder_split(root / "val", classes, 1.0, cfg.seed, eval_tf)
    else:
        train = _parquet_split(root / "train", train_fraction, cfg.seed, train_tf)
        val = _parquet_split(root / "val", 1.0, cfg.seed, eval_tf)
    for split, dataset in (("train", train), ("val", val)):
        check_labels(dataset.labels, cfg.model.num_classes, root / split)
    return train, val
