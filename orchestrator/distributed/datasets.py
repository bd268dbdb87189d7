"""The ray.data input pipeline of the Train stages: folder or Parquet ImageNet layouts on a local disk
or object storage (`s3://`, see `orchestrator.data.storage`), decoded, cropped and flipped in
`map_batches` tasks into blocks of uint8 CHW images (`{"image": uint8 (N,3,H,W), "label": int64}`:
3 bytes per pixel instead of float32's 12); `iter_batches` normalizes each batch to float32 on the
consumer's device.

Each Train worker reads its own share of each epoch: `epoch_dataset(data, split, epoch, rank,
world)`. What it reads, in which order and with which random crops is a function of (seed, epoch,
rank, world size) alone, never of how many times Ray Data executed something before, so a run that
resumes from a checkpoint at epoch k reads exactly what an uninterrupted run reads in epoch k:
- folders: the selected files are permuted by (seed, epoch) and dealt out round-robin to the ranks
  (one file is one image, so that is a full shuffle, free of any data movement); Parquet: the shards
  are permuted and dealt out the same way, and rows are permuted inside every map batch by a
  generator seeded from (seed, epoch, the batch's keys); validation reads in listing order;
- random crops and flips: torch's CPU generator is seeded per image from (seed, epoch, image key),
  independent of which task or worker process handles the image;
- `preserve_order` makes blocks arrive in that order although tasks run in parallel.
A Parquet split is dealt out by shard, so its shards should outnumber the workers several times over
(`limpq data to-parquet --shard-size`); the training loop stops every worker at the shortest share.

Subset: `train_fraction` keeps the same deterministic subset of samples in every epoch and in
either layout (see `orchestrator.data.layout.in_fraction`); folder files outside it are never read.
The datasets are built from the command's `DatasetIndex`: nothing is listed again here.

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
cluster's resources arrives (about a second, measured); negligible for a real epoch, visible
for tiny ones.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.data import Dataset
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.data.images import decode_image
from orchestrator.data.layout import (
    SPLITS,
    DatasetIndex,
    FolderSplit,
    check_dataset,
    content_key,
    in_fraction,
)
from orchestrator.data.transforms import ImageAugment, normalize, to_uint8_chw
from orchestrator.common.errors import UserError
from orchestrator.common.seeds import derived_seed

log = logging.getLogger(__name__)

# Images per read+decode task. Ray Data's scheduler notices a finished task only on its next poll
# (every 0.1 s), so short tasks leave CPUs idle between tasks: on 2 CPUs, 64-image tasks kept
# about 1.4 of them busy. Long tasks amortize that and the per-block fetch cost, while each task's
# output is still cut into blocks of OUTPUT_BLOCK_IMAGES (4.6 MiB at 224x224 uint8).
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
    """Distinct unreadable images per split, reported by the map tasks of `epoch_dataset`.

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
                          split: str, epoch: int, augment: ImageAugment, input_size: int, seed: int,
                          shuffle_rows: bool, counter: ray.actor.ActorHandle) -> Iterator[dict[str, np.ndarray]]:
    """Yields blocks of at most OUTPUT_BLOCK_IMAGES uint8 CHW images: a task may cover many files
    (fewer, longer tasks keep the CPUs busy) while its output blocks stay small."""
    order = (np.random.default_rng(derived_seed(seed, epoch, *keys)).permutation(len(keys)) if shuffle_rows
             else range(len(keys)))
    generator = torch.default_generator  # what torchvision's random transforms draw from
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
        generator.manual_seed(derived_seed(seed, epoch, keys[row]))
        images.append(to_uint8_chw(augment(image)))
        kept_labels.append(labels[row])
        if len(images) == OUTPUT_BLOCK_IMAGES:
            yield {"image": np.stack(images), "label": np.asarray(kept_labels, np.int64)}
            images, kept_labels, yielded = [], [], True
    if skipped:
        log.warning("skipped %d unreadable %s image(s): %s", len(skipped), split, ", ".join(skipped[:3]))
        # Waited on, so the count is complete once the task's output has been consumed.
        ray.get(counter.add.remote(split, skipped))
    if images or not yielded:
        yield {"image": np.asarray(images, np.uint8).reshape(-1, 3, input_size, input_size),
               "label": np.asarray(kept_labels, np.int64)}


def _preprocess_files(batch: dict[str, np.ndarray], *, split_prefix: str, class_index: dict[str, int],
                      **options) -> Iterator[dict[str, np.ndarray]]:
    keys = [path[len(split_prefix):] if path.startswith(split_prefix) else path for path in batch["path"]]
    labels = [class_index[key.split("/", 1)[0]] for key in keys]
    yield from _decode_and_transform(batch["bytes"], labels, keys, **options)


