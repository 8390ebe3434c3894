"""docs/configuration.md, generated from the policy models (the source of config/schema.json).

``gateway schema --markdown`` prints it. One section per YAML mapping, in the order the models
declare their fields, each a table of the mapping's keys: type, default, allowed range, what
the key does (its ``Field(description=...)``) and an example value. Examples come from the
example policies (config/example.yaml, config/example-full.yaml) when they set the key, else
from the default, else from the type. tests/test_config_doc.py fails when a key has no
description or the committed file differs from what this module prints.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .model import GatewayConfig

EXAMPLES = ("config/example.yaml", "config/example-full.yaml")
REGENERATE = ".venv/bin/gateway schema --markdown > docs/configuration.md"
NAME = "<name>"  # a key of the operator's choosing (a tenant, a provider, a model...)


@dataclass(frozen=True, slots=True)
class Option:
    """One key of one section."""

    path: tuple[str, ...]
    field: FieldInfo
    default: Any  # PydanticUndefined when required
    nested: type[BaseModel] | None  # the model of a sub-section, if the key holds one


@dataclass(frozen=True, slots=True)
class Section:
    path: tuple[str, ...]
    model: type[BaseModel]
    options: list[Option]


def sections(root: type[BaseModel] = GatewayConfig) -> list[Section]:
    """Every mapping of the policy file, depth first in declaration order."""
    out: list[Section] = []
    _walk(root, (), None, out)
    return out


def _walk(model: type[BaseModel], path: tuple[str, ...], instance: Any,
          out: list[Section]) -> None:
    section = Section(path, model, [])
    out.append(section)
    later: list[tuple[type[BaseModel], tuple[str, ...], Any]] = []
    for name, field in model.model_fields.items():
        default = _default(field, instance, name)
        nested, suffix = _nested_model(field.annotation)
        section.options.append(Option((*path, name), field, default, nested))
        if nested is not None:
            sub_instance = default if isinstance(default, BaseModel) else None
            later.append((nested, (*path, name, *suffix), sub_instance))
    for nested, sub_path, sub_instance in later:
        _walk(nested, sub_path, sub_instance, out)


def _default(field: FieldInfo, instance: Any, name: str) -> Any:
    if instance is not None:
        return getattr(instance, name)
    return field.default


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, tuple[str, ...]]:
    """The model a key holds (directly, optional, in a dict or a list) and the path suffix."""
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, ()
        origin = typing.get_origin(arg)
        args = typing.get_args(arg)
        if origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            return args[1], (NAME,)
        if origin is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], ("[]",)
    return None, ()


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


# --- rendering ------------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    """The YAML-facing type: ``integer``, ``one of: a, b``, ``map of name to tenant``..."""
    parts = [_type_part(a) for a in _union_args(annotation) if a is not type(None)]
    text = " or ".join(parts)
    return f"{text} or null" if type(None) in _union_args(annotation) else text


def _type_part(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_part(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of: " + ", ".join(str(v) for v in typing.get_args(tp))
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"map of {_type_part(key)} to {_type_part(value)}"
    if origin is list:
        return f"list of {_type_part(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def constraints(field: FieldInfo) -> str:
    """``>= 1``, ``> 0, <= 1``, ``at least 1 entry``; empty when unconstrained."""
    found: list[str] = []
    for item in _metadata(field.metadata, field.annotation):
        if isinstance(item, at.Ge):
            found.append(f">= {_num(item.ge)}")
        elif isinstance(item, at.Gt):
            found.append(f"> {_num(item.gt)}")
        elif isinstance(item, at.Le):
            found.append(f"<= {_num(item.le)}")
        elif isinstance(item, at.Lt):
            found.append(f"< {_num(item.lt)}")
        elif isinstance(item, at.MinLen):
            found.append(f"at least {item.min_length} entr{'y' if item.min_length == 1 else 'ies'}")
    return ", ".join(dict.fromkeys(found))


def _metadata(metadata: Sequence[Any], annotation: Any) -> Iterator[Any]:
    yield from metadata
    for arg in _union_args(annotation):
        if typing.get_origin(arg) is typing.Annotated:
            for extra in typing.get_args(arg)[1:]:
                yield from extra.metadata if isinstance(extra, FieldInfo) else (extra,)


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def value_text(value: Any) -> str:
    """A value as it would be written in YAML (flow style, one line)."""
    if isinstance(value, BaseModel):
        return "(section below)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else str(value)
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "-_./:*@" for c in value) and value not in (
            "yes", "no", "on", "off", "true", "false", "null")
        return value if plain else json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def _lookup(documents: Sequence[Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """The value at ``path`` in the first example policy that sets it (``<name>``: any key,
    ``[]``: any entry), null values skipped."""
    for doc in documents:
        found, value = _find(doc, path)
        if found:
            return True, value
    return False, None


def _find(node: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    """A value at ``path`` that is not null (an explicit null shows nothing worth copying)."""
    if not path:
        return node is not None, node
    head, rest = path[0], path[1:]
    if head == NAME and isinstance(node, Mapping):
        for child in node.values():
            found, value = _find(child, rest)
            if found:
                return True, value
        return False, None
    if head == "[]" and isinstance(node, list):
        for child in node:
            found, value = _find(child, rest)
            if found:
                return True, value
        return False, None
    if isinstance(node, Mapping) and head in node:
        return _find(node[head], rest)
    return False, None


def _example(option: Option, documents: Sequence[Any]) -> str:
    if option.nested is not None:
        return "(section below)"
    found, value = _lookup(documents, option.path)
    if found and not isinstance(value, (dict, list)) or found and value:
        return value_text(value)
    default = option.default
    if default is not PydanticUndefined and default not in (None, {}, []):
        return value_text(default)
    return _made_up(option.field)


def _made_up(field: FieldInfo) -> str:
    """An example from the type and range alone, for keys no example policy sets and without
    a default: above the lower bound, within the upper one."""
    low, high = 0.0, float("inf")
    for item in _metadata(field.metadata, field.annotation):
        bound: Any = getattr(item, type(item).__name__.lower(), None)  # Ge.ge, Lt.lt, ...
        if isinstance(item, (at.Ge, at.Gt)):
            low = max(low, float(bound))
        elif isinstance(item, (at.Le, at.Lt)):
            high = min(high, float(bound))
    number = min(max(2 * low, 1.0), high)
    for arg in _union_args(field.annotation):
        origin = typing.get_origin(arg)
        if origin is typing.Annotated:
            arg = typing.get_args(arg)[0]
            origin = typing.get_origin(arg)
        if origin is Literal:
            return value_text(typing.get_args(arg)[0])
        if arg is bool:
            return "true"
        if arg is int:
            return value_text(int(number))
        if arg is float:
            return value_text(number)
        if arg is str:
            return "..."
        if origin is list:
            return "[...]"
        if origin is dict:
            return "{...}"
    return "..."


def _description(option: Option) -> str:
    text = option.field.description
    if not text and option.nested is not None:
        text = (option.nested.__doc__ or "").strip().split("\n\n")[0]
    text = " ".join((text or "").split()).replace("|", "\\|")
    # <hex>, <name>: HTML to a Markdown renderer, except inside `code`
    parts = text.split("`")
    parts[::2] = [p.replace("<", "&lt;").replace(">", "&gt;") for p in parts[::2]]
    return "`".join(parts)


def missing_descriptions(root: type[BaseModel] = GatewayConfig) -> list[str]:
    """Keys with no description (a key holding a section may use its model's docstring)."""
    return [".".join(o.path) for s in sections(root) for o in s.options if not _description(o)]


def example_documents(root: Path | None = None) -> list[Any]:
    """The example policies under ``root`` (default: the repository this package is in, an
    editable install, else the current directory), loaded; missing ones skipped."""
    if root is None:
        beside = Path(__file__).resolve().parent.parent.parent
        root = beside if (beside / EXAMPLES[0]).exists() else Path()
    docs = []
    for name in EXAMPLES:
        path = root / name
        if path.exists():
            docs.append(yaml.safe_load(path.read_text(encoding="utf-8")))
    return docs


def render(documents: Sequence[Any] = ()) -> str:
    """The whole of docs/configuration.md; ``documents``: the example policies, loaded."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the policy models (gateway/config/), the",
        "     same source as config/schema.json. Do not edit by hand: change a Field's",
        f"     description and run, from the repository root:  {REGENERATE}  -->",
        "",
        "Every key of the policy file (`gateway serve --config FILE`), grouped as the YAML is.",
        "Every key is optional unless its default says *required*; unknown keys are errors.",
        "`<name>` stands for a name you choose (a provider, a model, a tenant); `[]` for an",
        "entry of a list. Examples are taken from `config/example.yaml` and",
        "`config/example-full.yaml` where those set the key. Check a file with",
        "`gateway check-config FILE`; `gateway schema` prints the same as a JSON Schema for",
        "editors (config/schema.json).",
        "",
        f"Regenerate this file after changing a model: `{REGENERATE}`.",
        "",
    ]
    all_sections = sections()
    lines.append("## Contents")
    lines.append("")
    for section in all_sections:
        title = _title(section.path)
        indent = "  " * max(0, _depth(section.path) - 1)
        lines.append(f"{indent}- [{title}](#{_anchor(title)})")
    lines.append("")
    for section in all_sections:
        title = _title(section.path)
        lines.append(f"{'##' if _depth(section.path) <= 1 else '###'} {title}")
        lines.append("")
        doc = " ".join((section.model.__doc__ or "").split())
        if doc:
            lines.append(doc)
            lines.append("")
        lines.append("| key | type | default | range | what it does | example |")
        lines.append("|---|---|---|---|---|---|")
        for option in section.options:
            default = ("*required*" if option.default is PydanticUndefined
                       else value_text(option.default))
            if option.nested is not None and isinstance(option.default, BaseModel):
                default = f"[section](#{_anchor(_title(option.path))})"
            lines.append(
                f"| `{option.path[-1]}` | {type_name(option.field.annotation)} | {default} | "
                f"{constraints(option.field)} | {_description(option)} | "
                f"`{_example(option, documents)}` |"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _title(path: tuple[str, ...]) -> str:
    return f"`{_dotted(path)}`" if path else "top level"


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path).replace(".[]", "[]")


def _depth(path: tuple[str, ...]) -> int:
    """Nesting as the reader sees it: ``tenants.<name>.limits`` is two levels down."""
    return sum(1 for part in path if part not in (NAME, "[]"))


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to -, most punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")
