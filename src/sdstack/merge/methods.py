"""Merge methods: one small pure function per method, computing in float32 (spec merge.md).

Each method maps the tensors of one key in models A, B (and C) to the merged tensor, with
``a`` = alpha and ``b`` = beta (per key, possibly per block: :mod:`sdstack.merge.blocks`):

==================  ==============================================================  =====
name (label)        formula                                                         needs
==================  ==============================================================  =====
weighted-sum        (1-a)A + aB  ("Weighted sum", the reference's multiplier a)     A B
add-difference      A + a(B-C)   ("Add difference")                                 A B C
sum-twice           (1-b)((1-a)A + aB) + bC  ("Sum Twice")                          A B C
triple-sum          (1-a-b)A + aB + bC  ("Triple Sum")                              A B C
train-difference    A + 1.8a(B-C)|B-A|/(|B-C|+|B-A|), 0 where |B-C|+|B-A| = 0       A B C
ties                C + a*disjoint_mean(trim(A-C), trim(B-C))  ("TIES")             A B C
dare                A + a*drop(B-C), or C + a*disjoint_mean(drop(A-C), drop(B-C))   A B C
slerp               spherical interpolation of A, B flattened, norms interpolated   A B
==================  ==============================================================  =====

Every function has the shape ``(a, b, c, alpha, beta, key, options) -> Tensor`` and never
changes its inputs. :func:`merge_tensor` checks the inputs (floating point, equal shapes,
finite multipliers, known options), casts to float32 and calls the method; ``MERGE_METHODS``
finds a method by name or by the reference UI's label ("Add difference"), and suggests the
nearest names for a typo. Randomness (DARE) depends only on ``(seed, key)``, so merging a
model key by key (streaming) gives the same bits as merging the whole state dict at once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch

from sdstack.errors import UnknownNameError
from sdstack.merge import MergeError
from sdstack.registry import Registry

MethodFunction = Callable[..., torch.Tensor]
"""``(a, b, c, alpha, beta, key, options) -> Tensor``; a, b, c float32 (c None for 2 inputs)."""


class UnknownMergeMethodError(MergeError, UnknownNameError):
    """A merge method name that is not registered (the message names the nearest)."""


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its name, the reference label, what it needs and its function."""

    name: str
    label: str
    inputs: int
    uses_beta: bool
    function: MethodFunction
    formula: str = ""
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The options the method takes, with their defaults."""


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", UnknownMergeMethodError)
"""Every merge method by name, with the reference UI's labels as aliases."""

TRAIN_DIFFERENCE_SCALE = 1.8
"""The reference (supermerger "trainDifference") multiplier of train difference."""

SLERP_PARALLEL_SIN = 1e-3
"""Below this sin(angle) slerp is the weighted sum (parallel or opposite directions)."""


def _method(name: str, label: str, inputs: int, formula: str, *, beta=False, options=None):
    def register(function: MethodFunction) -> MethodFunction:
        method = MergeMethod(name, label, inputs, beta, function, formula, dict(options or {}))
        MERGE_METHODS.register(name, method, aliases=(label,))
        return function

    return register