def _preprocess_rows(batch: dict[str, np.ndarray], *, fraction: float, **options) -> Iterator[dict[str, np.ndarray]]:
    images = [image if image is not None else b"" for image in batch["image"]]
    paths = batch["path"] if "path" in batch else [None] * len(images)
    keys = [path or content_key(image) for path, image in zip(paths, images)]
    selected = [row for row, kept in enumerate(in_fraction(keys, fraction, options["seed"])) if kept]
    yield from _decode_and_transform([images[row] for row in selected], [int(batch["label"][row]) for row in selected],
                                     [keys[row] for row in selected], **options)


@dataclass(frozen=True)
class TrainingData:
    """What every worker needs to read its share of any epoch: shipped once (as an object ref)."""

    index: DatasetIndex
    augments: tuple[ImageAugment, ImageAugment]  # (train, eval) PIL steps
    input_size: int
    seed: int
    train_fraction: float
    counter: SkipCounter


def training_data(index: DatasetIndex, augments: tuple[ImageAugment, ImageAugment], *, input_size: int,
                  num_classes: int, seed: int, skip_counter: SkipCounter, train_fraction: float = 1.0) -> TrainingData:
    """The reading plan of an indexed dataset, checked before any work (labels, and that the training
    fraction selects something). Its root is absolute or a URI, so tasks on other nodes or in other
    directories read the same files."""
    check_dataset(index, num_classes)
    train = index.splits["train"]
    if isinstance(train, FolderSplit) and not any(in_fraction(train.keys, train_fraction, seed)):
        raise UserError(f"{train.location}: train_fraction {train_fraction} selects no image")
    return TrainingData(index, augments, input_size, seed, train_fraction, skip_counter)


def _dealt(items: list, seed: int, epoch: int, rank: int, world: int, shuffle: bool) -> list:
    """This rank's items of the epoch: all items permuted by (seed, epoch) when shuffling, then every
    `world`-th one from position `rank`."""
    if shuffle:
        order = np.random.default_rng(derived_seed(seed, "order", epoch)).permutation(len(items))
        items = [items[i] for i in order]
    return items[rank::world]


def _in_order(dataset: Dataset) -> Dataset:
    dataset.context.execution_options.preserve_order = True
    return dataset


def epoch_dataset(data: TrainingData, split: str, epoch: int = 0, rank: int = 0, world: int = 1) -> Dataset:
    """The `rank`-th of `world` workers' share of `split` in `epoch` (lazy: nothing is read until
    iterated). Training reads a `train_fraction` subset, permuted and augmented per epoch; validation
    reads everything in listing order with the eval transforms, the same in every epoch."""
    training = split == "train"
    listing = data.index.splits[split]
    options = dict(split=split, epoch=epoch, augment=data.augments[0 if training else 1], input_size=data.input_size,
                   seed=data.seed, counter=data.counter.actor)
    fraction = data.train_fraction if training else 1.0
    if isinstance(listing, FolderSplit):
        keys = [key for key, kept in zip(listing.keys, in_fraction(listing.keys, fraction, data.seed)) if kept]
        paths = [(listing.location / key).path for key in _dealt(keys, data.seed, epoch, rank, world, training)]
        # One read task per IMAGES_PER_TASK files, and map_batches over whole blocks, so that Ray fuses
        # reading, decoding and transforming into one task: the encoded bytes never enter the object store.
        files = ray.data.read_binary_files(paths, filesystem=listing.location.filesystem, include_paths=True,
                                           override_num_blocks=max(1, -(-len(paths) // IMAGES_PER_TASK)))
        preprocess = functools.partial(_preprocess_files, split_prefix=f"{listing.location.path.rstrip('/')}/",
                                       class_index={name: i for i, name in enumerate(data.index.classes)},
                                       shuffle_rows=False, **options)
        return _in_order(files.map_batches(preprocess, batch_size=None, batch_format="numpy"))
    shards = _dealt(listing.shards, data.seed, epoch, rank, world, training)
    names = pq.read_schema(listing.shards[0].location.path, filesystem=listing.location.filesystem).names
    columns = ["image", "label"] + (["path"] if "path" in names else [])
    rows = ray.data.read_parquet([shard.location.path for shard in shards], filesystem=listing.location.filesystem,
                                 columns=columns)
    preprocess = functools.partial(_preprocess_rows, fraction=fraction, shuffle_rows=training, **options)
    return _in_order(rows.map_batches(preprocess, batch_size=IMAGES_PER_TASK, batch_format="numpy"))


def iter_batches(dataset: Dataset, batch_size: int, device: str | torch.device = "auto",
                 drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a dataset: float32 NCHW images normalized on `device`, int64 labels;
    one call is one pass. `device="auto"` is the Train worker's device (CPU outside Train). The uint8
    blocks travel to the device as they are and are normalized there."""
    batches = dataset.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last)
    for batch in batches:
        yield normalize(batch["image"]), batch["label"]
