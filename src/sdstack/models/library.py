"""A models folder laid out like the reference web UI's install folder.

``<root>/models/Stable-diffusion`` checkpoints (.safetensors .ckpt .pt; ``*.vae.*``
files there are VAEs), ``<root>/models/Lora`` and ``<root>/models/LyCORIS`` (.safetensors
.pt .ckpt), ``<root>/models/VAE`` (.safetensors .pt .ckpt), ``<root>/embeddings`` (.pt
.bin .safetensors). ``root`` may also be the ``models`` folder itself (``embeddings``
is then looked for beside it). Folders are scanned recursively: a folder's files sorted
by name, then its subfolders; hidden entries and ``*.preview.*`` files are skipped, and
so, with a warning, is anything that is not a regular file or a folder (see
``iter_model_files``): a listing never opens a FIFO or device, never loops, and one bad
file never ends it.

Short hashes as the reference writes them in infotext: checkpoints and VAEs
``sha256[:10]``; embeddings ``sha256[:12]``; LoRA the ``sshs_model_hash`` from the
file's metadata when present, else the kohya/addnet hash (``addnet_hash``), ``[:12]``.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from sdstack.errors import SdstackError, SdstackWarning
from sdstack.models import hashes
from sdstack.models.safetensors_header import SafetensorsHeaderError, safetensors_metadata

KINDS = ("checkpoint", "lora", "vae", "embedding")
# kind -> (folders relative to an install root, file suffixes)
LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "checkpoint": (("models/Stable-diffusion",), (".safetensors", ".ckpt", ".pt")),
    "lora": (("models/Lora", "models/LyCORIS"), (".safetensors", ".pt", ".ckpt")),
    "vae": (("models/VAE",), (".safetensors", ".pt", ".ckpt")),
    "embedding": (("embeddings",), (".pt", ".bin", ".safetensors")),
}
OTHER_MODEL_FOLDERS = ("models/ControlNet",)
"""Folders that also make a web UI root (their files are found by ``sdstack.control``)."""
SHORT_HASH_LENGTH = {"checkpoint": 10, "vae": 10, "lora": 12, "embedding": 12}
_HEX64 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class ModelLibraryError(SdstackError):
    """A folder that is not laid out like the reference UI, or an unknown model name."""


class ModelNotFoundError(ModelLibraryError):
    """No model of that kind has that name (or hash); the message names the closest."""


def _is_vae_file(path: Path) -> bool:
    """``name.vae.safetensors`` / ``.vae.pt`` / ``.vae.ckpt`` (a VAE beside checkpoints)."""
    return path.stem.lower().endswith(".vae")


@dataclass(frozen=True)
class ModelEntry:
    """One model file: ``name`` is the file stem, ``alias`` the LoRA ``ss_output_name``."""

    kind: str
    name: str
    path: Path
    folder: Path
    size: int
    alias: str | None = None
    metadata_hash: str | None = None  # LoRA sshs_model_hash, lowercase 64 hex
    error: str | None = None  # why listing could not read it (warned; hashing fails too)

    @property
    def relative_path(self) -> str:
        """Path inside its category folder, with ``/`` separators."""
        return self.path.relative_to(self.folder).as_posix()

    def sha256(self, *, progress: hashes.ProgressCallback | None = None) -> str:
        """The full hash behind ``short_hash`` (computed once, then cached on disk)."""
        if self.kind == "lora":
            if self.metadata_hash is not None:
                return self.metadata_hash
            return hashes.addnet_hash(self.path, progress=progress)
        return hashes.file_sha256(self.path, progress=progress)

    def cached_sha256(self) -> str | None:
        """``sha256()`` if it needs no reading of the file, else None."""
        if self.kind == "lora":
            return self.metadata_hash or hashes.cached_addnet_hash(self.path)
        return hashes.cached_file_sha256(self.path)

    def short_hash(self, *, progress: hashes.ProgressCallback | None = None) -> str:
        """Infotext short hash: 10 hex (checkpoint, VAE) or 12 hex (LoRA, embedding)."""
        return self.sha256(progress=progress)[: SHORT_HASH_LENGTH[self.kind]]


def iter_model_files(folder: str | os.PathLike[str], suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Regular files under ``folder`` with these (lowercase) suffixes, recursively.

    Order: a folder's files sorted by name, then its subfolders (sorted). Hidden entries
    (``.name``) and ``*.preview.*`` files are skipped silently. Symlinks are followed; a
    folder reached twice (a link back to a folder it is inside, or a second link to one
    already walked; compared by device and inode) is walked once. Only ``stat`` and
    ``listdir`` are used, nothing is opened, so a hostile folder cannot hang or abort the
    walk: special files (FIFOs, devices, sockets, links to them), dangling links, link
    loops, folder loops and subfolders that cannot be listed are each skipped with an
    ``SdstackWarning`` naming the path.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    info = folder.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"not a folder: {folder}")
    yield from _walk(folder, (info.st_dev, info.st_ino), suffixes, {}, {})


def _warn(message: str) -> None:
    warnings.warn(message, SdstackWarning, stacklevel=3)


def _walk(
    folder: Path,
    identity: tuple[int, int],
    suffixes: tuple[str, ...],
    ancestors: dict[tuple[int, int], Path],
    seen: dict[tuple[int, int], Path],
) -> Iterator[Path]:
    """One folder of ``iter_model_files``: files first, then subfolders (depth first)."""
    seen[identity] = ancestors[identity] = folder
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        _warn(f"{folder}: could not list the folder ({error.strerror or error}); skipped")
        names = []
    subfolders = []
    for name in names:
        if name.startswith("."):
            continue
        path = folder / name
        info = _stat_entry(path)
        if info is None:
            continue
        if stat.S_ISDIR(info.st_mode):
            subfolders.append((path, (info.st_dev, info.st_ino)))
        elif not stat.S_ISREG(info.st_mode):
            kind = hashes.file_type_name(info.st_mode)
            _warn(f"{path}: {kind}, not a model file; skipped")
        elif path.suffix.lower() in suffixes and ".preview." not in name.lower():
            yield path
    for path, child in subfolders:
        if child in ancestors:
            _warn(
                f"{path}: links back to {ancestors[child]}, a folder it is inside (a folder "
                "loop); not followed"
            )
        elif child in seen:
            _warn(f"{path}: the same folder as {seen[child]}, already listed; not listed twice")
        else:
            yield from _walk(path, child, suffixes, ancestors, seen)
    del ancestors[identity]


def _stat_entry(path: Path) -> os.stat_result | None:
    """``os.stat`` (links followed), or None after a warning: dangling link, loop, error."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            _warn(f"{path}: dangling symbolic link (its target does not exist); skipped")
        return None  # else removed while we looked
    except OSError as error:
        if error.errno == errno.ELOOP:
            _warn(f"{path}: symbolic link loop (too many levels of links); skipped")
        else:
            _warn(f"{path}: could not read ({error.strerror or error}); skipped")
        return None


