"""`limpq export`: a registered (or logged) PyTorch model as ONNX with per-layer QDQ at its own bits."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from orchestrator.common.errors import UserError
from orchestrator.common.fileio import writable_file


# a fixed batch is traced, exported and checked at that size in this process: beyond this it may not fit
# in memory, and a dynamic batch serves any size
MAX_BATCH = 1024


def _batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    if value.isdigit() and 0 < int(value) <= MAX_BATCH:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'dynamic' or an integer from 1 to {MAX_BATCH}, got {value!r} (a "
                                     "dynamic batch serves any size)")


def _replaceable(out: Path, given: str) -> None:
    """`out` is new, or an ONNX file (which the export replaces): never another file's bytes."""
    import onnx  # here, not at the top: the CLI starts without onnx

    if not out.is_file():
        return
    try:
        proto = onnx.load_model(out, load_external_data=False)
        is_onnx = proto.ir_version > 0 and len(proto.graph.node) > 0
    except Exception:  # protobuf's DecodeError, or bytes onnx cannot read at all: either way not ONNX
        is_onnx = False
    if not is_onnx:
        raise UserError(f"--out {given}: exists and is not an ONNX file; limpq export replaces only an ONNX file: "
                        "give a new path")


def _export(args: argparse.Namespace) -> int:
    from orchestrator.tracking.onnx_models import (
        MEGABYTE,
        export_logged_model,
        resolve_source,
        tracking_uri_for_export,
    )
    from orchestrator.quant.onnx_export import MIN_OPSET, check_opset

    out = writable_file(args.out, "--out")
    _replaceable(out, args.out)
    opset = MIN_OPSET if args.opset is None else args.opset
    check_opset(opset)
    tracking_uri = tracking_uri_for_export(args.tracking_uri)
    source = resolve_source(tracking_uri, args.model_uri, args.run_id)
    result = export_logged_model(tracking_uri, source, out, opset, args.batch, args.form)
    export = result.export
    size_mb = export.size_bytes / MEGABYTE
    print(f"wrote {out} ({args.form} form, opset {opset}, batch {args.batch or 'dynamic'}, input "
          f"{list(source.input_shape)}) from {source.uri}")
    added = [change.output_of for change in export.changes if change.output_of]
    for kind, label in (("weight", "weights"), ("act", "activations"), ("output", "outputs")):
        counts = Counter(f"{q.bits}-bit as {q.onnx_type}" for q in export.quantized if q.kind == kind)
        if kind == "output":  # the fast form's, which a registered (deployed) model holds itself
            counts.subtract({"8-bit as UINT8": len(added)})
            if not +counts:
                continue
        print(f"  quantized {label}: " + (", ".join(f"{n} x {what}" for what, n in sorted((+counts).items()))
                                           or "none"))
    if added:
        print(f"  added at export (the PyTorch model has none): {len(added)} x 8-bit output as UINT8, where a "
              f"convolution's output reaches no quantizer: after {', '.join(added)}")
    policy = f"; the policy's size_mb {result.policy_size_mb:.3f} MB" if result.policy_size_mb is not None else ""
    print(f"  size: {size_mb:.3f} MB; FP32 export of the same model {result.fp32_bytes / MEGABYTE:.3f} MB "
          f"({result.fp32_bytes / export.size_bytes:.2f}x larger){policy}")
    print(f"  {result.kernels.summary()}")
    check = result.random_check
    print(f"  ONNX Runtime vs PyTorch on {check.samples} random N(0, 1) inputs: largest logit difference "
          f"{check.max_logit_diff:.3g}, same top-1 class on {round(check.agreement * check.samples)}/{check.samples}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a registered model as ONNX (QDQ at its searched bits)",
        description="Export a PyTorch model that the pipeline logged (a registered version, e.g. "
                    "models:/<name>-<arch>@best-top1, or a run's newest logged PyTorch model) as ONNX in QDQ form: "
                    "each quantized weight's integer codes read by DequantizeLinear, each quantized activation "
                    "QuantizeLinear -> DequantizeLinear at its own bits, the rest in float (--form says how). "
                    "Prints the file's size next to an FP32 export of the same model.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", metavar="URI", help="an MLflow model URI, e.g. models:/demo-resnet18@best-top1")
    source.add_argument("--run-id", metavar="RUN", help="an MLflow run id: its newest logged PyTorch model")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument("--form", choices=("fast", "compact", "integer"), default="fast",
                        help="fast (default, what the registry holds): QLinearConv/QGemm on ONNX Runtime's integer "
                        "kernels, the fastest on its CPU; compact: the smallest file (INT4 packed), run in float; "
                        "integer: ConvInteger, slower than float on x86 CPUs (README, Deploy)")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset: 21 (the first with INT4; default) to 23")
    parser.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                        help="the batch dimension: dynamic (default) or a fixed size up to 1024")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="the MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.set_defaults(func=_export)
