"""The ray.data input pipeline for Ray Train: folder or Parquet ImageNet layouts on a local disk or
object storage (`s3://`, see `orchestrator.data.storage`), decoded, cropped and flipped in
`map_batches` tasks into blocks of uint8 CHW images (`{"image": uint8 (N,3,H,W), "label": int64}`:
3 bytes per pixel instead of float32's 12); `iter_batches` normalizes each batch to float32 on the
consumer's device.

Order and randomness are functions of (cfg.seed, epoch, sample), so the same config and seed give
the same batches. Ray Train executes a dataset again each time a worker iterates its shard (once
per epoch); Ray Data counts these executions (`DataContext._execution_idx`, the counter its own
`FileShuffleConfig(reseed_after_execution=True)` uses) and ships that context to the map tasks, so
the epoch is known inside them:
- folders: the file list is shuffled with `FileShuffleConfig(seed)`, reseeded per execution (one
  file is one image, so that is a full shuffle, free of any data movement); Parquet: shards are
  shuffled the same way and rows are permuted inside every map batch by a generator seeded from
  (seed, epoch, the batch's keys);
- random crops and flips: torch's CPU generator is seeded per image from (seed, epoch, image key),
  independent of which task or worker process handles the image;
- `preserve_order` (set on the datasets, and on Train's ingest through `dataset_config()`) makes
  blocks arrive in that order although tasks run in parallel.
With several Train workers, `streaming_split` hands blocks to whichever worker asks first, so which
worker sees which batch is not fixed; a single worker's stream is.

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
cluster's resources arrives (about a second in Ray 2.60); negligible for a real epoch, visible
for tiny ones.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataContext, Dataset, ExecutionOptions, FileShuffleConfig
from ray.train import DataConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.data.images import decode_image
from orchestrator.data.layout import (
    SPLITS,
    DatasetIndex,
    FolderSplit,
    ParquetSplit,
    check_dataset,
    content_key,
    in_fraction,
)
from orchestrator.data.transforms import ImageAugment, normalize, to_uint8_chw
from orchestrator.errors import UserError
from orchestrator.seeds import derived_seed

log = logging.getLogger(__name__)

# Images per read+decode task. Ray Data's scheduler notices a finished task only on its next poll
# (every 0.1 s), so short tasks leave CPUs idle between tasks: on 2 CPUs, 64-image tasks kept
# about 1.4 of them busy. Long tasks amortize that and the per-block fetch cost, while each task's
# output is still cut into blocks of OUTPUT_BLOCK_IMAGES (4.6 MiB at 224x224 uint8).
IMAGES_PER_TASK = 256
OUTPUT_BLOCK_IMAGES = 32


def _execution_options() -> ExecutionOptions:
    """Ray Data's defaults for this process, with blocks delivered in order."""
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def dataset_config():
    """Ray Train's `DataConfig` for these datasets: Train replaces each dataset's execution options
    with its own defaults, which would drop `preserve_order`. Pass it as
    `TorchTrainer(..., dataset_config=dataset_config())`."""
    return DataConfig(execution_options=_execution_options())


def _current_epoch() -> int:
    """How many times this dataset was executed before (the epoch under Ray Train); 0 outside
    a Ray Data task."""
    return DataContext.get_current()._execution_idx


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
                          split: str, augment: ImageAugment, input_size: int, seed: int, shuffle_rows: bool,
                          counter: ray.actor.ActorHandle) -> Iterator[dict[str, np.ndarray]]:
    """Yields blocks of at most OUTPUT_BLOCK_IMAGES uint8 CHW images: a task may cover many files
    (fewer, longer tasks keep the CPUs busy) while its output blocks stay small."""
    epoch = _current_epoch()
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
    selected = [row for row, key in enumerate(keys) if in_fraction(key, fraction, options["seed"])]
    yield from _decode_and_transform([images[row] for row in selected], [int(batch["label"][row]) for row in selected],
                                     [keys[row] for row in selected], **options)


def _in_order(dataset: Dataset) -> Dataset:
    dataset.context.execution_options = _execution_options()
    return dataset


def _folder_split(listing: FolderSplit, classes: list[str], fraction: float, seed: int, shuffle: bool,
                  **options) -> Dataset:
    paths = [(listing.location / key).path for key in listing.keys if in_fraction(key, fraction, seed)]
    if not paths:
        raise UserError(f"{listing.location}: train_fraction {fraction} selects no image")
    # One read task per IMAGES_PER_TASK files, and map_batches over whole blocks, so that Ray fuses
    # reading, decoding and transforming into one task: the encoded bytes never enter the object store.
    files = ray.data.read_binary_files(
        paths, filesystem=listing.location.filesystem, include_paths=True,
        shuffle=FileShuffleConfig(seed=seed) if shuffle else None,
        override_num_blocks=-(-len(paths) // IMAGES_PER_TASK),
    )
    preprocess = functools.partial(_preprocess_files, split_prefix=f"{listing.location.path.rstrip('/')}/",
                                   class_index={name: index for index, name in enumerate(classes)},
                                   seed=seed, shuffle_rows=False, **options)
    return _in_order(files.map_batches(preprocess, batch_size=None, batch_format="numpy"))


def _parquet_split(listing: ParquetSplit, fraction: float, seed: int, shuffle: bool, **options) -> Dataset:
    names = pq.read_schema(listing.shards[0].location.path, filesystem=listing.location.filesystem).names
    columns = ["image", "label"] + (["path"] if "path" in names else [])
    rows = ray.data.read_parquet([shard.location.path for shard in listing.shards],
                                 filesystem=listing.location.filesystem,
                                 shuffle=FileShuffleConfig(seed=seed) if shuffle else None).select_columns(columns)
    preprocess = functools.partial(_preprocess_rows, fraction=fraction, seed=seed, shuffle_rows=shuffle, **options)
    return _in_order(rows.map_batches(preprocess, batch_size=IMAGES_PER_TASK, batch_format="numpy"))


def build_ray_datasets(index: DatasetIndex, augments: tuple[ImageAugment, ImageAugment], *, input_size: int,
                       num_classes: int, seed: int, skip_counter: SkipCounter,
                       train_fraction: float = 1.0) -> dict[str, Dataset]:
    """{"train", "val"} ray.data datasets of an indexed dataset (lazy: nothing is read until
    iterated); `augments` are the (train, eval) PIL steps. Its root is absolute or a URI, so tasks on
    other nodes or in other directories read the same files."""
    check_dataset(index, num_classes)
    common = dict(seed=seed, input_size=input_size, counter=skip_counter.actor)
    options = {"train": dict(augment=augments[0], fraction=train_fraction, shuffle=True, **common),
               "val": dict(augment=augments[1], fraction=1.0, shuffle=False, **common)}
    datasets = {}
    for split in SPLITS:
        listing = index.splits[split]
        if isinstance(listing, FolderSplit):
            datasets[split] = _folder_split(listing, index.classes, split=split, **options[split])
        else:
            datasets[split] = _parquet_split(listing, split=split, **options[split])
    return datasets


def iter_batches(shard: Dataset | ray.data.DataIterator, batch_size: int, device: str | torch.device = "auto",
                 local_shuffle_buffer_size: int | None = None,
                 drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches from a dataset or a Train worker's shard: float32 NCHW images
    normalized on `device`, int64 labels; one call is one epoch. `device="auto"` is the Train
    worker's device (CPU outside Train). The uint8 blocks travel to the device as they are and are
    normalized there."""
    batches = shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                       local_shuffle_buffer_size=local_shuffle_buffer_size)
    for batch in batches:
        yield normalize(batch["image"]), batch["label"]
