"""One registry class for every named choice (editors, datasets, models, CLI commands).

An entry is an object, or `Lazy("module:attribute")`, imported on first use. Optional entries name the
modules they need and the command that installs them: while one is missing the entry is listed as not
installed, and asking for it says how to install it. An unknown name gets one line naming the valid choices.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownChoice(ValueError):
    """An unknown or not installed name; the message is one line."""


@dataclass(frozen=True)
class Lazy:
    """An entry's object named by "module:attribute", imported when the entry is first used."""

    path: str

    def load(self) -> Any:
        module, _, attribute = self.path.partition(":")
        return getattr(importlib.import_module(module), attribute)


@dataclass
class Entry(Generic[T]):
    name: str
    target: T | Lazy  # the object, or where to import it from
    description: str = ""
    requires: tuple[str, ...] = ()  # top-level modules an optional entry needs
    install: str = ""  # the command that installs them

    def missing(self) -> list[str]:
        """The required modules that cannot be imported (found without importing them)."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    @property
    def installed(self) -> bool:
        return not self.missing()


class Registry(Generic[T]):
    """Named choices of one kind; `discover` (optional) adds entries once, before the first lookup."""

    def __init__(self, kind: str, discover: Callable[[Registry[T]], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._discover = discover

    def add(self, name: str, target: T | Lazy, description: str = "", requires: tuple[str, ...] = (),
            install: str = "") -> None:
        self._entries[name] = Entry(name, target, description, tuple(requires), install)

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator form of `add` for an object defined in place."""
        def wrap(obj: T) -> T:
            self.add(name, obj, description)
            return obj
        return wrap

    def _ready(self) -> dict[str, Entry[T]]:
        if self._discover is not None:
            discover, self._discover = self._discover, None
            discover(self)
        return self._entries

    def entries(self) -> list[Entry[T]]:
        return [self._ready()[name] for name in sorted(self._ready())]

    def names(self, installed_only: bool = True) -> list[str]:
        return [e.name for e in self.entries() if e.installed or not installed_only]

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entry(self, name: str) -> Entry[T]:
        entries = self._ready()
        if name not in entries:
            raise UnknownChoice(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names()) or '(none)'}")
        return entries[name]

    def get(self, name: str) -> T:
        """The entry's object, imported on first use; a missing requirement names the install command."""
        entry = self.entry(name)
        missing = entry.missing()
        if missing:
            raise UnknownChoice(f"{self.kind} '{name}' is not installed: needs {', '.join(missing)}; "
                                f"install with: {entry.install}")
        if isinstance(entry.target, Lazy):
            entry.target = entry.target.load()
        return entry.target


def first_doc_line(obj: Any) -> str:
    """The first line of an object's docstring (a registry listing's description)."""
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    return doc[0] if doc else ""
