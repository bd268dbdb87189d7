"""`limpq config`: validate a pipeline YAML; print or update the generated configuration reference."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.run import add_config_arguments, load_config_from_args
from orchestrator.config.reference import (
    current_reference,
    render_reference,
    update_markdown,
)
from orchestrator.config.schema import ModelConfig
from orchestrator.search.costs import CostTable, float_ops_text
from orchestrator.checks.stage_keys import stage_keys


def _validate(args: argparse.Namespace) -> int:
    """The same checks as the start of `limpq run` (schema and preflight), without Ray or MLflow."""
    checked = load_config_from_args(args, args.file)
    if checked.dataset is None:
        print(f"{args.file}: OK (the digits demo is built at {checked.config.data.path} when the run starts; stage "
              "keys follow from its files)")
    else:
        keys = stage_keys(checked.config, checked.dataset.fingerprint)
        print(f"{args.file}: OK (stage keys fp {keys.fp}, indicators {keys.indicators}, sweep {keys.sweep})")
    _print_quantized_share(checked.config.model, checked.costs)
    return 0


WARN_QUANTIZED_SHARE = 0.95


def _print_quantized_share(model: ModelConfig, costs: CostTable) -> None:
    """How much of the model the bit budgets describe; below 95% a warning naming the float multiplies
    (below model.min_quantized_share the preflight has already refused the config)."""
    total = costs.total_macs or 1
    print(f"quantized share: {100 * costs.quantized_share:.2f}% of {costs.total_macs / 1e9:.4g} G MACs at "
          f"{model.input_size}x{model.input_size} (searchable {100 * costs.searchable_macs / total:.2f}%, "
          f"fixed {100 * costs.fixed_macs / total:.2f}%, float {100 * costs.float_macs / total:.2f}%)")
    if costs.quantized_share < WARN_QUANTIZED_SHARE:
        print(f"warning: {100 * costs.float_macs / total:.1f}% of the MACs stay in float (counted at 32x32 bits in "
              f"bitops_g_total, outside the search): {float_ops_text(costs)}", file=sys.stderr)


def _reference(args: argparse.Namespace) -> int:
    reference = render_reference()
    if args.check:
        if current_reference(args.check) != reference:
            print(f"{args.check}: configuration reference is out of date; run: limpq config reference --update {args.check}")
            return 1
        print(f"{args.check}: configuration reference is up to date")
        return 0
    if args.update:
        changed = update_markdown(args.update, reference)
        print(f"{args.update}: configuration reference {'updated' if changed else 'already up to date'}")
        return 0
    print(reference, end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("config", help="pipeline config: validate a file, configuration reference")
    commands = group.add_subparsers(dest="config_command", required=True)

    validate = commands.add_parser("validate", help="check a pipeline YAML; prints OK or the one-line error (exit 2)")
    validate.add_argument("file", help="pipeline config YAML")
    add_config_arguments(validate, config_flag=False)
    validate.set_defaults(func=_validate)

    reference = commands.add_parser("reference", help="Markdown reference of every config key, from the schema")
    target = reference.add_mutually_exclusive_group()
    target.add_argument("--update", metavar="FILE",
                        help="write it between <!-- config-reference:start/end --> markers in FILE (e.g. README.md)")
    target.add_argument("--check", metavar="FILE", help="exit 1 when FILE's copy differs from the schema")
    reference.set_defaults(func=_reference)