def _lora_metadata(path: Path) -> tuple[str | None, str | None, str | None]:
    """(ss_output_name, sshs_model_hash, why the header could not be read) of a LoRA."""
    if path.suffix.lower() != ".safetensors":
        return None, None, None
    try:
        metadata = safetensors_metadata(path)
    except SafetensorsHeaderError as error:
        return None, None, str(error)
    except OSError as error:
        return None, None, f"{path}: could not read the header ({error.strerror or error})"
    alias = metadata.get("ss_output_name") or None
    stored = metadata.get("sshs_model_hash", "")
    digest = stored.lower().removeprefix("0x") if _HEX64.match(stored) else None
    return alias, digest, None


def lora_sha256(
    path: str | os.PathLike[str], *, progress: hashes.ProgressCallback | None = None
) -> str:
    """The LoRA hash the reference writes (first 12 hex) in "Lora hashes", 64 hex.

    ``sshs_model_hash`` from the safetensors metadata when it is 64 hex, else
    ``hashes.addnet_hash(path)`` (tensor bytes after the header; whole file for .pt/.ckpt).
    """
    path = Path(path)
    _, stored, _ = _lora_metadata(path)
    return stored if stored is not None else hashes.addnet_hash(path, progress=progress)


def list_entries(kind: str, folders: tuple[Path, ...]) -> list[ModelEntry]:
    """Entries of the ``kind`` files under ``folders`` (walked in order); a LoRA header
    that cannot be read is an ``SdstackWarning`` (listed without alias, ``error`` set)."""
    entries = []
    for folder in folders:
        for path in iter_model_files(folder, LAYOUT[kind][1]):
            try:
                size = path.stat().st_size
            except OSError:
                continue  # removed since the walk saw it
            alias, metadata_hash, error = (
                _lora_metadata(path) if kind == "lora" else (None, None, None)
            )
            if error is not None:
                _warn(f"{error}; listed without its alias (ss_output_name)")
            entries.append(
                ModelEntry(kind, path.stem, path, folder, size, alias, metadata_hash, error)
            )
    return entries


