"""Which source a run used: the git commit of the checkout it came from."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(directory: str | Path) -> str | None:
    """The HEAD commit of the git checkout holding `directory`, or None."""
    try:
        result = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
