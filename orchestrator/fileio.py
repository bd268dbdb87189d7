"""Writing results that other processes read: each is built beside its final path and renamed onto it
in one step (same filesystem, so the rename is atomic), so a reader never sees half a file or half a
dataset, and an interrupted writer leaves the previous result (or nothing) behind.

Layer-neutral: standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replaced_on_success(final: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """A fresh sibling of `final` to write into (a file path, or an empty directory with `directory`),
    renamed onto `final` when the block ends without an error and removed when it raises. It gets
    the permissions a plain `open` or `mkdir` would give (temporary files are private by default)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        staging.chmod(0o777 & ~_umask())
    else:
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
        staging = Path(name)
        staging.chmod(0o666 & ~_umask())
    try:
        yield staging
        os.replace(staging, final)
    finally:
        if directory:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with replaced_on_success(path) as staging:
        staging.write_text(text)


def write_json_atomic(path: str | Path, payload: object) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")
