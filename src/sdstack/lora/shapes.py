"""Checks that a LoRA module's tensors fit its layer, on shapes alone (before any math).

Every algorithm's parts are checked against the layer's weight shape ``(out, in, *k)``
(diffusers layout) so that a file can never make the delta computation allocate more than
the layer, and so that a wrong file fails at read time naming the key, its shape and the
shape that was expected. Accepted spellings of the same matrix: a linear weight stored as
a 1x1 conv ``[r, in, 1, 1]`` and the reverse (kohya stores SD1 ``proj_in`` as 1x1 convs),
conv factors flattened to ``[r, in*k*k]`` (LyCORIS). A 4-channel delta also fits the
9-channel inpainting ``conv_in`` (it is zero-padded). Ranks may not exceed the larger side
of the matrix they factor (a rank above it adds nothing and only costs memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

Shape = tuple[int, ...]
INPAINT_CHANNELS = 9
"""Input channels of the inpainting UNet's conv_in (4 latent + 1 mask + 4 masked image)."""
LATENT_CHANNELS = 4


class PartShapeError(Exception):
    """A part whose shape does not fit (formats turn it into a LoraFileError with the key)."""

    def __init__(self, part: str, shape: Shape | None, expected: str) -> None:
        super().__init__(f"{part} {shape} expected {expected}")
        self.part = part
        self.shape = shape
        self.expected = expected


def _text(options: list[Shape] | set[Shape]) -> str:
    return " or ".join(str(tuple(s)) for s in sorted(set(options), key=len))


def _need(part: str, shape: Shape, options: list[Shape]) -> None:
    if tuple(shape) not in {tuple(o) for o in options}:
        raise PartShapeError(part, tuple(shape), _text(options))


def _rank(part: str, shape: Shape, rank: int, limit: int, expected: str) -> None:
    if rank < 1 or rank > limit:
        raise PartShapeError(part, tuple(shape), f"{expected} with a rank from 1 to {limit}")


def weight_forms(weight: Shape) -> list[Shape]:
    """Shapes that hold a whole weight matrix: itself, ``(out, in*k*k)``, and a linear
    weight as a 1x1 conv."""
    forms = [tuple(weight)]
    if len(weight) > 2:
        forms.append((weight[0], math.prod(weight[1:])))
    if len(weight) == 2:
        forms.append((*weight, 1, 1))
    return forms


def _matrix(weight: Shape) -> tuple[int, int, Shape]:
    if len(weight) < 2:
        raise PartShapeError("weight", None, "a linear or conv layer (its weight is 1-d)")
    return weight[0], weight[1], tuple(weight[2:])


def check_lora(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """LoRA/LoCon: down ``[r, in(, k, k)]``, up ``[out, r(, 1, 1)]``; with ``lora_mid``
    ``[r, r, k, k]`` the down is ``[r, in(, 1, 1)]``."""
    out, inp, kernel = _matrix(weight)
    flat = math.prod(weight[1:])
    down, mid = s["lora_down.weight"], s.get("lora_mid.weight")
    if len(down) < 2:
        raise PartShapeError("lora_down.weight", down, f"(r, {flat})")
    rank = down[0]
    if mid is None:
        downs = [(rank, flat), (rank, inp, *kernel)] + ([(rank, inp, 1, 1)] if not kernel else [])
    else:
        if not kernel:
            raise PartShapeError("lora_mid.weight", mid, "no lora_mid (the layer is linear)")
        downs = [(rank, inp), (rank, inp, 1, 1)]
    _need("lora_down.weight", down, downs)
    _rank("lora_down.weight", down, rank, max(out, flat), _text(downs))
    up_rank = rank
    if mid is not None:
        up_rank = mid[0] if len(mid) == 2 + len(kernel) else 0
        _need("lora_mid.weight", mid, [(up_rank, rank, *kernel)])
        _rank("lora_mid.weight", mid, up_rank, max(out, flat), f"(r, {rank}, {kernel})")
    _need("lora_up.weight", s["lora_up.weight"], [(out, up_rank), (out, up_rank, 1, 1)])


def _loha_factor(s: Mapping[str, Shape], i: int, weight: Shape) -> None:
    out, inp, kernel = _matrix(weight)
    flat = math.prod(weight[1:])
    a, b, core = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], s.get(f"hada_t{i}")
    if len(b) < 2:
        raise PartShapeError(f"hada_w{i}_b", b, f"(r, {flat})")
    rank = b[0]
    if core is None:
        options = [(rank, flat), (rank, inp, *kernel)]
        _need(f"hada_w{i}_b", b, options)
        _rank(f"hada_w{i}_b", b, rank, max(out, flat), _text(options))
        _need(f"hada_w{i}_a", a, [(out, rank)])
        return
    if not kernel:
        raise PartShapeError(f"hada_t{i}", core, "no Tucker core (the layer is linear)")
    _need(f"hada_w{i}_b", b, [(rank, inp)])
    _rank(f"hada_w{i}_b", b, rank, max(out, flat), f"({rank}, {inp})")
    _need(f"hada_t{i}", core, [(rank, rank, *kernel)])
    _need(f"hada_w{i}_a", a, [(rank, out)])


