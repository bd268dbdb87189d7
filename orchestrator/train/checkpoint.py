"""Training checkpoints: model, optimizer, scheduler, position (epoch, step) and every RNG state, so a
resumed run continues exactly. Written atomically; read with `weights_only=True`."""

from __future__ import annotations

import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.common.errors import UserError, first_line
from orchestrator.models.explicit_layers import explicit_state_dict
from orchestrator.common.fileio import readable_file, replaced_on_success
from orchestrator.quant.surgery import unwrap

FORMAT = "limpq-checkpoint/v1"


def rng_state(policy_rng: random.Random | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if policy_rng is not None:
        state["policy"] = policy_rng.getstate()
    return state


def restore_rng(state: dict[str, Any], policy_rng: random.Random | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if policy_rng is not None and "policy" in state:
        policy_rng.setstate(state["policy"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
    step: int = 0,
    policy_rng: random.Random | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "step": step,
        "rng": rng_state(policy_rng),
        "meta": dict(meta or {}),
    }
    with replaced_on_success(path) as staging:
        torch.save(payload, staging)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (ours, or a bare state dict from elsewhere) without executing any code."""
    path = readable_file(path, "checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message goes on to suggest weights_only=False, which would run the file's code
        refused = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
        if refused is None:  # not a pickle of allowed types at all: garbage, truncated, another format
            unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            reason = unpickler.group(1).strip() if unpickler else first_line(error)[:200]
            raise UserError(f"{path}: not a readable torch checkpoint ({reason[:200]})") from None
        raise UserError(f"{path}: refused to load: it holds Python objects ({refused.group(1)}), not only tensors, "
                        "and loading them could run code; save the model's state_dict "
                        "(torch.save(model.state_dict(), ...))") from None
    except Exception as error:  # torch raises many types for corrupt files
        raise UserError(f"{path}: not a readable torch checkpoint ({first_line(error)[:200]})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return payload
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"format": "state_dict", "model": payload, "meta": {}}
    raise UserError(f"{path}: holds neither a limpq checkpoint nor a model state dict")


def restore_model(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load weights strictly; a mismatch names the file and the keys or shapes that differ. Weights of an
    nn.MultiheadAttention saved before it was made explicit (a user's own checkpoint) load as well."""
    target = unwrap(model)
    state_dict = explicit_state_dict(target, {key.removeprefix("module."): value for key, value in state_dict.items()})
    own = target.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(f"{source}: checkpoint does not match the model ({'; '.join(parts)})")
    # The keys match the model's own, so its own module versions apply; some modules' loaders need them
    # (mnasnet refuses a state dict without) and a renamed or transferred dict has lost the saved ones.
    loadable = OrderedDict(state_dict)
    loadable._metadata = own._metadata
    target.load_state_dict(loadable)
