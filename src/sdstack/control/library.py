"""ControlNet models by name, from the folders where the reference extension keeps them.

Under a web UI root (``--root`` / ``$SDSTACK_ROOT``, as ``sdstack.models.root``):
``ROOT/models/ControlNet`` and ``ROOT/extensions/sd-webui-controlnet/models`` (with the
root being the ``models/`` folder itself: ``ROOT/ControlNet`` and
``ROOT/../extensions/sd-webui-controlnet/models``). Files ``.safetensors``, ``.pth``,
``.pt``, ``.ckpt``, ``.bin`` are listed recursively (``models.library.iter_model_files``:
hidden and special files skipped); a diffusers folder (``config.json`` +
``diffusion_pytorch_model.*``) is one model named by its folder.

A model is named as the extension labels it: the file stem, ``name [hash]`` (hash = the
legacy 8-hex ``model_hash``; 10 to 64 hex = a sha256 prefix), or a relative path.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning, UnknownNameError
from sdstack.models import hashes
from sdstack.models.library import (
    ModelEntry,
    ModelLibrary,
    ModelLibraryError,
    ModelNotFoundError,
    find_entry,
    iter_model_files,
)
from sdstack.models.root import ROOT_ENVIRONMENT_VARIABLE, root_folder

KIND = "ControlNet"
CONTROLNET_FOLDERS = ("models/ControlNet", "extensions/sd-webui-controlnet/models")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_LABEL = re.compile(r"^(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")
_HEX8 = re.compile(r"^[0-9a-fA-F]{8}$")


class ControlNetNotFoundError(ModelNotFoundError, UnknownNameError):
    """No ControlNet file has that name or hash; the message names the closest."""


def controlnet_root(
    root: str | os.PathLike[str] | ModelLibrary | None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """``root`` (a path or a ``ModelLibrary``), else ``$SDSTACK_ROOT``, else None.

    Raises:
        ModelLibraryError: the root is not an existing folder (names ``--root`` or
            ``SDSTACK_ROOT``).
    """
    if isinstance(root, ModelLibrary):
        return root.root
    return root_folder(root, environ=environ, holds="models/ and extensions/")


def controlnet_folders(root: Path) -> tuple[Path, ...]:
    """The existing ControlNet folders of ``root`` (module docstring), in that order."""
    candidates = [root / relative for relative in CONTROLNET_FOLDERS]
    if not (root / "models").is_dir():  # the root is the models/ folder itself
        parent = Path(os.path.abspath(root)).parent
        candidates += [root / "ControlNet", parent / CONTROLNET_FOLDERS[1]]
    found: list[Path] = []
    for folder in candidates:
        if folder.is_dir() and not any(_same(folder, f) for f in found):
            found.append(folder)
    return tuple(found)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_diffusers_weights(path: Path) -> bool:
    return (
        path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file()
    )


def list_controlnets(folders: tuple[Path, ...]) -> list[ModelEntry]:
    """Entries (kind ``"controlnet"``, name = file stem or diffusers folder name) of the
    model files under ``folders``; unreadable entries are skipped with an ``SdstackWarning``."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()
    for folder in folders:
        for path in iter_model_files(folder, CONTROLNET_SUFFIXES):
            model = path.parent if _is_diffusers_weights(path) else path
            if model in seen or model == folder:
                continue
            seen.add(model)
            try:
                size = path.stat().st_size
            except OSError:
                continue  # removed since the walk saw it
            name = model.name if model.is_dir() else model.stem
            entries.append(ModelEntry("controlnet", name, model, folder, size))
    return entries


def _file_hash(entry: ModelEntry, digest: str) -> str | None:
    """The hash of ``entry`` in the form of ``digest`` (legacy 8 hex, or a sha256 prefix),
    None (after a warning) when the file cannot be read."""
    path = entry.path
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.name.startswith("diffusion_pytorch_model"))
        if not weights:
            return None
        path = weights[0]
    try:
        if _HEX8.match(digest):
            return hashes.legacy_model_hash(path)
        return hashes.file_sha256(path)[: len(digest)]
    except (OSError, ValueError) as error:
        warnings.warn(f"could not hash {path}: {error}; skipped", SdstackWarning, stacklevel=4)
        return None


