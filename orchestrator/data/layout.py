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

Before any work, `check_dataset(cfg)` finds what would fail later (one-line UserError naming the key
and the fix); `dataset_fingerprint(cfg)` identifies the dataset's content for stage keys and
`dataset_source(cfg)` names it for lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator.config import PipelineConfig
from orchestrator.data.storage import Location, bucket_exists, locate, redact, storage_error
from orchestrator.errors import UserError
from orchestrator.seeds import derived_seed

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared case-insensitively (ImageNet uses .JPEG)
PARQUET_REQUIRED_COLUMNS = ("image", "label")
KEY = "data.path"


@dataclass(frozen=True)
class FolderSplit:
    classes: list[str]
    keys: list[str]  # "<class>/<file>" relative to the split directory, sorted
    labels: list[int]
    sizes: list[int]  # bytes of each file
    empty_classes: list[str]  # class directories of this split without any image file


@dataclass(frozen=True)
class ParquetShard:
    location: Location
    size: int

    @property
    def uri(self) -> str:
        return self.location.uri


def dataset_root(cfg: PipelineConfig) -> Location:
    """The dataset root, checked before any work; builds the digits demo there when configured."""
    root = locate(cfg.data.path, KEY)
    if not root.exists(KEY):
        if not cfg.data.demo:
            raise _missing_root(root)
        _check_demo_settings(cfg, root)
        from orchestrator.data.demo import write_digits_dataset

        write_digits_dataset(root.path)
    for split in SPLITS:
        if not (root / split).is_dir(KEY):
            raise UserError(f"{KEY}: {root} has no {split}/ directory; point data.path at the folder holding train/ and val/")
    return root


def _missing_root(root: Location) -> UserError:
    if not root.is_local and not bucket_exists(root, KEY):
        return UserError(f"{KEY}: bucket '{root.bucket}' does not exist ({root}); create it or fix the URI")
    return UserError(f"{KEY}: dataset path does not exist: {root}; set data.path to the folder holding train/ and val/ "
                     "(or data.demo: true to build the digits demo there)")


