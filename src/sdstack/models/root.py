"""``--root WEBUI_DIR`` / ``$SDSTACK_ROOT``: model names resolved the way the web UI does.

The root is a reference-UI install folder (or its ``models/`` folder); see
``sdstack.models.library`` for the layout. Given a root:

- a checkpoint (``--model``) is an existing file or folder path (an explicit path always
  wins), else a name as ``sdstack models list`` shows it, looked up in
  ``models/Stable-diffusion`` (``ModelLibrary.find``: relative path, with or without
  extension, file name, stem), else the web UI's title ``name.safetensors [hash]``, else a
  hash: 10 to 64 hex = a prefix of the file's sha256 (infotext "Model hash" is its first
  10), 8 hex = the legacy model hash;
- a VAE (``--vae``) the same way in ``models/VAE`` (and ``*.vae.*`` beside checkpoints);
- the embeddings folder defaults to ``embeddings/`` (beside ``models/`` when the root is
  the models folder); an explicit ``--embeddings`` wins;
- the LoRA folders are ``models/Lora`` and ``models/LyCORIS``, those that exist.

Without a root, paths are returned as given (the loaders report missing files). An
existing path that is a FIFO, device or socket is refused, with or without a root.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning
from sdstack.models import hashes
from sdstack.models.library import (
    ModelEntry,
    ModelLibrary,
    ModelLibraryError,
    ModelNotFoundError,
)

ROOT_ENVIRONMENT_VARIABLE = "SDSTACK_ROOT"
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
_HEX10_64 = re.compile(r"^[0-9a-f]{10,64}$")
_TITLE = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


@dataclass(frozen=True)
class ResolvedPaths:
    """What a root and the model options resolve to (None: not given, nothing found).

    ``library`` is None without a root; ``lora_folders`` is empty then.
    """

    library: ModelLibrary | None
    model: Path | None
    vae: Path | None
    embeddings: Path | None
    lora_folders: tuple[Path, ...]
    merge: Any = None  # a ``merge:`` model: the MergeSpec, ``model`` is its A


def root_folder(
    root: str | os.PathLike[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
    holds: str = "models/ and embeddings/",
) -> Path | None:
    """The web UI folder ``root``, else ``$SDSTACK_ROOT``, else None, checked to exist.

    Raises:
        ModelLibraryError: it does not exist or is not a folder; the message names
            ``--root`` or ``SDSTACK_ROOT`` and says it should hold ``holds``.
    """
    environ = os.environ if environ is None else environ
    if root is not None:
        path, label = Path(root).expanduser(), f"--root {root}"
    elif environ.get(ROOT_ENVIRONMENT_VARIABLE):
        value = environ[ROOT_ENVIRONMENT_VARIABLE]
        path, label = Path(value).expanduser(), f"{ROOT_ENVIRONMENT_VARIABLE}={value}"
    else:
        return None
    if not path.is_dir():
        problem = "not a folder" if path.exists() else "folder not found"
        raise ModelLibraryError(
            f"{label}: {problem}; pass the web UI install folder (the one that holds "
            f"{holds}) or its models/ folder"
        )
    return path


def open_library(
    root: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> ModelLibrary | None:
    """The ``ModelLibrary`` of ``root``, else of ``$SDSTACK_ROOT``, else None.

    Raises:
        ModelLibraryError: the root does not exist or is not a folder (the message names
            ``--root`` or ``SDSTACK_ROOT``), or holds none of the web UI folders.
    """
    path = root_folder(root, environ=environ)
    return None if path is None else ModelLibrary(path)


def resolve_model_paths(
    root: str | os.PathLike[str] | None,
    *,
    model: str | None,
    vae: str | None,
    embeddings: str | None,
    progress: hashes.ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedPaths:
    """Resolve ``--model``/``--vae``/``--embeddings`` against ``root`` (or ``$SDSTACK_ROOT``).

    See the module docstring for the lookup order. ``progress(n)`` is called for bytes
    read while hashing files to find a model by hash (only files not cached yet).

    Raises:
        ModelLibraryError: a bad root (see ``open_library``), or a name or hash that
            matches no file (names the closest) or several (lists them).
    """
    library = open_library(root, environ=environ)
    if library is None:
        return ResolvedPaths(
            None,
            None if model is None else _explicit(Path(model).expanduser()),
            None if vae is None else _explicit(Path(vae).expanduser()),
            None if embeddings is None else Path(embeddings).expanduser(),
            (),
        )
    if embeddings is not None:
        embeddings_folder: Path | None = Path(embeddings).expanduser()
    else:
        embeddings_folder = next(iter(library.folders["embedding"]), None)
    return ResolvedPaths(
        library,
        resolve_path(library, "checkpoint", model, progress),
        resolve_path(library, "vae", vae, progress),
        embeddings_folder,
        library.folders["lora"],
    )


def resolve_path(
    library: ModelLibrary,
    kind: str,
    text: str | None,
    progress: hashes.ProgressCallback | None = None,
) -> Path | None:
    """An existing path as given (see ``_explicit``), else ``find_model(...).path``."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if path.exists():
        return _explicit(path)
    return find_model(library, kind, text, progress=progress).path