def _plus_scaled(base: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * delta`` in one pass, written over ``delta`` (a fresh temporary)."""
    return torch.add(base, delta, alpha=scale, out=delta)


@_method("weighted-sum", "Weighted sum", 2, "(1-a)A + aB")
def weighted_sum(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Weighted sum (the reference's "Weighted sum"): ``(1 - alpha) A + alpha B``."""
    return torch.mul(a, 1.0 - alpha).add_(b, alpha=alpha)


@_method("add-difference", "Add difference", 3, "A + a(B-C)")
def add_difference(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Add difference (the reference's "Add difference"): ``A + alpha (B - C)``."""
    return _plus_scaled(a, b - c, alpha)


@_method("sum-twice", "Sum Twice", 3, "(1-b)((1-a)A + aB) + bC", beta=True)
def sum_twice(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Sum twice (supermerger "Sum Twice"): ``(1 - beta)((1 - alpha) A + alpha B) + beta C``."""
    return weighted_sum(a, b, c, alpha, beta, key, options).mul_(1.0 - beta).add_(c, alpha=beta)


@_method("triple-sum", "Triple Sum", 3, "(1-a-b)A + aB + bC", beta=True)
def triple_sum(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Triple sum (supermerger "Triple Sum"): ``(1 - alpha - beta) A + alpha B + beta C``."""
    return torch.mul(a, 1.0 - alpha - beta).add_(b, alpha=alpha).add_(c, alpha=beta)


@_method("train-difference", "Train Difference", 3, "A + 1.8a(B-C)|B-A|/(|B-C|+|B-A|)")
def train_difference(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Train difference (supermerger "trainDifference"): B's change from C, scaled per element
    by how far B is from A, added to A.

    ``A + 1.8 alpha (B - C) |B - A| / (|B - C| + |B - A|)``; where the denominator is 0
    (A = B = C) the added term is 0.
    """
    b_from_c = b - c
    share = (b - a).abs_()
    total = b_from_c.abs().add_(share)
    share.div_(total).masked_fill_(total == 0, 0.0)
    return _plus_scaled(a, b_from_c.mul_(share), TRAIN_DIFFERENCE_SCALE * alpha)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``max(1, round(density n))`` largest ``|delta|`` of the n elements.

    Elements equal in magnitude to the last one kept are kept too (so ties at the threshold
    may keep a few more); the rest become 0. ``density`` 1 keeps everything.
    """
    count = delta.numel()
    keep = min(count, max(1, round(density * count)))
    if keep == count:
        return delta
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.flatten(), count - keep + 1).values
    return torch.where(magnitude >= threshold, delta, 0.0)


def _disjoint_mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES elect and disjoint merge: per element, ``s = sign(sum of sign(delta_X))``; the
    mean of the deltas whose sign is s; 0 where s is 0 (a tie, or every delta 0)."""
    signs = [torch.sign(delta) for delta in deltas]
    elected = torch.zeros_like(deltas[0])
    for sign in signs:
        elected.add_(sign)
    elected.sign_()
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for delta, sign in zip(deltas, signs, strict=True):
        agrees = sign.mul_(elected).clamp_(min=0.0)  # 1 where sign(delta) = elected != 0
        total.addcmul_(delta, agrees)
        count.add_(agrees)
    return total.div_(count.clamp_(min=1.0))


@_method("ties", "TIES", 3, "C + a*disjoint_mean(trim(A-C), trim(B-C))", options={"density": 0.2})
def ties(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) in the add-difference form, base C.

    ``delta_X = trim(X - C)`` for X in A, B: the top ``density`` fraction by ``|X - C|``
    (option ``density``, default 0.2, the paper's and sd-mecha's); the elected sign
    ``s = sign(sign(delta_A) + sign(delta_B))``; ``merged`` = the mean of the deltas with
    sign s (0 where A and B disagree or both are trimmed: a tie elects nothing);
    ``out = C + alpha merged``.
    """
    density = options["density"]
    merged = _disjoint_mean([_trim(a - c, density), _trim(b - c, density)])
    return _plus_scaled(c, merged, alpha)


def dare_keep_mask(shape: Sequence[int], *, drop: float, seed: int, key: str, model: str):
    """DARE's random mask for one key: True where an element is kept (probability 1 - drop).

    ``torch.rand(shape) >= drop`` from a CPU generator seeded by
    ``sha256("sdstack-dare|<seed>|<key>|<model>")``, so the mask of a key never depends on
    which keys were merged before it, on the device or on the global RNG.
    """
    digest = hashlib.sha256(f"sdstack-dare|{seed}|{key}|{model}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(tuple(shape), generator=generator) >= drop


def _dropped(x, c, options, key: str, model: str) -> torch.Tensor:
    delta = x - c
    drop = options["drop"]
    if drop == 0:
        return delta
    keep = dare_keep_mask(delta.shape, drop=drop, seed=options["seed"], key=key, model=model)
    return delta.div_(1.0 - drop).masked_fill_(~keep.to(delta.device), 0.0)


@_method(
    "dare",
    "DARE",
    3,
    "A + a*drop(B-C), or with ties C + a*disjoint_mean(drop(A-C), drop(B-C))",
    options={"drop": 0.9, "seed": 0, "ties": False, "density": 1.0},
)
def dare(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """DARE, drop and rescale (Yu et al. 2023), alone or before TIES.

    ``drop(X - C)``: each element of the delta is set to 0 with probability ``drop``
    (default 0.9, the paper's and sd-mecha's) and the kept ones are divided by
    ``1 - drop`` (mask: :func:`dare_keep_mask`, seeded by ``seed`` (default 0) and the key).
    Plain: ``A + alpha drop(B - C)`` (``drop`` 0 is exactly add difference). With
    ``ties``: ``C + alpha disjoint_mean(drop(A - C), drop(B - C))`` as :func:`ties`, the
    random drop taking the place of the magnitude trim (mergekit's ``dare_ties``);
    ``density`` < 1 trims the dropped deltas as TIES does as well.
    """
    if not options["ties"]:
        return _plus_scaled(a, _dropped(b, c, options, key, "B"), alpha)
    density = options["density"]
    deltas = [_trim(_dropped(x, c, options, key, m), density) for x, m in ((a, "A"), (b, "B"))]
    return _plus_scaled(c, _disjoint_mean(deltas), alpha)


@_method("slerp", "Slerp", 2, "slerp(A, B, a) with the norm (1-a)|A| + a|B|")
def slerp(a, b, c, alpha, beta, key, options) -> torch.Tensor:
    """Spherical linear interpolation of A and B as flat vectors, with the norm interpolated.

    With ``w = angle(A, B)``: ``out = ((1-a)|A| + a|B|) (sin((1-a)w) A/|A| + sin(aw) B/|B|)
    / sin(w)``. Where that is undefined it is the weighted sum ``(1-a)A + aB``: a zero
    tensor (the weighted sum then has the direction of the other and the interpolated
    norm), and ``sin(w) < 1e-3`` (parallel: the same result; opposite: no unique arc).
    """
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    if norm_a == 0 or norm_b == 0:
        return weighted_sum(a, b, c, alpha, beta, key, options)
    cosine = float(torch.dot(a.flatten(), b.flatten())) / (norm_a * norm_b)
    if not math.isfinite(cosine):
        return weighted_sum(a, b, c, alpha, beta, key, options)
    angle = math.acos(min(1.0, max(-1.0, cosine)))
    sine = math.sin(angle)
    if sine < SLERP_PARALLEL_SIN:
        return weighted_sum(a, b, c, alpha, beta, key, options)
    norm = (1.0 - alpha) * norm_a + alpha * norm_b
    weight_a = math.sin((1.0 - alpha) * angle) / sine * norm / norm_a
    weight_b = math.sin(alpha * angle) / sine * norm / norm_b
    return torch.mul(a, weight_a).add_(b, alpha=weight_b)


def _where(key: str) -> str:
    return f"merge key {key!r}" if key else "merge"


def _option_value(method: MergeMethod, name: str, value: Any) -> Any:
    bad = f"merge method {method.name!r}: option {name}={value!r}"
    if name == "ties":
        if not isinstance(value, bool):
            raise MergeError(f"{bad}; expected true or false")
        return value
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise MergeError(f"{bad}; expected a whole number")
        return value
    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    if name == "density":
        fits, expected = number is not None and 0 < number <= 1, "0 < density <= 1 (kept)"
    else:
        fits, expected = number is not None and 0 <= number < 1, "0 <= drop < 1 (dropped)"
    if not fits:  # NaN fails both comparisons
        raise MergeError(f"{bad}; expected a fraction, {expected}")
    return number


def resolve_options(method: MergeMethod | str, options: Mapping[str, Any] | None) -> dict:
    """The method's options with defaults filled in (what the recipe records).

    Raises:
        MergeError: an option the method does not take (with the nearest name), or a value
            out of range (``density`` in (0, 1], ``drop`` in [0, 1), ``seed`` an int,
            ``ties`` a bool; ``density`` with DARE only with ``ties``).
        UnknownMergeMethodError: an unknown method name.
    """
    method = MERGE_METHODS.get(method) if isinstance(method, str) else method
    given = dict(options or {})
    resolved = dict(method.options)
    for name, value in given.items():
        if name not in method.options:
            takes = ", ".join(method.options) or "no options"
            raise MergeError(
                f"merge method {method.name!r}: unknown option {name!r}; expected {takes}"
            )
        resolved[name] = _option_value(method, name, value)
    if method.name == "dare" and resolved["density"] != 1.0 and not resolved["ties"]:
        raise MergeError("merge method 'dare': density applies with ties=true only")
    return resolved


def _multiplier(name: str, value: Any, key: str) -> float:
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise MergeError(f"{_where(key)}: {name}={value!r}; expected a finite number")


def _check_tensors(method: MergeMethod, tensors: dict[str, Any], key: str) -> None:
    where = _where(key)
    if method.inputs == 2 and tensors.pop("C") is not None:
        raise MergeError(
            f"{where}: merge method {method.name!r} merges models A and B; got a tensor for "
            "model C (pass c=None)"
        )
    if method.inputs == 3 and tensors["C"] is None:
        raise MergeError(f"{where}: merge method {method.name!r} needs model C; got None")
    for model, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise MergeError(f"{where}: model {model} gave a {kind}; expected a tensor")
        if not tensor.is_floating_point():
            raise MergeError(
                f"{where}: model {model} tensor has dtype {tensor.dtype}; expected a floating-"
                "point tensor (integer tensors such as position_ids are copied, never merged)"
            )
    shapes = {model: tuple(tensor.shape) for model, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{model} {shape}" for model, shape in shapes.items())
        raise MergeError(f"{where}: shapes differ ({listed}); expected one shape in every model")


def merge_tensor(
    method: MergeMethod | str,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    alpha: float,
    beta: float = 0.0,
    key: str = "",
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Merge the tensors of one key with ``method`` (a :class:`MergeMethod` or its name/label).

    Args:
        a, b, c: the key's tensors in models A, B, C (any floating dtype; C only for the
            3-model methods).
        alpha, beta: the multipliers for this key (beta only where the method uses it).
        key: the checkpoint key, for messages and DARE's seed.
        options: method options (:func:`resolve_options`): ties ``density``; dare ``drop``,
            ``seed``, ``ties``, ``density``.

    Returns:
        A new float32 tensor of the inputs' shape, on their device.

    Raises:
        UnknownMergeMethodError: an unknown method name (with the nearest names).
        MergeError: a non-float tensor, differing shapes, C missing (or given to a 2-model
            method), alpha/beta not finite, or bad options.
    """
    method = MERGE_METHODS.get(method) if isinstance(method, str) else method
    alpha = _multiplier("alpha", alpha, key)
    beta = _multiplier("beta", beta, key)
    tensors = {"A": a, "B": b, "C": c}
    _check_tensors(method, tensors, key)
    resolved = resolve_options(method, options)
    a32, b32 = a.float(), b.float()
    c32 = c.float() if c is not None else None
    return method.function(a32, b32, c32, alpha, beta, key, resolved)
