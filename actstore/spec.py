"""Frozen-dataclass specs loaded from TOML or dicts, with unknown keys rejected.

Every spec (ingest jobs, edits, analyses) is a frozen dataclass. :func:`from_dict`
builds one from a mapping: unknown keys are errors that list the valid ones,
values are checked against the field types (including nested specs and lists of
them), and ``__post_init__`` validates values. :func:`to_dict` is the inverse.

Example
-------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Point:
...     x: int
...     y: int = 0
>>> from_dict(Point, {"x": 1})
Point(x=1, y=0)
>>> from_dict(Point, {"x": 1, "z": 2})  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
actstore.errors.SpecError: Point: unknown key 'z'; valid keys: x, y
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from actstore.errors import SpecError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise SpecError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # `hooks = "blocks.*.hook_resid_post"` means a list of one
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise SpecError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise SpecError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        if not isinstance(value, Mapping):
            raise SpecError(
                f"{where}: expected a table of {_type_name(tp)} settings, got {value!r}"
            )
        return from_dict(tp, value, where=where)  # type: ignore[arg-type]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise SpecError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str | None = None) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys.

    Example
    -------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class S:
    ...     names: tuple[str, ...] = ()
    >>> from_dict(S, {"names": ["a", "b"]})
    S(names=('a', 'b'))
    """
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a table of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SpecError(f"{where}: missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError(f"{where}: {e}") from e


def to_dict(spec: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict`: nested dicts and lists, None values dropped.

    Example
    -------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class S:
    ...     a: int = 1
    ...     b: str | None = None
    >>> to_dict(S())
    {'a': 1}
    """

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {
                f.name: conv(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if getattr(v, f.name) is not None
            }
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    out = conv(spec)
    assert isinstance(out, dict)
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with a clear error naming the file and line on a syntax error.

    Example
    -------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "j.toml"); _ = open(p, "w").write("a = 1")
    >>> load_toml(p)
    {'a': 1}
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: invalid TOML: {e}") from e
