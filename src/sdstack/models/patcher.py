"""The model patcher: weight patches (LoRAs, merges) as data, applied and removed exactly.

A :class:`Patch` says *which layer* (a ``key_map`` ``Layer.key``), *which delta* (a
recipe: the layer's original parameters in float32 -> the delta at strength 1) and *how
strong*. :meth:`ModelPatcher.apply` makes the model carry exactly the given patches:

    W = cast(W0 + sum_i s_i * dW_i)        (computed in float32, cast once)

Every patched weight is always rebuilt from its original ``W0``, never by subtracting a
previous delta, so removing every patch gives ``W0`` back bit for bit, whatever happened
before, and switching stack A -> B gives the same bits as applying B to a fresh model.

Originals are kept by reference: a patched parameter gets a new tensor of its own (its
``.data`` is swapped), the loaded tensor is never written to, so no copy is needed (the
reference UI and ComfyUI copy each weight into a backup before writing over it).

Deltas are cached in float32 per (source, layer) under a byte budget, least recently used
first out: changing only a strength re-sums cached deltas, and a stack change rebuilds
only the layers whose (source, strength) list changed. Low-rank deltas (plain LoRA,
``dW = up @ down``) are kept as their factors: a layer whose patches are all low-rank is
rebuilt as ``W0 + [s_1 up_1, ...] @ [down_1; ...]`` by one matrix product: faster than
summing dense deltas, and no dense delta is held in memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from sdstack.models.patch_sum import (
    CACHE_ENVIRONMENT_VARIABLE,
    DEFAULT_CACHE_BYTES,
    DeltaCache,
    DeltaRecipe,
    FactorRecipe,
    Patch,
    PatchError,
    PatchStats,
    default_cache_bytes,
    layer_writers,
    sum_into,
)

__all__ = [
    "CACHE_ENVIRONMENT_VARIABLE",
    "DEFAULT_CACHE_BYTES",
    "DeltaCache",
    "DeltaRecipe",
    "FactorRecipe",
    "ModelPatcher",
    "Patch",
    "PatchError",
    "PatchStats",
    "default_cache_bytes",
    "patcher_of",
    "sum_into",
    "weights_fingerprint",
]


class ModelPatcher:
    """Applies weight patches to one loaded model (see the module docstring).

    Args:
        components: the loaded model (``ModelComponents``).
        cache_bytes: delta cache budget; None = :func:`default_cache_bytes`.
    """

    def __init__(self, components: Any, *, cache_bytes: int | None = None) -> None:
        from sdstack.models.key_map import key_map_of

        self.components = components
        self.key_map = key_map_of(components)
        self.cache = DeltaCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
        self._originals: dict[str, dict[str, torch.Tensor]] = {}
        self._applied: dict[str, tuple[tuple[str, float], ...]] = {}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}  # our patched tensors
        self._patches: tuple[Patch, ...] = ()
        self._owned: dict[str, tuple[Patch, ...]] = {}
        # Kept here for sdstack.lora.stack: the applied stack, the files read, who applied it.
        self.lora_stack: Any = None
        self.lora_files: OrderedDict[Any, Any] = OrderedDict()
        self.lora_owner: str | None = None
        self.lora_advised: Any = None

    @property
    def patches(self) -> tuple[Patch, ...]:
        """The patches the model carries now: every owner's, owners in name order."""
        return self._patches

    @property
    def patched_layers(self) -> tuple[str, ...]:
        """Keys of the layers whose weights differ from the originals now."""
        return tuple(self._applied)

    @property
    def owned(self) -> dict[str, tuple[Patch, ...]]:
        """The patches the model carries, by owner (``"lora"``, ``"merge"``...)."""
        return dict(self._owned)

    def apply(self, patches: Iterable[Patch], *, owner: str = "patches") -> PatchStats:
        """Make ``owner``'s patches exactly ``patches``; other owners' patches stay.

        The model then carries every owner's patches, owners in name order (so the sum,
        and its rounding, never depends on the order they were applied in). A layer
        whose ``(source, strength)`` list is unchanged is left alone; one with no
        patches left gets its original tensors back; every other one is rebuilt from its
        originals. Patches of one layer are summed in that order.

        Raises:
            PatchError: a layer this model does not have, a strength that is not finite,
                a delta whose shape differs from its parameter's. Layers rebuilt before the
                failure are restored (the model is left unpatched rather than half-patched).
        """
        owned = {**self._owned, owner: tuple(patches)}
        if not owned[owner]:
            del owned[owner]
        return self.apply_owned(owned)

    def apply_owned(self, owned: dict[str, tuple[Patch, ...]]) -> PatchStats:
        """Make the model carry exactly ``owned`` (owner -> patches); see :meth:`apply`."""
        patches = tuple(p for name in sorted(owned) for p in owned[name])
        by_layer = _group_by_layer(patches)
        for layer in by_layer:
            self._check_layer(layer)
        stats = PatchStats()
        try:
            for layer in list(self._applied) + [k for k in by_layer if k not in self._applied]:
                wanted = by_layer.get(layer, [])
                signature = tuple((p.source, float(p.strength)) for p in wanted)
                if self._applied.get(layer) == signature:
                    stats.layers_unchanged += 1
                elif not wanted:
                    self._restore_layer(layer)
                    stats.layers_restored += 1
                else:
                    self._rebuild_layer(layer, wanted, stats)
                    self._applied[layer] = signature
                    stats.layers_rebuilt += 1
        except BaseException:
            self.restore()
            raise
        self._owned = {name: tuple(owned[name]) for name in owned}
        self._patches = patches
        return stats

    def restore(self) -> None:
        """Every patched layer gets its original tensors back (bit-exact); no owner keeps
        any patch."""
        for layer in list(self._applied):
            self._restore_layer(layer)
        self._patches = ()
        self._owned = {}

    def forget_cache(self) -> None:
        """Drop every cached delta (after the model moved device or dtype)."""
        self.cache.clear()

    def _check_layer(self, layer: str) -> None:
        try:
            self.key_map[layer]
        except KeyError:
            raise PatchError(f"patch for layer {layer!r}: this model has no such layer") from None

    def _parameters(self, layer: str) -> dict[str, torch.nn.Parameter]:
        from sdstack.models.key_map import live_module

        module = live_module(self.components, self.key_map[layer])
        return dict(module.named_parameters(recurse=False))

    def _restore_layer(self, layer: str) -> None:
        parameters = self._parameters(layer)
        for name, original in self._originals.pop(layer, {}).items():
            parameters[name].data = original
        self._applied.pop(layer, None)
        self._buffers.pop(layer, None)

    def _rebuild_layer(self, layer: str, patches: list[Patch], stats: PatchStats) -> None:
        """``param = cast(W0 + sum_i s_i dW_i)`` for each parameter some patch changes."""
        parameters = self._parameters(layer)
        originals = self._originals.get(layer)
        if originals is None:
            originals = {name: p.data for name, p in parameters.items()}
        writers = layer_writers(layer, patches, originals, self.cache, stats)
        self._originals[layer] = originals
        buffers = self._buffers.setdefault(layer, {})
        for name, original in originals.items():
            if name not in writers:
                parameters[name].data = original
                buffers.pop(name, None)
                continue
            # Our own tensor holds the patched values (reused by later rebuilds); the
            # original's memory is never written.
            target = buffers.get(name)
            if target is None or target.shape != original.shape or target.dtype != original.dtype:
                target = buffers[name] = torch.empty_like(original)
            writers[name](target)
            parameters[name].data = target