def _check_demo_settings(cfg: PipelineConfig, root: Location) -> None:
    if not root.is_local:
        raise UserError(f"data.demo: builds a local folder, but data.path is {root}; set data.demo: false "
                        "or a local data.path")
    if cfg.data.format != "folder":
        raise UserError(f"data.demo builds a folder dataset but data.format is {cfg.data.format!r}; set data.format: folder")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


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
    for info in split_dir.files(KEY):
        relative = split_dir.relative(info.path)
        if "/" not in relative or _is_hidden(relative) or not is_image_file(relative):
            continue
        class_name = relative.split("/", 1)[0]
        keys.append(relative)
        labels.append(class_index[class_name])
        sizes.append(info.size)
        seen_classes.add(class_name)
    if not keys:
        raise UserError(f"{KEY}: {split_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    empty = [name for name in split_classes if name not in seen_classes]
    return FolderSplit(classes, keys, labels, sizes, empty)


def parquet_shards(split_dir: Location) -> list[ParquetShard]:
    """The split's `.parquet` files, sorted (columns not checked: see `list_parquet_shards`)."""
    shards = [ParquetShard(split_dir / split_dir.relative(info.path), info.size) for info in split_dir.files(KEY)
              if info.path.endswith(".parquet") and "/" not in split_dir.relative(info.path)
              and not _is_hidden(split_dir.relative(info.path))]
    if not shards:
        raise UserError(f"{KEY}: {split_dir} holds no .parquet shards")
    return shards


def _parquet_file(shard: ParquetShard):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(shard.location.path, filesystem=shard.location.filesystem)
    except OSError as error:
        raise storage_error(error, KEY, shard.location) from None
    except Exception as error:  # ArrowInvalid and friends: not Parquet
        raise UserError(f"{KEY}: {shard.location} is not a readable Parquet file ({error})") from None


def check_parquet_shards(shards: list[ParquetShard]) -> list[int]:
    """Checks the required columns of every shard; returns their row counts."""
    rows = []
    for shard in shards:
        parquet = _parquet_file(shard)
        missing = [column for column in PARQUET_REQUIRED_COLUMNS if column not in parquet.schema_arrow.names]
        if missing:
            raise UserError(f"{KEY}: {shard.location} is missing column(s) {', '.join(missing)}")
        rows.append(parquet.metadata.num_rows)
    return rows


def list_parquet_shards(split_dir: Location) -> list[str]:
    """The split's shards as URIs (or absolute local paths) that pyarrow opens, checked for the
    required columns."""
    shards = parquet_shards(split_dir)
    check_parquet_shards(shards)
    return [shard.uri for shard in shards]


def parquet_label_range(shards: list[ParquetShard]) -> tuple[int, int] | None:
    """(min, max) label over the shards, from the footer statistics where present (no data read),
    else from the label column; None for no rows."""
    low, high = None, None
    for shard in shards:
        parquet = _parquet_file(shard)
        column = parquet.schema_arrow.get_field_index("label")
        stats = [parquet.metadata.row_group(i).column(column).statistics for i in range(parquet.metadata.num_row_groups)]
        if all(s is not None and s.has_min_max for s in stats):
            pairs = [(s.min, s.max) for s in stats]
        else:
            labels = parquet.read(columns=["label"]).column("label").to_pylist()
            pairs = [(min(labels), max(labels))] if labels else []
        for shard_low, shard_high in pairs:
            low = shard_low if low is None else min(low, shard_low)
            high = shard_high if high is None else max(high, shard_high)
    return None if low is None else (int(low), int(high))


def check_label_range(label_range: tuple[int, int] | None, num_classes: int, where: object) -> None:
    if not label_range:
        return
    low, high = label_range
    if low < 0:
        raise UserError(f"{KEY}: {where} has negative labels ({low}); labels must be 0..model.num_classes-1")
    if high >= num_classes:
        raise UserError(f"model.num_classes: {where} has labels 0..{high} but model.num_classes is {num_classes}; "
                        f"set model.num_classes: {high + 1} (or more)")


def check_labels(labels: list[int], num_classes: int, where: object) -> None:
    check_label_range((min(labels), max(labels)) if labels else None, num_classes, where)


def check_dataset(cfg: PipelineConfig) -> None:
    """Everything about `cfg.data` that can fail later, checked now without Ray: the path (and its
    bucket and credentials on object storage), train/ and val/, classes, empty class directories,
    images or shards, labels within `model.num_classes`. Raises a one-line UserError naming the key
    and the fix. Reads listings and Parquet footers only, never images."""
    root = locate(cfg.data.path, KEY)
    if cfg.data.demo:
        _check_demo_settings(cfg, root)
        if not root.exists(KEY):
            return  # the run builds the digits demo there
    if not root.exists(KEY):
        raise _missing_root(root)
    for split in SPLITS:
        if not (root / split).is_dir(KEY):
            raise UserError(f"{KEY}: {root} has no {split}/ directory; point data.path at the folder holding train/ and val/")
    num_classes = cfg.model.num_classes
    if cfg.data.format == "folder":
        classes = list_classes(root / "train")
        for split in SPLITS:
            listing = list_folder_split(root / split, classes)
            if listing.empty_classes:
                raise UserError(f"{KEY}: class directory {root / split / listing.empty_classes[0]} holds no image files "
                                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        check_label_range((0, len(classes) - 1), num_classes, root / "train")
        return
    for split in SPLITS:
        shards = parquet_shards(root / split)
        if sum(check_parquet_shards(shards)) == 0:
            raise UserError(f"{KEY}: the shards in {root / split} hold no rows")
        check_label_range(parquet_label_range(shards), num_classes, root / split)


def dataset_fingerprint(cfg: PipelineConfig) -> dict:
    """Content identity of the dataset from its file listing, for stage keys.

    Per split: the count and total bytes of the files the pipeline reads, and a SHA-256 over the
    sorted lines "relative-name<TAB>size" (Parquet: "shard<TAB>size<TAB>rows"); plus the format and
    a SHA-256 over all of it. Names are relative to the split, so the same data under another root
    (another mount, bucket, or a `ray job submit --working-dir` upload) has the same fingerprint;
    adding, removing, renaming or resizing any file changes it. A file rewritten in place with
    exactly the same size is not noticed (that would take reading every byte). Builds the digits
    demo first when `data.demo` asks for it.
    """
    root = dataset_root(cfg)
    splits = {}
    for split in SPLITS:
        if cfg.data.format == "folder":
            listing = list_folder_split(root / split, list_classes(root / "train"))
            lines = [f"{key}\t{size}" for key, size in zip(listing.keys, listing.sizes)]
            total = sum(listing.sizes)
        else:
            shards = parquet_shards(root / split)
            rows = check_parquet_shards(shards)
            lines = [f"{shard.location.name}\t{shard.size}\t{count}" for shard, count in zip(shards, rows)]
            total = sum(shard.size for shard in shards)
        splits[split] = {"files": len(lines), "bytes": total,
                         "sha256": hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()}
    summary = {"format": cfg.data.format, "splits": splits}
    return {**summary, "sha256": hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()}


def dataset_source(cfg: PipelineConfig) -> str:
    """Where the dataset lives, as a URI for lineage (MLflow `log_input`): `file:///abs/path` for
    local data, the URI as configured (credentials redacted) for object storage."""
    root = locate(cfg.data.path, KEY)
    return Path(root.path).as_uri() if root.is_local else redact(root.uri)


def count_samples(cfg: PipelineConfig, split: str = "train", fraction: float = 1.0) -> int:
    """Samples of a split in a `fraction` subset, from the listing (folder) or shard footers
    (Parquet: rows times fraction); reads no image."""
    root = dataset_root(cfg)
    if cfg.data.format == "folder":
        listing = list_folder_split(root / split, list_classes(root / "train"))
        return sum(in_fraction(key, fraction, cfg.seed) for key in listing.keys)
    return int(sum(check_parquet_shards(parquet_shards(root / split))) * fraction)


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
    return derived_seed(seed, key) < fraction * 2**63  # a uniform 63-bit number per (seed, key)
