"""The ray.data pipeline on a real local Ray: layouts, corrupt files, subsets, per-epoch shuffling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from data_fixtures import (
    add_corrupt_files,
    data_config,
    datasets_of,
    ray_datasets_of,
    ray_training_data,
    write_tiny_folder,
)

from orchestrator.data.convert import folder_to_parquet
from orchestrator.distributed.datasets import SkipCounter, iter_batches
from orchestrator.common.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The same tiny dataset (with two unreadable training images) as a folder and as Parquet."""
    base = tmp_path_factory.mktemp("ray-data")
    write_tiny_folder(base / "folder", classes=3, per_class=16)
    add_corrupt_files(base / "folder" / "train")
    folder_to_parquet(base / "folder", base / "parquet", shard_size=20)
    return {"folder": base / "folder", "parquet": base / "parquet"}


def epoch_labels(dataset, batch_size: int = 8) -> list[int]:
    labels = []
    for images, batch_labels in iter_batches(dataset, batch_size, device="cpu"):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 16, 16)
        assert batch_labels.dtype == torch.int64
        labels += batch_labels.tolist()
    return labels


def test_folder_and_parquet_give_the_same_samples(layouts):
    label_counts = {}
    for fmt, root in layouts.items():
        datasets = ray_datasets_of(data_config(root, fmt), SkipCounter(), train_fraction=0.5)
        label_counts[fmt] = {split: Counter(epoch_labels(ds)) for split, ds in datasets.items()}
    assert label_counts["folder"] == label_counts["parquet"]
    in_process, in_process_val = datasets_of(data_config(layouts["folder"]), train_fraction=0.5)
    assert label_counts["folder"]["train"] == Counter(in_process.labels)
    assert label_counts["folder"]["val"] == Counter(in_process_val.labels)


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_corrupt_images_are_skipped_and_counted_once(layouts, fmt):
    root = layouts["folder"]  # the Parquet copy has no unreadable rows: the converter dropped them
    if fmt == "parquet":
        root = layouts["parquet"].parent / "parquet-with-corrupt"
        write_parquet_with_corrupt_rows(layouts["folder"], root)
    counter = SkipCounter()
    train = ray_datasets_of(data_config(root, fmt), counter)["train"]
    assert len(epoch_labels(train)) == 3 * 16
    assert len(epoch_labels(train)) == 3 * 16
    assert counter.counts() == {"train": 2, "val": 0}
    assert counter.keys("train") == ["c0/truncated.jpg", "c1/empty.jpeg"]


def write_parquet_with_corrupt_rows(folder: Path, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.exists():
        return
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        keys = sorted(p.relative_to(folder / split).as_posix() for p in (folder / split).rglob("*")
                      if p.suffix.lower() in (".png", ".jpeg", ".jpg"))
        pq.write_table(pa.table({
            "image": [(folder / split / key).read_bytes() for key in keys],
            "label": [int(key.split("/")[0][1:]) for key in keys],
            "path": keys,
        }), out / split / "shard.parquet")


def test_new_order_every_epoch_same_samples(layouts):
    cfg = data_config(layouts["folder"])
    first = epoch_labels(ray_datasets_of(cfg, SkipCounter(), epoch=0)["train"])
    second = epoch_labels(ray_datasets_of(cfg, SkipCounter(), epoch=1)["train"])
    assert first != second
    assert Counter(first) == Counter(second)


def test_train_fraction_selects_a_subset(layouts):
    full = ray_datasets_of(data_config(layouts["folder"]), SkipCounter())
    half = ray_datasets_of(data_config(layouts["folder"]), SkipCounter(), train_fraction=0.5)
    in_process, _ = datasets_of(data_config(layouts["folder"]), train_fraction=0.5)
    assert half["train"].count() == len(in_process) < full["train"].count() == 48
    assert half["val"].count() == full["val"].count()


def test_bad_input_is_a_user_error_before_any_work(tmp_path, layouts):
    cfg = data_config(tmp_path)
    cfg.data.path = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        ray_datasets_of(cfg, SkipCounter())
    for fmt, root in layouts.items():
        with pytest.raises(UserError, match="model.num_classes is 2"):
            ray_datasets_of(data_config(root, fmt, num_classes=2), SkipCounter())


def first_batch(dataset, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter_batches(dataset, batch_size, device="cpu"))


@pytest.mark.parametrize("fmt", ["folder", "parquet"])
def test_an_epochs_batches_depend_on_seed_and_epoch_alone(layouts, fmt):
    """Epoch 2 read fresh (as a run resumed at epoch 2 reads it) gives the batches epoch 2 gives after
    epoch 1 (order and random crops): nothing depends on what was executed before. Epoch 2 differs
    from epoch 1, and another seed differs."""
    cfg = data_config(layouts[fmt], fmt)
    uninterrupted = [first_batch(ray_datasets_of(cfg, SkipCounter(), epoch=epoch)["train"]) for epoch in (0, 1)]
    resumed = first_batch(ray_datasets_of(cfg, SkipCounter(), epoch=1)["train"])
    assert torch.equal(uninterrupted[1][0], resumed[0]) and torch.equal(uninterrupted[1][1], resumed[1])
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])
    other_seed = ray_datasets_of(cfg.model_copy(update={"seed": 1}), SkipCounter(), epoch=0)["train"]
    assert not torch.equal(first_batch(other_seed)[0], uninterrupted[0][0])


def test_workers_split_each_epoch_without_overlap(layouts):
    """Two workers' shares of an epoch: disjoint, together every readable image, alike in size."""
    from orchestrator.distributed.datasets import epoch_dataset

    def samples(dataset) -> Counter:  # one checksum per image: an image's crop depends on (seed, epoch, key) only
        return Counter(round(float(image.double().sum()), 3) for images, _ in iter_batches(dataset, 8, device="cpu")
                       for image in images)

    data = ray_training_data(data_config(layouts["folder"]), SkipCounter())
    shares = [samples(epoch_dataset(data, "train", 1, rank, 2)) for rank in (0, 1)]
    sizes = [share.total() for share in shares]
    assert abs(sizes[0] - sizes[1]) <= 2 and sum(sizes) == 3 * 16  # 50 files dealt 25 / 25, 2 of them unreadable
    assert shares[0] + shares[1] == samples(epoch_dataset(data, "train", 1))


def test_blocks_hold_uint8_and_batches_match_the_float_transforms(layouts):
    """Blocks carry uint8 CHW (3 bytes per pixel); iter_batches normalizes them to the same values
    as the in-process float transforms."""
    cfg = data_config(layouts["folder"])
    val = ray_datasets_of(cfg, SkipCounter())["val"]
    block = val.take_batch(4, batch_format="numpy")
    assert block["image"].dtype == np.uint8 and block["image"].shape[1:] == (3, 16, 16)
    assert block["image"][0].nbytes == 3 * 16 * 16
    _, in_process_val = datasets_of(cfg)
    expected = {key: in_process_val[index][0] for index, key in enumerate(in_process_val.keys)}
    images, labels = first_batch(val, batch_size=len(expected))
    assert images.dtype == torch.float32
    ordered = torch.stack([expected[key] for key in sorted(expected)])  # val is read in sorted key order
    assert torch.allclose(images, ordered, atol=1e-5)
    assert labels.tolist() == [in_process_val.labels[in_process_val.keys.index(key)] for key in sorted(expected)]
