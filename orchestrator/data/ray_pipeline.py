"""The ray.data input pipeline for Ray Train: folder or Parquet ImageNet layouts, decoded and
transformed in `map_batches` tasks, rows `{"image": float32 CHW, "label": int64}`.

Shuffling: the training set gets a new order on every execution, and Ray Train executes a dataset
again each time a worker iterates its shard again (once per epoch). For folders the file list is
shuffled (`FileShuffleConfig(seed, reseed_after_execution=True)`: seeded, different per
execution); since one file is one image that is a full shuffle, free of any data movement. Parquet
shards are shuffled by file and rows are permuted inside every map batch; add
`local_shuffle_buffer_size` in `iter_batches` for more mixing across shards (the converter already
writes shards of randomly ordered rows). Random crops and flips draw fresh randomness per batch.

Subset: `train_fraction` keeps the same deterministic subset of samples in every epoch and in
either layout (see `layout.in_fraction`); folder files outside it are never read.

Unreadable images: a map task that fails to decode an image drops the row and reports its key to a
`SkipCounter` actor; the counter keeps unique keys per split, so re-reading the same files every
epoch does not inflate the count. After (or during) training, `counter.counts()` on the driver
gives the number of distinct unreadable images seen so far; every selected image is seen in each
epoch, so after the first epoch the count is complete.

CPUs: every read/decode task takes 1 CPU. Under Ray Train the workers' CPUs are held for the whole
run, so the cluster needs CPUs beyond `num_workers * cpus_per_worker` or the data tasks never
start and training hangs (checked on 2 CPUs with 2 workers x 1 CPU). On a small machine either
start local Ray with more logical CPUs than workers need (`ray.init(num_cpus=...)`; logical CPUs
may exceed physical cores) or give workers fractional CPUs (2 workers x 0.5 CPU on 2 CPUs runs).

Each epoch is a new Ray Data execution, which runs at most one task until its view of the
cluster's resources arrives (about a second in Ray 2.60); negligible for a real epoch, visible
for tiny ones.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import ray
import torch
from ray.data import Dataset, FileShuffleConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config import PipelineConfig
from orchestrator.data.layout import (
    SPLITS,
    check_labels,
    content_key,
    dataset_root,
    in_fraction,
    list_classes,
    list_folder_split,
    list_parquet_shards,
    parquet_labels,
)
from orchestrator.data.transforms import ImageTransform, decode_image, transforms_for
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

# Images per read+decode task. Ray Data's scheduler notices a finished task only on its next poll
# (every 0.1 s), so short tasks leave CPUs idle between tasks: on 2 CPUs, 64-image tasks kept
# about 1.4 of them busy. Long tasks amortize that and the per-block fetch cost, while each task's
# output is still cut into blocks of OUTPUT_BLOCK_IMAGES (18 MiB at 224x224 float32).
IMAGES_PER_TASK = 256
OUTPUT_BLOCK_IMAGES = 32


@ray.remote(num_cpus=0)
class _SkippedImages:
    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {split: set() for split in SPLITS}

    def add(self, split: str, keys: list[str]) -> None:
        self._keys[split].update(keys)

    def counts(self) -> dict[str, int]:
        return {split: len(keys) for split, keys in self._keys.items()}

    def keys(self, split: str) -> list[str]:
        return sorted(self._keys[split])


class SkipCounter:
    """Distinct unreadable images per split, reported by the map tasks of `build_ray_datasets`.

    Create it on the driver (it starts a zero-CPU actor owned by the driver) and keep it for as
    long as the datasets are used; it pickles, so Train workers may receive it too.
    """

    def __init__(self) -> None:
        # On the driver's node: an actor on a worker node would die with that node and take the stage
        # down after Train itself recovered from the loss.
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = _SkippedImages.options(scheduling_strategy=driver_node).remote()

    def counts(self) -> dict[str, int]:
        return ray.get(self.actor.counts.remote())

    def keys(self, split: str) -> list[str]:
        return ray.get(self.actor.keys.remote(split))


def _decode_and_transform(encoded_images: Sequence[bytes], labels: Sequence[int], keys: Sequence[str], *,
                          split: str, transform: ImageTransform, input_size: int, shuffle_rows: bool,
                          counter: ray.actor.ActorHandle) -> Iterator[dict[str, np.ndarray]]:
    """Yields blocks of at most OUTPUT_BLOCK_IMAGES transformed images: a task may cover many files
    (fewer, longer tasks keep the CPUs busy) while its output blocks stay small."""
    # Every Ray worker process starts torch's global generator from the same default seed; reseed
    # so that crops and flips differ across workers, batches and epochs.
    torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
    order = np.random.default_rng().permutation(len(keys)) if shuffle_rows else range(len(keys))
    images: list[np.ndarray] = []
    kept_labels: list[int] = []
    skipped: list[str] = []
    yielded = False
    for row in order:
        try:
            image = decode_image(encoded_images[row])
        except Exception:  # PIL raises many types for bad data; the row is dropped and counted
            skipped.append(keys[row])
            continue
        images.append(transform(image).numpy())
        kept_labels.append(labels[row])
        if len(images) == OUTPUT_BLOCK_IMAGES:
            yield {"image": np.stack(images), "label": np.asarray(kept_labels, np.int64)}
            images, kept_labels, yielded = [], [], True
    if skipped:
        log.warning("skipped %d unreadable %s image(s): %s", len(skipped), split, ", ".join(skipped[:3]))
        # Waited on, so the count is complete once the task's output has been consumed.
        ray.get(counter.add.remote(split, skipped))
    if images or not yielded:
        yield {"image": np.asarray(images, np.float32).reshape(-1, 3, input_size, input_size),
               "label": np.asarray(kept_labels, np.int64)}


def _preprocess_files(batch: dict[str, np.ndarray], *, split_prefix: str, class_index: dict[str, int],
                      **options) -> Iterator[dict[str, np.ndarray]]:
    keys = [path[len(split_prefix):] if path.startswith(split_prefix) else path for path in batch["path"]]
    labels = [class_index[key.split("/", 1)[0]] for key in keys]
    yield from _decode_and_transform(batch["bytes"], labels, keys, **options)


def _preprocess_rows(batch: dict[str, np.ndarray], *, fraction: float, seed: int,
                     **options) -> Iterator[dict[str, np.ndarray]]:
    images = [image if image is not None else b"" for image in batch["image"]]
    paths = batch["path"] if "path" in batch else [None] * len(images)
    keys = [path or content_key(image) for path, image in zip(paths, images)]
    selected = [row for row, key in enumerate(keys) if in_fraction(key, fraction, seed)]
    yield from _decode_and_transform([images[row] for row in selected], [int(batch["label"][row]) for row in selected],
                                     [keys[row] for row in selected], **options)


def _folder_split(split_dir: Path, classes: list[str], fraction: float, seed: int, shuffle: bool,
                  num_classes: int, **options) -> Dataset:
    listing = list_folder_split(split_dir, classes)
    check_labels(listing.labels, num_classes, split_dir)
    paths = [str(split_dir / key) for key in listing.keys if in_fraction(key, fraction, seed)]
    if not paths:
        raise UserError(f"{split_dir}: train_fraction {fraction} selects no image")
    # One read task per IMAGES_PER_TASK files, and map_batches over whole blocks, so that Ray fuses
    # reading, decoding and transforming into one task: the encoded bytes never enter the object store.
    files = ray.data.read_binary_files(
        paths, include_paths=True, shuffle=FileShuffleConfig(seed=seed) if shuffle else None,
        override_num_blocks=-(-len(paths) // IMAGES_PER_TASK),
    )
    preprocess = functools.partial(_preprocess_files, split_prefix=f"{split_dir}/",
                                   class_index={name: index for index, name in enumerate(classes)},
                                   shuffle_rows=False, **options)
    return files.map_batches(preprocess, batch_size=None, batch_format="numpy")


def _parquet_split(split_dir: Path, fraction: float, seed: int, shuffle: bool, num_classes: int,
                   **options) -> Dataset:
    import pyarrow.parquet as pq

    shards = list_parquet_shards(split_dir)
    check_labels(parquet_labels(shards), num_classes, split_dir)
    columns = ["image", "label"] + (["path"] if "path" in pq.read_schema(shards[0]).names else [])
    rows = ray.data.read_parquet([str(shard) for shard in shards],
                                 shuffle=FileShuffleConfig(seed=seed) if shuffle else None).select_columns(columns)
    preprocess = functools.partial(_preprocess_rows, fraction=fraction, seed=seed, shuffle_rows=shuffle, **options)
    return rows.map_batches(preprocess, batch_size=IMAGES_PER_TASK, batch_format="numpy")


def build_ray_datasets(cfg: PipelineConfig, *, skip_counter: SkipCounter,
                       train_fraction: float = 1.0) -> dict[str, Dataset]:
    """{"train", "val"} ray.data datasets of `cfg.data` (lazy: nothing is read until iterated).

    The dataset layout is checked here, on the driver, before any work; a missing path is a
    UserError (or builds the digits demo when `data.demo` is set).
    """
    root = dataset_root(cfg).resolve()  # tasks on other nodes or in other directories need absolute paths
    train_tf, eval_tf = transforms_for(cfg)
    size = cfg.model.input_size
    train_options = dict(split="train", transform=train_tf, input_size=size, counter=skip_counter.actor)
    val_options = dict(split="val", transform=eval_tf, input_size=size, counter=skip_counter.actor)
    if cfg.data.format == "folder":
        classes = list_classes(root / "train")
        common = dict(classes=classes, seed=cfg.seed, num_classes=cfg.model.num_classes)
        return {
            "train": _folder_split(root / "train", fraction=train_fraction, shuffle=True, **common, **train_options),
            "val": _folder_split(root / "val", fraction=1.0, shuffle=False, **common, **val_options),
        }
    common = dict(seed=cfg.seed, num_classes=cfg.model.num_classes)
    return {
        "train": _parquet_split(root / "train", fraction=train_fraction, shuffle=True, **common, **train_options),
        "val": _parquet_split(root / "val", fraction=1.0, shuffle=False, **common, **val_options),
    }


def iter_batches(shard: Dataset | ray.data.DataIterator, batch_size: int, device: str | torch.device = "auto",
                 local_shuffle_buffer_size: int | None = None,
                 drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) tensor batches from a dataset or a Train worker's shard; one call is one
    epoch. `device="auto"` is the Train worker's device (CPU outside Train)."""
    batches = shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                       local_shuffle_buffer_size=local_shuffle_buffer_size)
    for batch in batches:
        yield batch["image"], batch["label"]
