"""The sums a patched weight is: ``W = cast(W0 + sum_i s_i * dW_i)``, in float32.

Patches are data (:class:`Patch`: layer, source, strength, recipe); this module turns the
patches of one layer into writers of its patched parameters, with the float32 deltas (or
low-rank factors) cached by (source, layer) in a :class:`DeltaCache`. The model patcher
(``sdstack.models.patcher``) and the LoRA bake (``sdstack.lora.bake``) both use it, so a
baked checkpoint holds the bits that applying the same LoRAs gives.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sdstack.errors import SdstackError

DeltaRecipe = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""``recipe(originals) -> deltas``: float32 originals of one layer's parameters
(``{"weight": W0, "bias": b0}``) -> float32 deltas at strength 1 for some of them."""

FactorRecipe = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""``recipe() -> (up, down)``: a low-rank weight delta ``(up @ down).view(W0.shape)`` at
strength 1, ``up`` ``[out, r]``, ``down`` ``[r, n]`` (float32)."""

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
        factors: for a low-rank delta ``dW = up @ down`` (plain LoRA), the recipe of its
            factors (see :data:`FactorRecipe`): a layer whose patches all have one is
            rebuilt by one matrix product and no dense delta is made.
    """

    layer: str
    source: str
    strength: float
    delta: DeltaRecipe = field(compare=False, repr=False)
    factors: FactorRecipe | None = field(default=None, compare=False, repr=False)


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
        self._entries: OrderedDict[tuple[str, ...], dict[str, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, ...], deltas: dict[str, torch.Tensor]) -> None:
        size = _size(deltas)
        if size > self.budget or key in self._entries:
            return
        self._evict(self.budget - size)
        self._entries[key] = deltas
        self.bytes += size

    def resize(self, budget: int) -> None:
        """A new budget; entries past it go, least recently used first."""
        if budget < 0:
            raise PatchError(f"delta cache budget: {budget} bytes; expected 0 or more")
        self.budget = budget
        self._evict(budget)

    def _evict(self, room: int) -> None:
        while self._entries and self.bytes > room:
            _, old = self._entries.popitem(last=False)
            self.bytes -= _size(old)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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


Writer = Callable[[torch.Tensor], None]
"""``writer(target)``: fills ``target`` (the parameter's shape and dtype) with the patched
values."""


def layer_writers(
    layer: str,
    patches: Sequence[Patch],
    originals: Mapping[str, torch.Tensor],
    cache: DeltaCache,
    stats: PatchStats,
) -> dict[str, Writer]:
    """Per parameter that a patch changes, a writer of ``cast(W0 + sum_i s_i dW_i)``.

    A layer whose patches all have low-rank factors takes one matrix product
    (:func:`low_rank_sum`); any other takes the dense deltas (:func:`dense_sum`).

    Raises:
        PatchError: a strength that is not finite, a delta that does not fit.
    """
    for patch in patches:
        if not math.isfinite(float(patch.strength)):
            raise PatchError(f"patch {patch.source!r} on {layer}: strength {patch.strength}")
    if all(patch.factors is not None for patch in patches):
        return {"weight": low_rank_sum(layer, patches, originals, cache, stats)}
    return dense_sum(layer, patches, originals, cache, stats)


def dense_sum(
    layer: str,
    patches: Sequence[Patch],
    originals: Mapping[str, torch.Tensor],
    cache: DeltaCache,
    stats: PatchStats,
) -> dict[str, Callable[[torch.Tensor], None]]:
    """Per parameter, a writer of ``W0 + sum_i s_i dW_i`` from (cached) dense deltas."""
    float_originals: dict[str, torch.Tensor] = {}
    terms: dict[str, list[tuple[float, torch.Tensor]]] = {}
    for patch in patches:
        key = (patch.source, layer)
        deltas = cache.get(key)
        if deltas is None:
            if not float_originals:  # converted once per layer, not per patch
                float_originals.update({n: t.detach().float() for n, t in originals.items()})
            deltas = _computed(patch, float_originals)
            stats.deltas_computed += 1
            cache.put(key, deltas)
        else:
            stats.deltas_from_cache += 1
        for name, delta in deltas.items():
            if name not in originals or delta.shape != originals[name].shape:
                raise PatchError(
                    f"patch {patch.source!r} on {layer}: delta {name} of shape "
                    f"{tuple(delta.shape)}; the layer has "
                    + ", ".join(f"{n} {tuple(t.shape)}" for n, t in originals.items())
                )
            terms.setdefault(name, []).append((float(patch.strength), delta))
    return {
        name: functools.partial(sum_into, original=originals[name], terms=terms[name])
        for name in terms
    }


