"""Typed construction of attrs classes from plain YAML data.

Recipes and plugin parameters are attrs classes.  :func:`build` turns a nested
``dict`` (from YAML or ``--set``) into such a class, converting values to the
annotated field types and turning every mistake into one readable
:class:`~clusterkit.errors.RecipeError` that names the full key path::

    >>> @attrs.define
    ... class Params:
    ...     beta: float = attrs.field(default=0.99, validator=in_unit_interval)
    >>> build(Params, {"beta": 1}, "plugins.momentum_grouping")
    Params(beta=1.0)
    >>> build(Params, {"bta": 0.9}, "plugins.momentum_grouping")   # doctest: +SKIP
    RecipeError: Unknown key 'plugins.momentum_grouping.bta'; did you mean 'beta'? ...

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``X | None``,
``typing.Literal[...]``, ``tuple[T, ...]`` / ``tuple[T1, T2]``, ``list[T]``,
``dict[str, T]``, ``typing.Any`` and nested attrs classes.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Callable

import attrs

from .errors import RecipeError

__all__ = ["build", "unstructure", "did_you_mean", "field_docs", "in_range", "positive", "positive_finite",
           "non_negative", "in_unit_interval", "plain_name"]


def did_you_mean(word: str, choices) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


# -- validators with messages that read well after "plugins.x.y: " ------------------------------------

def in_range(lo=None, hi=None, *, lo_open=False, hi_open=False, finite=False):
    """attrs validator: ``lo <= value <= hi`` (bounds optional, optionally open).  NaN is never
    in range; ``finite=True`` also rejects +-inf (a missing bound then reads as an open one)."""

    def check(_inst, attribute, value):
        if value is None:
            return
        nonfinite = isinstance(value, float) and not math.isfinite(value)
        bad = (isinstance(value, float) and math.isnan(value)) or (finite and nonfinite) or \
              (lo is not None and (value <= lo if lo_open else value < lo)) or \
              (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            left = "(" if lo_open or (finite and lo is None) else "["
            right = ")" if hi_open or (finite and hi is None) else "]"
            what = "a finite number in " if finite and nonfinite else ""
            raise ValueError(f"must be {what or 'in '}{left}{'-inf' if lo is None else lo}, "
                             f"{'inf' if hi is None else hi}{right}, got {value!r}")

    return check


positive = in_range(0, None, lo_open=True)
positive_finite = in_range(0, None, lo_open=True, finite=True)
non_negative = in_range(0, None)
in_unit_interval = in_range(0, 1)


def plain_name(_inst, attribute, value):
    """attrs validator: a name that is used as one folder name (a recipe's ``name``: the run goes to
    ``run.out_dir/<name>/``, compare's to ``OUT/<name>/``), so never a path that leads elsewhere:
    not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL."""
    if value is None:
        return
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError("must be a plain name, not a path (it becomes a folder name: run.out_dir/<name>/); "
                         "any characters but '/', '\\' and NUL, and not empty, '.' or '..', e.g. my_run; "
                         f"got {value!r}")


# -- building ------------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise RecipeError mentioning ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"'{where}' must be one of {', '.join(repr(a) for a in args)}, got {value!r}."
                          f"{did_you_mean(value, args)}")
    if attrs.has(tp):
        return _convert_attrs(value, tp, where)
    if origin in (tuple, list):
        return _convert_sequence(value, origin, args, where)
    if origin is dict:
        return _convert_mapping(value, args, where)
    for scalar, convert in _SCALARS:
        if tp is scalar:
            return convert(value, where)
    raise TypeError(f"schema: unsupported annotation {tp!r} at {where}")  # a bug in a schema, not user input


def _convert_union(value: Any, args: tuple, where: str) -> Any:
    """``value`` as the first member of a union that takes it (None for an optional's None)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, where)
        except RecipeError as exc:
            errors.append(exc)
    raise errors[0] if len(errors) == 1 else RecipeError(
        f"'{where}' must be {' or '.join(_type_name(a) for a in args)}, got {value!r}.")


def _convert_attrs(value: Any, tp: Any, where: str) -> Any:
    """A nested section (an attrs class) from its mapping (None: every key at its default)."""
    if isinstance(value, tp):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"'{where}' must be a mapping of keys to values, got {value!r}.")
    return build(tp, value, where)


def _convert_mapping(value: Any, args: tuple, where: str) -> dict:
    """A ``dict[str, T]``, value by value (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"'{where}' must be a mapping, got {value!r}.")
    val_tp = args[1] if args else Any
    return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}


def _convert_sequence(value: Any, origin: Any, args: tuple, where: str) -> list | tuple:
    """A list, a fixed-length tuple or a variable-length tuple, item by item."""
    if not isinstance(value, (list, tuple)):
        raise RecipeError(f"'{where}' must be a list, got {value!r}.")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise RecipeError(f"'{where}' must have {len(args)} items, got {len(value)}: {value!r}.")
        items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
    else:
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
        return value.lower() in ("true", "yes", "on")
    raise RecipeError(f"'{where}' must be true or false, got {value!r}.")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RecipeError(f"'{where}' must be an integer, got {value!r}.")
    try:
        as_float = float(value)
    except ValueError:
        raise RecipeError(f"'{where}' must be an integer, got {value!r}.") from None
    if not as_float.is_integer():
        raise RecipeError(f"'{where}' must be an integer, got {value!r}.")
    return int(as_float)


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise RecipeError(f"'{where}' must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"'{where}' must be a number, got {value!r}.") from None


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise RecipeError(f"'{where}' must be a string, got {value!r}.")
    return str(value)


#: The scalar annotations a recipe value may have, with their converters.
_SCALARS: tuple[tuple[type, Callable[[Any, str], Any]], ...] = (
    (bool, _to_bool), (int, _to_int), (float, _to_float), (str, _to_str))


def build(cls, data: dict | None, where: str = ""):
    """Build attrs class ``cls`` from mapping ``data``; unknown keys and bad values raise RecipeError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"'{where or cls.__name__}' must be a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise RecipeError(
                f"Unknown key '{path}'.{did_you_mean(key, fields)} Valid keys here are: "
                f"{', '.join(sorted(fields))}.")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # attrs validators raise with the attribute as args[1] when they can; our own validators
        # raise ValueError(message) -- find which field failed by validating one field at a time.
        for name, value in kwargs.items():
            field = fields[name]
            if field.validator is None:
                continue
            try:
                field.validator(None, field, value)
            except (ValueError, TypeError) as inner:
                path = f"{where}.{name}" if where else name
                raise RecipeError(f"'{path}' {_reason(inner)}.") from None
        raise RecipeError(f"'{where or cls.__name__}': {_reason(exc)}.") from None


def _reason(exc: Exception) -> str:
    msg = str(exc.args[0]) if exc.args else str(exc)
    return msg.rstrip(".")


def unstructure(obj) -> Any:
    """attrs instance -> plain YAML-friendly data (tuples become lists)."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items()}
    return obj


def field_docs(cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) for every field; docs come from ``metadata={"doc": ...}``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in attrs.fields(cls):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory() if not default.takes_self else "<derived>"
        rows.append((f.name, _type_name(hints.get(f.name, Any)), unstructure(default), f.metadata.get("doc", "")))
    return rows
