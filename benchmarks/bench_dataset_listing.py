"""`limpq config validate` on an ImageNet-1k-shaped folder dataset: CPU seconds of the whole command
(schema, model trace, the one listing of train/ and val/, every check, the stage keys) against a bare
recursive listing with file sizes (`os.scandir`, the floor any check must pay once).

The tree is 1,000 classes x 1,281 training and 50 validation images by default (1.33 M paths), all
hard links to tiny JPEGs (one per class and split: ext4 allows 65,000 links to a file), so it takes
directory entries, not gigabytes. It is built once under --root and reused. The cost table is
traced before timing (a cached table is what a user's second command reads); the command runs in a
subprocess and its CPU time is read from getrusage. Ratio ours / bare listing is printed last.

    .venv/bin/python benchmarks/bench_dataset_listing.py [--root /tmp/limpq-imagenet-shape] [--classes 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image


def build_tree(root: Path, classes: int, train: int, val: int) -> int:
    """The hard-linked tree (reused when its manifest matches); returns the number of image paths."""
    manifest = {"classes": classes, "train": train, "val": val}
    marker = root / "tree.json"
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return classes * (train + val)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buffer, "JPEG")
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            class_dir = root / "data" / split / f"n{label:08d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            source = sources / f"{split}-{label}.JPEG"
            source.write_bytes(buffer.getvalue())
            for index in range(count):
                target = class_dir / f"n{label:08d}_{index}.JPEG"
                if not target.exists():
                    os.link(source, target)
    marker.write_text(json.dumps(manifest))
    print(f"built {classes * (train + val):,} hard links in {time.monotonic() - started:.0f} s", flush=True)
    return classes * (train + val)


def bare_listing(root: Path) -> tuple[float, int]:
    """CPU seconds of a recursive listing with each file's size, and the files seen."""
    before = time.process_time()
    files, pending = 0, [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    entry.stat()
                    files += 1
    return time.process_time() - before, files


def validate(config: Path) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, output) of `limpq config validate` in a subprocess."""
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).with_name("limpq")), "config", "validate", str(config)],
                            capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"config validate failed: {result.stdout}{result.stderr}")
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    return cpu, wall, result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/limpq-imagenet-shape"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-per-class", type=int, default=1281)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args()
    paths = build_tree(args.root, args.classes, args.train_per_class, args.val_per_class)
    config = args.root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "listing", "output_dir": str(args.root / "runs"),
        "model": {"arch": "resnet18", "num_classes": args.classes, "input_size": 224},
        "data": {"path": str(args.root / "data"), "batch_size": 256},
        "search": {"budgets": [{"target_wbits": 4, "target_abits": 4}]},
        "finetune": {"baselines": [4]},
        "ray": {"storage_path": str(args.root / "ray")},
    }))
    validate(config)  # traces the model into the cost cache and warms the page cache, as a second run finds them
    floor, files = bare_listing(args.root / "data")
    cpu, wall, output = validate(config)
    print(f"{paths:,} image paths ({files:,} files listed)")
    print(f"bare recursive listing with sizes (os.scandir): {floor:.1f} s CPU")
    print(f"limpq config validate: {cpu:.1f} s CPU, {wall:.1f} s wall (goal: under 10 s CPU); {output}")
    print(f"ratio limpq config validate / bare listing (CPU): {cpu / floor:.2f}x")


if __name__ == "__main__":
    main()