def low_rank_sum(
    layer: str,
    patches: Sequence[Patch],
    originals: Mapping[str, torch.Tensor],
    cache: DeltaCache,
    stats: PatchStats,
) -> Callable[[torch.Tensor], None]:
    """A writer of ``W0 + [s_1 up_1, s_2 up_2, ...] @ [down_1; down_2; ...]``: every
    patch of the layer is a low-rank product, so one matrix product sums them all, with no
    dense delta made or cached (the factors are, in float32)."""
    original = originals["weight"]
    ups, downs = [], []
    for patch in patches:
        key = (patch.source, layer, "factors")
        factors = cache.get(key)
        if factors is None:
            with torch.no_grad():
                up, down = patch.factors()
            factors = {"up": up.detach().to(torch.float32), "down": down.detach().float()}
            stats.deltas_computed += 1
            cache.put(key, factors)
        else:
            stats.deltas_from_cache += 1
        up, down = factors["up"], factors["down"]
        if up.shape[0] * down.shape[1] != original.numel() or up.shape[1] != down.shape[0]:
            raise PatchError(
                f"patch {patch.source!r} on {layer}: factors {tuple(up.shape)} @ "
                f"{tuple(down.shape)} do not make the weight {tuple(original.shape)}"
            )
        ups.append(up.to(original.device) * float(patch.strength))
        downs.append(down.to(original.device))

    @torch.no_grad()
    def write(target: torch.Tensor) -> None:
        # The product into a fresh float32 matrix, then W0 added to it: measured faster on
        # CPU than addmm_ into a float32 copy of W0, and the same two roundings.
        accumulator = torch.cat(ups, dim=1) @ torch.cat(downs, dim=0)
        accumulator.add_(original.reshape(accumulator.shape))
        target.copy_(accumulator.view(target.shape))

    return write


def storage_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """The permutation of ``tensor``'s dimensions that lists them as memory holds them
    (largest stride first): ``tensor.permute(order)`` is contiguous for any dense,
    non-overlapping layout, e.g. ``(0, 2, 3, 1)`` for a channels-last 4-D tensor.
    Size-1 dimensions (whose stride does not matter) go last."""
    dims = range(tensor.dim())
    return tuple(sorted(dims, key=lambda d: (-tensor.stride(d) if tensor.shape[d] > 1 else 0, d)))


def _computed(patch: Patch, float_originals: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The patch's dense deltas at strength 1, in float32."""
    with torch.no_grad():
        return {
            name: delta.detach().to(torch.float32)
            for name, delta in patch.delta(float_originals).items()
        }


@torch.no_grad()
def sum_into(
    target: torch.Tensor, *, original: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]
) -> None:
    """``target = cast(original + sum_i s_i * delta_i)``, accumulated in float32.

    Row chunks keep the float32 accumulator small; every element is computed by the same
    operations in the same order whatever the chunking, so the result depends only on
    ``original`` and ``terms``. ``target`` may have any dense layout (channels-last
    convolution weights): the sums run in its memory order and write it in place, and each
    element's value does not depend on that order.
    """
    order = storage_order(target)
    flat_target = target.permute(order).view(-1)
    flat_original = original.permute(order).reshape(-1)
    flat_terms = [(s, d.permute(order).reshape(-1).to(target.device)) for s, d in terms]
    total = flat_target.numel()
    for start in range(0, total, _CHUNK_ELEMENTS):
        end = min(start + _CHUNK_ELEMENTS, total)
        accumulator = flat_original[start:end].to(torch.float32, copy=True)
        for strength, delta in flat_terms:
            accumulator.add_(delta[start:end], alpha=strength)
        flat_target[start:end].copy_(accumulator)
