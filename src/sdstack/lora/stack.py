"""Applying a LoRA stack to a loaded model through the model patcher.

``set_loras(model, stack)`` makes ``model`` carry exactly ``stack``: every LoRA module
becomes one :class:`~sdstack.models.patcher.Patch` of strength

    s = multiplier * lbw[block]      (multiplier: ``te`` for the text encoder, ``unet``
                                      for the UNet; lbw 1 without ``lbw=``)

whose delta is the module's formula at multiplier 1 (``algorithms.module_delta``; for a
plain LoRA module its factors ``up @ down``, ``algorithms.module_factors``), so
the patched weight is ``W0 + sum_i s_i * dW_i`` rebuilt from the original (see
``sdstack.models.patcher``): ``set_loras(model, [])`` gives the original weights back bit
for bit, and changing one multiplier re-sums cached deltas without reading any file.
Read files are kept (a few, least recently used out), so switching back is cheap too.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning
from sdstack.lora.block_weights import block_factor
from sdstack.lora.library import LoraLibrary
from sdstack.lora.spec import LoraSpec, specs_from_entries
from sdstack.models.patcher import Patch, PatchStats, patcher_of

LORA_OWNER = "lora"
"""The patcher owner of LoRA patches (a merge applied as patches stays under them)."""
KEPT_FILES = 8
"""Read LoRA files kept per model, least recently used out."""
_MAX_LISTED_KEYS = 8


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA the model carries: what was asked for and the file it came from.

    ``hash`` is the reference's LoRA hash (64 hex; infotext writes the first 12).
    """

    spec: LoraSpec
    path: Path
    file: Any  # sdstack.lora.network.LoraFile
    hash: str

    @property
    def name(self) -> str:
        """The name the reference writes in tags and ``Lora hashes`` (the file stem)."""
        return self.path.stem

    @property
    def short_hash(self) -> str:
        return self.hash[:12]


@dataclass(frozen=True)
class LoraStack:
    """What :func:`set_loras` applied, and what the patcher did."""

    loras: tuple[ActiveLora, ...]
    stats: PatchStats

    def hashes_field(self) -> str | None:
        """The infotext ``Lora hashes`` value: ``"name: hash12, name: hash12"``."""
        if not self.loras:
            return None
        seen = dict.fromkeys(f"{lora.name}: {lora.short_hash}" for lora in self.loras)
        return ", ".join(seen)

    def embeddings(self) -> dict[str, Any]:
        """Textual-inversion vectors bundled in the files (``bundle_emb``), by name."""
        found: dict[str, Any] = {}
        for lora in self.loras:
            found.update(lora.file.embeddings)
        return found


def set_loras(
    model: Any,
    stack: Iterable[Any],
    *,
    library: LoraLibrary | None = None,
    cache_bytes: int | None = None,
) -> LoraStack:
    """Make ``model`` carry exactly ``stack`` (replacing what was applied before).

    Args:
        model: a loaded model (``ModelComponents``).
        stack: entries ``(file_or_name, w)``, ``(file_or_name, te_w, unet_w)``, a bare
            name or path, or :class:`LoraSpec`; ``[]`` restores the original weights.
        library: where names are looked up (default: ``$SDSTACK_ROOT``'s LoRA folders).
        cache_bytes: the patcher's delta cache budget (default 4 GiB,
            ``$SDSTACK_DELTA_CACHE_MB``).

    Returns:
        The applied :class:`LoraStack`.

    Raises:
        LoraSpecError, BlockWeightError: a bad entry. LoraNotFoundError: a name no
            folder has. LoraFileError, ForeignLoraError: a file that cannot be used (an
            SDXL or SD2 LoRA). Nothing is applied when any entry fails.
    Warns:
        SdstackWarning: a file's keys that match no layer of the model (listed once).
    """
    specs = specs_from_entries(stack)
    # 1. Resolve and read every file before touching the model.
    library = library if library is not None else _default_library()
    patcher = patcher_of(model, cache_bytes=cache_bytes)
    loras = [_active_lora(patcher, spec, library) for spec in specs]
    # 2. One patch per module, then the patcher rebuilds what changed.
    patches = [patch for lora in loras for patch in lora_patches(lora)]
    stats = patcher.apply(patches, owner=LORA_OWNER)
    patcher.lora_stack = LoraStack(tuple(loras), stats)
    patcher.lora_owner = "user"
    return patcher.lora_stack


def active_loras(model: Any) -> LoraStack | None:
    """The stack last applied by :func:`set_loras` (None if none or it was removed)."""
    patcher = getattr(model, "patcher", None)
    if patcher is None or not patcher.owned.get(LORA_OWNER):
        return None
    stack = patcher.lora_stack
    return stack if stack is not None and stack.loras else None


def lora_patches(lora: ActiveLora) -> list[Patch]:
    """The patches of one LoRA: ``multiplier * lbw[block]`` per module (0 is skipped)."""
    from sdstack.lora.algorithms import has_factors, module_delta, module_factors

    spec, patches = lora.spec, []
    for key, module in lora.file.modules.items():
        layer = module.layer
        multiplier = spec.te if layer.component == "text_encoder" else spec.unet_multiplier
        strength = multiplier * block_factor(spec.lbw, layer.block)
        if strength == 0:
            continue
        factors = partial(module_factors, module) if has_factors(module) else None
        delta = partial(module_delta, module)
        patches.append(Patch(key, f"lora:{lora.hash}", strength, delta, factors))
    return patches


def _default_library() -> LoraLibrary:
    from sdstack.models.root import open_library

    return LoraLibrary(open_library(None))


def _active_lora(patcher: Any, spec: LoraSpec, library: LoraLibrary) -> ActiveLora:
    from sdstack.models.library import lora_sha256

    path = library.find(spec.name)
    file = _read_kept(patcher, path)
    return ActiveLora(spec, path, file, lora_sha256(path))


def _read_kept(patcher: Any, path: Path) -> Any:
    """The LoRA file at ``path`` read for this model, from the kept files if unchanged."""
    from sdstack.lora.formats import read_lora

    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    kept: OrderedDict = patcher.lora_files
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    file = read_lora(path, patcher.key_map)
    warn_unmatched(file)
    kept[key] = file
    while len(kept) > KEPT_FILES:
        kept.popitem(last=False)
    return file


def warn_unmatched(file: Any, verb: str = "applied") -> None:
    """One ``SdstackWarning`` listing the file's keys that match no layer (never silent)."""
    from sdstack.models.detect import name_list

    if file.unmatched:
        warnings.warn(
            f"{file.path}: {len(file.unmatched)} key(s) match no layer of this model and are "
            f"not {verb}: {name_list(list(file.unmatched), _MAX_LISTED_KEYS)}",
            SdstackWarning,
            stacklevel=4,
        )
