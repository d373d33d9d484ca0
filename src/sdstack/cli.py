"""The ``sdstack`` command line: argument parsing and dispatch only.

Each command group lives in ``sdstack.commands.<group>`` and exposes
``register(subparsers)``, which adds its parsers and sets ``handler`` to a function
``handler(args) -> int``. User errors (``CommandError``, ``ValueError``,
missing or existing files) print ``sdstack: error: ...`` and exit 2; set
``SDSTACK_DEBUG=1`` to get the traceback instead. Command modules import torch and
diffusers inside their handlers, so ``sdstack prompt ...`` and ``--help`` never pay for them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from sdstack import __version__
from sdstack.errors import SdstackError

COMMAND_MODULES = (
    "sdstack.commands.prompt",
    "sdstack.commands.encode",
    "sdstack.commands.generate",
    "sdstack.commands.info",
    "sdstack.commands.models",
)


class CommandError(SdstackError):
    """A user-facing failure: printed as ``sdstack: error: <message>``, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every command group registered."""
    parser = argparse.ArgumentParser(
        prog="sdstack",
        description="Stable Diffusion 1.x from the shell: the reference web UI's prompt "
        "language, CLIP skip, emphasis, embeddings, single-file checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"sdstack {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdstack`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("sdstack: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("SDSTACK_DEBUG"):
            raise
        print(f"sdstack: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
