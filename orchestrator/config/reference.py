"""The configuration reference in Markdown, generated from the pydantic schema in orchestrator.config.schema:
one table per section (key, type, default, description), so the documentation cannot drift from
the code. `update_markdown` rewrites the part of a file between the reference markers.

Layer-neutral: pydantic only.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from orchestrator.config.schema import PipelineConfig
from orchestrator.common.errors import UserError

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"
_BOUND_SYMBOLS = ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="), (Lt, "lt", "<"))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds directly or as list items, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _model_in(item)
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(json.dumps(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _bounds(field: FieldInfo) -> str:
    parts = []
    for constraint in field.metadata:
        for kind, attribute, symbol in _BOUND_SYMBOLS:
            if isinstance(constraint, kind):
                parts.append(f"{symbol} {getattr(constraint, attribute)}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """Rows for the model's plain keys, and the (path, model) of its nested sections."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        sub_model = _model_in(field.annotation)
        if sub_model is not None and typing.get_origin(field.annotation) is not list:
            nested.append((f"{prefix}{name}", sub_model))
            continue
        type_text = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            type_text += f" ({bounds})"
        description = field.description or ""
        if sub_model is not None:
            nested.append((f"{prefix}{name}[]", sub_model))
            description = (description + " " if description else "") + f"Items: see `{prefix}{name}[]`."
        rows.append(f"| `{prefix}{name}` | {_cell(type_text)} | {_cell(_default(field))} | {_cell(description)} |")
    return rows, nested


def _own_doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _render_section(model: type[BaseModel], path: str, lines: list[str]) -> None:
    lines += [f"### {'`' + path + '`' if path else 'Top level'}", ""]
    if path and _own_doc(model):
        lines += [_own_doc(model), ""]
    rows, nested = _table(model, f"{path}." if path else "")
    lines += [*rows, ""]
    for sub_path, sub_model in nested:
        _render_section(sub_model, sub_path, lines)


def render_reference(root: type[BaseModel] = PipelineConfig) -> str:
    """Markdown tables for `root`'s top-level keys, then each section (and its sub-sections) in
    schema order."""
    lines: list[str] = []
    _render_section(root, "", lines)
    return "\n".join(lines).rstrip() + "\n"


def _split(text: str, source: str) -> tuple[str, str]:
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise UserError(f"{source}: needs the markers {START_MARKER} and {END_MARKER} (in that order)")
    return text[: start + len(START_MARKER)], text[end:]


def current_reference(path: str | Path) -> str:
    """The text between the markers of a Markdown file, without the blank lines around it."""
    text = Path(path).read_text()
    head, tail = _split(text, str(path))
    return text[len(head) : len(text) - len(tail)].strip("\n") + "\n"


def update_markdown(path: str | Path, reference: str | None = None) -> bool:
    """Put the generated reference between the markers of a Markdown file; True when it changed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text()
    head, tail = _split(text, str(path))
    updated = f"{head}\n\n{(reference or render_reference()).strip()}\n\n{tail}"
    if updated == text:
        return False
    path.write_text(updated)
    return True
