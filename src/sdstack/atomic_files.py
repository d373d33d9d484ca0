"""Outputs written atomically: a temporary file beside the target, then ``os.replace``.

A reader never sees a half-written file and a failure leaves nothing behind. Callers keep
their own naming and overwrite policy; this module only owns the temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def temporary_file(folder: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A new, empty, hidden file in ``folder`` (created if needed) to write an output into.

    Write it, then ``os.replace(path, target)`` inside the block. Whatever is still at the
    temporary path when the block exits, normally or by an exception, is removed.
    """
    directory = Path(folder)
    directory.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
