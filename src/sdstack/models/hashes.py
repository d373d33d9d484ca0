"""File hashes as the reference web UI writes them, cached (``sdstack.models.hash_cache``).

- ``file_sha256``: sha256 of the whole file (the reference's "sha256"), streamed in
  1 MiB blocks and cached by (resolved path, size, mtime_ns).
- ``short_hash``: its first 10 hex (infotext "Model hash", "VAE hash").
- ``short_hash12``: its first 12 hex (infotext "TI hashes").
- ``addnet_hash`` / ``addnet_short_hash``: the kohya / additional-networks hash the
  reference uses for LoRA files: for ``.safetensors``, sha256 of the bytes after the
  header (so editing metadata keeps the hash); other files, the whole-file sha256.
  First 12 hex in "Lora hashes".
- ``legacy_model_hash``: the old 8-hex model hash, sha256 of 0x10000 bytes at 0x100000.

Only regular files are hashed: a FIFO, device, socket or folder is a ``HashError``
before anything is opened (opening a FIFO would block). The cache is read once and
written once per run; call ``flush()`` when done (commands do; so does ``atexit``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from sdstack.errors import SdstackError
from sdstack.models import hash_cache
from sdstack.models.hash_cache import (  # noqa: F401  (re-exported: the public hash API)
    CACHE_FILE_NAME,
    CACHE_VERSION,
    FileKey,
    HashCache,
    HashCacheWarning,
    cache_dir,
    default_cache,
    flush,
    hash_cache_path,
)
from sdstack.models.safetensors_header import read_safetensors_header

BLOCK_SIZE = 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just hashed (for a progress bar over bytes)."""


class HashError(SdstackError):
    """A path that cannot be hashed: not a regular file."""


def file_type_name(mode: int) -> str:
    """What ``stat.st_mode`` is, for messages: "a FIFO (named pipe)", "a folder"..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _or_default(cache: HashCache | None) -> HashCache:
    return cache if cache is not None else hash_cache.default_cache()


def _regular_file(path: Path) -> os.stat_result:
    """``stat`` of ``path`` (links followed), refusing anything but a regular file.

    Raises:
        FileNotFoundError: no such file (or a dangling link).
        HashError: a FIFO, device, socket or folder (never opened: a FIFO would block).
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise HashError(
            f"{path}: {file_type_name(info.st_mode)}, not a regular file; only model files "
            "can be hashed"
        )
    return info


def _file_key(path: Path) -> FileKey:
    """(resolved path, size, mtime_ns) of a regular file (see ``_regular_file``)."""
    info = _regular_file(path)
    return str(path.resolve()), info.st_size, info.st_mtime_ns


def _sha256_from(path: Path, offset: int, progress: ProgressCallback | None) -> str:
    """sha256 of the bytes of ``path`` from ``offset`` to the end, 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(offset)
        while block := file.read(BLOCK_SIZE):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()


def _cached_hash(
    section: str,
    path: str | os.PathLike[str],
    compute: Callable[[Path], str],
    use_cache: bool,
    cache: HashCache | None,
) -> str:
    path = Path(path)
    key = _file_key(path)
    cache = _or_default(cache)
    if use_cache and (digest := cache.get(section, key)) is not None:
        return digest
    digest = compute(path)
    if use_cache:
        cache.put(section, key, digest)
    return digest


def file_sha256(
    path: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    use_cache: bool = True,
    cache: HashCache | None = None,
) -> str:
    """Reference-UI "sha256": sha256 of the whole file, 64 hex, cached.

    The cache entry (``cache``, default ``default_cache()``) is keyed by the resolved path
    and reused only while the file's size and ``st_mtime_ns`` are unchanged.
    ``progress(n)`` is called after each block of n bytes actually read (never on a hit).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        HashError: ``path`` is not a regular file (FIFO, device, folder...).
    """

    def compute(p: Path) -> str:
        return _sha256_from(p, 0, progress)

    return _cached_hash("sha256", path, compute, use_cache, cache)


def cached_file_sha256(
    path: str | os.PathLike[str], *, cache: HashCache | None = None
) -> str | None:
    """The cached ``file_sha256`` of ``path`` if still valid, else None (nothing is read)."""
    return _or_default(cache).get("sha256", _file_key(Path(path)))


def short_hash(path: str | os.PathLike[str], *, progress: ProgressCallback | None = None) -> str:
    """Reference-UI "shorthash" / infotext "Model hash": ``file_sha256(path)[:10]``."""
    return file_sha256(path, progress=progress)[:10]


def short_hash12(path: str | os.PathLike[str], *, progress: ProgressCallback | None = None) -> str:
    """Textual-inversion short hash ("TI hashes"): ``file_sha256(path)[:12]``."""
    return file_sha256(path, progress=progress)[:12]


def addnet_hash(
    path: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    use_cache: bool = True,
    cache: HashCache | None = None,
) -> str:
    """kohya / additional-networks hash the reference uses for LoRA files, 64 hex, cached.

    ``.safetensors``: sha256 of the bytes from ``8 + N`` (after the JSON header) to the
    end, so metadata edits do not change it. Any other file: ``file_sha256(path)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        HashError: ``path`` is not a regular file.
        SafetensorsHeaderError: a ``.safetensors`` file with a truncated/corrupt header.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path, progress=progress, use_cache=use_cache, cache=cache)

    def compute(p: Path) -> str:
        _, data_offset = read_safetensors_header(p)
        return _sha256_from(p, data_offset, progress)

    return _cached_hash("addnet", path, compute, use_cache, cache)


def cached_addnet_hash(
    path: str | os.PathLike[str], *, cache: HashCache | None = None
) -> str | None:
    """The cached ``addnet_hash`` of ``path`` if still valid, else None (nothing is read)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return cached_file_sha256(path, cache=cache)
    return _or_default(cache).get("addnet", _file_key(path))


def addnet_short_hash(
    path: str | os.PathLike[str], *, progress: ProgressCallback | None = None
) -> str:
    """LoRA short hash ("Lora hashes"): ``addnet_hash(path)[:12]``."""
    return addnet_hash(path, progress=progress)[:12]


def legacy_model_hash(path: str | os.PathLike[str]) -> str:
    """Reference-UI legacy "model hash": sha256 of 0x10000 bytes read at 0x100000, 8 hex.

    Like the reference, it hashes whatever that read returns: for a file shorter than
    0x110000 bytes only the bytes from 0x100000 to the end, and for a file of at most
    1 MiB nothing at all (``sha256(b"")[:8] == "e3b0c442"``). Not cached (64 KiB read).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        HashError: ``path`` is not a regular file.
    """
    path = Path(path)
    _regular_file(path)
    with path.open("rb") as file:
        file.seek(LEGACY_OFFSET)
        data = file.read(LEGACY_LENGTH)
    return hashlib.sha256(data).hexdigest()[:8]
