"""`limpq data`: build the digits demo dataset; convert a folder dataset into Parquet shards."""

from __future__ import annotations

import argparse
import os

from orchestrator.data.convert import folder_to_parquet
from orchestrator.data.demo import write_digits_dataset


def _demo(args: argparse.Namespace) -> int:
    manifest = write_digits_dataset(args.out, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed)
    counts = manifest["counts"]
    print(f"digits dataset in {args.out}: {counts['train']} train, {counts['val']} val images, "
          f"{manifest['num_classes']} classes, {manifest['image_size']}x{manifest['image_size']} RGB")
    return 0


def _to_parquet(args: argparse.Namespace) -> int:
    reports = folder_to_parquet(args.src, args.dst, shard_size=args.shard_size, seed=args.seed, workers=args.workers)
    for split, report in reports.items():
        print(f"{split}: {report.images} images in {report.shards} shard(s), {len(report.skipped)} unreadable skipped")
        for key in report.skipped[:10]:
            print(f"  skipped {split}/{key}")
        if len(report.skipped) > 10:
            print(f"  ... and {len(report.skipped) - 10} more")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("data", help="datasets: demo data, Parquet conversion")
    commands = group.add_subparsers(dest="data_command", required=True)

    demo = commands.add_parser("demo", help="write the scikit-learn digits as an ImageNet-style folder")
    demo.add_argument("--out", required=True, help="dataset root to create (train/ and val/ inside)")
    demo.add_argument("--image-size", type=int, default=32, help="square size of the RGB images (default 32)")
    demo.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val/ (default 0.2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    demo.set_defaults(func=_demo)

    convert = commands.add_parser("to-parquet", help="convert a folder dataset into Parquet shards")
    convert.add_argument("src", help="folder dataset root (train/<class>/*, val/<class>/*): a path or URI (s3://...)")
    convert.add_argument("dst", help="output root, a path or URI such as s3://bucket/prefix (created; must not hold files)")
    convert.add_argument("--shard-size", type=int, default=1000, help="images per Parquet file (default 1000)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the row order (default 0)")
    convert.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="processes reading and checking images (default: all CPUs)")
    convert.set_defaults(func=_to_parquet)