def _group_by_layer(patches: Sequence[Patch]) -> dict[str, list[Patch]]:
    grouped: dict[str, list[Patch]] = {}
    for patch in patches:
        grouped.setdefault(patch.layer, []).append(patch)
    return grouped


def patcher_of(components: Any, *, cache_bytes: int | None = None) -> ModelPatcher:
    """The one patcher of a loaded model (made on first use, kept on ``components``)."""
    patcher = getattr(components, "patcher", None)
    if patcher is None:
        patcher = ModelPatcher(components, cache_bytes=cache_bytes)
        components.patcher = patcher
    elif cache_bytes is not None:
        patcher.cache.resize(cache_bytes)
    return patcher


def weights_fingerprint(components: Any, *, parts: Sequence[str] | None = None) -> str:
    """A BLAKE2b digest of the bytes of every parameter and buffer (in name order).

    Two models with the same fingerprint hold the same bits in every tensor: tests and
    users check with it that removing patches restored the original exactly. ``parts``
    limits it to some of ``("unet", "text_encoder", "vae")``.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in parts or ("unet", "text_encoder", "vae"):
        module = getattr(components, part)
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            digest.update(f"{part}.{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` in its logical (row-major) order, whatever its dtype,
    device and memory layout (channels-last weights give the same bytes as contiguous
    ones), as a memoryview."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