class ModelLibrary:
    """The models of a reference-UI install folder, by kind (see the module docstring).

    ``root`` is the install folder or its ``models/`` folder; in the latter case
    ``embeddings/`` is looked for beside it (``root/../embeddings``), as the reference keeps
    it. Raises ``FileNotFoundError`` when ``root`` does not exist and ``ModelLibraryError``
    when it holds none of the expected folders (the message lists them).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"models root folder not found: {self.root}")
        subfolders = {Path(f).name for relative, _ in LAYOUT.values() for f in relative}
        subfolders |= {Path(f).name for f in OTHER_MODEL_FOLDERS}
        self.is_models_folder = not (self.root / "models").is_dir() and any(
            (self.root / name).is_dir() for name in subfolders - {"embeddings"}
        )
        self.folders: dict[str, tuple[Path, ...]] = {
            kind: tuple(self._find_folders(relative)) for kind, (relative, _) in LAYOUT.items()
        }
        others = tuple(self._find_folders(OTHER_MODEL_FOLDERS))
        if not any(self.folders.values()) and not others:
            wanted = [f for relative, _ in LAYOUT.values() for f in relative]
            wanted += OTHER_MODEL_FOLDERS
            raise ModelLibraryError(
                f"{self.root} does not look like a web UI install folder: none of "
                f"{', '.join(wanted)} found (pass the folder that contains models/ and "
                "embeddings/, or the models/ folder itself)"
            )

    def _find_folders(self, relatives: tuple[str, ...]) -> Iterator[Path]:
        """Existing folders for these layout paths: under root, else (root = models/)
        ``root/<name>`` for ``models/<name>`` and ``root/../embeddings``."""
        for relative in relatives:
            candidates = [self.root / relative]
            if relative.startswith("models/"):
                candidates.append(self.root / relative.removeprefix("models/"))
            elif self.is_models_folder:
                candidates.append(Path(os.path.abspath(self.root)).parent / relative)
            for candidate in candidates:
                if candidate.is_dir():
                    yield candidate
                    break

    def display_path(self, path: Path) -> str:
        """``path`` relative to ``root`` with ``/`` (``../embeddings/x.pt`` beside models/)."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def _entries(self, kind: str, folders: tuple[Path, ...]) -> list[ModelEntry]:
        return list_entries(kind, folders)

    def _checkpoint_folder(self) -> tuple[list[ModelEntry], list[ModelEntry]]:
        """(checkpoints, ``*.vae.*`` VAEs) of models/Stable-diffusion, from one walk."""
        entries = self._entries("checkpoint", self.folders["checkpoint"])
        checkpoints = [entry for entry in entries if not _is_vae_file(entry.path)]
        beside = [replace(entry, kind="vae") for entry in entries if _is_vae_file(entry.path)]
        return checkpoints, beside

    def checkpoints(self) -> list[ModelEntry]:
        """Checkpoint files (``*.vae.*`` files excluded)."""
        return self._checkpoint_folder()[0]

    def loras(self) -> list[ModelEntry]:
        """LoRA and LyCORIS files, ``alias`` = ``ss_output_name`` when present."""
        return self._entries("lora", self.folders["lora"])

    def vaes(self) -> list[ModelEntry]:
        """VAE files in models/VAE, then ``*.vae.*`` files beside the checkpoints."""
        return self._entries("vae", self.folders["vae"]) + self._checkpoint_folder()[1]

    def embeddings(self) -> list[ModelEntry]:
        """Textual-inversion files (not loaded: use ``EmbeddingLibrary`` for that)."""
        return self._entries("embedding", self.folders["embedding"])

    def entries(self, kinds: tuple[str, ...] = KINDS) -> list[ModelEntry]:
        """All entries of these kinds, in ``KINDS`` order (each folder walked once)."""
        found: dict[str, list[ModelEntry]] = {}
        if "checkpoint" in kinds or "vae" in kinds:
            checkpoints, beside = self._checkpoint_folder()
            found["checkpoint"] = checkpoints
            found["vae"] = self._entries("vae", self.folders["vae"]) + beside
        if "lora" in kinds:
            found["lora"] = self.loras()
        if "embedding" in kinds:
            found["embedding"] = self.embeddings()
        return [entry for kind in KINDS if kind in kinds for entry in found[kind]]

    def describe_folders(self, kind: str) -> str:
        """``in <folders of kind>`` (VAEs: also the checkpoint folder), for messages."""
        folders = self.folders[kind] + (self.folders["checkpoint"] if kind == "vae" else ())
        if not folders:
            return f"under {self.root} (no {', '.join(LAYOUT[kind][0])} folder)"
        return "in " + ", ".join(str(folder) for folder in folders)

    def entries_of(self, kind: str) -> list[ModelEntry]:
        """``entries((kind,))``, raising ``ModelLibraryError`` for an unknown kind."""
        if kind not in KINDS:
            raise ModelLibraryError(f"unknown model kind {kind!r}; expected one of {KINDS}")
        return self.entries((kind,))

    def find(self, kind: str, name: str) -> ModelEntry:
        """The entry of ``kind`` that ``name`` names, as ``models list`` shows them.

        Tried in order, the first that matches anything wins: relative path in its folder
        (``anime/any.ckpt``), that without extension (``anime/any``), file name
        (``any.ckpt``), name (``any``), LoRA alias (``ss_output_name``). ``\\`` counts as
        ``/``.

        Raises:
            ModelNotFoundError: no entry (names the closest).
            ModelLibraryError: several entries at that step (lists their paths), or an
                unknown ``kind``.
        """
        return find_entry(self.entries_of(kind), kind, name, self.describe_folders(kind))


