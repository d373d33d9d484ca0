"""Argument helpers shared by the command modules (no torch)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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


def add_command_group(subparsers: Any, name: str, *, help: str, description: str) -> Any:
    """Add the command group ``sdstack NAME`` and return its sub-command adder.

    ``sdstack NAME`` alone prints the group's help and exits with status 2, as a missing
    sub-command is a usage error. Sub-commands are added with
    ``commands.add_parser(...)`` on the returned object (``dest`` is ``NAME_command``).
    """
    group = subparsers.add_parser(name, help=help, description=description)
    group.set_defaults(handler=lambda _args: _print_group_help(group))
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def _print_group_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
