"""Where a dataset's samples are and which of them a run uses (plain Python over pyarrow
filesystems, shared by the in-process datasets and the ray.data pipeline).

The dataset root (`data.path`) is a local directory or an object-storage URI (`s3://bucket/prefix`,
see `orchestrator.data.storage`). Layouts under a root holding `train/` and `val/`:
- folder: `<split>/<class>/**/*.{JPEG,jpg,jpeg,png}`; class index = position in the sorted class
  names of the train split (val uses the same mapping);
- parquet: `<split>/*.parquet` with columns `image` (encoded bytes) and `label` (int), optionally
  `class_name` and `path` (the source file relative to the split, written by `limpq data to-parquet`).

Every sample has a stable key: its path relative to the split (folder, or the Parquet `path`
column), else the SHA-1 of its bytes. The key decides membership in a `train_fraction` subset and
identifies skipped images, so folder and Parquet copies of a dataset select the same samples.

A command lists a dataset once: `index_dataset` (or `prepare_dataset`, which builds the digits demo
first when configured) returns a `DatasetIndex`, and every check (`check_dataset`), stage key
(`DatasetIndex.fingerprint`), sample count and data pipeline reads that index; at ImageNet's 1.28 M
files a listing costs seconds, so it is never repeated within a command.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.config.schema import DataConfig
from orchestrator.data.demo import write_digits_dataset
from orchestrator.data.storage import (
    Location,
    bucket_exists,
    locate,
    locate_reachable,
    storage_error,
)
from orchestrator.common.errors import UserError
from orchestrator.common.redact import redact
from orchestrator.common.seeds import derived_seeds

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared case-insensitively (ImageNet uses .JPEG)
PARQUET_REQUIRED_COLUMNS = ("image", "label")
KEY = "data.path"


@dataclass(frozen=True)
class FolderSplit:
    location: Location
    keys: list[str]  # "<class>/<file>" relative to the split directory, sorted
    labels: list[int]
    sizes: list[int]  # bytes of each file
    empty_classes: list[str]  # class directories of this split without any image file

    def fingerprint_lines(self) -> list[str]:
        return [f"{key}\t{size}" for key, size in zip(self.keys, self.sizes)]


@dataclass(frozen=True)
class ParquetShard:
    location: Location
    size: int
    rows: int
    labels: frozenset[int]  # the labels its rows carry


@dataclass(frozen=True)
class ParquetSplit:
    location: Location
    shards: list[ParquetShard]

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def labels(self) -> frozenset[int]:
        return frozenset().union(*(shard.labels for shard in self.shards))

    def fingerprint_lines(self) -> list[str]:
        return [f"{shard.location.name}\t{shard.size}\t{shard.rows}" for shard in self.shards]


@dataclass(frozen=True)
class DatasetIndex:
    """One listing of a dataset (file names and sizes, or Parquet footers), read once per command."""

    root: Location
    format: str
    classes: list[str] | None  # folder: class directories of train/, sorted (the label order)
    splits: dict[str, FolderSplit | ParquetSplit]
    _counts: dict[tuple[str, float, int], int] = field(default_factory=dict, compare=False, repr=False)

    def count(self, split: str, fraction: float = 1.0, seed: int = 0) -> int:
        """Samples of `split` in a `fraction` subset chosen by `seed` (Parquet: rows times fraction)."""
        key = (split, fraction, seed)
        if key not in self._counts:
            listing = self.splits[split]
            if isinstance(listing, FolderSplit):
                self._counts[key] = sum(in_fraction(listing.keys, fraction, seed))
            else:
                self._counts[key] = int(listing.rows * fraction)
        return self._counts[key]

    @cached_property
    def fingerprint(self) -> dict:
        """Content identity of the dataset, for stage keys.

        Per split: the count and total bytes of the files the pipeline reads, and a SHA-256 over the
        sorted lines "relative-name<TAB>size" (Parquet: "shard<TAB>size<TAB>rows"); plus the format and
        a SHA-256 over all of it. Names are relative to the split, so the same data under another root
        (another mount, bucket, or a `ray job submit --working-dir` upload) has the same fingerprint;
        adding, removing, renaming or resizing any file changes it. A file rewritten in place with
        exactly the same size is not noticed (that would take reading every byte).
        """
        splits = {}
        for split, listing in self.splits.items():
            lines = listing.fingerprint_lines()
            total = sum(listing.sizes) if isinstance(listing, FolderSplit) else sum(s.size for s in listing.shards)
            splits[split] = {"files": len(lines), "bytes": total,
                             "sha256": hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()}
        summary = {"format": self.format, "splits": splits}
        return {**summary, "sha256": hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()}

    @property
    def source(self) -> str:
        """Where the dataset lives, as a URI for lineage (MLflow `log_input`): `file:///abs/path` for
        local data, the URI as configured (credentials redacted) for object storage."""
        return Path(self.root.path).as_uri() if self.root.is_local else redact(self.root.uri)


def _missing_root(root: Location) -> UserError:
    if not root.is_local and not bucket_exists(root, KEY):
        return UserError(f"{KEY}: bucket '{root.bucket}' does not exist ({root}); create it or fix the URI")
    return UserError(f"{KEY}: dataset path does not exist: {root}; set data.path to the folder holding train/ and val/ "
                     "(or data.demo: true to build the digits demo there)")


def check_demo_settings(data: DataConfig, root: Location) -> None:
    if not root.is_local:
        raise UserError(f"data.demo: builds a local folder, but data.path is {root}; set data.demo: false "
                        "or a local data.path")
    if data.format != "folder":
        raise UserError(f"data.demo builds a folder dataset but data.format is {data.format!r}; set data.format: folder")


def demo_to_build(data: DataConfig) -> bool:
    """Whether `data` asks for the digits demo and it is not built yet (the run builds it)."""
    if not data.demo:
        return False
    root = locate(data.path, KEY)
    check_demo_settings(data, root)
    return not root.exists(KEY)


def prepare_dataset(data: DataConfig) -> DatasetIndex:
    """The dataset of `data`, indexed; the digits demo is built first when configured and missing."""
    if demo_to_build(data):
        write_digits_dataset(locate(data.path, KEY).path)
    return index_dataset(data)


def index_dataset(data: DataConfig) -> DatasetIndex:
    """List the dataset at `data.path` once (every file of a folder dataset, every Parquet footer).
    A root, split, class directory or shard that is missing or unreadable is a one-line UserError
    naming `data.path` and the fix; reads no image."""
    root = locate_reachable(data.path, KEY)
    if not root.exists(KEY):
        raise _missing_root(root)
    for split in SPLITS:
        if not (root / split).is_dir(KEY):
            raise UserError(f"{KEY}: {root} has no {split}/ directory; point data.path at the folder holding train/ and val/")
    if data.format == "folder":
        classes = list_classes(root / "train")
        splits = {split: list_folder_split(root / split, classes) for split in SPLITS}
        return DatasetIndex(root, data.format, classes, splits)
    return DatasetIndex(root, data.format, None, {split: list_parquet_split(root / split) for split in SPLITS})


def check_dataset(index: DatasetIndex, num_classes: int) -> None:
    """What the listing shows would fail later: empty class directories, splits without samples,
    labels outside `model.num_classes`. One-line UserError naming the key and the fix."""
    if index.format == "folder":
        for split, listing in index.splits.items():
            if listing.empty_classes:
                raise UserError(f"{KEY}: class directory {listing.location / listing.empty_classes[0]} holds no image "
                                f"files ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        check_label_range((0, len(index.classes) - 1), num_classes, index.root / "train")
        return
    for split, listing in index.splits.items():
        labels = listing.labels
        if not labels:
            raise UserError(f"{KEY}: the shards in {listing.location} hold no labelled rows")
        check_label_range((min(labels), max(labels)), num_classes, listing.location)
    # as in a folder dataset, where an empty class directory is refused: every class of train has rows
    train, val = index.splits["train"].labels, index.splits["val"].labels
    empty = sorted(set(range(max(train) + 1)) - train)
    if empty:
        raise UserError(f"{KEY}: {index.splits['train'].location} has no row of class {empty[0]} (labels 0.."
                        f"{max(train)}{f', {len(empty)} classes empty' if len(empty) > 1 else ''}); add its rows or "
                        "renumber the labels")
    unknown = sorted(val - train)
    if unknown:
        raise UserError(f"{KEY}: {index.splits['val'].location} has rows of class {unknown[0]}, which train/ lacks; "
                        "remove them or add the class to train/")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(relative: str) -> bool:
    """A path with a component starting with a dot (one string search: this runs once per file)."""
    return relative.startswith(".") or "/." in relative


def list_classes(split_dir: Location) -> list[str]:
    """The class directories of a split (one listing call, not recursive)."""
    try:
        entries = split_dir.filesystem.get_file_info(pafs.FileSelector(split_dir.path))
    except OSError as error:
        raise storage_error(error, KEY, split_dir) from None
    classes = sorted(entry.base_name for entry in entries
                     if entry.type == pafs.FileType.Directory and not entry.base_name.startswith("."))
    if not classes:
        raise UserError(f"{KEY}: {split_dir} holds no class directories; expected {split_dir.name}/<class>/<image>")
    return classes


def list_folder_split(split_dir: Location, classes: list[str]) -> FolderSplit:
    """All image files of a split with their labels and sizes, from one recursive listing; a class
    directory unknown to `classes` is an error."""
    class_index = {name: index for index, name in enumerate(classes)}
    split_classes = list_classes(split_dir)
    unknown = [name for name in split_classes if name not in class_index]
    if unknown:
        raise UserError(f"{KEY}: {split_dir / unknown[0]}: class not present in the train split; "
                        "remove it or add it to train/")
    keys: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    seen_classes: set[str] = set()
    for relative, size in split_dir.files(KEY):
        class_name, slash, _ = relative.partition("/")
        if not slash or not is_image_file(relative) or _is_hidden(relative):
            continue
        keys.append(relative)
        labels.append(class_index[class_name])
        sizes.append(size)
        seen_classes.add(class_name)
    if not keys:
        raise UserError(f"{KEY}: {split_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    empty = [name for name in split_classes if name not in seen_classes]
    return FolderSplit(split_dir, keys, labels, sizes, empty)


def _parquet_file(location: Location) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(location.path, filesystem=location.filesystem)
    except OSError as error:
        raise storage_error(error, KEY, location) from None
    except Exception as error:  # ArrowInvalid and friends: not Parquet
        raise UserError(f"{KEY}: {location} is not a readable Parquet file ({error})") from None


def list_parquet_split(split_dir: Location) -> ParquetSplit:
    """The split's `.parquet` files, sorted, with their row counts (from the footers) and the labels
    they hold (the label column, the only data read); a shard without the required columns is an error."""
    shards = []
    for relative, size in split_dir.files(KEY):
        if not relative.endswith(".parquet") or "/" in relative or _is_hidden(relative):
            continue
        location = split_dir / relative
        parquet = _parquet_file(location)
        missing = [column for column in PARQUET_REQUIRED_COLUMNS if column not in parquet.schema_arrow.names]
        if missing:
            raise UserError(f"{KEY}: {location} is missing column(s) {', '.join(missing)}")
        labels = pc.unique(parquet.read(columns=["label"]).column("label")).to_pylist()
        shards.append(ParquetShard(location, size, parquet.metadata.num_rows,
                                   frozenset(int(label) for label in labels if label is not None)))
    if not shards:
        raise UserError(f"{KEY}: {split_dir} holds no .parquet shards")
    return ParquetSplit(split_dir, shards)


def check_label_range(label_range: tuple[int, int] | None, num_classes: int, where: object) -> None:
    if not label_range:
        return
    low, high = label_range
    if low < 0:
        raise UserError(f"{KEY}: {where} has negative labels ({low}); labels must be 0..model.num_classes-1")
    if high >= num_classes:
        raise UserError(f"model.num_classes: {where} has labels 0..{high} but model.num_classes is {num_classes}; "
                        f"set model.num_classes: {high + 1} (or more)")


def content_key(encoded: bytes) -> str:
    return "sha1:" + hashlib.sha1(encoded).hexdigest()


def in_fraction(keys: Sequence[str], fraction: float, seed: int) -> list[bool]:
    """Deterministic membership of each sample in a `fraction` subset (independent of order and
    format): a uniform 63-bit number per (seed, key) below `fraction` of the range."""
    if fraction >= 1:
        return [True] * len(keys)
    threshold = fraction * 2**63
    return [value < threshold for value in derived_seeds(seed, keys)]
