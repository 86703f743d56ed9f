"""A strict, generic loader: nested mappings (parsed YAML) into typed dataclasses, and back.

Strict in the llm-foundry sense: an unknown key, a value of the wrong type or an impossible value
(a dataclass's ``validate()``) raises :class:`RecipeError` naming the dotted key, the source it came
from and what is allowed. ``key.sub=value`` overrides are parsed as YAML values. Nothing here knows
the recipe's sections (``af_train.config.schema``); only the standard library and yaml are imported.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class RecipeError(ValueError):
    """A recipe (file or override) that cannot be turned into a valid configuration."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (ints to floats, lists, dataclasses)."""

    def fail(extra: str = "") -> RecipeError:
        return RecipeError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){extra}"
        )

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise RecipeError(
                f"{source}: key '{key}' = {value!r} is not allowed; choose one of "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except RecipeError:
                pass
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(
                f"{source}: key '{key}' must be a mapping with keys "
                f"{', '.join(f.name for f in dataclasses.fields(tp))}; got {value!r}"
            )
        return build_dataclass(tp, value, source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(" (use true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise RecipeError(f"{source}: key '{key}' has an unsupported annotation {tp!r}")  # pragma: no cover


def build_dataclass(cls: type, data: dict[str, Any], source: str = "<recipe>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise RecipeError(
            f"{source}: unknown key '{_join(prefix, unknown[0])}' in {where}; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], _join(prefix, name), source)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise RecipeError(f"{source}: required key '{_join(prefix, missing[0])}' is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like key.sub=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key.split("."), numbers_from_yaml(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (in place); returns it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def numbers_from_yaml(obj: Any) -> Any:
    """YAML 1.1 leaves '1e-4' as a string; turn such strings into floats throughout."""
    if isinstance(obj, dict):
        return {k: numbers_from_yaml(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [numbers_from_yaml(v) for v in obj]
    if isinstance(obj, str) and _is_number(obj) and any(c in obj.lower() for c in "e."):
        if obj.lower() in {"nan", ".nan", "inf", ".inf", "-inf", "-.inf"}:
            return obj
        return float(obj)
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclasses -> nested dicts/lists of plain values (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
