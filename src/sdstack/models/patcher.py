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
only the layers whose (source, strength) list changed.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sdstack.errors import SdstackError

DeltaRecipe = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""``recipe(originals) -> deltas``: float32 originals of one layer's parameters
(``{"weight": W0, "bias": b0}``) -> float32 deltas at strength 1 for some of them."""

DEFAULT_CACHE_BYTES = 4 << 30
"""Delta cache budget: 4 GiB, or ``$SDSTACK_DELTA_CACHE_MB`` mebibytes."""
CACHE_ENVIRONMENT_VARIABLE = "SDSTACK_DELTA_CACHE_MB"
_CHUNK_ELEMENTS = 1 << 18  # rows summed together: the fp32 accumulator stays in cache


class PatchError(SdstackError):
    """A patch that cannot be applied: unknown layer, wrong delta shape, NaN strength."""


@dataclass(frozen=True)
class Patch:
    """One weight patch: ``strength * delta(originals)`` added to ``layer``.

    Attributes:
        layer: the layer's key (``key_map.Layer.key``, e.g. ``"unet:conv_in"``).
        source: what the delta is, for the cache: two patches with the same source and
            layer must have the same delta (e.g. a file's sha256 and the module's name).
        strength: the multiplier ``s_i``.
        delta: the recipe (see :data:`DeltaRecipe`).
    """

    layer: str
    source: str
    strength: float
    delta: DeltaRecipe = field(compare=False, repr=False)


@dataclass
class PatchStats:
    """What one :meth:`ModelPatcher.apply` did."""

    layers_rebuilt: int = 0
    layers_restored: int = 0
    layers_unchanged: int = 0
    deltas_computed: int = 0
    deltas_from_cache: int = 0


class DeltaCache:
    """Float32 deltas by ``(source, layer)``, least recently used out past ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise PatchError(f"delta cache budget: {budget} bytes; expected 0 or more")
        self.budget = budget
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> dict[str, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, str], deltas: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in deltas.values())
        if size > self.budget or key in self._entries:
            return
        while self.bytes + size > self.budget:
            _, old = self._entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old.values())
        self._entries[key] = deltas
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def default_cache_bytes(environ: Mapping[str, str] | None = None) -> int:
    """:data:`DEFAULT_CACHE_BYTES`, or ``$SDSTACK_DELTA_CACHE_MB`` MiB when set.

    Raises:
        PatchError: the variable is not a whole number of MiB >= 0.
    """
    value = (os.environ if environ is None else environ).get(CACHE_ENVIRONMENT_VARIABLE)
    if value is None or value == "":
        return DEFAULT_CACHE_BYTES
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise PatchError(
            f"{CACHE_ENVIRONMENT_VARIABLE}={value!r}: expected a whole number of MiB, 0 or more"
        )
    return megabytes << 20


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
        # Kept here for sdstack.lora.stack: the applied stack, the files read, who applied it.
        self.lora_stack: Any = None
        self.lora_files: OrderedDict[Any, Any] = OrderedDict()
        self.lora_owner: str | None = None
        self.lora_advised: Any = None

    @property
    def patches(self) -> tuple[Patch, ...]:
        """The patches the model carries now, in the order given to :meth:`apply`."""
        return self._patches

    @property
    def patched_layers(self) -> tuple[str, ...]:
        """Keys of the layers whose weights differ from the originals now."""
        return tuple(self._applied)

    def apply(self, patches: Iterable[Patch]) -> PatchStats:
        """Make the model carry exactly ``patches`` (whatever it carried before).

        A layer whose ``(source, strength)`` list is unchanged is left alone; one with no
        patches left gets its original tensors back; every other one is rebuilt from its
        originals. Patches of one layer are summed in the order given.

        Raises:
            PatchError: a layer this model does not have, a strength that is not finite,
                a delta whose shape differs from its parameter's. Layers rebuilt before the
                failure are restored (the model is left unpatched rather than half-patched).
        """
        patches = tuple(patches)
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
        self._patches = patches
        return stats

    def restore(self) -> None:
        """Every patched layer gets its original tensors back (bit-exact)."""
        for layer in list(self._applied):
            self._restore_layer(layer)
        self._patches = ()

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
        terms: dict[str, list[tuple[float, torch.Tensor]]] = {}
        for patch in patches:
            if not torch.isfinite(torch.tensor(float(patch.strength))):
                raise PatchError(f"patch {patch.source!r} on {layer}: strength {patch.strength}")
            for name, delta in self._delta(patch, originals, stats).items():
                if name not in originals or delta.shape != originals[name].shape:
                    raise PatchError(
                        f"patch {patch.source!r} on {layer}: delta {name} of shape "
                        f"{tuple(delta.shape)}; the layer has "
                        + ", ".join(f"{n} {tuple(t.shape)}" for n, t in originals.items())
                    )
                terms.setdefault(name, []).append((float(patch.strength), delta))
        self._originals[layer] = originals
        buffers = self._buffers.setdefault(layer, {})
        for name, original in originals.items():
            parameter = parameters[name]
            if name not in terms:
                parameter.data = original
                buffers.pop(name, None)
                continue
            # Our own tensor for the patched values (reused by later rebuilds); the
            # original's memory is never written.
            target = buffers.get(name)
            if target is None or target.shape != original.shape or target.dtype != original.dtype:
                target = buffers[name] = torch.empty_like(original)
            sum_into(target, original, terms[name])
            parameter.data = target

    def _delta(
        self, patch: Patch, originals: Mapping[str, torch.Tensor], stats: PatchStats
    ) -> dict[str, torch.Tensor]:
        key = (patch.source, patch.layer)
        cached = self.cache.get(key)
        if cached is not None:
            stats.deltas_from_cache += 1
            return cached
        with torch.no_grad():
            float_originals = {name: t.detach().float() for name, t in originals.items()}
            deltas = {
                name: delta.detach().to(torch.float32)
                for name, delta in patch.delta(float_originals).items()
            }
        stats.deltas_computed += 1
        self.cache.put(key, deltas)
        return deltas


@torch.no_grad()
def sum_into(
    target: torch.Tensor, original: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]
) -> None:
    """``target = cast(original + sum_i s_i * delta_i)``, accumulated in float32.

    Row chunks keep the float32 accumulator small; every element is computed by the same
    operations in the same order whatever the chunking, so the result depends only on
    ``original`` and ``terms``.
    """
    flat_target, flat_original = target.view(-1), original.reshape(-1)
    flat_terms = [(s, d.reshape(-1).to(target.device)) for s, d in terms]
    total = flat_target.numel()
    for start in range(0, total, _CHUNK_ELEMENTS):
        end = min(start + _CHUNK_ELEMENTS, total)
        accumulator = flat_original[start:end].to(torch.float32, copy=True)
        for strength, delta in flat_terms:
            accumulator.add_(delta[start:end], alpha=strength)
        flat_target[start:end].copy_(accumulator)


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
        patcher.cache.budget = cache_bytes
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
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (any dtype, any device), as a memoryview."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
