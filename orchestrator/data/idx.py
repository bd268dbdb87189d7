"""IDX data sets (MNIST, Fashion-MNIST, KMNIST, EMNIST) as an image folder (`limpq data from-idx`).

The IDX format (LeCun's MNIST page): a big-endian header of two zero bytes, a type code (0x08:
unsigned bytes), the number of dimensions, then one uint32 per dimension, then the values in C
order. A data set is four files, each plain or gzipped: `train-images-idx3-ubyte` (N x rows x cols),
`train-labels-idx1-ubyte` (N), and the same two for `t10k`, which become `val/`.

Images are written unchanged as grayscale PNGs (`<split>/<class>/<record>.png`, the record being
the image's index in its IDX file); the pipeline's transforms resize them and make them RGB. Class
folders are the label numbers, zero-padded so that their sorted order (the pipeline's class index)
is the label order, or names given by the user in label order. A subset (`limit_train`,
`limit_val`) takes the same number of images from every class (the remainder one more each from the
lowest labels), chosen by seed.

Every file is read and checked before anything is written; the folder is built beside DST and
renamed onto it at the end, so a bad input or an interruption leaves nothing behind.
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import readable_file, replaced_on_success, writable_directory
from orchestrator.common.seeds import derived_seed
from orchestrator.data.demo import MANIFEST_NAME

MANIFEST_FORMAT = "limpq-idx/v1"
UNSIGNED_BYTE = 0x08
# split of the image folder -> prefix of its IDX files
SPLIT_FILES = {"train": "train", "val": "t10k"}


@dataclass(frozen=True)
class IdxSplit:
    images: np.ndarray  # uint8, N x rows x cols
    labels: np.ndarray  # uint8, N


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise UserError(f"{path}: not a readable gzip file ({error or type(error).__name__})") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file with `ndim` dimensions (gzipped when named *.gz);
    UserError naming the file on a wrong magic number, a short or over-long body."""
    path = readable_file(path, "IDX file")
    raw = _read_bytes(path)
    expected_magic = (UNSIGNED_BYTE << 8) | ndim
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX file ({len(raw)} bytes, shorter than its header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise UserError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(unsigned-byte IDX with {ndim} dimension{'s' if ndim > 1 else ''})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = memoryview(raw)[4 + 4 * ndim:]
    size = int(np.prod(shape, dtype=np.int64))
    if len(body) != size:
        what = "truncated" if len(body) < size else "longer than its header says"
        raise UserError(f"{path}: {what}: header {' x '.join(map(str, shape))} = {size} bytes, body {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """`array` (uint8) as an IDX file, gzipped when `path` ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">I", (UNSIGNED_BYTE << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)


def idx_file(src: Path, name: str) -> Path:
    """`src/name`, else `src/name.gz`."""
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise UserError(f"{src}: no {name} (nor {name}.gz); SRC must hold the four IDX files "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def read_idx_split(src: Path, prefix: str) -> IdxSplit:
    images_path, labels_path = idx_file(src, f"{prefix}-images-idx3-ubyte"), idx_file(src, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(f"{src}: {images_path.name} holds {len(images)} images but {labels_path.name} "
                        f"{len(labels)} labels")
    if len(images) == 0:
        raise UserError(f"{images_path}: holds no images")
    return IdxSplit(images, labels)


def _class_names(labels: np.ndarray, names: list[str] | None) -> dict[int, str]:
    """Label -> class folder, for the labels of the training split in increasing order."""
    present = [int(label) for label in np.unique(labels)]
    if names is None:
        width = len(str(present[-1]))
        return {label: f"{label:0{width}d}" for label in present}
    if len(names) != len(present):
        raise UserError(f"--classes: {len(names)} names given, the training labels hold {len(present)} classes "
                        f"({', '.join(map(str, present))}); give one name per class in label order")
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"--classes: {name!r} cannot be a class folder name (empty, '/' or a leading '.')")
    if len(set(names)) != len(names):
        raise UserError(f"--classes: duplicate names in {','.join(names)}")
    return dict(zip(present, names))


def balanced_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of at most `limit` samples, the same number from every class (the remainder
    one more each from the lowest labels; a class with fewer takes all it has), chosen by `seed`;
    every index without a limit."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for rank, label in enumerate(classes):
        quota = limit // len(classes) + (1 if rank < limit % len(classes) else 0)
        members = np.flatnonzero(labels == label)
        chosen.append(rng.permutation(members)[:quota])
    return np.sort(np.concatenate(chosen))


def _check_limit(limit: int | None, flag: str, classes: int) -> None:
    if limit is not None and limit < classes:
        raise UserError(f"{flag}: {limit} is below the number of classes ({classes}); every class needs an image")


def idx_to_folder(src: str | Path, dst: str | Path, classes: list[str] | None = None, limit_train: int | None = None,
                  limit_val: int | None = None, seed: int = 0) -> dict:
    """Write the IDX data set in `src` as `dst/{train,val}/<class>/<record>.png`; returns its
    manifest (also written as `dst/limpq-dataset.json`). Refuses a non-empty `dst`."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src}: SRC is not a directory" if src.exists() else f"{src}: SRC not found")
    writable_directory(dst, "DST")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst}: exists and is not empty; remove it or choose another DST")
    splits = {split: read_idx_split(src, prefix) for split, prefix in SPLIT_FILES.items()}
    for name, split in splits.items():
        if split.images.shape[1:] != splits["train"].images.shape[1:]:
            raise UserError(f"{src}: {SPLIT_FILES[name]} images are {'x'.join(map(str, split.images.shape[1:]))}, "
                            f"train images {'x'.join(map(str, splits['train'].images.shape[1:]))}")
    folders = _class_names(splits["train"].labels, classes)
    unknown = sorted(set(np.unique(splits["val"].labels).tolist()) - set(folders))
    if unknown:
        raise UserError(f"{src}: t10k labels {', '.join(map(str, unknown[:5]))} do not occur in the training labels")
    _check_limit(limit_train, "--limit-train", len(folders))
    _check_limit(limit_val, "--limit-val", len(folders))
    limits = {"train": limit_train, "val": limit_val}
    counts = {}
    with replaced_on_success(dst, directory=True) as staging:
        for name, split in splits.items():
            kept = balanced_subset(split.labels, limits[name], derived_seed(seed, "idx-subset", name))
            width = len(str(len(split.labels) - 1))
            for folder in {folders[int(label)] for label in split.labels[kept]}:
                (staging / name / folder).mkdir(parents=True)
            for index in kept:
                path = staging / name / folders[int(split.labels[index])] / f"{index:0{width}d}.png"
                Image.fromarray(split.images[index]).save(path)
            counts[name] = len(kept)
        manifest = {"format": MANIFEST_FORMAT, "source": str(src.resolve()),
                    "classes": {str(label): folder for label, folder in folders.items()},
                    "image_size": list(splits["train"].images.shape[1:]), "counts": counts,
                    "limit_train": limit_train, "limit_val": limit_val, "seed": seed}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
