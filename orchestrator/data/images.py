"""Decoding encoded images (PIL only, so that the dataset converter and checks need no torch)."""

from __future__ import annotations

import io

from PIL import Image


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
