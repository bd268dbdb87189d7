"""Indicators and searched policies of the demo before and after aligning indicator training with the
reference (docs/method.md §2.1-§3: raw unclamped step sizes with clamp's gradient, full-precision fixed layers,
Nesterov, no decay on 1-D parameters, per-epoch cosine to 1e-5, conv-only random pass, zero-gradient
parameters out of the step).

Both code versions train indicators with the demo config (jobs/configs/demo.yaml) from the same FP
checkpoint, each with its own `limpq indicators train` (Ray Train on a local Ray) in a subprocess;
then this prints the Spearman
rank correlation of the two indicator sets per bit and kind, how many 2-bit activation indicators sit at
the clamp's 1.0, and how many layers the searched policy changes at each of the demo's budgets.

    git archive <commit-before> | tar -x -C /tmp/limpq-before
    python experiments/reference_alignment.py --before-src /tmp/limpq-before --fp runs/demo/fp.pt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from scipy.stats import spearmanr

from orchestrator.config.loading import load_config
from orchestrator.search.indicators import load_indicators
from orchestrator.search.costs import cost_table
from orchestrator.search.ilp import Searcher

REPO = Path(__file__).resolve().parents[1]

RUN = ("import sys; from orchestrator.cli import main; "
       "sys.exit(main(['indicators', 'train', '--config', sys.argv[1]]))")


def start(source: Path, label: str, args: argparse.Namespace) -> subprocess.Popen:
    """Indicator training of one code version in its own process (both versions run at once)."""
    raw = yaml.safe_load((REPO / "jobs/configs/demo.yaml").read_text())
    work = args.workdir / label
    raw["name"] = f"align-{label}"
    raw["output_dir"] = str(work / "runs")
    raw["data"].update(path=str(args.data), demo=True)
    raw["fp"] = {"source": "checkpoint", "checkpoint": str(args.fp)}
    if args.epochs is not None:
        raw["indicators"]["epochs"] = args.epochs
    if args.fraction is not None:
        raw["indicators"]["train_fraction"] = args.fraction
    raw["ray"]["storage_path"] = str(work / "ray")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "limpq-alignment"}
    work.mkdir(parents=True, exist_ok=True)
    config = work / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    # cwd too: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    return subprocess.Popen([sys.executable, "-c", RUN, str(config), str(args.fp)], cwd=source,
                            env={**os.environ, "PYTHONPATH": str(source)}, stdout=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, label: str, started: float) -> Path:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{label}: indicator training failed (exit {process.returncode})")
    print(f"{label}: indicators trained in {time.monotonic() - started:.0f} s", flush=True)
    return Path(output.strip().splitlines()[-1].removeprefix("indicators: "))  # the command's last line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-src", type=Path, required=True, help="source tree of the code before alignment")
    parser.add_argument("--fp", type=Path, required=True, help="FP checkpoint (resnet18, 10 classes) both start from")
    parser.add_argument("--data", type=Path, default=Path("/tmp/limpq-align/digits"), help="digits demo data (built if missing)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/limpq-align"))
    parser.add_argument("--epochs", type=int, default=None, help="indicator epochs (default: the demo's)")
    parser.add_argument("--fraction", type=float, default=None, help="indicators.train_fraction (default: the demo's)")
    args = parser.parse_args()
    started = time.monotonic()
    processes = {label: start(source, label, args) for label, source in (("before", args.before_src), ("after", REPO))}
    before, after = (load_indicators(finish(processes[label], label, started)) for label in ("before", "after"))
    print(f"{'bits':>4}  {'weight rho':>10}  {'act rho':>8}  {'act at 1.0 before/after':>24}")
    for b in before.bits:
        rho_w = spearmanr([before.weight[n][b] for n in before.layers], [after.weight[n][b] for n in before.layers]).statistic
        rho_a = spearmanr([before.act[n][b] for n in before.layers], [after.act[n][b] for n in before.layers]).statistic
        at_one = [sum(abs(ind.act[n][b] - 1.0) < 1e-9 for n in ind.layers) for ind in (before, after)]
        above = sum(after.act[n][b] > 1.0 for n in after.layers)
        print(f"{b:>4}  {rho_w:>10.3f}  {rho_a:>8.3f}  {at_one[0]:>12}/{at_one[1]} (after: {above} above 1.0)")
    cfg = load_config(args.workdir / "after" / "demo.yaml")
    costs = cost_table(cfg.model.arch, cfg.model.input_size, cfg.search.cost_model, cfg.model.fixed_layers,
                       cfg.model.num_classes)
    for budget in cfg.search.budgets:
        policies = [Searcher(ind, costs, alpha=cfg.search.alpha).solve(budget) for ind in (before, after)]
        changed = sum((x.wbits, x.abits) != (y.wbits, y.abits) for x, y in zip(policies[0].layers, policies[1].layers))
        print(f"budget {budget.label()}: {changed} of {len(costs.searchable)} layers change; "
              f"BitOps {policies[0].totals.bitops_g:.4f} -> {policies[1].totals.bitops_g:.4f} G")
    return 0


if __name__ == "__main__":
    sys.exit(main())
