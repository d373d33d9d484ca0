"""The ``sdstack`` command line: argument parsing and dispatch only.

Each command group lives in ``sdstack.commands.<group>`` and exposes
``register(subparsers)``, which adds its parsers and sets ``handler`` to a function
``handler(args) -> int``. User errors (every ``SdstackError``, ``OSError``, bad image or
safetensors files) print ``sdstack: error: ...`` and exit 2; set ``SDSTACK_DEBUG=1`` to
get the traceback instead. Anything else is a bug: its traceback is kept, with a line
asking to report it. ``SdstackWarning`` prints as ``sdstack: warning: ...``. Command
modules import torch and diffusers inside their handlers, so ``sdstack prompt ...`` and
``--help`` never pay for them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from sdstack import __version__
from sdstack.errors import SdstackError, SdstackWarning

COMMAND_MODULES = (
    "sdstack.commands.prompt",
    "sdstack.commands.encode",
    "sdstack.commands.generate",
    "sdstack.commands.demo",
    "sdstack.commands.info",
    "sdstack.commands.models",
    "sdstack.commands.lora",
    "sdstack.commands.grid",
    "sdstack.commands.merge",
    "sdstack.commands.control",
    "sdstack.commands.deproject",
    "sdstack.commands.train",
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


def is_user_error(error: BaseException) -> bool:
    """User errors print one line; anything else is a bug and keeps its traceback.

    ``SdstackError``, ``OSError`` (missing, unreadable, unwritable files), Pillow's
    decompression-bomb error and safetensors' own errors on a bad file.
    """
    if isinstance(error, (SdstackError, OSError)):
        return True
    kind = type(error)
    return kind.__name__ in ("DecompressionBombError", "SafetensorError") and (
        kind.__module__.startswith(("PIL", "safetensors"))
    )


def describe(error: BaseException) -> str:
    """The one-line message: ``path: reason`` for OSError, the message otherwise."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, SdstackError):
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    return str(error)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, SdstackWarning):
        print(f"sdstack: warning: {message}", file=sys.stderr)
    else:
        _default_show_warning(message, category, *args, **kwargs)


_default_show_warning = warnings.showwarning


def _flush_hash_cache() -> None:
    """Write the file-hash cache now (not at exit), so a failure prints as a warning."""
    cache = sys.modules.get("sdstack.models.hash_cache")
    if cache is not None:
        cache.flush()


def _quiet_broken_pipe() -> int:
    """``sdstack info x | head``: the reader left. Point stdout at /dev/null so the final
    flush does not fail again, and exit as a process killed by SIGPIPE would (141)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdstack`` console script.

    Exit status: 0 done, 2 a user error (``sdstack: error: ...``), 130 interrupted,
    141 the output pipe closed, 1 a bug (traceback, with a request to report it).
    """
    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 2
        code = int(handler(args) or 0)
        _flush_hash_cache()
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("sdstack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as error:
        if not is_user_error(error):
            print(BUG_REPORT, file=sys.stderr)
            raise
        if os.environ.get("SDSTACK_DEBUG"):
            raise
        print(f"sdstack: error: {describe(error)}", file=sys.stderr)
        return 2


BUG_REPORT = (
    "sdstack: internal error: this is a bug in sdstack, not in your input. Please report "
    "it with the command you ran and the traceback below."
)


if __name__ == "__main__":
    sys.exit(main())