def find_entry(entries: list[ModelEntry], kind: str, name: str, where: str) -> ModelEntry:
    """The one entry of ``entries`` that ``name`` names (``ModelLibrary.find``'s steps);
    ``where`` ("in <folders>") ends the messages.

    Raises:
        ModelNotFoundError, ModelLibraryError: as ``ModelLibrary.find``.
    """
    found = _match_name(entries, name.replace("\\", "/"))
    if len(found) == 1:
        return found[0]
    if found:
        paths = [entry.relative_path for entry in found]
        fix = "the relative path"
        if len(set(paths)) < len(paths):  # the same path in models/Lora and LyCORIS
            paths, fix = [str(entry.path) for entry in found], "the file's path"
        raise ModelLibraryError(
            f"{kind} name {name!r} is ambiguous {where}: "
            f"{', '.join(paths)}; give {fix} (e.g. {paths[0]!r})"
        )
    known = sorted({entry.name for entry in entries} | {e.alias for e in entries if e.alias})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFoundError(f"no {kind} named {name!r} {where}{hint}")


def _match_name(entries: list[ModelEntry], name: str) -> list[ModelEntry]:
    """Entries matching ``name`` at the first ``find`` step that matches any."""
    steps = (
        lambda e: e.relative_path,
        lambda e: e.relative_path.rsplit(".", 1)[0],
        lambda e: e.path.name,
        lambda e: e.name,
        lambda e: e.alias,
    )
    for key in steps:
        found = [entry for entry in entries if key(entry) == name]
        if found:
            return found
    return []
