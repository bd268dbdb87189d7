"""Connect to Ray: join the cluster a job was submitted to, or start the embedded local default."""

from __future__ import annotations

import logging
import math
import os

import ray

from orchestrator.config import PipelineConfig

log = logging.getLogger("limpq")


def local_cpu_count(cfg: PipelineConfig) -> int:
    """Logical CPUs for an embedded local Ray: twice the cores (at least 4), and always two more than
    the Train workers reserve, because they hold theirs for the whole run and Ray Data needs CPUs of its
    own to feed them, or it hangs."""
    return max(4, 2 * (os.cpu_count() or 1), math.ceil(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 2)


def ensure_ray(cfg: PipelineConfig) -> None:
    """Idempotent. Under `ray job submit` RAY_ADDRESS points at the cluster and `ray.init()` joins it."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    log.info("starting local Ray (%d logical CPUs)", local_cpu_count(cfg))
    # address="local": a new instance even when `ray start` left one running on this machine
    ray.init(address="local", num_cpus=local_cpu_count(cfg), include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
