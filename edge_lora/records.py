"""Typed JSON records: frozen dataclasses read from a JSON object with every field's type checked, every problem
collected into one error whose one line names the file and the fix, and the object written back unchanged (the
manifests in edge_lora.formats are built on it). Standard library only."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from edge_lora.errors import UsageError


class ManifestError(UsageError):
    """A manifest that is missing, not JSON, or not of the shape this version reads."""


@dataclass(frozen=True)
class Record:
    """A JSON object with typed fields: from_dict checks every field's type and collects every problem into one
    error, naming the file; keys without a field are kept in `extra` and written back by to_dict."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    given: frozenset[str] | None = field(default=None, repr=False, compare=False, kw_only=True)
    """The keys the source object had (None: built in code): to_dict leaves out an optional field it lacked."""
    error: ClassVar[type[ManifestError]] = ManifestError
    fix: ClassVar[str] = "re-create the file with this edge-lora"

    @classmethod
    def from_dict(cls, doc: object, where: str) -> typing.Self:
        if not isinstance(doc, dict):
            raise cls.error(f"{where} is not a JSON object — {cls.fix}")
        record, problems = cls._build(doc, prefix="")
        if problems:
            raise cls.error(f"{where}: {'; '.join(problems)} — {cls.fix}")
        return record

    @classmethod
    def _build(cls, doc: dict, prefix: str) -> tuple[typing.Self | None, list[str]]:
        """The record and no problems, or None and every problem, each naming its key as `prefix` + field."""
        hints = _hints(cls)
        values, problems = {}, []
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "given"):
                continue
            if f.name not in doc:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    problems.append(f"lacks {prefix + f.name!r}")
                continue
            try:
                values[f.name] = _convert(hints[f.name], doc[f.name], prefix + f.name)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            return None, problems
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**values, extra={k: v for k, v in doc.items() if k not in names}, given=frozenset(doc)), []

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "given") and (self.given is None or f.name in self.given):
                out[f.name] = _plain(getattr(self, f.name))
        return out | self.extra


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(hint: Any, value: Any, key: str) -> Any:
    """`value` checked against the annotation `hint`, nested Records built; ValueError names the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if isinstance(hint, type) and issubclass(hint, Record):
        if not isinstance(value, dict):
            raise ValueError(f"{key!r} is {_kind(value)}, expected an object")
        record, problems = hint._build(value, prefix=f"{key}.")
        if problems:
            raise ValueError("; ".join(problems))
        return record
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key!r} is {value!r}, expected one of {', '.join(map(str, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key!r} is {_kind(value)}, expected an object")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{key!r} is {_kind(value)}, expected a list")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{key!r} is {_kind(value)}, expected {hint.__name__}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_json(path: Path, error: type[ManifestError], fix: str) -> object:
    """The JSON document in `path`; `error` with `fix` when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}) — {fix}") from None


def write_json(record: Record, path: Path) -> Path:
    """`record` as indented JSON in `path`; the path."""
    path.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return path
