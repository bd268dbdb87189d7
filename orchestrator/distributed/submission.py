"""Submit a command to a Ray cluster's job API and follow it to the end (`limpq submit`).

A thin layer over `ray.job_submission.JobSubmissionClient`: where the cluster is, which runtime
environment the job gets, the job's logs streamed while it runs, and its final status as an exit
code. Ray is imported inside the functions: the token-authentication mode is read when Ray loads.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from orchestrator.common.errors import UserError
from orchestrator.common.source import git_commit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUCCEEDED = "SUCCEEDED"
TERMINAL_STATUSES = (SUCCEEDED, "FAILED", "STOPPED")
_STATUS_SETTLE_SECONDS = 30.0


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (Ray's own order), else loopback."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def load_runtime_env(path: str | Path | None, working_dir: str | None = None) -> dict[str, Any]:
    """The runtime env of a YAML file (if any); `working_dir` overrides the file's, default "."."""
    runtime_env: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: runtime env file not found")
        try:
            runtime_env = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"{path}: not valid YAML: {getattr(error, 'problem', error)}") from None
        if not isinstance(runtime_env, dict):
            raise UserError(f"{path}: a runtime env must be a mapping (working_dir, env_vars, ...)")
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    runtime_env.setdefault("working_dir", ".")
    commit = git_commit(runtime_env["working_dir"])
    if commit:  # the uploaded copy has no .git: the job's MLflow runs get the commit from here
        runtime_env.setdefault("env_vars", {}).setdefault("LIMPQ_GIT_COMMIT", commit)
    return runtime_env


def use_auth_token_if_present() -> None:
    """Send this machine's Ray token when RAY_AUTH_MODE is unset, as `ray start` does.

    Ray's client only sends a token with RAY_AUTH_MODE=token, and reads that variable when it loads;
    an explicit RAY_AUTH_MODE (e.g. "disabled") is left alone.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:
        from orchestrator.compat import (
            reload_ray_auth_mode,  # Ray: see the module's docstring
        )

        reload_ray_auth_mode()


@dataclass(frozen=True)
class SubmittedJob:
    client: Any  # ray.job_submission.JobSubmissionClient
    job_id: str
    address: str


def submit(entrypoint: Sequence[str], address: str | None = None, runtime_env: dict[str, Any] | None = None) -> SubmittedJob:
    """Submit `entrypoint` (an argv list, run by the cluster's shell) and return at once."""
    if not entrypoint:
        raise UserError("submit: no command given; usage: limpq submit [options] -- python jobs/pipeline.py --config FILE")
    given = address
    address = resolve_address(address)
    if not _is_cluster_address(address):
        source = "--address" if given else ("RAY_API_SERVER_ADDRESS" if os.environ.get("RAY_API_SERVER_ADDRESS")
                                             else "RAY_ADDRESS")
        raise UserError(f"{source}: {address!r} is not a Ray job API address; give the dashboard's URL (e.g. "
                        f"{DEFAULT_ADDRESS}), ray://HOST:PORT, HOST:PORT of the cluster, or auto")
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument; an explicit
    # --address has to win, so it goes into the variable Ray reads first.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    use_auth_token_if_present()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, AuthenticationError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot use the Ray job API at {address}: {first_line}") from None
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env or {"working_dir": "."})
    return SubmittedJob(client, job_id, address)


def _is_cluster_address(address: str) -> bool:
    """What Ray's JobSubmissionClient takes: the dashboard's http(s) URL, a Ray Client ray:// address,
    a cluster's HOST:PORT, or auto."""
    if address == "auto":
        return True
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) or bool(parts.hostname and port)


def follow(job: SubmittedJob, out: TextIO = sys.stdout) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status name."""

    async def tail() -> None:
        async for lines in job.client.tail_job_logs(job.job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as error:
        raise UserError(
            f"lost the log stream of job {job.job_id} ({error}); it may still run: ray job status {job.job_id}"
        ) from None
    # The log stream closes when the driver exits, a moment before the status is recorded.
    deadline = time.monotonic() + _STATUS_SETTLE_SECONDS
    status = str(job.client.get_job_status(job.job_id).value)
    while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(job.client.get_job_status(job.job_id).value)
    return status


def status_message(job: SubmittedJob) -> str:
    """Ray's one-line reason for the job's status (e.g. the entrypoint's exit code), or ''."""
    message = job.client.get_job_info(job.job_id).message or ""
    return message.strip().splitlines()[0] if message.strip() else ""


def exit_code(status: str) -> int:
    """0 for a job that SUCCEEDED, 1 for FAILED or STOPPED (or one still running)."""
    return 0 if status == SUCCEEDED else 1
