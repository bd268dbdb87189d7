"""`limpq data from-idx`: IDX files (MNIST's format) written here, plain and gzipped, into the image
folder the pipeline reads; subsets; every bad input is one line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import data_config, datasets_of
from PIL import Image

from orchestrator.cli import main as limpq
from orchestrator.data.demo import MANIFEST_NAME
from orchestrator.data.idx import read_idx, write_idx

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx_set(root: Path, train: int = 40, val: int = 20, classes: int = 4, size: int = 6, gz: bool = False,
                  labels_from: int = 0) -> dict[str, np.ndarray]:
    """Four IDX files; image i of a split has every pixel equal to i % 256 (so a PNG names its record)
    and label labels_from + i % classes."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, count in (("train", train), ("t10k", val)):
        arrays[f"{prefix}-images-idx3-ubyte"] = np.repeat(np.arange(count) % 256, size * size).astype(np.uint8) \
            .reshape(count, size, size)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (labels_from + np.arange(count) % classes).astype(np.uint8)
    for name, array in arrays.items():
        write_idx(root / (f"{name}.gz" if gz else name), array)
    return arrays


def listing(root: Path) -> dict[str, list[str]]:
    return {str(d.relative_to(root)): sorted(p.name for p in d.iterdir())
            for d in sorted(root.glob("*/*")) if d.is_dir()}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_and_folder_layout(tmp_path, gz, capsys):
    arrays = write_idx_set(tmp_path / "src", gz=gz)
    suffix = ".gz" if gz else ""
    assert np.array_equal(read_idx(tmp_path / "src" / f"train-images-idx3-ubyte{suffix}", 3),
                          arrays["train-images-idx3-ubyte"])
    assert limpq(["data", "from-idx", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert "40 train, 20 val images, 4 classes (0, 1, 2, 3), 6x6 grayscale PNG" in capsys.readouterr().out
    tree = listing(tmp_path / "dst")
    assert sorted(tree) == [f"{split}/{label}" for split in ("train", "val") for label in range(4)]
    assert tree["train/1"] == [f"{i:02d}.png" for i in range(1, 40, 4)]
    assert tree["val/3"] == [f"{i:02d}.png" for i in range(3, 20, 4)]
    image = Image.open(tmp_path / "dst" / "train" / "1" / "37.png")
    assert image.mode == "L" and image.size == (6, 6)
    assert np.array_equal(np.asarray(image), arrays["train-images-idx3-ubyte"][37])
    manifest = json.loads((tmp_path / "dst" / MANIFEST_NAME).read_text())
    assert manifest["counts"] == {"train": 40, "val": 20}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]  # no staging left
    # the pipeline reads it: class index = label, RGB at the model's input size
    train, val = datasets_of(data_config(tmp_path / "dst", input_size=8, num_classes=4))
    assert (len(train), len(val)) == (40, 20)
    assert all(int(key.split("/")[1][:2]) % 4 == label for key, label in zip(train.keys, train.labels))
    assert train[0][0].shape == (3, 8, 8)


def test_class_names_and_zero_padded_label_folders(tmp_path, capsys):
    write_idx_set(tmp_path / "src", classes=12, train=48, val=24)
    assert limpq(["data", "from-idx", str(tmp_path / "src"), str(tmp_path / "numbers")]) == 0
    # padded, so that the pipeline's sorted class order is the label order
    assert sorted(p.name for p in (tmp_path / "numbers" / "train").iterdir()) == [f"{i:02d}" for i in range(12)]
    write_idx_set(tmp_path / "src2", classes=3, labels_from=1)  # EMNIST letters: labels start at 1
    assert limpq(["data", "from-idx", str(tmp_path / "src2"), str(tmp_path / "named"),
                  "--classes", "shirt,coat,bag"]) == 0
    assert "3 classes (shirt, coat, bag)" in capsys.readouterr().out
    assert len(list((tmp_path / "named" / "train" / "coat").iterdir())) == len(range(1, 40, 3))
    assert json.loads((tmp_path / "named" / MANIFEST_NAME).read_text())["classes"] == {
        "1": "shirt", "2": "coat", "3": "bag"}


def test_subset_is_balanced_and_seeded(tmp_path, capsys):
    write_idx_set(tmp_path / "src", train=200, val=100, classes=4, gz=True)

    def subset(name: str, seed: int) -> dict[str, list[str]]:
        assert limpq(["data", "from-idx", str(tmp_path / "src"), str(tmp_path / name), "--limit-train", "22",
                      "--limit-val", "8", "--seed", str(seed)]) == 0
        return listing(tmp_path / name)

    first = subset("a", 0)
    assert "22 train, 8 val images" in capsys.readouterr().out
    counts = Counter({key: len(files) for key, files in first.items()})
    assert [counts[f"train/{c}"] for c in range(4)] == [6, 6, 5, 5]  # 22 = 4 x 5 + 2 from the lowest labels
    assert [counts[f"val/{c}"] for c in range(4)] == [2, 2, 2, 2]
    assert subset("b", 0) == first
    assert subset("c", 1) != first


def bad(src: Path, tmp_path: Path, *args: str) -> list[str]:
    """Run from-idx into tmp_path/out expecting exit 2; returns stderr lines. Nothing may be left behind."""
    import contextlib
    import io
    before = sorted(p.name for p in tmp_path.iterdir())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert limpq(["data", "from-idx", str(src), str(tmp_path / "out"), *args]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no DST, no staging directory
    return err.getvalue().strip().splitlines()


def _rewrite(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("case, expected", [
    ("missing", "no t10k-labels-idx1-ubyte (nor t10k-labels-idx1-ubyte.gz)"),
    ("magic", "wrong magic number 0x00000801, expected 0x00000803"),
    ("counts", "holds 40 images but train-labels-idx1-ubyte 39 labels"),
    ("truncated", "truncated: header 20 x 6 x 6 = 720 bytes, body 700 bytes"),
    ("truncated gzip", "t10k-images-idx3-ubyte.gz: not a readable gzip file"),
    ("header only", "truncated IDX file (6 bytes, shorter than its header)"),
    ("classes", "--classes: 3 names given, the training labels hold 4 classes (0, 1, 2, 3)"),
    ("limit", "--limit-train: 3 is below the number of classes (4)"),
    ("unknown val label", "t10k labels 9 do not occur in the training labels"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, expected):
    src = tmp_path / "src"
    write_idx_set(src)
    args: list[str] = []
    if case == "missing":
        (src / "t10k-labels-idx1-ubyte").unlink()
    elif case == "magic":
        (src / "train-images-idx3-ubyte").write_bytes((src / "train-labels-idx1-ubyte").read_bytes())
    elif case == "counts":
        write_idx(src / "train-labels-idx1-ubyte", np.arange(39, dtype=np.uint8) % 4)
    elif case == "truncated":
        _rewrite(src / "t10k-images-idx3-ubyte", lambda data: data[:-20])
    elif case == "truncated gzip":
        path = src / "t10k-images-idx3-ubyte"
        (src / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(path.read_bytes())[:-30])
        path.unlink()
    elif case == "header only":
        _rewrite(src / "train-labels-idx1-ubyte", lambda data: data[:6])
    elif case == "classes":
        args = ["--classes", "a,b,c"]
    elif case == "limit":
        args = ["--limit-train", "3"]
    elif case == "unknown val label":
        write_idx(src / "t10k-labels-idx1-ubyte", np.full(20, 9, np.uint8))
    [line] = bad(src, tmp_path, *args)
    assert line.startswith("limpq: error: ") and expected in line, line


def test_destination_not_empty_and_empty_destination(tmp_path, capsys):
    write_idx_set(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    [line] = bad(tmp_path / "src", tmp_path)
    assert "exists and is not empty" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()  # an empty directory is filled
    assert limpq(["data", "from-idx", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "train" / "0").is_dir()
