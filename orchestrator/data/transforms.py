"""Standard ImageNet transforms.

Two halves: the geometric part on PIL images (`train_augment`: random resized crop and flip;
`eval_resize_crop`: resize and center crop), and the conversion to normalized float. The ray.data
map tasks run only the first half and store uint8 CHW arrays (a quarter of float32's bytes);
`normalize` turns a uint8 batch into ImageNet-normalized float32 on the consumer's device. The
in-process torch datasets use `train_transform` / `eval_transform`, the same steps composed with
ToTensor and Normalize, so both pipelines feed the model the same values (up to float rounding).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from orchestrator.config.schema import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageTransform = Callable[[Image.Image], torch.Tensor]
ImageAugment = Callable[[Image.Image], Image.Image]


def eval_resize_size(input_size: int, resize_size: int | None = None) -> int:
    """The shorter-side resize before the eval center crop: the usual 256 for 224 unless configured."""
    return resize_size if resize_size is not None else round(input_size * 8 / 7)


def train_augment(input_size: int, min_crop_scale: float = 0.08, hflip: bool = True) -> ImageAugment:
    """Random resized crop (and flip); draws from torch's default CPU generator."""
    steps: list = [transforms.RandomResizedCrop(input_size, scale=(min_crop_scale, 1.0))]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps)


def eval_resize_crop(input_size: int, resize_size: int | None = None) -> ImageAugment:
    return transforms.Compose([transforms.Resize(eval_resize_size(input_size, resize_size)),
                               transforms.CenterCrop(input_size)])


def _to_normalized_tensor(augment: ImageAugment) -> ImageTransform:
    return transforms.Compose([augment, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(input_size: int, min_crop_scale: float = 0.08, hflip: bool = True) -> ImageTransform:
    return _to_normalized_tensor(train_augment(input_size, min_crop_scale, hflip))


def eval_transform(input_size: int, resize_size: int | None = None) -> ImageTransform:
    return _to_normalized_tensor(eval_resize_crop(input_size, resize_size))


def augments_for(data: DataConfig, input_size: int) -> tuple[ImageAugment, ImageAugment]:
    """(train, eval) PIL -> PIL steps of the data settings at the model's input size."""
    return (train_augment(input_size, data.min_crop_scale, data.hflip), eval_resize_crop(input_size, data.resize_size))


def transforms_for(data: DataConfig, input_size: int) -> tuple[ImageTransform, ImageTransform]:
    """(train, eval) PIL -> normalized float32 CHW transforms of the data settings."""
    train, evaluation = augments_for(data, input_size)
    return _to_normalized_tensor(train), _to_normalized_tensor(evaluation)


def to_uint8_chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> ImageNet-normalized float32 NCHW on the same device: (x/255 - mean) / std as
    one multiply-add, x * 1/(255 std) - mean/std."""
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], device=images.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=images.device).view(1, 3, 1, 1)
    return images.float().mul_(scale).sub_(shift)
