"""Every classification model of the installed torchvision through the pipeline, one model at a time.

Per model, at the smallest input among 32, 64, 96, 128, 160, 192 and 224 pixels that its forward pass
accepts (10 classes, random initialisation, nothing downloaded):
- `total_macs` of `limpq model info` against torch.utils.flop_counter (FLOPs / 2) on the model as
  torchvision builds it (before any module swap; with torch's attention formula also registered for
  the CPU attention kernel, which torch leaves uncounted), goal within 2%;
- the quantized share of those MACs (searchable and fixed layers, and attention products tied to a
  layer's activation bits), goal >= 95%;
- one joint-training step, one search and one fine-tuning step (orchestrator.models.check, batch 4,
  bits 4 and 2, a uniform W3A3 BitOps budget).
A model is supported when every column holds.

Each model runs in its own process (its memory is returned; one killed for time or memory is a row
with that reason). One line per model as it finishes, then the table, then the summary line last.

    nice -n 10 python benchmarks/model_zoo.py                     # all of them (about 80)
    python benchmarks/model_zoo.py --models resnet18 swin_t       # some
    python benchmarks/model_zoo.py --markdown zoo.md --jsonl zoo.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = (32, 64, 96, 128, 160, 192, 224)
NUM_CLASSES = 10
MAX_GAP = 0.02
MIN_SHARE = 0.95
MEMORY_LIMIT = 18 * 2**30  # address space of one model's process: a failure there, not the machine's OOM killer


def smallest_input(arch: str, builder_kwargs: dict) -> tuple[int, object]:
    """The smallest size in SIZES at which the model's forward runs at batch 1, and the model."""
    import torch
    from torchvision import models

    model = models.get_model(arch, num_classes=NUM_CLASSES, **builder_kwargs).eval()
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size, model
        except Exception:  # this size is too small for the model: try the next
            continue
    raise RuntimeError(f"runs at none of {SIZES}")


def measure(arch: str) -> dict:
    """One model's row (runs in the child process)."""
    from orchestrator.models.check import check_model_stages, stage_check_config
    from orchestrator.models.info import TORCHVISION_DEFAULTS, flop_counter_macs

    started = time.perf_counter()
    size, original = smallest_input(arch, TORCHVISION_DEFAULTS.get(arch, {}))
    params = sum(p.numel() for p in original.parameters())
    reference = flop_counter_macs(original, size)
    del original
    check = check_model_stages(stage_check_config(arch, size, NUM_CLASSES))
    row = {"model": arch, "input_size": size, "params": params, "flop_counter_macs": reference,
           **check.to_dict(), "seconds_total": time.perf_counter() - started}
    if check.total_macs is not None and reference:
        row["gap"] = (check.total_macs - reference) / reference
    return row


def _child(arch: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        row = measure(arch)
    except MemoryError:
        row = {"model": arch, "failed": "memory", "error": f"more than {MEMORY_LIMIT / 2**30:.0f} GiB"}
    except Exception as error:  # reported as the row's reason
        row = {"model": arch, "failed": "build", "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    print("ROW " + json.dumps(row), flush=True)


def run_one(arch: str, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, __file__, "--child", arch], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": arch, "failed": "timeout", "error": f"longer than {timeout:.0f} s"}
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if not rows:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return {"model": arch, "failed": "crashed", "error": reason[:200],
                "seconds_total": time.perf_counter() - started}
    return json.loads(rows[-1])


def supported(row: dict) -> bool:
    return (row.get("failed") is None and abs(row.get("gap", 1.0)) <= MAX_GAP
            and (row.get("quantized_share") or 0.0) >= MIN_SHARE)


def reason(row: dict) -> str:
    if row.get("failed"):
        return f"{row['failed']}: {row.get('error', '')}"
    problems = []
    if abs(row.get("gap", 1.0)) > MAX_GAP:
        problems.append(f"MACs {100 * row['gap']:+.2f}% from flop_counter")
    if (row.get("quantized_share") or 0.0) < MIN_SHARE:
        problems.append(f"only {100 * row['quantized_share']:.1f}% quantized")
    return "; ".join(problems)


def _stage(row: dict, stage: str) -> str:
    if stage in (row.get("passed") or []):
        return "ok"
    return "FAILED" if row.get("failed") == stage else "-"


def _cell(value, text: str) -> str:
    return "-" if value is None else text


def markdown(rows: list[dict]) -> str:
    header = ("| model | input | params (M) | MACs (G) | flop_counter (G) | gap | quantized | joint step | search "
              "| fine-tune step | time (s) | supported |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|:---:|:---:|:---:|---:|---|"]
    for row in rows:
        params, macs, reference = row.get("params"), row.get("total_macs"), row.get("flop_counter_macs")
        gap, share = row.get("gap"), row.get("quantized_share")
        cells = [row["model"], _cell(row.get("input_size"), str(row.get("input_size"))),
                 _cell(params, f"{(params or 0) / 1e6:.1f}"), _cell(macs, f"{(macs or 0) / 1e9:.3f}"),
                 _cell(reference, f"{(reference or 0) / 1e9:.3f}"), _cell(gap, f"{100 * (gap or 0):+.2f}%"),
                 _cell(share, f"{100 * (share or 0):.2f}%"),
                 *(_stage(row, stage) for stage in ("joint_step", "search", "finetune_step")),
                 f"{row.get('seconds_total', 0):.0f}", "yes" if supported(row) else f"no: {reason(row)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="torchvision names (default: every classification model)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (1800)")
    parser.add_argument("--jsonl", help="append each row here as JSON")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0
    from torchvision import models

    names = args.models or sorted(models.list_models(module=models))
    rows = []
    started = time.perf_counter()
    for name in names:
        row = run_one(name, args.timeout)
        rows.append(row)
        print(f"{name}: {'supported' if supported(row) else 'NOT supported: ' + reason(row)} "
              f"({row.get('seconds_total', 0):.0f} s)", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    table = markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    count = sum(supported(row) for row in rows)
    print(f"supported: {count} of {len(rows)} torchvision classifiers ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
