"""Where a dataset's samples are and which of them a run uses (plain Python, shared by the in-process
datasets and the ray.data pipeline).

Layouts under a root holding `train/` and `val/`:
- folder: `<split>/<class>/**/*.{JPEG,jpg,jpeg,png}`; class index = position in the sorted class
  names of the train split (val uses the same mapping);
- parquet: `<split>/*.parquet` with columns `image` (encoded bytes) and `label` (int), optionally
  `class_name` and `path` (the source file relative to the split, written by `limpq data to-parquet`).

Every sample has a stable key: its path relative to the split (folder, or the Parquet `path`
column), else the SHA-1 of its bytes. The key decides membership in a `train_fraction` subset and
identifies skipped images, so folder and Parquet copies of a dataset select the same samples.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import PipelineConfig
from orchestrator.data.transforms import IMAGE_EXTENSIONS
from orchestrator.errors import UserError

SPLITS = ("train", "val")
PARQUET_REQUIRED_COLUMNS = ("image", "label")


@dataclass(frozen=True)
class FolderSplit:
    classes: list[str]
    keys: list[str]  # "<class>/<file>" relative to the split directory, sorted
    labels: list[int]


def dataset_root(cfg: PipelineConfig) -> Path:
    """The dataset root, checked before any work; builds the digits demo there when configured."""
    root = Path(cfg.data.path)
    if not root.exists():
        if not cfg.data.demo:
            raise UserError(f"data.path: dataset path does not exist: {root}")
        if cfg.data.format != "folder":
            raise UserError(f"data.demo builds a folder dataset but data.format is {cfg.data.format!r}")
        from orchestrator.data.demo import write_digits_dataset

        write_digits_dataset(root)
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"data.path: {root} has no {split}/ directory")
    return root


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_classes(split_dir: Path) -> list[str]:
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir}: no class directories")
    return classes


def list_folder_split(split_dir: Path, classes: list[str]) -> FolderSplit:
    """All image files of a split with their labels; a class directory unknown to `classes` is an error."""
    class_index = {name: index for index, name in enumerate(classes)}
    keys: list[str] = []
    labels: list[int] = []
    for class_name in list_classes(split_dir):
        if class_name not in class_index:
            raise UserError(f"{split_dir / class_name}: class not present in the train split")
        class_dir = split_dir / class_name
        for parent, dirs, files in os.walk(class_dir):
            dirs.sort()
            relative = Path(parent).relative_to(split_dir).as_posix()
            for name in sorted(files):
                if is_image_file(name):
                    keys.append(f"{relative}/{name}")
                    labels.append(class_index[class_name])
    if not keys:
        raise UserError(f"{split_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderSplit(classes, keys, labels)


def list_parquet_shards(split_dir: Path) -> list[Path]:
    """The split's shards, checked for the required columns."""
    import pyarrow.parquet as pq

    shards = sorted(split_dir.glob("*.parquet"))
    if not shards:
        raise UserError(f"{split_dir}: no .parquet shards")
    for shard in shards:
        try:
            names = set(pq.read_schema(shard).names)
        except Exception as error:
            raise UserError(f"{shard}: not a readable Parquet file ({error})") from None
        missing = [column for column in PARQUET_REQUIRED_COLUMNS if column not in names]
        if missing:
            raise UserError(f"{shard}: missing column(s) {', '.join(missing)}")
    return shards


def staging_dir(final: Path) -> Path:
    """An empty sibling of `final` to build into and then rename onto it (same filesystem, so the
    rename is atomic), with the permissions a plain mkdir would give."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def content_key(encoded: bytes) -> str:
    return "sha1:" + hashlib.sha1(encoded).hexdigest()


def in_fraction(key: str, fraction: float, seed: int) -> bool:
    """Deterministic membership of a sample in a `fraction` subset (independent of order and format)."""
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def check_labels(labels: list[int], num_classes: int, where: Path) -> None:
    if labels and (max(labels) >= num_classes or min(labels) < 0):
        raise UserError(f"{where}: labels span {min(labels)}..{max(labels)} but model.num_classes is {num_classes}")


def parquet_labels(shards: list[Path]) -> list[int]:
    """Every label of the shards (reads only the label column)."""
    import pyarrow.parquet as pq

    return [label for shard in shards for label in pq.read_table(shard, columns=["label"]).column("label").to_pylist()]


def dataset_fingerprint(cfg: PipelineConfig) -> str:
    """Content identity of the dataset from its file listing (relative names and sizes per split),
    independent of where the dataset lives."""
    root = dataset_root(cfg)
    digest = hashlib.sha256(cfg.data.format.encode())
    for split in SPLITS:
        split_dir = root / split
        files = sorted(p for p in split_dir.rglob("*") if p.is_file())
        for path in files:
            digest.update(f"{split}/{path.relative_to(split_dir).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
