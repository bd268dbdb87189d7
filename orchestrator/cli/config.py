"""`limpq config`: validate a pipeline YAML; print or update the generated configuration reference."""

from __future__ import annotations

import argparse

from orchestrator.cli.pipeline import add_config_arguments, load_config_from_args
from orchestrator.config.reference import (
    current_reference,
    render_reference,
    update_markdown,
)
from orchestrator.stagekeys import stage_keys


def _validate(args: argparse.Namespace) -> int:
    """The same checks as the start of `limpq run` (schema and preflight), without Ray or MLflow."""
    checked = load_config_from_args(args, args.file)
    if checked.dataset is None:
        print(f"{args.file}: OK (the digits demo is built at {checked.config.data.path} when the run starts; stage "
              "keys follow from its files)")
        return 0
    keys = stage_keys(checked.config, checked.dataset.fingerprint)
    print(f"{args.file}: OK (stage keys fp {keys.fp}, indicators {keys.indicators}, sweep {keys.sweep})")
    return 0


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
