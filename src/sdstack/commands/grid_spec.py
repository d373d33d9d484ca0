"""``sdstack grid --spec grid.toml``: the grid's options kept in a file.

Keys are the long option names of ``sdstack grid`` (``-`` or ``_``), values what the
option takes: ``prompt = "a cat"``, ``steps = 20``, ``x = "clip-skip=1,2,3"``,
``lora = ["film:0.8"]``. An option given on the command line wins over the file. The same
table, as JSON, is what an API would send.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError

MAX_SPEC_BYTES = 1 << 20
_NOT_FROM_SPEC = {"spec", "handler", "grid_parser", "command"}


class GridSpecError(SdstackError):
    """A spec file that cannot be read or names an option that does not exist."""


def read_spec(path: Path) -> dict[str, Any]:
    """The TOML table of ``path`` (at most 1 MiB).

    Raises:
        GridSpecError: missing, too large, or not valid TOML (with the parser's reason).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise GridSpecError(f"--spec {str(path)!r}: {size} bytes; at most 1 MiB expected")
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise GridSpecError(f"--spec {str(path)!r}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise GridSpecError(f"--spec {str(path)!r}: not UTF-8 text ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise GridSpecError(f"--spec {str(path)!r}: not valid TOML: {error}") from None


def apply_spec(args: argparse.Namespace, parser: argparse.ArgumentParser, path: Path) -> None:
    """Fill ``args`` from the spec file where the command line left the default.

    Raises:
        GridSpecError: an unknown key (with the nearest option names) or a value of the
            wrong type (named with the option).
    """
    actions = {
        action.dest: action
        for action in parser._actions
        if action.dest not in _NOT_FROM_SPEC and action.dest != "help"
    }
    for key, value in read_spec(path).items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            names = [name.replace("_", "-") for name in actions]
            close = difflib.get_close_matches(key.replace("_", "-"), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise GridSpecError(f"--spec {str(path)!r}: unknown option {key!r}{hint}")
        if getattr(args, dest) != parser.get_default(dest):
            continue  # given on the command line
        setattr(args, dest, _converted(action, value, key, path))


def _converted(action: argparse.Action, value: Any, key: str, path: Path) -> Any:
    """``value`` as the option would have parsed it."""
    where = f"--spec {str(path)!r}: {key}"
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_one(action, item, where) for item in items]
    if action.nargs == 0:  # flags
        if not isinstance(value, bool):
            raise GridSpecError(f"{where} = {value!r}; expected true or false")
        return value
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    result = _typed(action, value, where)
    if action.choices is not None and result not in action.choices:
        expected = ", ".join(map(str, action.choices))
        raise GridSpecError(f"{where} = {value!r}; expected one of {expected}")
    return result


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)):
        raise GridSpecError(f"{where} = {value!r}; expected a single value")
    if action.type is None or not isinstance(value, str):
        if action.type in (int, float) and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise GridSpecError(f"{where} = {value!r}; expected a number")
        return value
    try:
        return action.type(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise GridSpecError(f"{where} = {value!r}: {error}") from None
