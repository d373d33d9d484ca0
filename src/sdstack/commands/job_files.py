"""The files of a ``sdstack generate`` job: model, VAE, embeddings, configs.

Resolved against ``--root`` / ``$SDSTACK_ROOT`` (names and hashes, see
``sdstack.models.root``) and checked to exist before anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from sdstack.merge.patch import is_merge_spec


def resolve_files(args: argparse.Namespace, job: Any) -> Any:
    """Model, VAE and embeddings paths (``--root`` lookups), each checked to exist.

    Raises:
        CommandError, ModelLibraryError: a missing file or folder, an unknown name.
    """
    from sdstack.cli import CommandError
    from sdstack.models.root import open_library, resolve_model_paths

    library = open_library(args.root)
    model = args.model
    if model is None:
        if library is None or not (job.model_hash or job.model):
            raise CommandError(
                "give --model PATH (a checkpoint file or diffusers folder)"
                + (
                    f", or --root WEBUI_DIR to find the infotext's model {job.model!r}"
                    if job.model
                    else ""
                )
            )
        model = job.model_hash or job.model
    vae = args.vae
    if vae is None and job.vae is not None:
        vae = _infotext_vae(library, job)
    merge = None
    if is_merge_spec(model):  # merge:A,B,alpha=0.3: A loads, B (and C) are patches
        merge = _resolve_merge(args.root, str(model))
        model = merge.a
    paths = resolve_model_paths(args.root, model=model, vae=vae, embeddings=args.embeddings)
    if merge is not None:
        paths = dataclasses.replace(paths, merge=merge)
    _require(paths.model, "--model", folder_ok=True)
    if paths.vae is not None:
        _require(paths.vae, "--vae")
    if args.embeddings is not None:
        _require(paths.embeddings, "--embeddings", folder_ok=True, file_ok=False)
    if args.config_dir is not None:
        _require(args.config_dir, "--config-dir", folder_ok=True, file_ok=False)
    return paths


def _resolve_merge(root: Any, text: str) -> Any:
    """The ``merge:`` spec with each model found (``--root`` names) and checked to exist."""
    from sdstack.merge.patch import parse_merge_spec
    from sdstack.models.root import open_library, resolve_path

    library = open_library(root)

    def resolve(name: str) -> str:
        path = resolve_path(library, "checkpoint", name) if library is not None else Path(name)
        _require(path, f"--model {text!r}: model", file_ok=True)
        return str(path)

    return parse_merge_spec(text).with_files(resolve)


def _infotext_vae(library: Any, job: Any) -> str | None:
    """The infotext's ``VAE`` found in the root's library (then an existing path, so the
    root is not searched again), else None, listed as unhonoured."""
    from sdstack.errors import SdstackError
    from sdstack.models.root import resolve_path

    if library is None:
        job.unhonoured["VAE"] = (
            f"{job.vae} (give --vae or --root to use it; using the model's own VAE)"
        )
        return None
    try:
        return str(resolve_path(library, "vae", job.vae))
    except SdstackError:
        job.unhonoured["VAE"] = f"{job.vae} (not found under the root; using the model's own VAE)"
        return None


def _require(path: Any, option: str, *, folder_ok: bool = False, file_ok: bool = True) -> None:
    from pathlib import Path

    from sdstack.cli import CommandError

    target = Path(path)
    if (file_ok and target.is_file()) or (folder_ok and target.is_dir()):
        return
    expected = (
        "a file or folder" if folder_ok and file_ok else "a folder" if folder_ok else "a file"
    )
    problem = "not found" if not target.exists() else "is not " + expected
    hint = " (with --root it may also be a name or hash)" if option in ("--model", "--vae") else ""
    raise CommandError(f"{option} {str(path)!r}: {problem}; expected {expected}{hint}")
