"""Patches for the experiments, from outside the product code. Put this directory first on PYTHONPATH of
`limpq run` (Ray's workers inherit it from the local Ray it starts) and name the patches in LIMPQ_PATCH
(comma-separated); each is applied when its module is imported:

    lift_step_bound  orchestrator.quant.lsq.STEP_MAX = infinity: the step-size clamp without its upper
                     bound (experiments/step_clamp.sh)
    trace_fc_step    every fine-tuning step appends its loss, fc.weight_quant.step.8 before and after, the
                     step's gradient and the lr to $FC_TRACE (default fc_trace.txt)

docs/results.md, "The classifier's step still crosses zero", used both.
"""

import functools
import importlib.abc
import importlib.util
import os
import sys


def lift_step_bound(module) -> None:
    module.STEP_MAX = float("inf")


def trace_fc_step(module) -> None:
    original = module.plain_step

    @functools.wraps(original)
    def traced(model, images, labels, **kwargs):
        inner = getattr(model, "module", model)  # DDP-wrapped on a Ray Train worker
        quant = inner.fc.weight_quant
        before = float(quant.step["8"].detach()) if bool(quant.initialized) else None
        result = original(model, images, labels, **kwargs)
        grad = quant.step["8"].grad
        with open(os.environ.get("FC_TRACE", "fc_trace.txt"), "a") as out:
            out.write(f"loss {result['loss']:.3f} step {before} -> {float(quant.step['8'].detach()):.5f} "
                      f"grad {None if grad is None else format(float(grad), '.4g')} "
                      f"max|w|/127 {float(inner.fc.weight.abs().max()) / 127:.5f} "
                      f"lr {kwargs['optimizer'].param_groups[0]['lr']:.4g}\n")
        return result

    module.plain_step = traced


PATCHES = {"lift_step_bound": ("orchestrator.quant.lsq", lift_step_bound),
           "trace_fc_step": ("orchestrator.train.steps", trace_fc_step)}


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after module `name` is first executed."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


for _patch in filter(None, os.environ.get("LIMPQ_PATCH", "").split(",")):
    sys.meta_path.insert(0, PatchOnImport(*PATCHES[_patch]))
