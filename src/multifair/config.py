"""Config resolution: defaults -> YAML file -> command-line `key=value` overrides.

Pydantic models (with ``extra="forbid"``) validate the result; validation errors become one
`UserError` line naming the key. The resolved config is written to every run directory.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from multifair.errors import UserError

M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        # one line: where and what, not PyYAML's multi-line excerpt
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where} not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["train.lr=3e-5", "method.name=erm"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            # YAML 1.1 reads "3e-5" (no dot) as a string; users mean a number.
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def validate(model: type[M], data: Mapping[str, Any], source: str = "config") -> M:
    """Validate `data` against a pydantic model; errors name the dotted key and the bad value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # an unknown key first: a misspelt key is usually the cause of the other errors too
        first = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key" + _closest(model, first["loc"])
        bad = first.get("input")
        shown = "" if first["type"] == "missing" else f" (got {bad!r})"
        more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
        raise UserError(f"{source}: {where}: {msg}{shown}{more}") from None


def _closest(model: type[BaseModel], loc: Sequence[Any]) -> str:
    """'; did you mean 'epochs'?' for a misspelt key, or the valid keys when none is close."""
    valid = _keys_at(model, loc[:-1])
    if not valid:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (valid keys: {', '.join(sorted(valid))})"


def _keys_at(model: Any, path: Sequence[Any]) -> list[str]:
    """The field names of the (nested) pydantic model at `path`; [] where it is not a model."""
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        model = _model_of(fields[part].annotation)
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _model_of(annotation: Any) -> Any:
    """`X`, `X | None`, `Optional[X]` -> X when X is a pydantic model; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if _model_of(a) is not None]
        return models[0] if len(models) == 1 else None
    return None


def resolve(
    model: type[M],
    defaults: Mapping[str, Any] | None = None,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> M:
    data: dict[str, Any] = dict(defaults or {})
    source = "config"
    if path is not None:
        data = deep_merge(data, load_yaml(path))
        source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return validate(model, data, source)
