"""Typed hyperparameters: one frozen dataclass per editor, with each key's default, unit and range in one place.

A mapping (a YAML file, or a dict from a test or `bench tune`) becomes an editor's dataclass through
`Hparams.from_mapping`, which rejects unknown keys, wrongly typed values and out-of-range values (a layer
beyond the model among them) with one line naming the file and the key. Floats may be written as YAML 1.1
reads `1e-6` (as text), as EasyEdit's loader accepts them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from editors.errors import EditorError

FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
H = TypeVar("H", bound="Hparams")


class HparamsError(EditorError):
    """A hyperparameter file or mapping that does not fit the editor; the message names the source and the key."""


def setting(default: Any, *, unit: str = "", minimum: float | None = None, maximum: float | None = None,
            choices: tuple[Any, ...] = (), layer: bool = False, length: int | None = None, required: bool = False,
            doc: str = "") -> Any:
    """A dataclass field with its metadata: `layer` values must also be below the model's layer count,
    `minimum`/`maximum` bound numbers (each element of a list) inclusively, a list with a `length` has exactly
    that many items, and a `required` key must be given (its default only fills the dataclass)."""
    meta = dict(unit=unit, minimum=minimum, maximum=maximum, choices=tuple(choices), layer=layer, length=length,
                required=required, doc=doc)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Hparams:
    """The keys every editor accepts; subclasses add their own."""

    editor: ClassVar[str] = ""
    easyedit: dict[str, Any] = setting({}, doc="EasyEdit-only keys of an EasyEdit file (module templates, runner)")

    @classmethod
    def from_mapping(cls: type[H], data: Mapping[str, Any], source: str = "hparams",
                     n_layers: int | None = None) -> H:
        if not isinstance(data, Mapping):
            raise HparamsError(f"{source}: expected a mapping of hyperparameters, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in data:
            if key not in known:
                raise HparamsError(f"{source}: unknown key '{key}' for {cls.editor or cls.__name__}"
                                   f"{_suggestion(str(key), known)}; valid: {', '.join(sorted(known))}")
        missing = [name for name, f in known.items() if f.metadata.get("required") and name not in data]
        if missing:
            raise HparamsError(f"{source}: missing key '{missing[0]}' for {cls.editor or cls.__name__}")
        values = {key: _checked(source, key, value, hints[key], known[key].metadata, n_layers)
                  for key, value in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def described(cls) -> list[dict[str, Any]]:
        """Every key with its default, unit and documentation (for `bench hparams`)."""
        defaults = cls().to_dict()
        return [{"key": f.name, "default": None if f.metadata.get("required") else defaults[f.name],
                 "required": bool(f.metadata.get("required")), "unit": f.metadata.get("unit", ""),
                 "doc": f.metadata.get("doc", "")} for f in dataclasses.fields(cls)]


def _suggestion(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _checked(source: str, key: str, value: Any, hint: Any, meta: Mapping[str, Any], n_layers: int | None) -> Any:
    where = f"{source}: key '{key}'"
    ok, typed = _typed(value, hint)
    if not ok:
        raise HparamsError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    length = meta.get("length")
    if length is not None and isinstance(typed, list) and len(typed) != length:
        raise HparamsError(f"{where}: expected exactly {length} item{'s' * (length != 1)}, got {len(typed)}")
    choices = meta.get("choices") or ()
    if choices and typed not in choices:
        about = f" ({meta['doc']})" if meta.get("doc") else ""
        raise HparamsError(f"{where}: {typed!r} is not one of {', '.join(map(repr, choices))}{about}")
    for number in _numbers(typed):
        low, high = meta.get("minimum"), meta.get("maximum")
        if meta.get("layer") and n_layers is not None:
            high = n_layers - 1 if high is None else min(high, n_layers - 1)
            low = 0 if low is None else low
            if not low <= number <= high:
                raise HparamsError(f"{where}: layer {number} is outside the model's layers {low}..{high}")
        if low is not None and number < low or high is not None and number > high:
            bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in {low}..{high}"
            raise HparamsError(f"{where}: {number} must be {bounds}")
    return typed


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return []


def _typed(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether value fits the type, the value as that type)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, typed = _typed(value, arm)
            if ok:
                return True, typed
        return False, value
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return True, float(value)
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_typed(item, args[0]) for item in value]
        return all(ok for ok, _ in items), [typed for _, typed in items]
    if origin is dict:
        return isinstance(value, dict), value
    raise TypeError(f"unsupported hyperparameter type {hint!r}")


def _type_name(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm, plural) for arm in args)
    if origin is list:
        return f"{'lists' if plural else 'a list'} of {_type_name(args[0], plural=True)}"
    names = {bool: ("a boolean", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), type(None): ("null", "nulls"), dict: ("a mapping", "mappings")}
    return names.get(origin or hint, (str(hint), str(hint)))[plural]
