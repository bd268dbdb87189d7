"""Shared fixtures: a small slice of the real digits demo data for the Ray tests, and the plugins
holding the other shared ones."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator.data.demo import write_digits_dataset

# s3_server / s3_env / s3_bucket: a real S3-compatible server (moto) on 127.0.0.1; sweep / resubmitted:
# the pipelines that tests of several modules read, each run once per session.
pytest_plugins = ["s3_fixtures", "pipelines"]


# Cost tables traced by the tests (also inside Ray workers, which inherit this environment) stay out of
# the user's ~/.cache, in a folder that goes when the test run ends.
if "LIMPQ_CACHE_DIR" not in os.environ:
    os.environ["LIMPQ_CACHE_DIR"] = tempfile.mkdtemp(prefix="limpq-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LIMPQ_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def digits_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train and 4 val images per digit class (80 / 40 images, 16x16), from the bundled digits."""
    base = tmp_path_factory.mktemp("digits")
    write_digits_dataset(base / "full", image_size=16)
    root = base / "slice"
    for split, keep in (("train", 8), ("val", 4)):
        for class_dir in sorted((base / "full" / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:keep]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root
