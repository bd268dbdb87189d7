"""Standard ImageNet transforms, applied per image (PIL image -> float32 CHW tensor).

The same callables serve the in-process torch datasets and the ray.data map tasks, so both
pipelines feed the model identical tensors.
"""

from __future__ import annotations

import io
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms

from orchestrator.config import PipelineConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared case-insensitively (ImageNet uses .JPEG)

ImageTransform = Callable[[Image.Image], torch.Tensor]


def eval_resize_size(input_size: int, resize_size: int | None = None) -> int:
    """The shorter-side resize before the eval center crop: the usual 256 for 224 unless configured."""
    return resize_size if resize_size is not None else round(input_size * 8 / 7)


def train_transform(input_size: int, min_crop_scale: float = 0.08, hflip: bool = True) -> ImageTransform:
    steps: list = [transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0))]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def eval_transform(input_size: int, resize_size: int | None = None) -> ImageTransform:
    return transforms.Compose([
        transforms.Resize(eval_resize_size(input_size, resize_size)),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def transforms_for(cfg: PipelineConfig) -> tuple[ImageTransform, ImageTransform]:
    """(train, eval) transforms with the sizes of a pipeline config."""
    data, size = cfg.data, cfg.model.input_size
    return (train_transform(size, data.min_crop_scale, data.hflip), eval_transform(size, data.resize_size))


def decode_image(encoded: bytes) -> Image.Image:
    """Decode fully to RGB; raises (OSError, ValueError, ...) on truncated, empty or non-image data."""
    with Image.open(io.BytesIO(encoded)) as image:
        image.load()  # Image.open is lazy: only load() finds a truncated stream
        return image.convert("RGB")


def is_decodable(encoded: bytes) -> bool:
    """Cheap full-stream check: JPEGs decode at reduced scale (DCT draft) but still end to end."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.draft("RGB", (1, 1))
            image.load()
        return True
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        return False
