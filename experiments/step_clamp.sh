#!/usr/bin/env bash
# Does the step-size clamp's upper bound (clamp(s, 1e-5, 1), docs/method.md §2.1) cause the Fashion-MNIST
# study's fine-tuning collapses of policies with 2-bit activations (docs/results.md)? The study's LIMPQ
# size-W3 policy, fine-tuned over 3 seeds as the study did, and again with the bound lifted in the
# fine-tuning only (experiments/patches, LIMPQ_PATCH=lift_step_bound: STEP_MAX infinite in every process;
# FP and the indicators trained once, from the study's config, and reused from MLflow). About 30 minutes on 2 idle cores.
# Usage: experiments/step_clamp.sh WORK_DIR   (needs Debian's dataset-fashion-mnist)
set -euo pipefail
work=${1:?usage: experiments/step_clamp.sh WORK_DIR}
bin=${LIMPQ_BIN:-.venv/bin}
mkdir -p "$work"
[ -d "$work/fmnist" ] || "$bin/limpq" data from-idx /usr/share/datasets/fashion-mnist "$work/fmnist" \
  --limit-train 3000 --limit-val 2000 --seed 0 \
  --classes t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle-boot
"$bin/python" experiments/fashion_mnist.py prepare --work "$work"
"$bin/python" - "$work" <<'PY'
import sys, yaml
from pathlib import Path
work = Path(sys.argv[1])
config = yaml.safe_load((work / "limpq.yaml").read_text())
[size_w3] = [b for b in config["search"]["budgets"] if b["name"] == "size-W3"]
config["finetune"]["baselines"] = []
for name in ("size-W3", "size-W3-unclamped"):  # the budget's name keys the sweep; the ILP gives the same policy
    config["search"]["budgets"] = [{**size_w3, "name": name}]
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
PY
"$bin/limpq" run --config "$work/size-W3.yaml"
LIMPQ_PATCH=lift_step_bound PYTHONPATH="$PWD/experiments/patches${PYTHONPATH:+:$PYTHONPATH}" \
  "$bin/limpq" run --config "$work/size-W3-unclamped.yaml"
