"""Seeds derived from several values, stable across processes and machines (unlike `hash()`), so that
data order, augmentation and dropout are functions of the config's seed and where they happen."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any values (their `str`)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
