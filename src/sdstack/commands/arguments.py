"""Argument helpers shared by the command modules (no torch)."""

from __future__ import annotations

import sys


def read_prompt_argument(value: str, option: str = "PROMPT") -> str:
    """The prompt as given, or standard input for ``-`` (trailing newlines removed).

    Raises:
        CommandError: ``-`` with standard input not valid UTF-8.
    """
    if value != "-":
        return value
    from sdstack.cli import CommandError

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data.rstrip("\r\n")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise CommandError(
            f"{option} from standard input is not valid UTF-8 (byte {error.start}); save "
            "the prompt as UTF-8"
        ) from None
