"""Argument helpers shared by the command modules (no torch)."""

from __future__ import annotations

import sys


def read_prompt_argument(value: str) -> str:
    """The prompt argument, or standard input for ``-`` (trailing newlines removed).

    Standard input is read as bytes and decoded as UTF-8 with ``surrogateescape``, as
    command-line arguments are, so that a stray byte reaches the prompt check
    (``sdstack.prompt.errors.check_text``), which names it and its position.
    """
    if value != "-":
        return value
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (e.g. io.StringIO)
        return sys.stdin.read().rstrip("\r\n")
    return buffer.read().decode("utf-8", "surrogateescape").rstrip("\r\n")
