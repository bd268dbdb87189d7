"""`limpq data`: build the digits demo dataset; write IDX files (MNIST and kin) as an image folder;
convert a folder dataset into Parquet shards."""

from __future__ import annotations

import argparse
import os

from orchestrator.cli.model import at_least
from orchestrator.data.convert import folder_to_parquet
from orchestrator.data.demo import write_digits_dataset
from orchestrator.data.idx import idx_to_folder


def _demo(args: argparse.Namespace) -> int:
    manifest = write_digits_dataset(args.out, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed)
    counts = manifest["counts"]
    print(f"digits dataset in {args.out}: {counts['train']} train, {counts['val']} val images, "
          f"{manifest['num_classes']} classes, {manifest['image_size']}x{manifest['image_size']} RGB")
    return 0


def _from_idx(args: argparse.Namespace) -> int:
    classes = args.classes.split(",") if args.classes is not None else None
    manifest = idx_to_folder(args.src, args.dst, classes=classes, limit_train=args.limit_train,
                             limit_val=args.limit_val, seed=args.seed)
    counts, (rows, cols) = manifest["counts"], manifest["image_size"]
    print(f"{args.dst}: {counts['train']} train, {counts['val']} val images, {len(manifest['classes'])} classes "
          f"({', '.join(manifest['classes'].values())}), {rows}x{cols} grayscale PNG")
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

    idx = commands.add_parser("from-idx", help="write IDX files (MNIST, Fashion-MNIST, ...) as an image folder")
    idx.add_argument("src", help="directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz); t10k becomes val/")
    idx.add_argument("dst", help="dataset root to create (train/<class>/*.png, val/<class>/*.png; must not hold files)")
    idx.add_argument("--classes", metavar="NAMES",
                     help="comma-separated class folder names in label order (default: the label numbers)")
    idx.add_argument("--limit-train", type=at_least(1), metavar="N",
                     help="keep N training images, the same number per class (default: all)")
    idx.add_argument("--limit-val", type=at_least(1), metavar="N",
                     help="keep N validation images, the same number per class (default: all)")
    idx.add_argument("--seed", type=int, default=0, help="seed of the subsets (default 0)")
    idx.set_defaults(func=_from_idx)

    convert = commands.add_parser("to-parquet", help="convert a folder dataset into Parquet shards")
    convert.add_argument("src", help="folder dataset root (train/<class>/*, val/<class>/*): a path or URI (s3://...)")
    convert.add_argument("dst", help="output root, a path or URI such as s3://bucket/prefix (created; must not hold files)")
    convert.add_argument("--shard-size", type=int, default=1000, help="images per Parquet file (default 1000)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the row order (default 0)")
    convert.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="processes reading and checking images (default: all CPUs)")
    convert.set_defaults(func=_to_parquet)
