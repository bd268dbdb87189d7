"""Images/s delivered into a consumer loop: our ray.data pipeline vs torchvision ImageFolder + DataLoader.

Both read the same generated folder of JPEGs (default 2,000 at 256x256, ImageNet-like 224 crops),
apply the same train transforms (`orchestrator.data.transforms`) and get the same CPU count: the
DataLoader `num_workers`, Ray's `num_cpus`. Both pipelines are built once and warmed up by one
epoch; then timed epochs alternate between them for a few rounds, so that load from other
processes on a shared machine hits both alike. Reported per side: the best and the median epoch
rate, and CPU time per image summed over the process tree (driver, DataLoader workers or Ray's
workers and daemons), which is far less sensitive to other load than wall time. The ratio
(ours / DataLoader, best epochs) is printed last.

Our blocks hold uint8 CHW images (the benchmark prints the bytes per image against float32's);
normalization to float happens in `iter_batches`, on the consumer's device, which is part of the
timed loop here.

Ray Data starts every epoch as a new execution and runs at most one task until its resource view
arrives (about a second, in Ray 2.60); over a 2,000-image epoch that start-up is a visible share.
`--repeat K` hard-links every JPEG K times (same bytes, K times the paths), so epochs are K times
longer and the rate approaches the steady state of a large dataset such as ImageNet.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--images 2000] [--repeat 1] [--cpus 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

NUM_CLASSES = 10


def write_jpeg_folder(root: Path, count: int, size: int, repeat: int = 1, seed: int = 0) -> None:
    """Smooth random images (upscaled low-resolution noise plus grain): JPEG sizes like photos'."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        class_dir = root / "train" / f"class{index % NUM_CLASSES:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        grain = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        path = class_dir / f"img{index:05d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        for copy in range(1, repeat):
            os.link(path, class_dir / f"img{index:05d}-{copy}.JPEG")
    (root / "val" / "class00").mkdir(parents=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / "val" / "class00" / "img.JPEG")


def process_tree_cpu_seconds() -> float:
    """user+system CPU of this process and all its descendants (Linux /proc)."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = int(fields[11]) + int(fields[12])
    tree, grew = {os.getpid()}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(cpu.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


class Side:
    """One pipeline: a function returning an epoch's (images, labels) batches, and its timings."""

    def __init__(self, name: str, epoch: Callable[[], Iterable]) -> None:
        self.name, self.epoch = name, epoch
        self.rates: list[float] = []
        self.cpu_ms_per_image: list[float] = []

    def run_epoch(self) -> None:
        cpu_before, start, seen = process_tree_cpu_seconds(), time.perf_counter(), 0
        for images, labels in self.epoch():
            images.sum()  # the training step stand-in: touch every batch
            seen += len(labels)
        self.rates.append(seen / (time.perf_counter() - start))
        self.cpu_ms_per_image.append(1000 * (process_tree_cpu_seconds() - cpu_before) / seen)

    def summary(self) -> str:
        return (f"{self.name:38s} best {max(self.rates):7.1f} images/s, median {statistics.median(self.rates):7.1f}, "
                f"CPU {statistics.median(self.cpu_ms_per_image):.2f} ms/image")


def dataloader_side(root: Path, transform, batch_size: int, cpus: int) -> Side:
    import torch
    from torchvision.datasets import ImageFolder

    loader = torch.utils.data.DataLoader(ImageFolder(str(root / "train"), transform=transform), batch_size=batch_size,
                                         shuffle=True, num_workers=cpus, persistent_workers=True)
    return Side("torchvision ImageFolder + DataLoader", lambda: iter(loader))


def reading_plan(cfg):
    from orchestrator.data.layout import index_dataset
    from orchestrator.data.transforms import augments_for
    from orchestrator.distributed.datasets import SkipCounter, training_data

    return training_data(index_dataset(cfg.data), augments_for(cfg.data, cfg.model.input_size),
                         input_size=cfg.model.input_size, num_classes=cfg.model.num_classes, seed=cfg.seed,
                         skip_counter=SkipCounter())


def ray_side(cfg, batch_size: int) -> Side:
    """One Train worker's reading of successive epochs (each its own order and crops)."""
    import itertools

    from orchestrator.distributed.datasets import epoch_dataset, iter_batches

    data, epochs = reading_plan(cfg), itertools.count()
    return Side("ray.data pipeline (ours)",
                lambda: iter_batches(epoch_dataset(data, "train", next(epochs)), batch_size, device="cpu"))


def block_bytes(cfg) -> str:
    """Bytes per image in our blocks, measured on a block, against float32 CHW."""
    from orchestrator.distributed.datasets import epoch_dataset

    block = epoch_dataset(reading_plan(cfg), "val").take_batch(1, batch_format="numpy")["image"]
    float_bytes = block[0].size * 4
    return (f"bytes per image in blocks: {block[0].nbytes} ({block.dtype}, {block.shape[1:]}) vs {float_bytes} float32: "
            f"{float_bytes / block[0].nbytes:.0f}x smaller")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="paths per JPEG (hard links): epochs K times longer")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per side, alternating")
    args = parser.parse_args()

    import ray

    from orchestrator.config.schema import PipelineConfig
    from orchestrator.data.transforms import transforms_for

    with tempfile.TemporaryDirectory(prefix="limpq-bench-data-") as tmp:
        root = Path(tmp)
        write_jpeg_folder(root, args.images, args.image_size, args.repeat)
        cfg = PipelineConfig.model_validate({
            "data": {"path": str(root), "batch_size": args.batch_size},
            "model": {"num_classes": NUM_CLASSES, "input_size": args.input_size},
        })
        print(f"{args.images} JPEGs x {args.repeat} paths, {args.image_size}x{args.image_size} -> {args.input_size} crops, "
              f"batch {args.batch_size}, {args.cpus} CPUs, {args.rounds} alternating timed epochs per side")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-execution INFO lines between results
        try:
            print(block_bytes(cfg))
            sides = [dataloader_side(root, transforms_for(cfg.data, cfg.model.input_size)[0], args.batch_size, args.cpus),
                     ray_side(cfg, args.batch_size)]
            for side in sides:
                side.run_epoch()  # warm-up: worker start-up, page cache
                side.rates.clear()
                side.cpu_ms_per_image.clear()
            for _ in range(args.rounds):
                for side in sides:
                    side.run_epoch()
        finally:
            ray.shutdown()
    loader, ours = sides
    for side in sides:
        print(side.summary())
    print(f"CPU per image ours / DataLoader: {statistics.median(ours.cpu_ms_per_image) / statistics.median(loader.cpu_ms_per_image):.2f}x")
    print(f"ratio ours / DataLoader (images/s, median epochs): "
          f"{statistics.median(ours.rates) / statistics.median(loader.rates):.2f}x")
    print(f"ratio ours / DataLoader (images/s, best epochs): {max(ours.rates) / max(loader.rates):.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
