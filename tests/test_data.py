"""Demo dataset, transforms, in-process datasets and the Parquet converter (no Ray)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    add_corrupt_files,
    checked_index,
    data_config,
    datasets_of,
    write_tiny_folder,
)
from PIL import Image

from orchestrator.cli import main as limpq
from orchestrator.data.convert import folder_to_parquet
from orchestrator.data.demo import MANIFEST_NAME, write_digits_dataset
from orchestrator.data.layout import demo_to_build, index_dataset
from orchestrator.data.storage import check_storage_uri
from orchestrator.common.seeds import derived_seed
from orchestrator.data.transforms import (
    IMAGENET_MEAN,
    eval_resize_size,
    eval_transform,
    train_transform,
)
from orchestrator.common.errors import UserError


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits_dataset(root)
    return root


@pytest.fixture()
def tiny(tmp_path) -> Path:
    root = tmp_path / "tiny"
    write_tiny_folder(root)
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_demo_dataset_layout_counts_and_stratified_split(digits):
    manifest = json.loads((digits / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {"train": 1438, "val": 359}
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits / split).iterdir()) == [str(d) for d in range(10)]
    per_class = {d: (len(list((digits / "train" / str(d)).glob("*.png"))),
                     len(list((digits / "val" / str(d)).glob("*.png")))) for d in range(10)}
    assert sum(t + v for t, v in per_class.values()) == 1797
    for train_count, val_count in per_class.values():
        assert val_count == round(0.2 * (train_count + val_count))
    image = Image.open(next((digits / "val" / "7").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).max() > 200  # 0..16 counts scaled to 0..255


def test_demo_dataset_is_deterministic_and_idempotent(digits, tmp_path):
    again = tmp_path / "again"
    write_digits_dataset(again)
    assert tree_digest(again) == tree_digest(digits)
    before = {p: p.stat().st_mtime_ns for p in again.rglob("*")}
    assert write_digits_dataset(again)["counts"] == {"train": 1438, "val": 359}
    assert {p: p.stat().st_mtime_ns for p in again.rglob("*")} == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_demo_refuses_other_settings_and_incomplete_directories(digits, tmp_path):
    with pytest.raises(UserError, match="image_size=32"):
        write_digits_dataset(digits, image_size=64)
    half_written = tmp_path / "half"
    (half_written / "train" / "0").mkdir(parents=True)
    with pytest.raises(UserError, match="not a digits dataset"):
        write_digits_dataset(half_written)


def test_transform_shapes_and_normalization():
    image = Image.new("RGB", (256, 200), tuple(round(255 * m) for m in IMAGENET_MEAN))
    train = train_transform(224, min_crop_scale=0.5, hflip=True)(image)
    evaluated = eval_transform(224)(image)
    assert train.shape == evaluated.shape == (3, 224, 224)
    assert train.dtype == evaluated.dtype == torch.float32
    assert evaluated.abs().max() < 0.02  # the mean colour normalizes to ~0
    assert eval_resize_size(224) == 256 and eval_resize_size(32) == 37 and eval_resize_size(32, 40) == 40
    assert eval_transform(32, resize_size=40)(image).shape == (3, 32, 32)


def test_folder_datasets_labels_and_samples(digits):
    train, val = datasets_of(data_config(digits, input_size=32))
    assert (len(train), len(val)) == (1438, 359)
    assert train.classes == [str(d) for d in range(10)]
    assert all(int(key.split("/")[0]) == label for key, label in zip(train.keys, train.labels))
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert train.skipped == val.skipped == 0


def test_train_fraction_is_a_stable_subset(digits):
    full, _ = datasets_of(data_config(digits))
    half, val = datasets_of(data_config(digits), train_fraction=0.5)
    again, _ = datasets_of(data_config(digits), train_fraction=0.5)
    assert 0.45 * len(full) < len(half) < 0.55 * len(full)
    assert half.keys == again.keys and set(half.keys) < set(full.keys)
    assert len(val) == 359
    other_seed, _ = datasets_of(data_config(digits).model_copy(update={"seed": 1}), train_fraction=0.5)
    assert other_seed.keys != half.keys
    # the batched membership hashes what the per-sample seed does: subsets chosen before it stay chosen
    assert [key for key in full.keys if derived_seed(0, key) < 0.5 * 2**63] == half.keys


def test_corrupt_images_are_skipped_and_counted(tiny):
    bad = add_corrupt_files(tiny / "train")
    train, val = datasets_of(data_config(tiny))
    assert train.skipped == 2 and sorted(train.skipped_keys) == sorted(bad)
    assert len(train) == 3 * 8 and val.skipped == 0
    for index in range(len(train)):  # every kept sample loads
        assert train[index][0].shape == (3, 16, 16)


def test_parquet_matches_folder(tiny, tmp_path):
    add_corrupt_files(tiny / "train")
    reports = folder_to_parquet(tiny, tmp_path / "pq", shard_size=10, workers=1)
    assert (reports["train"].images, reports["train"].shards, len(reports["train"].skipped)) == (24, 3, 2)
    assert (reports["val"].images, reports["val"].shards) == (6, 1)
    for fraction in (1.0, 0.5):
        folder = datasets_of(data_config(tiny), train_fraction=fraction)
        parquet = datasets_of(data_config(tmp_path / "pq", "parquet"), train_fraction=fraction)
        for from_folder, from_parquet in zip(folder, parquet):
            assert sorted(zip(from_folder.keys, from_folder.labels)) == sorted(zip(from_parquet.keys, from_parquet.labels))
    assert parquet[0].classes == folder[0].classes == ["c0", "c1", "c2"]
    assert torch.equal(eval_sample(folder[1], "c2/001.png"), eval_sample(parquet[1], "c2/001.png"))


def eval_sample(dataset, key: str) -> torch.Tensor:
    return dataset[dataset.keys.index(key)][0]


def test_parquet_shards_mix_classes(tiny, tmp_path):
    folder_to_parquet(tiny, tmp_path / "pq", shard_size=8)
    import pyarrow.parquet as pq

    first_shard = pq.read_table(tmp_path / "pq" / "train" / "part-00000.parquet")
    assert len(Counter(first_shard.column("label").to_pylist())) > 1
    assert set(first_shard.column_names) == {"image", "label", "class_name", "path"}


def test_missing_path_and_demo_on_demand(tmp_path):
    cfg = data_config(tmp_path)
    cfg.data.path = str(tmp_path / "absent")
    with pytest.raises(UserError, match="absent"):
        datasets_of(cfg)
    cfg.data.demo = True
    train, val = datasets_of(cfg)
    assert (len(train), len(val)) == (1438, 359)


def test_bad_layouts_are_user_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="num_classes"):
        datasets_of(data_config(tiny, num_classes=2))
    (tiny / "val" / "c9").mkdir()
    (tiny / "val" / "c9" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="c9: class not present in the train split"):
        datasets_of(data_config(tiny))
    (tmp_path / "pq" / "train").mkdir(parents=True)
    (tmp_path / "pq" / "val").mkdir()
    with pytest.raises(UserError, match="no .parquet shards"):
        datasets_of(data_config(tmp_path / "pq", "parquet"))


def test_cli_demo_and_to_parquet(tmp_path, capsys):
    assert limpq(["data", "demo", "--out", str(tmp_path / "d"), "--image-size", "16"]) == 0
    assert "1438 train, 359 val" in capsys.readouterr().out
    assert Image.open(next((tmp_path / "d" / "train" / "3").glob("*.png"))).size == (16, 16)
    assert limpq(["data", "to-parquet", str(tmp_path / "d"), str(tmp_path / "p"), "--shard-size", "500",
                  "--workers", "2"]) == 0
    assert "train: 1438 images in 3 shard(s), 0 unreadable skipped" in capsys.readouterr().out
    assert limpq(["data", "to-parquet", str(tmp_path / "d"), str(tmp_path / "p")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def fingerprint(cfg) -> dict:
    return index_dataset(cfg.data).fingerprint


def test_fingerprint_is_content_not_location(tiny, tmp_path):
    """The same files under another root fingerprint the same; a replaced image or a new file does not."""
    import shutil

    original = fingerprint(data_config(tiny))
    assert original["format"] == "folder" and original["splits"]["train"]["files"] == 3 * 8
    assert str(tiny) not in json.dumps(original)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tiny, copy)
    assert fingerprint(data_config(copy)) == original
    image = copy / "train" / "c1" / "001.png"
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(image)  # same name, other bytes, other size
    changed = fingerprint(data_config(copy))
    assert changed["splits"]["train"] != original["splits"]["train"] and changed["sha256"] != original["sha256"]
    assert changed["splits"]["val"] == original["splits"]["val"]
    folder_to_parquet(tiny, tmp_path / "pq", shard_size=10)
    parquet = fingerprint(data_config(tmp_path / "pq", "parquet"))
    assert parquet["format"] == "parquet" and parquet["splits"]["train"]["files"] == 3
    assert index_dataset(data_config(tiny).data).source == tiny.resolve().as_uri()


def test_check_dataset_one_line_per_mistake(tiny, tmp_path):
    checked_index(data_config(tiny))
    cases = []
    missing = data_config(tiny)
    missing.data.path = str(tmp_path / "absent")
    cases.append((missing, "data.path: dataset path does not exist"))
    cases.append((data_config(tiny, num_classes=2), "model.num_classes: .* set model.num_classes: 3"))
    (tmp_path / "no-val" / "train" / "c0").mkdir(parents=True)
    cases.append((data_config(tmp_path / "no-val"), "has no val/ directory"))
    for split in ("train", "val"):
        (tmp_path / "no-classes" / split).mkdir(parents=True)
    cases.append((data_config(tmp_path / "no-classes"), "holds no class directories"))
    write_tiny_folder(tmp_path / "empty-class")
    for image in (tmp_path / "empty-class" / "val" / "c2").iterdir():
        image.unlink()
    cases.append((data_config(tmp_path / "empty-class"), r"class directory .*val/c2 holds no image files"))
    for split in ("train", "val"):
        (tmp_path / "no-images" / split / "c0").mkdir(parents=True)
        (tmp_path / "no-images" / split / "c0" / "readme.txt").write_text("not an image")
    cases.append((data_config(tmp_path / "no-images"), "holds no image files"))
    folder_to_parquet(tiny, tmp_path / "pq", shard_size=10)
    cases.append((data_config(tmp_path / "pq", "parquet", num_classes=2), "model.num_classes: .* labels 0..2"))
    for cfg, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            checked_index(cfg)
        assert "\n" not in str(caught.value)
    checked_index(data_config(tmp_path / "pq", "parquet", num_classes=3))
    demo = data_config(tiny)
    demo.data.path, demo.data.demo = str(tmp_path / "to-build"), True
    assert demo_to_build(demo.data)  # the run builds it, not the checks
    assert not (tmp_path / "to-build").exists()


def test_check_storage_uri_local(tmp_path):
    check_storage_uri(str(tmp_path / "ray" / "results"))
    assert not (tmp_path / "ray").exists()  # checked, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="ray.storage_path: cannot create directory .* is a file"):
        check_storage_uri(str(tmp_path / "file" / "sub"))
