"""Convert raw recipe values (YAML scalars, command-line strings) to a field's annotated type.

Supported annotations: bool, int, float, str, Literal[...], Optional / Union of those, list[X],
dict / dict[str, X], Any, and nested config dataclasses (built from a mapping, with the same
unknown-key check as the top level). Strings are accepted wherever a command line could give
them: "1e-6" for a float (PyYAML reads that as a string), "false" for a bool, "a,b" or "[a, b]"
for a list, YAML text for a mapping, "null" / "None" for an Optional.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from megagrpo.config.errors import ConfigError

TRUE_STRINGS = frozenset({"true", "yes", "y", "t", "on", "1"})
FALSE_STRINGS = frozenset({"false", "no", "n", "f", "off", "0"})
NULL_STRINGS = frozenset({"null", "None", "NULL", "Null", "~"})


class _Flag:
    """A command-line key given without a value (``--bf16``): True for bools, else an error."""

    def __repr__(self) -> str:
        return "<no value>"


FLAG = _Flag()


def describe(tp: Any) -> str:
    """Human-readable name of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp):
            parts.append("null")
        return " or ".join(parts)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {describe(item)}"
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, value: Any, tp: Any, why: str = "") -> ConfigError:
    shown = f"{value!r} ({type(value).__name__})" if value is not FLAG else "no value"
    return ConfigError(f"{key}={shown}: expected {describe(tp)}{why}")


def _parse_yaml_text(key: str, text: str, tp: Any) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail(key, text, tp, f" (not valid YAML: {str(e).splitlines()[0]})") from None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if value is FLAG:
        if tp is bool or (origin in (Union, types.UnionType) and bool in typing.get_args(tp)):
            return True
        raise ConfigError(f"--{key} needs a value: expected {describe(tp)}")
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS | FALSE_STRINGS:
            return value.strip().lower() in TRUE_STRINGS
        raise _fail(key, value, tp)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric revision or config name
        raise _fail(key, value, tp)
    if origin is list:
        return _coerce_list(value, tp, key)
    if tp is dict or origin is dict:
        return _coerce_dict(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = _parse_yaml_text(key, value, tp)
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        return build_dataclass(tp, value, prefix=f"{key}.")
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    members = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value in NULL_STRINGS):
        if type(None) in members:
            return None
        raise _fail(key, value, tp)
    others = [m for m in members if m is not type(None)]
    lower_none = isinstance(value, str) and value.lower() == "none"
    if len(others) == 1 and not lower_none:
        return coerce(value, others[0], key)  # Optional[X]: X's own, more precise, errors
    for member in others:
        try:
            return coerce(value, member, key)
        except ConfigError:
            continue
    # An Optional also takes a lower-case "none" when "none" is not itself a valid value.
    if lower_none and type(None) in members:
        return None
    raise _fail(key, value, tp)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = typing.get_args(tp)
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise _fail(key, value, tp, hint)


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _fail(key, value, int)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
    raise _fail(key, value, int)


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, float)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(key, value, float)


def _coerce_list(value: Any, tp: Any, key: str) -> list:
    (item_tp,) = typing.get_args(tp) or (Any,)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _parse_yaml_text(key, text, tp)
            if not isinstance(value, list):
                raise _fail(key, text, tp)
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    elif isinstance(value, tuple):
        value = list(value)
    elif isinstance(value, dict):
        raise _fail(key, value, tp)
    elif not isinstance(value, list):
        value = [value]  # a single scalar where a list is expected
    return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(value: Any, tp: Any, key: str) -> dict:
    if isinstance(value, str):
        value = _parse_yaml_text(key, value, tp)
    if not isinstance(value, dict):
        raise _fail(key, value, tp)
    args = typing.get_args(tp)
    value_tp = args[1] if len(args) == 2 else Any
    return {k: coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}


def apply_aliases(value: Any, field: dataclasses.Field) -> Any:
    """Map a value through the field's ``aliases`` metadata (see ``fields.option``)."""
    aliases = field.metadata.get("aliases")
    if not aliases:
        return value
    for raw, canonical in aliases.items():
        if isinstance(raw, bool):
            if isinstance(value, bool) and value is raw:
                return canonical
        elif isinstance(value, str) and isinstance(raw, str) and value.lower() == raw.lower():
            return canonical
    return value


def build_dataclass(
    cls: type, mapping: dict, *, prefix: str = "", sources: dict[str, str] | None = None
) -> Any:
    """Build ``cls`` from a mapping of raw values, collecting every problem into one ConfigError:
    unknown keys (with the closest field names), wrong types, missing required fields.
    ``sources`` (key -> where it was set) is appended to each key's messages."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    errors: list[str] = []
    values: dict[str, Any] = {}
    for name, raw in mapping.items():
        name = str(name)
        where = f" [{sources[name]}]" if sources and name in sources else ""
        if name not in fields:
            errors.append(unknown_key_message(prefix + name, name, fields) + where)
            continue
        try:
            values[name] = coerce(apply_aliases(raw, fields[name]), hints[name], prefix + name)
        except ConfigError as e:
            errors.extend(msg + where for msg in e.errors)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in mapping:
            errors.append(f"{prefix}{name} is required ({f.metadata.get('help', '')})")
    if errors:
        raise ConfigError(errors)
    return cls(**values)


def unknown_key_message(shown: str, name: str, known: typing.Iterable[str]) -> str:
    """'unknown key X; did you mean A, B?' with difflib's closest known names."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (no similar key is known)"
    return f"unknown key {shown!r}{hint}"
