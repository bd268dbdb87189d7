"""One trial of the budget sweep (a Ray Tune trial): the policy of its budget (ILP search, or a
uniform baseline), fine-tuned on Ray Train or, with `finetune.epochs: 0`, scored with the joint
model (docs/method.md §9); recorded in a nested MLflow run whose model becomes a version of the pipeline's
registered model.

MLflow is the source of truth for what finished: a trial whose run already finished under the same
sweep run reports the stored result instead of training again, so a resubmitted sweep reruns only
failed and never-run trials.
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from orchestrator.common.errors import UserError
from orchestrator.common.plots import policy_bits_chart
from orchestrator.config.schema import Budget, PipelineConfig, budget_alias
from orchestrator.distributed.evaluate import joint_model_at_policy, score_joint_weights_here
from orchestrator.distributed.train import (
    StageInputs,
    example_input,
    log_dataset_inputs,
    train_on_ray,
)
from orchestrator.search.ilp import Searcher
from orchestrator.search.indicators import Indicators
from orchestrator.search.policy import Policy, given_policy, uniform_baseline
from orchestrator.tracking.context import RunContext
from orchestrator.tracking.models import ModelRecord, log_model, register_model, registered_model_name
from orchestrator.tracking.onnx_models import deploy_trial_model, log_trial_onnx, val_batches
from orchestrator.tracking.trials import ONE_SHOT, TrialSpec, evaluation_kind
from orchestrator.train.checkpoint import restore_model, save_checkpoint
from orchestrator.train.stages import finetune_model, fp_meta

POLICY_METRICS = ("bitops_g", "size_mb", "compression_ratio", "avg_wbits", "avg_abits")


@dataclass(frozen=True)
class SweepInputs:
    """What every trial needs, shipped once through the object store (`tune.with_parameters`): the
    pipeline's context, the sweep run the trials go under, and the sweep's inputs."""

    context: RunContext
    sweep_run_id: str
    indicators: Indicators
    fp_weights: dict
    joint_weights: dict | None


def trial_policy(inputs: SweepInputs, spec: TrialSpec) -> Policy:
    """The searched policy of the trial's budget, its given policy file, or its uniform baseline."""
    cfg, costs = inputs.context.cfg, inputs.context.costs
    search = cfg.search
    if spec.kind == "uniform":
        return uniform_baseline(costs, spec.bits, search.alpha)
    if "policy" in spec.budget:
        return given_policy(spec.budget["policy"], costs, cfg.indicators.bits, label=spec.policy_label)
    searcher = Searcher(inputs.indicators, costs, search.wbits, search.abits, search.alpha, search.latency_table)
    return searcher.solve(Budget(**spec.budget))


def _policy_metrics(policy: Policy) -> dict[str, float]:
    return {key: float(getattr(policy.totals, key)) for key in POLICY_METRICS}


def _description(cfg: PipelineConfig, spec: TrialSpec) -> str:
    if spec.kind == "uniform":
        what = f"uniform W{spec.bits}A{spec.bits} baseline"
    elif "policy" in spec.budget:
        what = f"policy given in {spec.budget['policy']}"
    else:
        what = f"mixed-precision policy searched for budget {spec.policy_label}"
    how = (f"scored with the joint model ({ONE_SHOT})" if cfg.finetune.epochs == 0
           else f"fine-tuned for {cfg.finetune.epochs} epochs (seed {cfg.seed + spec.seed})")
    return f"{cfg.model.arch} at the {what}, {how}. Model registered as {registered_model_name(cfg)}."


def _score_one_shot(inputs: SweepInputs, label: str, policy: Policy) -> dict[str, float]:
    """The joint model's validation metrics at `policy` (docs/method.md §9), on this trial's CPUs: the same
    scoring as `limpq evaluate`."""
    [row] = score_joint_weights_here(inputs.context, inputs.joint_weights, [(label, policy.assignment())],
                                     inputs.context.cfg.finetune.bn_recalibration_batches)
    return {"val_top1": row["top1"], "val_loss": row["loss"], "val_samples": float(row["samples"])}


