"""The LoRA/LyCORIS weight deltas, one small pure function per algorithm.

Each function matches the reference UI (AUTOMATIC1111 ``extensions-builtin/Lora``,
``network_*.py``) and takes the module's parts in float32, the layer's original weight
``W0`` and the module's scale ``s`` (``scale`` key, else alpha/rank, else 1); it returns
the weight delta (in its natural shape, reshaped to ``W0`` by :func:`module_delta`) and
the bias delta or None. Shapes were checked when the file was read
(``sdstack.lora.shapes``), so nothing here allocates more than the layer.

``module_delta`` then applies what every algorithm shares: the 9-channel inpainting
``conv_in`` zero-pads the delta's input channels (4 -> 9), and DoRA replaces the delta
by ``dora(W0 + dW) - W0``. Everything is computed in float32 at multiplier 1; the patcher
multiplies by the strength.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sdstack.registry import Registry

if TYPE_CHECKING:
    from sdstack.lora.network import ModuleWeights

Tensor = torch.Tensor
DeltaFunction = Callable[[Mapping[str, Tensor], Tensor, float], tuple[Tensor, Tensor | None]]
RankFunction = Callable[[Mapping[str, Tensor]], "int | None"]


@dataclass(frozen=True)
class Algorithm:
    """One weight-delta algorithm: its file parts, its rank and its delta function."""

    name: str
    required: tuple[tuple[str, ...], ...]
    """Alternatives, each a tuple of parts that must all be present (one must hold)."""
    optional: tuple[str, ...]
    delta: DeltaFunction
    rank: RankFunction

    @property
    def parts(self) -> frozenset[str]:
        """Every part name this algorithm reads."""
        return frozenset(p for group in self.required for p in group) | set(self.optional)


ALGORITHMS: Registry[Algorithm] = Registry("LoRA algorithm")
"""The algorithms by name: lora, loha, lokr, full, norm, ia3."""


def _flat(tensor: Tensor) -> Tensor:
    """``tensor`` as a matrix: first dimension kept, the others flattened."""
    return tensor.reshape(tensor.shape[0], -1)


def rebuild_cp(core: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """LyCORIS Tucker (CP) rebuild used by LoHa ``hada_t*`` and LoKr ``lokr_t2``:
    ``W[p, q, k, l] = sum_ij core[i, j, k, l] * first[i, p] * second[j, q]``
    (``first`` [r, out], ``second`` [r, in], ``core`` [r, r, kh, kw])."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, first, second)


def lora_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """LoRA / LoCon (reference ``network_lora.py``): ``dW = s * up @ down``.

    Conv: ``up.view(out, r) @ down.view(r, in*k*k)``, viewed as ``[out, in, k, k]``.
    Tucker (``lora_mid`` [r, r, k, k]): ``dW[o, i] = s * sum mid[a, b] up[o, a] down[b, i]``.
    A PEFT ``lora_B`` bias (``lora_up.bias``) gives ``db = s * bias``.
    """
    up, down = _flat(t["lora_up.weight"]), _flat(t["lora_down.weight"])
    mid = t.get("lora_mid.weight")
    delta = up @ down if mid is None else torch.einsum("abkl,oa,bi->oikl", mid, up, down)
    bias = t.get("lora_up.bias")
    return delta * scale, None if bias is None else bias * scale


def _loha_factor(t: Mapping[str, Tensor], i: int) -> Tensor:
    a, b, core = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t.get(f"hada_t{i}")
    if core is not None:
        return rebuild_cp(core, a, b)
    return _flat(a) @ _flat(b)


def loha_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, None]:
    """LoHa (reference ``network_hada.py``): ``dW = s * (w1a @ w1b) * (w2a @ w2b)``
    (Hadamard product); a factor with ``hada_t1``/``hada_t2`` is the Tucker rebuild
    ``rebuild_cp(t, wa, wb)``. ``r = hada_w1_b.shape[0]``."""
    first, second = _loha_factor(t, 1), _loha_factor(t, 2)
    if first.ndim != second.ndim:  # one Tucker factor [out, in, k, k], one flat matrix
        first, second = first.reshape(w0.shape), second.reshape(w0.shape)
    return first * second * scale, None


