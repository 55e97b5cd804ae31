"""Typed loading of nested dicts into frozen dataclasses, with errors that name the key.

The params YAML is parsed once at the edge into these objects; inner code reads
attributes, never `dict.get(key, default)`. Every error raised here is a `ParamsError`
whose message starts with the dotted key path (e.g. `model.rotary_dim`).
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ParamsError(ValueError):
    """A params file or override that cannot be used; the message names the key and the fix."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _same_kind(value: Any, tp: Any) -> bool:
    if get_origin(tp) in (list, tuple):
        return isinstance(value, (list, tuple))
    return dataclasses.is_dataclass(tp) and isinstance(value, dict)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Return `value` as type `tp`, or raise ParamsError naming `path`."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ParamsError(
                f"{path}={value!r} is not allowed; use one of {', '.join(map(repr, allowed))}{extra}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, path)
            except ParamsError as err:
                errors.append((option, err))
        # A value of the right kind (a list for a list option, a mapping for a section) failed
        # inside: that inner error names the actual problem.
        for option, err in errors:
            if _same_kind(value, option):
                raise err
        raise ParamsError(f"{path}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ParamsError(f"{path}={value!r} has the wrong type; expected {_type_name(tp)}")
        (item_tp,) = get_args(tp)[:1]
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{path} must be a mapping of keys to values, got {value!r}")
        return from_dict(tp, value, path)
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{path}={value!r}; expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{path}={value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{path}={value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads `1e-4` (no dot) as a string; accept it when it parses as a number.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ParamsError(f"{path}={value!r} has the wrong type; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{path}={value!r} has the wrong type; expected a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported")  # a bug in the schema


def _apply_renames(cls: type, data: dict, path: str) -> dict:
    """Old key names listed in `cls.RENAMED_KEYS` ({old: new}) read as the new ones, each reported
    once on stderr; giving both names is an error."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if not renamed or not set(renamed) & set(data):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ParamsError(f"{_join(path, old)} and {_join(path, new)} are the same setting (the first is its "
                              f"old name); keep only {_join(path, new)}")
        data[new] = data.pop(old)
        print(f"note: {_join(path, old)} is now called {_join(path, new)}; read as such (rename it in the "
              "params file)", file=sys.stderr)
    return data


def from_dict(cls: type, data: dict, path: str) -> Any:
    """Build dataclass `cls` from `data`, filling defaults and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _apply_renames(cls, data, path)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), list(fields), n=1)
        extra = f"; did you mean {_join(path, hint[0])}?" if hint else ""
        raise ParamsError(
            f"{_join(path, key)} is not a known key{extra} (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{key_path} is required but missing; add it to the params file")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-YAML form of a params object (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
