#!/usr/bin/env bash
# The Fashion-MNIST study of docs/results.md, end to end through the product (about 75 minutes on 2 idle cores).
# Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist). Usage:
#   experiments/fashion_mnist.sh WORK_DIR
set -euo pipefail
work=${1:?usage: experiments/fashion_mnist.sh WORK_DIR}
bin=${LIMPQ_BIN:-.venv/bin}
src=/usr/share/datasets/fashion-mnist
mkdir -p "$work"
[ -d "$work/fmnist" ] || "$bin/limpq" data from-idx "$src" "$work/fmnist" --limit-train 3000 --limit-val 2000 --seed 0 \
  --classes t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle-boot
"$bin/python" experiments/fashion_mnist.py prepare --work "$work"
# one FP model and one joint indicator training (the three configs share their stage keys)
"$bin/limpq" run --config "$work/limpq.yaml"     # LIMPQ policies + uniform W3A3 and W4A4, 3 fine-tuning seeds
"$bin/limpq" run --config "$work/hessian.yaml"   # Hessian-trace policies, same budgets, 2 fine-tuning seeds
"$bin/limpq" run --config "$work/random.yaml"    # random policies of equal BitOps, fine-tuned once each
"$bin/python" experiments/fashion_mnist.py policies --work "$work"
"$bin/limpq" evaluate --config "$work/limpq.yaml" --json --uniform 2 3 4 \
  --policy "$work"/policies/searched/*.json $(cat "$work/policies/one_shot_random.txt") > "$work/oneshot.json"
"$bin/python" experiments/fashion_mnist.py report --work "$work" --out docs
