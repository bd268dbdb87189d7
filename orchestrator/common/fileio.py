"""Files a command reads and writes. Results other processes read are built beside their final path
and renamed onto it in one step (same filesystem, so the rename is atomic), so a reader never sees
half a file or half a dataset, and an interrupted writer leaves the previous result (or nothing)
behind. Inputs and outputs are checked before any work, with one line naming the path and what is
wrong (missing, a directory, not readable, not writable).

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

from orchestrator.common.errors import UserError


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


def readable_file(path: str | Path, what: str) -> Path:
    """`path` if it is a file this process can read; else a UserError naming `what` (e.g. "indicators
    file") and why: not found, a directory, or not readable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the {what}'s path")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: {what} is not readable (permission denied); check its permissions")
    return path


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_directory(path: str | Path, key: str) -> Path:
    """Checks, creating nothing, that `path` is a directory this process can write into, or one it
    can create; else a UserError naming `key` (a config key or a flag) and the fix."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {path} is a file, not a directory; choose another path")
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        raise UserError(f"{key}: cannot create directory {path}: {existing} is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}: {existing} is not writable; choose a writable path")
    return path


def writable_file(path: str | Path, key: str) -> Path:
    """Checks that a file can be written at `path` (not a directory; its directory exists or can be
    created, and is writable), leaving nothing behind; else a UserError naming `key`. Where the
    directory exists, the file is opened for appending to find out: permission bits do not say it
    for root, nor for a read-only file system."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise UserError(f"{key}: {path} is a directory; give a file path")
    writable_directory(path.parent, key)
    if path.parent.is_dir():
        existed = path.exists()
        try:
            with open(path, "ab"):
                pass
        except OSError as error:
            raise UserError(f"{key}: {path} cannot be written ({error.strerror}); choose another path") from None
        if not existed:
            path.unlink()
    return path
