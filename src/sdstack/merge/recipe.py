"""Where a merged model came from: ``sd_merge_recipe`` and ``sd_merge_models`` metadata.

The reference UI's checkpoint merger writes two JSON strings into the safetensors header,
which it and other tools show in their model info:

- ``sd_merge_recipe``: ``{"type", "primary_model_hash", "secondary_model_hash",
  "tertiary_model_hash", "interp_method", "multiplier", "save_as_half", "custom_name",
  "bake_in_vae", "discard_weights", "is_inpainting", "is_instruct_pix2pix"}`` (hashes are
  the inputs' full sha256; ``null`` for a model not given). sdstack writes ``"type":
  "sdstack"`` and adds its own fields: ``method`` (registered name), ``alpha``, ``beta``,
  ``blocks`` (``{"alpha": [26 values] | null, "beta": ...}``), ``options`` (the method's
  options with defaults filled in), ``dtype``, ``text_encoder`` and ``vae_from``.
- ``sd_merge_models``: ``{sha256: {"name", "legacy_hash", "sd_merge_recipe"}}`` for each
  input, in the order A, B, C, each followed by the input's own ``sd_merge_models``
  (``dict.update``, as the reference does), so provenance accumulates over chained merges.
  An input's ``sd_merge_recipe`` is nested as JSON (not a string), as the reference reads
  metadata: a value that starts with ``{`` and parses as JSON is the parsed object.

``save_as_half`` is true for a 16-bit output (fp16 or bf16; ``dtype`` says which),
``bake_in_vae`` the VAE file's name or ``"None"``, and ``is_inpainting`` /
``is_instruct_pix2pix`` whether the output's ``conv_in`` has 9 / 8 input channels.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE_KEY = "sd_merge_recipe"
MODELS_KEY = "sd_merge_models"
RECIPE_TYPE = "sdstack"


@dataclass(frozen=True)
class ParentModel:
    """One input of a merge as the recipe records it."""

    name: str
    sha256: str
    legacy_hash: str
    metadata: Mapping[str, Any]
    """The input's own header metadata, JSON values parsed (:func:`parsed_metadata`)."""


def parsed_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Header metadata as the reference reads it: a value starting with ``{`` that parses
    as JSON becomes the parsed object; everything else stays a string."""
    parsed: dict[str, Any] = {}
    for key, value in metadata.items():
        parsed[key] = value
        if isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                parsed[key] = json.loads(value)
    return parsed


class _Cancelled(Exception):
    """Raised inside the hashing thread to stop it."""


class HashJob:
    """The sha256 of some files, computed in a background thread (cached ones at once).

    ``hashlib`` and file reads release the GIL, so a merge streams its tensors while its
    inputs are hashed for the recipe. :meth:`result` waits and returns the digests in the
    order of ``paths`` (re-raising what the thread raised); :meth:`cancel` stops it.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        from sdstack.models.hashes import cached_file_sha256

        self.paths = list(paths)
        self.digests: list[str | None] = [cached_file_sha256(path) for path in self.paths]
        pairs = zip(self.paths, self.digests, strict=True)
        pending = [path for path, digest in pairs if digest is None]
        self.total = sum(path.stat().st_size for path in pending)
        self.done = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if pending:
            self._thread = threading.Thread(target=self._run, name="sdstack-hash", daemon=True)
            self._thread.start()

    def _count(self, count: int) -> None:
        if self._stop.is_set():
            raise _Cancelled
        self.done += count

    def _run(self) -> None:
        from sdstack.models.hashes import file_sha256

        try:
            for index, path in enumerate(self.paths):
                if self.digests[index] is None:
                    self.digests[index] = file_sha256(path, progress=self._count)
        except _Cancelled:
            pass
        except BaseException as error:  # handed to the caller by result()
            self.error = error

    def result(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """The digests, once computed; ``progress(done, total)`` (bytes) while waiting.

        Raises:
            What hashing raised (a file that vanished or became unreadable).
        """
        while self._thread is not None and self._thread.is_alive():
            if progress is not None:
                progress(self.done, self.total)
            self._thread.join(0.2)
        if progress is not None and self.total:
            progress(self.total, self.total)
        if self.error is not None:
            raise self.error
        return [digest for digest in self.digests if digest is not None]

    def cancel(self) -> None:
        """Stop hashing (after the current block) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def parent_models(
    paths: Sequence[Path], metadata: Sequence[Mapping[str, str]], digests: Sequence[str]
) -> list[ParentModel]:
    """The recipe's view of each input: name, sha256, legacy 8-hex hash, parsed metadata."""
    from sdstack.models.hashes import legacy_model_hash

    return [
        ParentModel(path.name, digest, legacy_model_hash(path), parsed_metadata(meta))
        for path, meta, digest in zip(paths, metadata, digests, strict=True)
    ]


def merge_recipe(
    settings: Any,
    method: Any,
    parents: Sequence[ParentModel],
    *,
    custom_name: str,
    options: Mapping[str, Any],
    conv_in_channels: int | None,
) -> dict[str, Any]:
    """The ``sd_merge_recipe`` object (module docstring) of a merge with ``settings``."""
    hashes = [parent.sha256 for parent in parents] + [None, None]
    return {
        "type": RECIPE_TYPE,
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1],
        "tertiary_model_hash": hashes[2],
        "interp_method": method.label,
        "multiplier": float(settings.alpha),
        "save_as_half": settings.dtype in ("fp16", "bf16"),
        "custom_name": custom_name,
        "bake_in_vae": Path(settings.vae).name if settings.vae is not None else "None",
        "discard_weights": settings.discard or "",
        "is_inpainting": conv_in_channels == 9,
        "is_instruct_pix2pix": conv_in_channels == 8,
        "method": method.name,
        "alpha": float(settings.alpha),
        "beta": float(settings.beta),
        "blocks": {
            "alpha": _listed(settings.alpha_blocks),
            "beta": _listed(settings.beta_blocks),
        },
        "options": {key: _plain(value) for key, value in options.items()},
        "dtype": settings.dtype,
        "text_encoder": settings.text_encoder,
        "vae_from": settings.vae_from,
    }


def _listed(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(value) for value in values]


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def merge_models(parents: Sequence[ParentModel]) -> dict[str, Any]:
    """The ``sd_merge_models`` object: each parent, then the parent's own provenance."""
    models: dict[str, Any] = {}
    for parent in parents:
        recipe = parent.metadata.get(RECIPE_KEY)
        models[parent.sha256] = {
            "name": parent.name,
            "legacy_hash": parent.legacy_hash,
            "sd_merge_recipe": recipe if isinstance(recipe, dict) else None,
        }
        own = parent.metadata.get(MODELS_KEY)
        if isinstance(own, dict):
            models.update(own)
    return models


def recipe_metadata(recipe: Mapping[str, Any], models: Mapping[str, Any]) -> dict[str, str]:
    """The header metadata of a merged file: ``format: pt`` and the two JSON strings."""
    return {
        "format": "pt",
        RECIPE_KEY: json.dumps(recipe),
        MODELS_KEY: json.dumps(models),
    }
