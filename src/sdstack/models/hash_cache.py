"""sdstack's persistent hash cache: one JSON file, read once and written once per run.

The file is ``hashes.json`` in ``$SDSTACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdstack``,
else ``~/.cache/sdstack``: ``{"version": 1, "sections": {section: {resolved path:
{"size", "mtime_ns", "sha256"}}}}`` (sections ``sha256`` and ``addnet``). A
:class:`HashCache` reads it on the first lookup, keeps it in memory and writes it once
(``flush()``: by the commands when done, by a ``with`` block, or at interpreter exit for
the default cache). Writing re-reads the file under an ``flock`` on ``hashes.json.lock``
(POSIX), merges, and replaces it atomically (temp file + ``os.replace``), so entries
stored meanwhile by another process survive. A corrupt cache file is a
``HashCacheWarning``, kept aside as ``hashes.json.bad``, and treated as empty.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdstack.atomic_files import replace, temporary_file
from sdstack.errors import SdstackWarning

CACHE_FILE_NAME = "hashes.json"
CACHE_VERSION = 1

FileKey = tuple[str, int, int]
"""(resolved path, size, mtime_ns): a cached hash is valid while all three match."""


class HashCacheWarning(SdstackWarning):
    """The hash cache could not be read or written (hashes are still returned)."""


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


def _parse_cache(raw: bytes) -> dict[str, dict]:
    """The sections of a cache file's bytes; ValueError saying why they are not our layout."""
    data = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError, JSONDecodeError: ValueError
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
    sections = data.get("sections")
    if not isinstance(sections, dict):
        raise ValueError("'sections' is not an object")
    return {name: entries for name, entries in sections.items() if isinstance(entries, dict)}


def _read_cache(cache_path: Path, *, locked: bool = False) -> dict[str, dict]:
    """The cache's sections; ``{}`` (no warning) when the file does not exist.

    An unreadable file warns; a corrupt one warns and is moved to ``<name>.bad`` (re-read
    under the interprocess lock first, unless ``locked``: a concurrent writer may just
    have replaced it).
    """
    try:
        with open(cache_path, "rb") as file:
            raw = file.read()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as error:
        warnings.warn(
            f"could not read the hash cache {cache_path}: {error}; hashes not in memory "
            "will be recomputed",
            HashCacheWarning,
            stacklevel=2,
        )
        return {}
    try:
        return _parse_cache(raw)
    except ValueError as error:
        if not locked:
            with _interprocess_lock(cache_path):
                return _read_cache(cache_path, locked=True)
        _set_aside(cache_path, error)
        return {}


def _set_aside(cache_path: Path, error: ValueError) -> None:
    """Move a corrupt cache file to ``<name>.bad`` and warn (the cache starts empty)."""
    bad = cache_path.with_name(cache_path.name + ".bad")
    try:
        os.replace(cache_path, bad)
        where = f"kept it as {bad}"
    except OSError as move_error:
        where = f"could not keep it as {bad} ({move_error}); it will be overwritten"
    warnings.warn(
        f"the hash cache {cache_path} is corrupt ({error}); {where} and started an empty "
        "cache (hashes will be recomputed)",
        HashCacheWarning,
        stacklevel=3,
    )


def _write_cache(cache_path: Path, sections: dict[str, dict]) -> None:
    """Write the cache atomically; warn (never raise) when that is impossible."""
    payload = json.dumps({"version": CACHE_VERSION, "sections": sections}, indent=1)
    try:
        with temporary_file(cache_path.parent, suffix=".json") as temporary:
            temporary.write_text(payload, encoding="utf-8")
            replace(temporary, cache_path)
    except OSError as error:
        warnings.warn(
            f"could not write the hash cache {cache_path}: {error}; hashes will be "
            "recomputed next time",
            HashCacheWarning,
            stacklevel=3,
        )


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
        lock_path = cache_path.with_name(cache_path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        yield  # unwritable folder: _write_cache will warn
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class HashCache:
    """The persistent hash cache, read once and written once (see the module docstring).

    ``path`` None follows ``hash_cache_path()`` (the environment, looked up at each use;
    when it changes, what is pending is written to the old file first). The file is read
    on the first lookup; ``put`` only records in memory; ``flush()`` (also on leaving a
    ``with`` block) re-reads the file under the interprocess lock, merges the new entries
    over it (another writer's entries survive; ours win for the same path), and replaces
    it atomically. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._explicit = Path(path) if path is not None else None
        self._lock = threading.RLock()
        self._loaded_path: Path | None = None  # the file ``_sections`` mirrors
        self._sections: dict[str, dict] = {}
        self._pending: dict[str, dict] = {}

    @property
    def path(self) -> Path:
        """The JSON file this cache reads and writes."""
        return self._explicit if self._explicit is not None else hash_cache_path()

    def _view(self) -> dict[str, dict]:
        """The in-memory sections of ``self.path``, read on first use (hold the lock)."""
        path = self.path
        if path != self._loaded_path:
            self._flush_locked()
            self._sections = _read_cache(path)
            self._loaded_path = path
        return self._sections

    def get(self, section: str, key: FileKey) -> str | None:
        """The hash stored for ``key`` in ``section``, or None (missing or stale)."""
        name, size, mtime_ns = key
        with self._lock:
            entry = self._view().get(section, {}).get(name)
        if (
            isinstance(entry, dict)
            and entry.get("size") == size
            and entry.get("mtime_ns") == mtime_ns
            and isinstance(entry.get("sha256"), str)
        ):
            return entry["sha256"]
        return None

    def put(self, section: str, key: FileKey, digest: str) -> None:
        """Record ``digest`` for ``key`` (in memory; written by ``flush``)."""
        name, size, mtime_ns = key
        entry = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
        with self._lock:
            self._view().setdefault(section, {})[name] = entry
            self._pending.setdefault(section, {})[name] = entry

    def flush(self) -> None:
        """Write new entries, merged with the file's current contents; no-op if none.

        A failed write is a ``HashCacheWarning`` (the entries are dropped, not retried).
        """
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending or self._loaded_path is None:
            return
        path, pending = self._loaded_path, self._pending
        self._pending = {}
        with _interprocess_lock(path):
            sections = _read_cache(path, locked=True)
            for section, entries in pending.items():
                sections.setdefault(section, {}).update(entries)
            _write_cache(path, sections)
        self._sections = sections

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()


_default_cache = HashCache()


def default_cache() -> HashCache:
    """The process-wide cache the hash functions use unless given ``cache=``."""
    return _default_cache


def flush() -> None:
    """Write what the default cache learned (commands call this when done; also atexit)."""
    _default_cache.flush()


atexit.register(flush)
