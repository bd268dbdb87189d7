"""Installs do not drift: requirements.lock pins every package `make install` installs, and every
dependency pyproject.toml declares (the runtime ones and the test extra) is pinned there at a version
it accepts; the cluster files install the same pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def test_every_declared_dependency_is_pinned_at_a_version_pyproject_accepts() -> None:
    pins = _pins()
    problems = []
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in requirements.lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement}: the lock pins {pins[name]}")
    assert problems == [], "requirements.lock and pyproject.toml disagree (run `make lock`): " + "; ".join(problems)


def test_the_lock_pins_exact_versions_only() -> None:
    requirement_lines = [line for line in LOCK.read_text().splitlines()
                         if line and not line.startswith(("#", " ", "-"))]
    assert requirement_lines and all("==" in line for line in requirement_lines), requirement_lines[:5]


def test_make_the_image_and_the_cluster_nodes_install_the_lock() -> None:
    assert "-r $(LOCK)" in (REPO / "Makefile").read_text()
    assert "requirements.lock" in (REPO / "cluster/Dockerfile").read_text()
    for launcher in ("ray_cluster.yaml", "cluster/local.yaml"):
        assert "requirements.lock" in (REPO / launcher).read_text(), launcher
