"""Stage keys: what a stage's output depends on, as a short hash.

A stage is skipped when MLflow holds a finished run with its key, so the key must change exactly
when the output would: it covers the stage's settings and the *content identity* of what it reads
(the FP checkpoint's and latency table's digests, a fingerprint of the dataset's file listing), and
the key of the stage before it, and the settings that change numerics (`training.bf16`). It never covers
where things are (absolute paths, the job's per-upload working directory), nor how the work is
spread (Ray resources), nor where it is logged.

Layer-neutral: no Ray, no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.schema import PipelineConfig
from orchestrator.models.user_module import is_import_path, source_digest


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StageKeys:
    fp: str
    indicators: str
    sweep: str


def stage_keys(cfg: PipelineConfig, dataset_fingerprint: dict) -> StageKeys:
    """The key of every stage of `cfg` on the dataset with `dataset_fingerprint`
    (`DatasetIndex.fingerprint`); hashes the input files."""
    settings = cfg.model_dump(mode="json")
    del settings["model"]["min_quantized_share"]  # a check before the run, not an input of any stage
    if not cfg.model.kwargs:
        del settings["model"]["kwargs"]  # so configs without it keep their keys (and finished stages)
    if is_import_path(cfg.model.arch):  # a user's model: its code is an input like the data
        settings["model"]["source_sha256"] = source_digest(cfg.model.arch)
    fp_settings = dict(settings["fp"])
    if cfg.fp.source == "checkpoint":
        fp_settings["checkpoint"] = file_digest(cfg.fp.checkpoint)
        fp_payload = {"model": settings["model"], "fp": fp_settings}
    elif cfg.fp.source == "torchvision":
        fp_payload = {"model": settings["model"], "fp": {"source": cfg.fp.source, "weights": cfg.fp.weights}}
    else:
        fp_payload = {"model": settings["model"], "fp": fp_settings, "seed": cfg.seed}
    data_settings = {k: v for k, v in settings["data"].items() if k not in ("path", "demo")}
    data_identity = {"settings": data_settings, "fingerprint": dataset_fingerprint}
    # They join the payloads only when set, so the keys of runs without them stay as they were.
    numerics = {"bf16": True} if cfg.training.bf16 else {}
    if cfg.fp.source == "train":
        fp_payload.update(data=data_identity, **numerics)
    fp = _hash(fp_payload)
    indicators = _hash({"fp": fp, "indicators": settings["indicators"], "data": data_identity, "seed": cfg.seed,
                        "model": settings["model"], **numerics})
    search_settings = dict(settings["search"])
    if cfg.search.scores == "limpq":  # the default: configs without the option keep their keys
        for key in ("scores", "hessian_batches", "hessian_samples"):
            del search_settings[key]
    if cfg.search.latency_table:
        search_settings["latency_table"] = file_digest(cfg.search.latency_table)
    for budget in search_settings["budgets"]:
        if budget.get("policy") is not None:  # what the file holds, wherever it lies
            budget["policy"] = file_digest(budget["policy"])
        else:
            budget.pop("policy", None)  # configs without policy budgets keep their keys
    finetune_settings = dict(settings["finetune"])
    if cfg.finetune.seeds == 1:
        del finetune_settings["seeds"]
    sweep = _hash({"indicators": indicators, "search": search_settings, "finetune": finetune_settings,
                   "seed": cfg.seed, **numerics})
    return StageKeys(fp=fp, indicators=indicators, sweep=sweep)