def _lokr_factor(t: Mapping[str, Tensor], i: int) -> Tensor:
    full = t.get(f"lokr_w{i}")
    if full is not None:
        return full
    a, b, core = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"], t.get(f"lokr_t{i}")
    if core is not None:
        return rebuild_cp(core, a, b)
    return a @ _flat(b)


def lokr_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, None]:
    """LoKr (reference ``network_lokr.py``): ``dW = s * kron(w1, w2)``; each factor is
    ``lokr_wN`` or ``lokr_wN_a @ lokr_wN_b`` (``w2`` also the Tucker rebuild with
    ``lokr_t2``); a 4-d ``w2`` (conv) takes ``w1`` as ``[a, b, 1, 1]``. The rank that alpha
    divides is that of the decomposed factor (``w2`` first); with two full factors s = 1
    unless a ``scale`` key says otherwise."""
    first, second = _lokr_factor(t, 1), _lokr_factor(t, 2)
    if second.ndim == 4:
        first = first.reshape(*first.shape[:2], 1, 1)
    return torch.kron(first, second.contiguous()) * scale, None


def full_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """Full (reference ``network_full.py``): ``dW = s * diff``, ``db = diff_b`` (the
    reference scales the bias delta by the multiplier only)."""
    return t["diff"] * scale, t.get("diff_b")


def norm_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """Norm (reference ``network_norm.py``): ``dW = s * w_norm``, ``db = b_norm``."""
    return t["w_norm"] * scale, t.get("b_norm")


def ia3_delta(t: Mapping[str, Tensor], w0: Tensor, scale: float) -> tuple[Tensor, None]:
    """IA3 (reference ``network_ia3.py``): ``dW = s * W0 * w``, ``w`` scaling each output
    row, or each input column when ``on_input`` is true (a conv weight is scaled per output
    or input channel; the reference's broadcast is only meant for linear layers)."""
    w = t["weight"].reshape(-1)
    on_input = bool(t["on_input"].reshape(-1)[0]) if "on_input" in t else False
    view = [1] * w0.ndim
    view[1 if on_input else 0] = w.numel()
    return w0 * w.reshape(view) * scale, None


def _lora_rank(t: Mapping[str, Tensor]) -> int | None:
    return int(t["lora_down.weight"].shape[0])


def _loha_rank(t: Mapping[str, Tensor]) -> int | None:
    return int(t["hada_w1_b"].shape[0])


def _lokr_rank(t: Mapping[str, Tensor]) -> int | None:
    for part in ("lokr_w2_b", "lokr_w1_b"):
        if part in t:
            return int(t[part].shape[0])
    return None


def _no_rank(t: Mapping[str, Tensor]) -> int | None:
    return None


