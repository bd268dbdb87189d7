"""Reading a pipeline YAML into a `PipelineConfig`: strict YAML (UTF-8, no key given twice), `--set`
overrides by dotted key, and validation errors as one line naming the file (or `--set`) and the key.

Layer-neutral: pydantic and yaml only.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.schema import MAX_BUDGETS, MOVED_KEYS, PipelineConfig
from orchestrator.common.errors import ConfigError, UserError
from orchestrator.common.fileio import readable_file

# A config of MAX_BUDGETS budgets in block style is well under this; parsing YAML takes seconds per MiB.
MAX_CONFIG_BYTES = 2 * 2**20


def _format_error(source: str, error: ValidationError, overridden: tuple[str, ...] = ()) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    if any(location == key or location.startswith(f"{key}.") for key in overridden):
        source = "--set"  # the value came from the command line, not the file
    where = f"{source}: {location}" if location else source
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def _refuse_moved_keys(raw: dict[str, Any], source: str, overridden: tuple[str, ...]) -> None:
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            where = "--set" if old in overridden else source
            raise ConfigError(f"{where}: {old}: moved to {new}; set {new} instead")


def parse_config(raw: dict[str, Any], source: str = "config", overridden: tuple[str, ...] = ()) -> PipelineConfig:
    """Validate a raw config; errors name `source`, or `--set` for a key in `overridden`."""
    _refuse_moved_keys(raw, source, overridden)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(source, error, overridden)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: the plain
    loader keeps the last one, so a repeated section silently replaces the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.name}: line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                                  "merge the two into one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_error(where: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    line = f" line {mark.line + 1}:" if mark else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}:{line} not valid YAML: {problem}"


def _load_yaml(text: str, name: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error(name, error)) from None
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file as a dict: UTF-8, valid YAML, a mapping at the top, no key given twice."""
    try:
        path = readable_file(path, "config file")
    except UserError as error:
        raise ConfigError(str(error)) from None
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size / 2**20:.1f} MiB, above the limit of {MAX_CONFIG_BYTES // 2**20} MiB for a "
                          f"config file (search.budgets holds at most {MAX_BUDGETS:,}); is this the config file? "
                          "split its budgets over several configs")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                          "save the file as UTF-8") from None
    raw = _load_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


_LIST_INDEX = re.compile(r"\[(\d+)\]")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's `--set`), VALUE in YAML syntax, as {dotted key: value}; a list
    item is `KEY.N` or `KEY[N]`."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = _LIST_INDEX.sub(r".\1", key.strip())  # search.budgets[0].name, as errors print it, is search.budgets.0.name
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. --set indicators.epochs=1")
        try:
            overrides[key] = _load_yaml(text, f"--set {item!r}")
        except ConfigError as error:
            raise ConfigError(f"{error}; quote a string value, e.g. --set '{key}=\"{text}\"'") from None
    return overrides


def _schema_kind(model: type[BaseModel] | None, key: str) -> tuple[type[BaseModel] | None, str | None]:
    """What the schema holds under `key` of `model`: ("section" or "list" with the model of the
    section or of the list items, or "value"); an unknown key gives (None, None) and is left to the
    schema's own "unknown key" error."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return None, None
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "section"
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, "list"
    return None, "value"


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in a raw config dict in place; list items by index (search.budgets.0.name)."""
    for dotted, value in overrides.items():
        node: Any = raw
        model: type[BaseModel] | None = PipelineConfig
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            here, last = ".".join(parts[:depth]), depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {dotted}: {here} has {len(node)} item(s); index them with 0.."
                                      f"{len(node) - 1} or set the whole list: --set {here}=[...]")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {here} is a value, not a section; set it whole: --set {here}=VALUE")
            model, kind = _schema_kind(model, part)
            if last:
                node[part] = value
                continue
            if kind == "value":
                key = f"{here}.{part}" if here else part
                raise ConfigError(f"--set {dotted}: {key} is a value, not a section; set it whole: --set {key}=VALUE")
            if node.get(part) is None:
                node[part] = [] if kind == "list" else {}
            node = node[part]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML; `overrides` maps dotted keys to values (e.g. from the CLI)."""
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides or {})
    return parse_config(raw, str(path), tuple(overrides or ()))