def _explicit(path: Path) -> Path:
    """``path``, unless it exists and is neither a regular file nor a folder (a FIFO or a
    device would hang or never end a load): then ``ModelLibraryError``."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # missing: the loader says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ModelLibraryError(
            f"{path}: {hashes.file_type_name(mode)}, not a model file or folder"
        )
    return path


def find_model(
    library: ModelLibrary,
    kind: str,
    text: str,
    *,
    progress: hashes.ProgressCallback | None = None,
) -> ModelEntry:
    """The entry of ``kind`` named by ``text``: a name, a ``name [hash]`` title, a hash.

    Raises:
        ModelNotFoundError: nothing matches (the closest names are suggested).
        ModelLibraryError: several files match (listed).
    """
    try:
        return library.find(kind, text)
    except ModelNotFoundError as not_named:
        title = _TITLE.match(text)
        if title is not None:
            try:
                return library.find(kind, title["name"])
            except ModelNotFoundError:
                pass
        if not _looks_like_hash(kind, text):
            raise
        try:
            return find_by_hash(library, kind, text, progress=progress)
        except ModelNotFoundError as not_hashed:
            raise ModelNotFoundError(f"{not_named}; {not_hashed}") from None


def _looks_like_hash(kind: str, text: str) -> bool:
    text = text.lower()
    return bool(_HEX10_64.match(text) or (kind == "checkpoint" and _HEX8.match(text)))


def find_by_hash(
    library: ModelLibrary,
    kind: str,
    digest: str,
    *,
    progress: hashes.ProgressCallback | None = None,
) -> ModelEntry:
    """The entry whose ``sha256()`` starts with ``digest`` (10 to 64 hex; infotext "Model
    hash" is 10), or, for checkpoints, whose ``legacy_model_hash`` is ``digest`` (8 hex).

    Cached hashes are tried first; files not hashed yet are read (and cached) only when
    no cached one matches. Files with the same sha256 count as one (the first listed
    wins); every legacy-hash match counts (files of at most 1 MiB all have ``e3b0c442``).
    A file that cannot be read is skipped with an ``SdstackWarning``.

    Raises:
        ModelNotFoundError: no file matches.
        ModelLibraryError: ``digest`` is not hex of those lengths, or two different files
            match (lists them).
    """
    entries, text = library.entries_of(kind), digest.lower()
    if kind == "checkpoint" and _HEX8.match(text):
        found = {str(e.path): e for e in entries if _legacy(e) == text}
        label = "legacy hash"
    elif _HEX10_64.match(text):
        found, label = _by_sha256_prefix(entries, text, progress), "hash"
    else:
        raise ModelLibraryError(f"{digest!r} is not a {kind} hash (10 to 64 hex digits)")
    where = library.describe_folders(kind)
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        paths = ", ".join(entry.relative_path for entry in found.values())
        raise ModelLibraryError(
            f"{kind} {label} {digest!r} is ambiguous {where}: {paths}; give the name or a "
            "longer hash"
        )
    raise ModelNotFoundError(f"no {kind} has the {label} {digest!r} ({len(entries)} files)")


def _legacy(entry: ModelEntry) -> str | None:
    """``legacy_model_hash`` of the entry, or None after a warning (unreadable file)."""
    try:
        return hashes.legacy_model_hash(entry.path)
    except (OSError, ValueError) as error:
        _warn_unreadable(entry, error)
        return None


def _by_sha256_prefix(
    entries: list[ModelEntry], prefix: str, progress: hashes.ProgressCallback | None
) -> dict[str, ModelEntry]:
    """full hash -> first entry whose hash starts with ``prefix`` (cached ones first)."""
    cached = {entry: _cached(entry) for entry in entries}
    found: dict[str, ModelEntry] = {}
    for entry, digest in cached.items():
        if digest is not None and digest.startswith(prefix):
            found.setdefault(digest, entry)
    for entry, digest in cached.items():
        if found:
            break
        if digest is None:
            try:
                digest = entry.sha256(progress=progress)
            except (OSError, ValueError) as error:  # SdstackError is a ValueError
                _warn_unreadable(entry, error)
                continue
            if digest.startswith(prefix):
                found.setdefault(digest, entry)
    return found


def _cached(entry: ModelEntry) -> str | None:
    try:
        return entry.cached_sha256()
    except (OSError, ValueError):
        return None  # hashing it will say why


def _warn_unreadable(entry: ModelEntry, error: Exception) -> None:
    warnings.warn(f"could not hash {entry.path}: {error}; skipped", SdstackWarning, stacklevel=4)
