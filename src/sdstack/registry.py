"""One registry helper for named things: samplers, emphasis modes, and what comes next.

A :class:`Registry` maps canonical names to values. Lookup is exact first, then by a
normalised key (case, spaces, ``_`` and ``-`` ignored, so "No norm", "no_norm" and
"no-norm" meet), then by registered aliases. An unknown name raises
:class:`~sdstack.errors.UnknownNameError` naming what was asked for, every valid name and
the nearest ones (``difflib.get_close_matches``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from sdstack.errors import SdstackError, UnknownNameError

T = TypeVar("T")

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalise_name(name: str) -> str:
    """The lookup key of ``name``: lower case, spaces/underscores/hyphens removed."""
    return _SEPARATORS.sub("", str(name).strip().lower())


class Registry(Generic[T]):
    """Named values of one kind (``kind`` is used in messages: "sampler", "emphasis mode").

    Args:
        kind: what the names are, for error messages.
        error: the error class raised for unknown names (a subclass of UnknownNameError).
    """

    def __init__(self, kind: str, error: type[UnknownNameError] = UnknownNameError) -> None:
        self.kind = kind
        self.error = error
        self._values: dict[str, T] = {}
        self._keys: dict[str, str] = {}

    def register(self, name: str, value: T, *, aliases: tuple[str, ...] = ()) -> T:
        """Add ``value`` under ``name`` (and ``aliases``); a clash is a programming error.

        Raises:
            SdstackError: ``name`` or an alias is already taken.
        """
        if name in self._values:
            raise SdstackError(f"{self.kind} {name!r} is already registered")
        for key in {normalise_name(n) for n in (name, *aliases)}:
            if key in self._keys:
                raise SdstackError(f"{self.kind} name {key!r} is already taken")
            self._keys[key] = name
        self._values[name] = value
        return value

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` means.

        Raises:
            UnknownNameError (``self.error``): not registered; names the nearest.
        """
        if name in self._values:
            return name
        found = self._keys.get(normalise_name(name))
        if found is not None:
            return found
        raise self.error(self.unknown_message(name))

    def checked(self, value: object, option: str) -> str:
        """:meth:`canonical` of a setting's ``value``, the messages naming ``option``.

        Raises:
            UnknownNameError (``self.error``): ``<option> must be one of a, b, got 3`` for
                a value that is not a string, ``<option>: unknown <kind> 'x'; did you mean
                ...`` for an unknown name.
        """
        if not isinstance(value, str):
            raise self.error(f"{option} must be one of {', '.join(self._values)}, got {value!r}")
        try:
            return self.canonical(value)
        except UnknownNameError as error:
            raise self.error(f"{option}: {error}") from None

    def get(self, name: str) -> T:
        """The value registered as ``name`` (see :meth:`canonical`)."""
        return self._values[self.canonical(name)]

    def unknown_message(self, name: str) -> str:
        """``unknown <kind> 'x'; did you mean 'b', 'c'? Expected one of: a, b, c``"""
        names = list(self._values)
        near = difflib.get_close_matches(str(name), names, n=3)
        if not near:
            by_key = {normalise_name(n): n for n in names}
            near = [by_key[k] for k in difflib.get_close_matches(normalise_name(name), by_key)]
        hint = f"; did you mean {', '.join(repr(n) for n in near)}? E" if near else "; e"
        return f"unknown {self.kind} {name!r}{hint}xpected one of: {', '.join(names)}"

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def values(self) -> list[T]:
        """Registered values, in registration order."""
        return list(self._values.values())

    def items(self) -> list[tuple[str, T]]:
        """``(name, value)`` pairs, in registration order."""
        return list(self._values.items())

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
