"""Convert a folder dataset into Parquet shards (`limpq data to-parquet`).

Each split becomes `DST/<split>/part-NNNNN.parquet` with columns `image` (the encoded file bytes,
unchanged), `label`, `class_name` and `path` (relative to the split). Rows are written in a seeded
random order so that every shard mixes all classes: readers that shuffle shard order and rows within
a shard then see well-mixed batches. Unreadable images are left out and reported.
"""

from __future__ import annotations

import os
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from orchestrator.data.layout import SPLITS, list_classes, list_folder_split, staging_dir
from orchestrator.data.transforms import is_decodable
from orchestrator.errors import UserError


@dataclass
class SplitReport:
    images: int = 0
    shards: int = 0
    skipped: list[str] = field(default_factory=list)


def _read_checked(path: Path) -> bytes | None:
    try:
        encoded = path.read_bytes()
    except OSError:
        return None
    return encoded if is_decodable(encoded) else None


def _checked_images(paths: list[Path], workers: int) -> Iterator[bytes | None]:
    if workers <= 1:
        yield from map(_read_checked, paths)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_read_checked, paths, chunksize=64)


def _write_shard(split_dir: Path, index: int, rows: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "image": pa.array(rows["image"], pa.binary()),
        "label": pa.array(rows["label"], pa.int64()),
        "class_name": pa.array(rows["class_name"], pa.string()),
        "path": pa.array(rows["path"], pa.string()),
    })
    pq.write_table(table, split_dir / f"part-{index:05d}.parquet")


def folder_to_parquet(src: str | Path, dst: str | Path, shard_size: int = 1000, seed: int = 0,
                      workers: int = 1) -> dict[str, SplitReport]:
    """Write Parquet shards of `src/{train,val}` to `dst`; refuses to overwrite a non-empty `dst`."""
    src, dst = Path(src), Path(dst)
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    for split in SPLITS:
        if not (src / split).is_dir():
            raise UserError(f"{src}: no {split}/ directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: exists and is not empty")
    classes = list_classes(src / "train")
    staging = staging_dir(dst)
    reports = {}
    try:
        for split in SPLITS:
            listing = list_folder_split(src / split, classes)
            order = list(range(len(listing.keys)))
            random.Random(seed).shuffle(order)
            paths = [src / split / listing.keys[i] for i in order]
            report = reports[split] = SplitReport()
            out_dir = staging / split
            out_dir.mkdir()
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
        os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return reports
