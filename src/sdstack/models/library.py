"""A models folder laid out like the reference web UI's install folder.

``<root>/models/Stable-diffusion`` checkpoints (.safetensors .ckpt .pt; ``*.vae.*``
files there are VAEs), ``<root>/models/Lora`` and ``<root>/models/LyCORIS`` (.safetensors
.pt .ckpt), ``<root>/models/VAE`` (.safetensors .pt .ckpt), ``<root>/embeddings`` (.pt
.bin .safetensors). ``root`` may also be the ``models`` folder itself. Folders are
scanned recursively: a folder's files sorted by name, then its subfolders; hidden
entries and ``*.preview.*`` files are skipped.

Short hashes as the reference writes them in infotext: checkpoints and VAEs
``sha256[:10]``; embeddings ``sha256[:12]``; LoRA the ``sshs_model_hash`` from the
file's metadata when present, else the kohya/addnet hash (``addnet_hash``), ``[:12]``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdstack.errors import SdstackError
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
SHORT_HASH_LENGTH = {"checkpoint": 10, "vae": 10, "lora": 12, "embedding": 12}
_HEX64 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class ModelLibraryError(SdstackError):
    """A folder that is not laid out like the reference UI, or an unknown model name."""


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


def iter_model_files(folder: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under ``folder`` with these (lowercase) suffixes, recursively.

    Order: a folder's files sorted by name, then its subfolders (sorted). Hidden entries
    (``.name``) and ``*.preview.*`` files are skipped; symlinked folders are followed
    once (a folder reached twice is not walked again).
    """
    yield from _walk(Path(folder), suffixes, set())


def _walk(folder: Path, suffixes: tuple[str, ...], seen: set[Path]) -> Iterator[Path]:
    resolved = folder.resolve()
    if resolved in seen:
        return
    seen.add(resolved)
    subfolders = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry)
        elif entry.suffix.lower() in suffixes and ".preview." not in entry.name.lower():
            yield entry
    for subfolder in subfolders:
        yield from _walk(subfolder, suffixes, seen)


def _lora_metadata(path: Path) -> tuple[str | None, str | None]:
    """(ss_output_name, sshs_model_hash) from a LoRA's safetensors header, if readable."""
    if path.suffix.lower() != ".safetensors":
        return None, None
    try:
        metadata = safetensors_metadata(path)
    except SafetensorsHeaderError:
        return None, None
    alias = metadata.get("ss_output_name") or None
    stored = metadata.get("sshs_model_hash", "")
    digest = stored.lower().removeprefix("0x") if _HEX64.match(stored) else None
    return alias, digest


def lora_sha256(
    path: str | os.PathLike[str], *, progress: hashes.ProgressCallback | None = None
) -> str:
    """The LoRA hash the reference writes (first 12 hex) in "Lora hashes", 64 hex.

    ``sshs_model_hash`` from the safetensors metadata when it is 64 hex, else
    ``hashes.addnet_hash(path)`` (tensor bytes after the header; whole file for .pt/.ckpt).
    """
    path = Path(path)
    _, stored = _lora_metadata(path)
    return stored if stored is not None else hashes.addnet_hash(path, progress=progress)


class ModelLibrary:
    """The models of a reference-UI install folder, by kind (see the module docstring).

    Raises ``FileNotFoundError`` when ``root`` does not exist and ``ModelLibraryError``
    when it holds none of the expected folders (the message lists them).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"models root folder not found: {self.root}")
        self.folders: dict[str, tuple[Path, ...]] = {
            kind: tuple(self._find_folders(relative)) for kind, (relative, _) in LAYOUT.items()
        }
        if not any(self.folders.values()):
            wanted = [f for relative, _ in LAYOUT.values() for f in relative]
            raise ModelLibraryError(
                f"{self.root} does not look like a web UI install folder: none of "
                f"{', '.join(wanted)} found (pass the folder that contains models/ and "
                "embeddings/, or the models/ folder itself)"
            )

    def _find_folders(self, relatives: tuple[str, ...]) -> Iterator[Path]:
        """Existing folders for these layout paths, under root or (models/ as root) directly."""
        for relative in relatives:
            for candidate in (self.root / relative, self.root / Path(relative).name):
                if candidate.is_dir():
                    yield candidate
                    break

    def _entries(self, kind: str, folders: tuple[Path, ...]) -> list[ModelEntry]:
        suffixes = LAYOUT[kind][1]
        entries = []
        for folder in folders:
            for path in iter_model_files(folder, suffixes):
                if kind == "checkpoint" and _is_vae_file(path):
                    continue
                alias, metadata_hash = _lora_metadata(path) if kind == "lora" else (None, None)
                size = path.stat().st_size
                entries.append(
                    ModelEntry(kind, path.stem, path, folder, size, alias, metadata_hash)
                )
        return entries

    def checkpoints(self) -> list[ModelEntry]:
        """Checkpoint files (``*.vae.*`` files excluded)."""
        return self._entries("checkpoint", self.folders["checkpoint"])

    def loras(self) -> list[ModelEntry]:
        """LoRA and LyCORIS files, ``alias`` = ``ss_output_name`` when present."""
        return self._entries("lora", self.folders["lora"])

    def vaes(self) -> list[ModelEntry]:
        """VAE files in models/VAE, then ``*.vae.*`` files beside the checkpoints."""
        beside = [
            entry
            for entry in self._entries("vae", self.folders["checkpoint"])
            if _is_vae_file(entry.path)
        ]
        return self._entries("vae", self.folders["vae"]) + beside

    def embeddings(self) -> list[ModelEntry]:
        """Textual-inversion files (not loaded: use ``EmbeddingLibrary`` for that)."""
        return self._entries("embedding", self.folders["embedding"])

    def entries(self, kinds: tuple[str, ...] = KINDS) -> list[ModelEntry]:
        """All entries of these kinds, in ``KINDS`` order."""
        listing = {
            "checkpoint": self.checkpoints,
            "lora": self.loras,
            "vae": self.vaes,
            "embedding": self.embeddings,
        }
        return [entry for kind in KINDS if kind in kinds for entry in listing[kind]()]

    def find(self, kind: str, name: str) -> ModelEntry:
        """The entry of ``kind`` whose name (or LoRA alias, or relative path) is ``name``.

        Raises ``ModelLibraryError`` naming the closest names when there is none.
        """
        if kind not in KINDS:
            raise ModelLibraryError(f"unknown model kind {kind!r}; expected one of {KINDS}")
        entries = self.entries((kind,))
        for entry in entries:
            if name in (entry.name, entry.relative_path, entry.path.name):
                return entry
        for entry in entries:
            if entry.alias == name:
                return entry
        known = sorted({entry.name for entry in entries} | {e.alias for e in entries if e.alias})
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLibraryError(f"no {kind} named {name!r} under {self.root}{hint}")
