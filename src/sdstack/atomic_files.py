"""Outputs written atomically: a temporary file beside the target, then a rename.

A reader never sees a half-written file and a failure leaves nothing behind.

Modes: the temporary file is created with ``os.open(..., 0o666)``, so the kernel applies
the process umask exactly as for a plain ``open(path, "w")`` (0644 under umask 022, 0600
under 077), and its mode is read back with ``fstat``. ``tempfile.mkstemp`` gives 0600
whatever the umask, and reading the umask (``os.umask`` twice) races with other threads.
Some writers replace the file instead of writing into it (safetensors >= 0.8 renames its
own 0600 temporary file over the path), so :func:`replace` and :func:`publish_new` set
the creation mode back before moving the file into place.

Two ways to move the finished file into place:

- :func:`replace` (``os.replace``): replaces whatever ``target`` held (caller's policy).
- :func:`publish_new`: claims ``target`` exclusively, failing with ``FileExistsError``
  when it exists, so concurrent writers never overwrite each other.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What mkstemp uses, minus its 0600 mode: exclusive, no symlink following, binary on
# Windows, not inherited by child processes.
_CREATE_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NOINHERIT", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_ATTEMPTS = 100  # name collisions among 48 random bits: never in practice
# Temporary path -> the mode the kernel gave it at creation (while its block is open).
_CREATION_MODES: dict[str, int] = {}


def _create_new_file(directory: Path, suffix: str) -> tuple[Path, int]:
    """A new empty file ``directory/.tmp-<random><suffix>`` and its mode
    (``0o666 & ~umask``, as the kernel applied it)."""
    for _ in range(_ATTEMPTS):
        path = directory / f".tmp-{secrets.token_hex(6)}{suffix}"
        try:
            handle = os.open(path, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue
        try:
            return path, stat.S_IMODE(os.fstat(handle).st_mode)
        finally:
            os.close(handle)
    raise FileExistsError(f"no free temporary file name in {str(directory)!r}")


@contextmanager
def temporary_file(folder: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A new, empty, hidden file in ``folder`` (created if needed) to write an output into.

    Its mode is what ``open(path, "w")`` would give a new file under the current umask
    (``0o666 & ~umask``). Write it, then :func:`replace` or :func:`publish_new` it inside
    the block (they keep that mode even if the writer replaced the file). Whatever is
    still at the temporary path when the block exits, normally or by an exception, is
    removed.

    Raises:
        OSError: the folder cannot be created or written (the caller words the error).
    """
    directory = Path(folder)
    directory.mkdir(parents=True, exist_ok=True)
    path, mode = _create_new_file(directory, suffix)
    _CREATION_MODES[os.fspath(path)] = mode
    try:
        yield path
    finally:
        _CREATION_MODES.pop(os.fspath(path), None)
        path.unlink(missing_ok=True)


def _restore_creation_mode(temporary: str | os.PathLike[str]) -> None:
    """Give ``temporary`` its creation mode back if a writer replaced it (e.g. 0600)."""
    mode = _CREATION_MODES.get(os.fspath(temporary))
    if mode is not None and stat.S_IMODE(os.stat(temporary).st_mode) != mode:
        os.chmod(temporary, mode)


def replace(temporary: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """``os.replace(temporary, target)`` with ``temporary``'s creation mode (umask) kept.

    Raises:
        OSError: as ``os.replace``.
    """
    _restore_creation_mode(temporary)
    os.replace(temporary, target)


def publish_new(temporary: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move ``temporary`` to ``target`` only if ``target`` does not exist; never overwrites.

    ``os.link(temporary, target)`` is an exclusive create of the name (it fails when the
    name exists, atomically, across threads and processes), then ``temporary`` is removed.
    Where hard links are not supported (FAT, some network file systems), an empty
    placeholder is created with ``O_CREAT | O_EXCL`` and ``os.replace``d: the name is
    still claimed exclusively, but a reader may see the empty file for a moment.

    Raises:
        FileExistsError: ``target`` exists (a file, a folder or a link); try another name.
        OSError: the name cannot be created (full disk, no permission, name too long).
    """
    _restore_creation_mode(temporary)
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except (NotImplementedError, OSError):
        _publish_by_placeholder(Path(temporary), Path(target))
        return
    os.unlink(temporary)


def _publish_by_placeholder(temporary: Path, target: Path) -> None:
    """Claim ``target`` with an exclusive empty file, then replace it by ``temporary``."""
    handle = os.open(target, _CREATE_FLAGS, 0o666)  # FileExistsError: claimed by another
    os.close(handle)
    try:
        os.replace(temporary, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
