"""Output folders: checked before any model loads, and write failures worded for users.

:func:`check_output_folder` is what the command line runs on ``--out`` before the slow
work starts, so a typo costs nothing: the path must be a folder we can write in, or a
missing one whose nearest existing ancestor is a folder we can write in (the folder is
created by the first save). :func:`os_error_reason` turns an ``OSError`` into the
"what went wrong; the fix" tail of a message.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from sdstack.atomic_files import temporary_file
from sdstack.errors import SdstackError

DEFAULT_NAME_MAX = 255  # bytes in one path component on ext4, XFS, btrfs, NTFS, APFS

_REASONS = {
    errno.ENOSPC: ("the disk is full", "free some space or choose another folder"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("permission denied", "choose a folder you can write to"),
    errno.EROFS: ("the file system is read-only", "choose a folder you can write to"),
    errno.ENAMETOOLONG: ("a name in the path is too long", "choose a shorter name"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another folder"),
}


class OutputError(SdstackError):
    """An output that cannot be written: the folder is a file, read-only, or the disk full."""


def _is_missing(error: OSError) -> bool:
    """``os.stat`` failed because the path (or a name in it) does not exist."""
    return error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)


def os_error_reason(error: OSError) -> str:
    """``"<what>; <fix>"`` for the errno of ``error``, e.g. ``"the disk is full; free
    some space or choose another folder"``; the system's text for other errors."""
    known = _REASONS.get(error.errno) if error.errno is not None else None
    if known is not None:
        return f"{known[0]}; {known[1]}"
    return error.strerror or str(error) or type(error).__name__


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system takes (``pathconf``)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):  # no pathconf (Windows) or no answer
        return DEFAULT_NAME_MAX


def _probe_writable(folder: Path, message: str) -> None:
    """Create and remove a temporary file in the existing ``folder``; on failure raise
    ``OutputError(f"{message}{reason}")``."""
    try:
        with temporary_file(folder, suffix=".probe"):
            pass
    except OSError as error:
        raise OutputError(f"{message}{os_error_reason(error)}") from error


def _check_missing_folder(folder: Path, prefix: str) -> None:
    """``folder`` does not exist: its nearest existing ancestor must be a folder we can
    write in, and each missing name must fit the file system."""
    for ancestor in folder.parents:
        try:
            ancestor_stat = os.stat(ancestor)
        except OSError as error:
            if _is_missing(error):
                continue
            raise OutputError(f"{prefix}{os_error_reason(error)}") from error
        if not stat.S_ISDIR(ancestor_stat.st_mode):
            raise OutputError(f"{prefix}{str(ancestor)!r} is a file, expected a folder")
        break
    else:  # pragma: no cover - the root or "." always exists
        return
    limit = _name_max(ancestor)
    for name in folder.relative_to(ancestor).parts:
        if len(os.fsencode(name)) > limit:
            raise OutputError(
                f"{prefix}the name {name[:16]!r}... is {len(os.fsencode(name))} bytes, the "
                f"file system takes at most {limit}; choose a shorter name"
            )
    _probe_writable(ancestor, f"{prefix}cannot create it in {str(ancestor)!r}: ")


def check_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check that images can be saved in ``path`` before any work starts; leaves nothing.

    - an existing folder: a temporary file is created and removed in it (the only sure
      writability test: permissions, ACLs, read-only mounts, root, a full disk);
    - a missing folder: fine (the first save creates it) when every missing name fits
      the file system (``pathconf`` ``PC_NAME_MAX``, usually 255 bytes) and its nearest
      existing ancestor is a folder that passes the same temporary-file test;
    - anything else (a file, a file as an ancestor) is an error.

    Args:
        path: the output folder.
        option: how the message names it, e.g. ``"--out"``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: e.g. ``--out 'x': is a file, expected a folder``.
    """
    folder = Path(path)
    prefix = f"{option} {str(folder)!r}: "
    try:
        folder_stat = os.stat(folder)
    except OSError as error:
        if not _is_missing(error):
            raise OutputError(f"{prefix}{os_error_reason(error)}") from error
        if os.path.islink(folder):
            raise OutputError(f"{prefix}is a link to nothing, expected a folder") from error
        _check_missing_folder(folder, prefix)
        return folder
    if not stat.S_ISDIR(folder_stat.st_mode):
        raise OutputError(f"{prefix}is a file, expected a folder")
    _probe_writable(folder, f"{prefix}cannot write in it: ")
    return folder
