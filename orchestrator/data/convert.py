"""Convert a folder dataset into Parquet shards (`limpq data to-parquet`).

Each split becomes `DST/<split>/part-NNNNN.parquet` with columns `image` (the encoded file bytes,
unchanged), `label`, `class_name` and `path` (relative to the split). Rows are written in a seeded
random order so that every shard mixes all classes: readers that shuffle shard order and rows within
a shard then see well-mixed batches. Unreadable images are left out and reported.

SRC and DST are local paths or object-storage URIs (`s3://bucket/prefix`). A local DST is built in a
sibling directory and renamed into place at the end, so an interrupted conversion leaves nothing
that looks complete; object storage has no rename, so there the shards are written in place (an
interrupted conversion leaves a non-empty DST, which the next attempt refuses: delete it first).
"""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.images import is_decodable
from orchestrator.data.layout import SPLITS, list_classes, list_folder_split
from orchestrator.data.storage import (
    Location,
    bucket_exists,
    locate,
    locate_reachable,
    storage_error,
)
from orchestrator.common.errors import UserError
from orchestrator.common.fileio import replaced_on_success, writable_directory


@dataclass
class SplitReport:
    images: int = 0
    shards: int = 0
    skipped: list[str] = field(default_factory=list)


def _read_checked(location: Location) -> bytes | None:
    try:
        encoded = location.read_bytes()
    except OSError:
        return None
    return encoded if is_decodable(encoded) else None


def _checked_images(paths: list[Location], workers: int) -> Iterator[bytes | None]:
    if workers <= 1:
        yield from map(_read_checked, paths)
        return
    # The AWS SDK inside pyarrow's S3 filesystem is not fork-safe once used: start fresh processes.
    context = None if all(path.is_local for path in paths[:1]) else multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_read_checked, paths, chunksize=64)


def _write_shard(split_dir: Location, index: int, rows: dict[str, list]) -> None:
    table = pa.table({
        "image": pa.array(rows["image"], pa.binary()),
        "label": pa.array(rows["label"], pa.int64()),
        "class_name": pa.array(rows["class_name"], pa.string()),
        "path": pa.array(rows["path"], pa.string()),
    })
    shard = split_dir / f"part-{index:05d}.parquet"
    try:
        pq.write_table(table, shard.path, filesystem=shard.filesystem)
    except OSError as error:
        raise storage_error(error, "DST", shard) from None


def _is_empty_or_missing(location: Location) -> bool:
    info = location.info("DST")
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    try:
        return not location.filesystem.get_file_info(pafs.FileSelector(location.path))
    except OSError as error:
        raise storage_error(error, "DST", location) from None


def folder_to_parquet(src: str | Path, dst: str | Path, shard_size: int = 1000, seed: int = 0,
                      workers: int = 1) -> dict[str, SplitReport]:
    """Write Parquet shards of `src/{train,val}` to `dst` (paths or URIs); refuses a non-empty `dst`."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    source, target = locate_reachable(src, "SRC"), locate_reachable(dst, "DST")
    if target.is_local:
        writable_directory(target.path, "DST")
    for split in SPLITS:
        if not (source / split).is_dir("SRC"):
            raise UserError(f"{source}: no {split}/ directory")
    if not target.is_local and not bucket_exists(target, "DST"):
        raise UserError(f"DST: bucket '{target.bucket}' does not exist ({target}); create it or fix the URI")
    if not _is_empty_or_missing(target):
        raise UserError(f"{target}: exists and is not empty")
    classes = list_classes(source / "train")
    if not target.is_local:
        return _convert(source, target, classes, shard_size, seed, workers)
    with replaced_on_success(target.path, directory=True) as staging:
        return _convert(source, locate(staging), classes, shard_size, seed, workers)


def _convert(source: Location, out: Location, classes: list[str], shard_size: int, seed: int,
             workers: int) -> dict[str, SplitReport]:
    reports = {}
    for split in SPLITS:
        listing = list_folder_split(source / split, classes)
        order = list(range(len(listing.keys)))
        random.Random(seed).shuffle(order)
        paths = [source / split / listing.keys[i] for i in order]
        report = reports[split] = SplitReport()
        out_dir = out / split
        try:
            out.filesystem.create_dir(out_dir.path)
        except OSError as error:
            raise storage_error(error, "DST", out_dir) from None
        rows: dict[str, list] = {"image": [], "label": [], "class_name": [], "path": []}
        for i, encoded in zip(order, _checked_images(paths, workers)):
            key, label = listing.keys[i], listing.labels[i]
            if encoded is None:
                report.skipped.append(key)
                continue
            for column, value in (("image", encoded), ("label", label), ("class_name", classes[label]), ("path", key)):
                rows[column].append(value)
            report.images += 1
            if len(rows["image"]) == shard_size:
                _write_shard(out_dir, report.shards, rows)
                report.shards += 1
                rows = {column: [] for column in rows}
        if rows["image"]:
            _write_shard(out_dir, report.shards, rows)
            report.shards += 1
    return reports
