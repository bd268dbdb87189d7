"""Seeds derived from several values, stable across processes and machines (unlike `hash()`), so that
data order, augmentation and dropout are functions of the config's seed and where they happen."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any values (their `str`)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def derived_seeds(prefix: object, keys: Iterable[object]) -> Iterator[int]:
    """`derived_seed(prefix, key)` for every key, hashing the prefix once (3x faster at ImageNet's
    1.28 M file names)."""
    base = hashlib.blake2b(f"{prefix}\0".encode(), digest_size=8)
    for key in keys:
        hasher = base.copy()
        hasher.update(str(key).encode())
        yield int.from_bytes(hasher.digest(), "big") >> 1