def _by_hash(entries: list[ModelEntry], digest: str, where: str) -> Path:
    found = [entry for entry in entries if _file_hash(entry, digest) == digest.lower()]
    if len(found) == 1:
        return found[0].path
    if found:
        paths = ", ".join(entry.relative_path for entry in found)
        raise ModelLibraryError(
            f"{KIND} hash {digest!r} is ambiguous {where}: {paths}; give the file name"
        )
    raise ControlNetNotFoundError(f"no {KIND} has the hash {digest!r} {where}")


def find_controlnet(
    name_or_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | ModelLibrary | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The ControlNet file or folder ``name_or_path`` names.

    1. An existing path is returned as given.
    2. Under the root (``root``, else ``$SDSTACK_ROOT``): by relative path, file name or
       stem (``ModelLibrary.find``'s steps), also in the label form ``name [hash]``: a
       hash that differs from the found file's is an ``SdstackWarning`` (the file found
       by name is used); a name that matches nothing is looked up by the hash.

    Raises:
        ControlNetNotFoundError: nothing matches (did-you-mean among the names found), or
            no root to look a name up in.
        ModelLibraryError: a bad root, or several files match (listed).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    base = controlnet_root(root, environ=environ)
    if base is None:
        raise ControlNetNotFoundError(
            f"{KIND} model {text!r}: no such file; give its path, or the web UI folder with "
            f"--root (or {ROOT_ENVIRONMENT_VARIABLE}) to look it up by name in models/ControlNet"
        )
    folders = controlnet_folders(base)
    where = (
        f"in {', '.join(map(str, folders))}"
        if folders
        else (f"under {base} (no {' or '.join(CONTROLNET_FOLDERS)} folder)")
    )
    entries = list_controlnets(folders)
    label = _LABEL.match(text.strip())
    name, digest = (label["name"], label["hash"]) if label else (text, None)
    try:
        entry = find_entry(entries, KIND, name, where)
    except ControlNetNotFoundError:
        raise
    except ModelNotFoundError as error:
        if digest is None:
            raise ControlNetNotFoundError(str(error)) from None
        try:
            return _by_hash(entries, digest, where)
        except ControlNetNotFoundError as not_hashed:
            raise ControlNetNotFoundError(f"{error}; {not_hashed}") from None
    if digest is not None:
        _check_hash(entry, digest)
    return entry.path


def _check_hash(entry: ModelEntry, digest: str) -> None:
    actual = _file_hash(entry, digest)
    if actual is not None and actual != digest.lower():
        warnings.warn(
            f"{KIND} {entry.name!r}: the label's hash [{digest}] is not the file's "
            f"[{actual}] ({entry.path}); using the file found by name",
            SdstackWarning,
            stacklevel=3,
        )


def controlnet_names(root: Any = None, *, environ: Mapping[str, str] | None = None) -> list[str]:
    """Names of the ControlNets under the root (empty without one), as find_controlnet takes."""
    base = controlnet_root(root, environ=environ)
    return [] if base is None else [e.name for e in list_controlnets(controlnet_folders(base))]


def open_controlnet(
    name_or_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | ModelLibrary | None = None,
    device: Any = None,
    dtype: Any = None,
    config_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """``load_controlnet(find_controlnet(name_or_path, root=root), ...)``: a
    ``LoadedControlNet`` from a path, a name or a ``name [hash]`` label.

    Raises:
        ControlNetNotFoundError, ModelLibraryError: as ``find_controlnet``.
        ControlNetFileError, SettingError: as ``load_controlnet``.
    """
    from sdstack.control.files import load_controlnet

    path = find_controlnet(name_or_path, root=root, environ=environ)
    return load_controlnet(path, device=device, dtype=dtype, config_dir=config_dir)