def check_loha(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """LoHa: each factor ``w_a [out, r] @ w_b [r, in*k*k]``, or with a Tucker core
    ``t [r, r, k, k]``: ``w_a [r, out]``, ``w_b [r, in]``."""
    _loha_factor(s, 1, weight)
    _loha_factor(s, 2, weight)


def _lokr_first(s: Mapping[str, Shape]) -> tuple[int, int]:
    if "lokr_w1" in s:
        w1 = s["lokr_w1"]
        if len(w1) != 2:
            raise PartShapeError("lokr_w1", w1, "a matrix (a, b)")
        return w1[0], w1[1]
    a, b = s["lokr_w1_a"], s["lokr_w1_b"]
    if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
        raise PartShapeError(
            "lokr_w1_b", b, f"({a[1] if len(a) == 2 else 'r'}, b) after lokr_w1_a {a}"
        )
    _rank("lokr_w1_a", a, a[1], max(a[0], b[1]), "(a, r)")
    return a[0], b[1]


def check_lokr(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """LoKr: ``kron(w1 [a, b], w2 [out/a, in*k*k/b])`` (``w2`` also ``[out/a, in/b, k, k]``,
    ``w2_a [out/a, r] @ w2_b [r, in*k*k/b]``, or Tucker ``t2 [r, r, k, k]`` with
    ``w2_a [r, out/a]``, ``w2_b [r, in/b]``)."""
    out, inp, kernel = _matrix(weight)
    flat = math.prod(weight[1:])
    a, b = _lokr_first(s)
    first = "lokr_w1" if "lokr_w1" in s else "lokr_w1_a"
    if a < 1 or b < 1 or out % a or flat % b:
        raise PartShapeError(
            first, s[first], f"factors (a, b) with a dividing {out} and b dividing {flat}"
        )
    c, d = out // a, flat // b
    if "lokr_w2" in s:
        options = [(c, d)] + ([(c, inp // b, *kernel)] if kernel and inp % b == 0 else [])
        _need("lokr_w2", s["lokr_w2"], options)
        return
    w2a, w2b, core = s["lokr_w2_a"], s["lokr_w2_b"], s.get("lokr_t2")
    if len(w2b) < 2:
        raise PartShapeError("lokr_w2_b", w2b, f"(r, {d})")
    rank = w2b[0]
    if core is None:
        _need("lokr_w2_b", w2b, [(rank, d)])
        _rank("lokr_w2_b", w2b, rank, max(c, d), f"({rank}, {d})")
        _need("lokr_w2_a", w2a, [(c, rank)])
        return
    if not kernel or inp % b:
        raise PartShapeError("lokr_t2", core, f"no Tucker core for this layer {tuple(weight)}")
    _need("lokr_w2_b", w2b, [(rank, inp // b)])
    _rank("lokr_w2_b", w2b, rank, max(c, d), f"({rank}, {inp // b})")
    _need("lokr_t2", core, [(rank, rank, *kernel)])
    _need("lokr_w2_a", w2a, [(rank, c)])


def check_full(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """Full: ``diff`` is a whole weight."""
    _need("diff", s["diff"], weight_forms(weight))


def check_norm(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """Norm: ``w_norm`` is a whole weight (the norm layer's scale vector)."""
    _need("w_norm", s["w_norm"], weight_forms(weight))


def check_ia3(s: Mapping[str, Shape], weight: Shape, values: Mapping[str, bool]) -> None:
    """IA3: ``weight`` has one value per output row, or per input column with on_input."""
    out, inp, _ = _matrix(weight)
    size = inp if values.get("on_input", False) else out
    _need("weight", s["weight"], [(size,), (size, 1)] if size != 1 else [(1,), (1, 1)])


CHECKS: dict[str, Callable[[Mapping[str, Shape], Shape, Mapping[str, bool]], None]] = {
    "lora": check_lora,
    "loha": check_loha,
    "lokr": check_lokr,
    "full": check_full,
    "norm": check_norm,
    "ia3": check_ia3,
}
BIAS_PARTS = ("lora_up.bias", "diff_b", "b_norm")


def inpaint_variant(weight: Shape) -> Shape | None:
    """The 4-channel weight shape a LoRA for the inpainting conv_in was made for."""
    if len(weight) == 4 and weight[1] == INPAINT_CHANNELS:
        return (weight[0], LATENT_CHANNELS, *weight[2:])
    return None


def check_module(
    algorithm: str,
    shapes: Mapping[str, Shape],
    weight: Shape,
    bias: Shape | None,
    values: Mapping[str, bool],
) -> None:
    """Raise PartShapeError unless every part fits a layer of ``weight``/``bias`` shape
    (or the weight's 4-channel inpainting variant)."""
    try:
        CHECKS[algorithm](shapes, weight, values)
    except PartShapeError as error:
        variant = inpaint_variant(weight)
        if variant is None:
            raise
        try:
            CHECKS[algorithm](shapes, variant, values)
        except PartShapeError:
            raise error from None
    for part in BIAS_PARTS:
        if part in shapes:
            if bias is None:
                raise PartShapeError(part, shapes[part], "nothing: the layer has no bias")
            _need(part, shapes[part], [tuple(bias)])


def dora_layout(shape: Shape, weight: Shape, wd_on_output: bool) -> Shape:
    """The shape a DoRA magnitude is viewed as: ``(1, in, 1...)`` (per input column) or
    ``(out, 1, 1...)`` (per output row). ``(in,)``/``(1, in, ...)`` are per input,
    ``(out,)``/``(out, 1, ...)`` per output; a 1-d vector of a square layer is per input
    unless the metadata says ``wd_on_output``."""
    out, inp, kernel = _matrix(weight)
    ones = (1,) * len(kernel)
    per_input, per_output = (1, inp, *ones), (out, 1, *ones)
    shape = tuple(shape)
    if shape == (inp,) and (out != inp or not wd_on_output):
        return per_input
    if shape == (out,):
        return per_output
    if shape in {(1, inp), per_input}:
        return per_input
    if shape in {(out, 1), per_output}:
        return per_output
    raise PartShapeError("dora_scale", shape, _text([per_input, per_output]))