for _algorithm, _aliases in (
    (
        Algorithm(
            "lora",
            (("lora_down.weight", "lora_up.weight"),),
            ("lora_mid.weight", "lora_up.bias"),
            lora_delta,
            _lora_rank,
        ),
        ("locon",),
    ),
    (
        Algorithm(
            "loha",
            (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
            ("hada_t1", "hada_t2"),
            loha_delta,
            _loha_rank,
        ),
        ("hada",),
    ),
    (
        Algorithm(
            "lokr",
            (
                ("lokr_w1", "lokr_w2"),
                ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
                ("lokr_w1_a", "lokr_w1_b", "lokr_w2"),
                ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
            ),
            ("lokr_t2",),
            lokr_delta,
            _lokr_rank,
        ),
        (),
    ),
    (Algorithm("full", (("diff",),), ("diff_b",), full_delta, _no_rank), ()),
    (Algorithm("norm", (("w_norm",),), ("b_norm",), norm_delta, _no_rank), ()),
    (Algorithm("ia3", (("weight",),), ("on_input",), ia3_delta, _no_rank), ()),
):
    ALGORITHMS.register(_algorithm.name, _algorithm, aliases=_aliases)


def fit_delta(delta: Tensor, w0: Tensor) -> Tensor:
    """``delta`` in ``W0``'s shape: a view when the sizes agree; for the 9-channel
    inpainting ``conv_in`` a 4-channel delta zero-padded to 9 input channels (as the
    reference UI does: the 5 extra channels, mask and masked image, are left alone)."""
    if delta.numel() == w0.numel():
        return delta.reshape(w0.shape)
    out, channels, *kernel = w0.shape
    padded = delta.reshape(out, -1, *kernel)
    return torch.nn.functional.pad(padded, (0, 0, 0, 0, 0, channels - padded.shape[1]))


def dora_delta(w0: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA as the reference UI applies it: ``dora(W0 + dW) - W0`` where
    ``dora(W) = W * magnitude / ||W||`` (no epsilon, as the reference). ``magnitude``
    shaped ``(1, in, 1...)`` takes the norm of each input column (over every dimension
    but 1: the reference's only form); ``(out, 1, 1...)`` the norm of each output row
    (LyCORIS ``wd_on_output``, PEFT); the two agree when the weight is 1 x 1."""
    merged = w0 + delta
    per_input = magnitude.shape[0] == 1 and magnitude.shape[1] == merged.shape[1]
    dims = tuple(d for d in range(merged.ndim) if d != (1 if per_input else 0))
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return merged * (magnitude / norm) - w0


def module_delta(module: ModuleWeights, original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The float32 deltas of one module's layer at multiplier 1.

    Args:
        module: a module of a read LoRA file.
        original: the layer's original parameters in float32 (``{"weight": W0, "bias":
            b0}``), on the device the delta is computed on.

    Returns:
        ``{"weight": dW}`` (``W0``'s shape) plus ``"bias": db`` when the module changes
        the bias: ``s * raw`` with ``s = module.effective_scale``, zero-padded for the
        inpainting ``conv_in``, DoRA applied as ``dora(W0 + dW) - W0``.
    """
    w0 = original["weight"]
    parts = {k: v.to(device=w0.device, dtype=torch.float32) for k, v in module.tensors.items()}
    weight, bias = ALGORITHMS[module.algorithm].delta(parts, w0, module.effective_scale)
    weight = fit_delta(weight, w0)
    if module.dora_scale is not None:
        magnitude = module.dora_scale.to(device=w0.device, dtype=torch.float32)
        weight = dora_delta(w0, weight, magnitude)
    deltas = {"weight": weight}
    if bias is not None:
        b0 = original.get("bias")
        deltas["bias"] = bias.reshape(b0.shape if b0 is not None else (-1,))
    return deltas


def has_factors(module: ModuleWeights) -> bool:
    """Whether :func:`module_factors` gives factors for ``module`` (no tensor is touched)."""
    tensors = module.tensors
    if module.algorithm != "lora" or module.dora_scale is not None:
        return False
    if set(tensors) != {"lora_up.weight", "lora_down.weight"}:
        return False
    out = tensors["lora_up.weight"].shape[0]
    flat_in = math.prod(tensors["lora_down.weight"].shape[1:])
    return out * flat_in == math.prod(module.layer.shape("weight"))


def module_factors(module: ModuleWeights, device: Any = None) -> tuple[Tensor, Tensor] | None:
    """A plain LoRA module's delta as float32 factors: ``dW = up @ down`` at multiplier 1.

    ``up`` is ``[out, r]`` with the scale (``alpha / rank`` or ``scale``) folded in,
    ``down`` ``[r, in * k * k]`` (conv kernels flattened), so that
    ``(up @ down).view(W0.shape)`` is :func:`module_delta`'s weight delta. None when the
    module has no such form (:func:`has_factors`): another algorithm, Tucker ``lora_mid``,
    a bias part, DoRA, or a delta that must be zero-padded (inpainting ``conv_in``); those
    take the dense path.
    """
    if not has_factors(module):
        return None
    up = _flat(module.tensors["lora_up.weight"]).to(device=device, dtype=torch.float32)
    down = _flat(module.tensors["lora_down.weight"]).to(device=device, dtype=torch.float32)
    return up * module.effective_scale, down
