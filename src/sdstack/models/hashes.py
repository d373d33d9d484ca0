"""File hashes as the reference web UI writes them, with a persistent cache.

- ``file_sha256``: sha256 of the whole file (the reference's "sha256"), streamed in
  1 MiB blocks and cached by (resolved path, size, mtime_ns).
- ``short_hash``: its first 10 hex (infotext "Model hash", "VAE hash").
- ``short_hash12``: its first 12 hex (infotext "TI hashes").
- ``addnet_hash`` / ``addnet_short_hash``: the kohya / additional-networks hash the
  reference uses for LoRA files: for ``.safetensors``, sha256 of the bytes after the
  header (so editing metadata keeps the hash); other files, the whole-file sha256.
  First 12 hex in "Lora hashes".
- ``legacy_model_hash``: the old 8-hex model hash, sha256 of 0x10000 bytes at 0x100000.

The cache is one JSON file, ``hashes.json`` in ``$SDSTACK_CACHE_DIR``, else
``$XDG_CACHE_HOME/sdstack``, else ``~/.cache/sdstack``. It is rewritten atomically
(temp file + ``os.replace``) under a thread lock and, on POSIX, an ``flock`` on
``hashes.json.lock``; an unreadable or corrupt cache is ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sdstack.atomic_files import temporary_file
from sdstack.models.safetensors_header import read_safetensors_header

BLOCK_SIZE = 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
CACHE_FILE_NAME = "hashes.json"
CACHE_VERSION = 1

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just hashed (for a progress bar over bytes)."""

_lock = threading.RLock()


class HashCacheWarning(UserWarning):
    """The hash cache could not be written (hashes are still returned)."""


def cache_dir() -> Path:
    """Folder of sdstack's caches: $SDSTACK_CACHE_DIR, $XDG_CACHE_HOME/sdstack, ~/.cache/sdstack."""
    explicit = os.environ.get("SDSTACK_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "sdstack"
    return Path.home() / ".cache" / "sdstack"


def hash_cache_path() -> Path:
    """The JSON file that holds cached hashes (read from the environment on each call)."""
    return cache_dir() / CACHE_FILE_NAME


def _read_cache(cache_path: Path) -> dict[str, dict]:
    """The cache's sections, ``{}`` when missing, unreadable or not our JSON layout."""
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    sections = data.get("sections")
    if not isinstance(sections, dict):
        return {}
    return {name: entries for name, entries in sections.items() if isinstance(entries, dict)}


def _write_cache(cache_path: Path, sections: dict[str, dict]) -> None:
    """Write the cache atomically; warn (never raise) when that is impossible."""
    payload = json.dumps({"version": CACHE_VERSION, "sections": sections}, indent=1)
    try:
        with temporary_file(cache_path.parent, suffix=".json") as temporary:
            temporary.write_text(payload, encoding="utf-8")
            os.replace(temporary, cache_path)
    except OSError as error:
        warnings.warn(
            f"could not write the hash cache {cache_path}: {error}; hashes will be "
            "recomputed next time",
            HashCacheWarning,
            stacklevel=4,
        )


def _file_key(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): a cached hash is valid while all three match."""
    resolved = path.resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def _cached(section: str, key: tuple[str, int, int]) -> str | None:
    """The hash cached for ``key`` in ``section``, or None (missing or stale)."""
    name, size, mtime_ns = key
    with _lock:
        entry = _read_cache(hash_cache_path()).get(section, {}).get(name)
    if (
        isinstance(entry, dict)
        and entry.get("size") == size
        and entry.get("mtime_ns") == mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    return None


@contextmanager
def _interprocess_lock(cache_path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<cache>.lock`` where available (POSIX); else no-op."""
    try:
        import fcntl
    except ImportError:  # Windows: the in-process lock and atomic replace still hold
        yield
        return
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_path.with_name(cache_path.name + ".lock"), os.O_CREAT | os.O_RDWR)
    except OSError:
        yield  # unwritable folder: _write_cache will warn
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store(section: str, key: tuple[str, int, int], digest: str) -> None:
    """Record ``digest`` for ``key`` (re-reading the file so concurrent entries survive)."""
    name, size, mtime_ns = key
    cache_path = hash_cache_path()
    with _lock, _interprocess_lock(cache_path):
        sections = _read_cache(cache_path)
        sections.setdefault(section, {})[name] = {
            "size": size,
            "mtime_ns": mtime_ns,
            "sha256": digest,
        }
        _write_cache(cache_path, sections)


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
) -> str:
    path = Path(path)
    key = _file_key(path)
    if use_cache and (digest := _cached(section, key)) is not None:
        return digest
    digest = compute(path)
    if use_cache:
        _store(section, key, digest)
    return digest


def file_sha256(
    path: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    use_cache: bool = True,
) -> str:
    """Reference-UI "sha256": sha256 of the whole file, 64 hex, cached.

    The cache entry is keyed by the resolved path and reused only while the file's size
    and ``st_mtime_ns`` are unchanged. ``progress(n)`` is called after each block of n
    bytes actually read (never on a cache hit).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    return _cached_hash("sha256", path, lambda p: _sha256_from(p, 0, progress), use_cache)


def cached_file_sha256(path: str | os.PathLike[str]) -> str | None:
    """The cached ``file_sha256`` of ``path`` if still valid, else None (nothing is read)."""
    return _cached("sha256", _file_key(Path(path)))


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
) -> str:
    """kohya / additional-networks hash the reference uses for LoRA files, 64 hex, cached.

    ``.safetensors``: sha256 of the bytes from ``8 + N`` (after the JSON header) to the
    end, so metadata edits do not change it. Any other file: ``file_sha256(path)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SafetensorsHeaderError: a ``.safetensors`` file with a truncated/corrupt header.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path, progress=progress, use_cache=use_cache)

    def compute(p: Path) -> str:
        _, data_offset = read_safetensors_header(p)
        return _sha256_from(p, data_offset, progress)

    return _cached_hash("addnet", path, compute, use_cache)


def cached_addnet_hash(path: str | os.PathLike[str]) -> str | None:
    """The cached ``addnet_hash`` of ``path`` if still valid, else None (nothing is read)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return cached_file_sha256(path)
    return _cached("addnet", _file_key(path))


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
    """
    with Path(path).open("rb") as file:
        file.seek(LEGACY_OFFSET)
        data = file.read(LEGACY_LENGTH)
    return hashlib.sha256(data).hexdigest()[:8]