def sweep_trial(config: dict[str, Any], inputs: SweepInputs) -> None:
    """One Tune trial: the policy of its budget, fine-tuned (or scored with the joint model), recorded
    in a nested run whose model becomes a registered version."""
    cfg, tracker, sweep_key = inputs.context.cfg, inputs.context.tracker, inputs.context.keys.sweep
    spec = TrialSpec(**config["trial"])
    done = tracker.find_finished_stage_run(cfg, "trial", sweep_key, run_name=spec.label,
                                           parent_run_id=inputs.sweep_run_id)
    if done is not None:
        tune.report({**tracker.run_metrics(done), "resumed_from_mlflow": 1.0})
        return
    run = inputs.context.open_stage("trial", sweep_key, parent_run_id=inputs.sweep_run_id, run_name=spec.label,
                                description=_description(cfg, spec),
                                tags={"limpq.kind": spec.kind, "limpq.budget": spec.label,
                                      "limpq.policy_label": spec.policy_label,
                                      "limpq.finetune_seed": str(cfg.seed + spec.seed),
                                      "limpq.node": socket.gethostname(),
                                      "limpq.ray_node_id": ray.get_runtime_context().get_node_id()})
    try:
        policy = trial_policy(inputs, spec)
    except UserError as error:
        # deterministic (an infeasible budget): recorded as this trial's failure, not retried
        tracker.finish(run.run_id, "FAILED", f"{type(error).__name__}: {error}")
        tune.report({"failed": 1.0})
        return
    with run:
        bits = policy.assignment()
        tracker.log_dict(run.run_id, policy.to_dict(), "policy.json")
        tracker.log_params(run.run_id, {"trial.kind": spec.kind, "trial.budget": spec.label,
                                        "trial.evaluation": evaluation_kind(cfg)})
        tracker.log_metrics(run.run_id, _policy_metrics(policy), step=0)
        if cfg.finetune.epochs == 0:
            metrics = {**_policy_metrics(policy), **_score_one_shot(inputs, spec.label, policy), "epoch": 0.0}
            tracker.log_metrics(run.run_id, metrics, step=0)
            model = joint_model_at_policy(inputs.context, inputs.joint_weights, bits, cfg.finetune.bn_recalibration_batches)
        else:
            log_dataset_inputs(cfg, inputs.context.dataset, tracker, run.run_id, "finetune")
            finetune_inputs = StageInputs(fp_weights=inputs.fp_weights, joint_weights=inputs.joint_weights, policy=bits,
                                          report_extra=_policy_metrics(policy))
            seeded = cfg.model_copy(update={"seed": cfg.seed + spec.seed})
            state, metrics = train_on_ray(seeded, inputs.context.dataset, "finetune", tracker, run.run_id,
                                          finetune_inputs, label=spec.label)
            model = finetune_model(cfg.model, cfg.indicators.bits, inputs.fp_weights, bits)
            restore_model(model, state, f"fine-tuned checkpoint of trial {spec.label}")
        _log_trial_outputs(inputs, spec, run.run_id, model, policy, metrics)
        tune.report(metrics)


def _log_trial_outputs(inputs: SweepInputs, spec: TrialSpec, run_id: str, model: torch.nn.Module,
                       policy: Policy, metrics: dict[str, float]) -> None:
    """Checkpoint and bits chart as artifacts; the model (the one the trial's top-1 belongs to: fine-tuned,
    or the joint model at the policy) as deployed (`quant.deployed.deploy`: what its fast ONNX form computes) as
    an MLflow model and a version of the pipeline's registered model, then its ONNX export as a version of
    `<name>-<arch>-onnx` (each once per trial run, also when a retry gets here). The checkpoint holds the
    model as trained; `deployed_top1` on the run is the registered model's val top-1."""
    cfg, tracker = inputs.context.cfg, inputs.context.tracker
    document = policy.to_dict()
    checkpoint_name = "finetuned.pt" if cfg.finetune.epochs else "joint-at-policy.pt"
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = save_checkpoint(Path(directory) / checkpoint_name, model,
                                     meta={**fp_meta(cfg.model), "policy": document})
        chart = Path(directory) / "bits.png"
        policy_bits_chart([layer.name for layer in policy.layers], policy.weight_bits, policy.act_bits, chart,
                          title=f"{cfg.model.arch} {spec.label}")
        for path, folder in ((checkpoint, "checkpoint"), (chart, "plots")):
            tracker.log_artifact(run_id, path, folder)
    record = ModelRecord(
        name=registered_model_name(cfg), aliases=(budget_alias(spec.label),), step=int(metrics.get("epoch", 0)),
        tags={"budget": spec.label, "kind": spec.kind, "evaluation": evaluation_kind(cfg),
              "top1": f"{metrics.get('val_top1', float('nan')):.4f}",
              **{key: f"{value:.6g}" for key, value in _policy_metrics(policy).items()}})
    example = example_input(cfg)
    with tempfile.TemporaryDirectory() as directory:
        deployment = deploy_trial_model(tracker, run_id, model, example, Path(directory))
        if not tracker.model_versions(record.name, run_id):
            uri = log_model(tracker, run_id, deployment.model if deployment else model, example, name="model",
                            step=record.step, tags={"limpq.budget": spec.label, "limpq.kind": spec.kind})
            register_model(tracker, record.name, uri, run_id, record.tags, record.aliases)
        if deployment is not None:
            log_trial_onnx(tracker, run_id, deployment, example, val_batches(cfg, inputs.context.dataset), record)
