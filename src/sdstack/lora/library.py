"""Finding LoRA files by name or hash, as the reference UI does.

The folders are ``models/Lora`` and ``models/LyCORIS`` under ``--root`` (``$SDSTACK_ROOT``)
and every ``--lora-dir``, searched in that order. A name is, first match wins: an existing
file path; the relative path in its folder (with or without extension); the file name; the
file stem; the ``ss_output_name`` of its metadata (the reference's alias). A hash (the
12 hex of an infotext's ``Lora hashes``) is matched against hashes already computed
(``sdstack models list --hashes`` fills the cache), never by reading every file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sdstack.models.library import (
    ModelEntry,
    ModelLibrary,
    ModelNotFoundError,
    find_entry,
    list_entries,
)


class LoraNotFoundError(ModelNotFoundError):
    """No LoRA file has that name (the message names the folders searched)."""


class LoraLibrary:
    """The LoRA files of a web-UI root plus extra folders.

    Args:
        library: the root's ``ModelLibrary`` (None: no root).
        folders: extra folders (``--lora-dir``), searched after the root's.
    """

    def __init__(
        self,
        library: ModelLibrary | None = None,
        folders: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        root_folders = library.folders["lora"] if library is not None else ()
        self.folders: tuple[Path, ...] = tuple(root_folders) + tuple(
            Path(folder).expanduser() for folder in folders
        )
        self._entries: list[ModelEntry] | None = None

    def entries(self) -> list[ModelEntry]:
        """Every LoRA file of the folders (listed once, then kept)."""
        if self._entries is None:
            self._entries = list_entries("lora", self.folders)
        return self._entries

    def where(self) -> str:
        if not self.folders:
            return "(no LoRA folder: give --root with models/Lora, or --lora-dir)"
        return "in " + ", ".join(str(folder) for folder in self.folders)

    def find(self, name: str) -> Path:
        """The file ``name`` names (see the module docstring).

        Raises:
            LoraNotFoundError: nothing matches (with the closest names).
            ModelLibraryError: several files match at the same step.
        """
        path = Path(name).expanduser()
        if path.is_file():
            return path
        try:
            return find_entry(self.entries(), "LoRA", name, self.where()).path
        except ModelNotFoundError as error:
            raise LoraNotFoundError(str(error)) from None

    def find_by_hash(self, short_hash: str) -> Path | None:
        """The file whose LoRA hash starts with ``short_hash`` (already hashed files only)."""
        wanted = short_hash.lower()
        for entry in self.entries():
            digest = entry.cached_sha256()
            if digest is not None and digest.startswith(wanted):
                return entry.path
        return None
