"""In-process torch datasets over the folder and Parquet layouts (for the plain training loops).

Unreadable images (truncated, empty, not an image) are found once, when the dataset is built, by a
cheap full decode of every selected sample; they are left out and counted in `dataset.skipped`, so
any DataLoader setup (workers or not) sees only good samples. That check reads every image once
more, which is fine at in-process scale; the ray.data pipeline checks while it decodes instead.
"""

from __future__ import annotations

import logging

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from orchestrator.data.images import decode_image, is_decodable
from orchestrator.data.layout import (
    DatasetIndex,
    FolderSplit,
    ParquetSplit,
    check_dataset,
    content_key,
    in_fraction,
)
from orchestrator.data.storage import Location
from orchestrator.data.transforms import ImageTransform

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
    for source, label, key, kept in zip(sources, labels, keys, in_fraction(keys, fraction, seed)):
        if not kept:
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


def _folder_split(listing: FolderSplit, classes: list[str], fraction: float, seed: int,
                  transform: ImageTransform) -> EncodedImageDataset:
    sources: list[Location | bytes] = [listing.location / key for key in listing.keys]
    return _select(sources, listing.labels, listing.keys, fraction, seed, transform, classes, listing.location)


def _parquet_split(listing: ParquetSplit, fraction: float, seed: int, transform: ImageTransform) -> EncodedImageDataset:
    sources: list[Location | bytes] = []
    labels: list[int] = []
    keys: list[str] = []
    class_names: dict[int, str] = {}
    for shard in listing.shards:
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
    return _select(sources, labels, keys, fraction, seed, transform, classes, listing.location)


def split_dataset(index: DatasetIndex, split: str, transform: ImageTransform, seed: int,
                  fraction: float = 1.0) -> EncodedImageDataset:
    """One split of an indexed dataset: a `fraction` subset chosen by `seed`, through `transform`."""
    listing = index.splits[split]
    if isinstance(listing, FolderSplit):
        return _folder_split(listing, index.classes, fraction, seed, transform)
    return _parquet_split(listing, fraction, seed, transform)


def build_datasets(index: DatasetIndex, transforms: tuple[ImageTransform, ImageTransform], num_classes: int,
                   seed: int, train_fraction: float = 1.0) -> tuple[EncodedImageDataset, EncodedImageDataset]:
    """(train, val) datasets of an indexed dataset; train uses the first of `transforms` and a
    `train_fraction` subset chosen by `seed`, val the second and every sample."""
    check_dataset(index, num_classes)
    return (split_dataset(index, "train", transforms[0], seed, train_fraction),
            split_dataset(index, "val", transforms[1], seed))
