"""Tests of sdstack.text; the helpers below compute truths directly from the CLIP model.

They run the text model on one chunk at a time (batch 1) and apply the spec formulas by
hand, independently of ``PromptEncoder``'s batched path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


def inner(model: Any) -> Any:
    """The module holding embeddings/encoder/final_layer_norm (transformers 4.x or 5.x)."""
    return getattr(model, "text_model", model)


def final_norm(model: Any) -> Any:
    """The final LayerNorm, read directly off the model."""
    return inner(model).final_layer_norm


def direct_output(model: Any, ids: Sequence[int]) -> Any:
    """``model(ids[None], output_hidden_states=True)`` for one 77-id chunk."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True)


def direct_layer(model: Any, ids: Sequence[int], n: int) -> torch.Tensor:
    """Spec CLIP skip N for one chunk: (77, width)."""
    out = direct_output(model, ids)
    with torch.no_grad():
        if n == 1:
            return out.last_hidden_state[0]
        return final_norm(model)(out.hidden_states[-n])[0]


def direct_original(z: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Spec "original": mean0 = z.mean(); z = z * m; z = z * (mean0 / z.mean())."""
    m = torch.tensor(list(weights), dtype=z.dtype)[:, None]
    mean0 = z.mean()
    weighted = z * m
    return weighted * (mean0 / weighted.mean())


EMPTY_IDS = (49406,) + (49407,) * 76
"""The empty chunk the reference pads calls with: BOS + 76 x EOS (weights all 1.0)."""


def direct_call_original(model: Any, texts: Sequence[Any], n: int = 1) -> list[torch.Tensor]:
    """Spec "original" over ONE reference call, computed chunk index by chunk index.

    ``texts``: one chunk list per text of the call (objects with ``ids`` and ``weights``).
    Shorter texts are padded with the empty chunk; for chunk index ``i`` the model runs on
    the stacked ids of every text (batch = texts), CLIP skip ``n`` is applied, then
    ``mean0 = z.mean(); z = z * m; z = z * (mean0 / z.mean())`` with one mean over the whole
    batch. Returns each text's (77 * chunks, width) tensor.
    """
    count = max(len(chunks) for chunks in texts)
    empty = [(EMPTY_IDS, (1.0,) * 77)]
    rows = [
        [(c.ids, c.weights) for c in chunks] + empty * (count - len(chunks)) for chunks in texts
    ]
    outputs: list[list[torch.Tensor]] = [[] for _ in texts]
    for index in range(count):
        ids = torch.tensor([list(row[index][0]) for row in rows])
        m = torch.tensor([list(row[index][1]) for row in rows])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            z = out.last_hidden_state if n == 1 else final_norm(model)(out.hidden_states[-n])
        mean0 = z.mean()
        z = z * m[..., None]
        z = z * (mean0 / z.mean())
        for text, tensor in zip(outputs, z, strict=True):
            text.append(tensor)
    return [torch.cat(chunks) for chunks in outputs]


# Tolerances. PromptEncoder runs every chunk of every text in ONE batched forward; the
# truths above and below run the model per chunk index. Different batch sizes and reduction
# shapes make the float32 kernels (GEMM blocking, vectorised sums, thread partitioning)
# round in a different order, and that order changes with the CPU, the BLAS build, the
# thread count and the torch version. Comparisons of such results use the bounds below;
# comparisons of identical computations (same batch, same shapes) stay exact or use the
# default float32 tolerance, with a comment saying so.

U32 = 2.0**-24
"""float32 unit roundoff."""

FORWARD_ULPS = 32
"""Elementwise error of one float32 forward of the tiny CLIP, in units of ``U32 * max|z|``.

Measured against the same forward in float64: 4.5 to 6.6 with AVX-512, AVX2 and scalar
ATen kernels, 1 and 2 threads, torch 2.13 and 2.14 (and 2.9 in units of the bfloat16
roundoff for a bfloat16 model); 32 leaves a factor of 5.
"""

MEAN_ULPS = 8
"""Rounding of one float32 mean, in units of ``U32 * mean|x|`` (measured: at most 1)."""


def forward_atol(want: torch.Tensor, *, evaluations: int = 2, unit: float = U32) -> float:
    """Bound on ``max|a - b|`` for ``evaluations`` float32 forwards of the same chunks.

    Each forward is within ``FORWARD_ULPS * unit * max|z|`` of the exact result, so two
    of them (ours and a truth run with another batch) are within twice that of each other.
    """
    return evaluations * FORWARD_ULPS * unit * float(want.detach().abs().max())


def assert_forward_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got == want`` up to the rounding of two differently batched float32 forwards.

    For results that are the forward output itself (weights all 1, or position-wise
    emphasis modes whose multiplier is 1 at every compared row).
    """
    torch.testing.assert_close(got, want, rtol=0, atol=forward_atol(want))


class Expected(NamedTuple):
    """A float64 truth and the elementwise bound on ``|float32 result - value|``."""

    value: torch.Tensor
    tol: torch.Tensor

    def rows(self, start: int, stop: int) -> Expected:
        """The token rows ``start:stop`` of a ``(tokens, width)`` truth."""
        return Expected(self.value[start:stop], self.tol[start:stop])


_TWINS: dict[int, Any] = {}


def float64_twin(model: Any) -> Any:
    """A float64 copy of ``model`` (cached per model object; do not mutate either)."""
    twin = _TWINS.get(id(model))
    if twin is None or twin[0] is not model:
        twin = _TWINS[id(model)] = (model, copy.deepcopy(model).to(torch.float64))
    return twin[1]


def _layer(model: Any, ids: torch.Tensor, n: float) -> torch.Tensor:
    """Spec CLIP skip ``n`` (fractional: the linear blend of floor(n) and floor(n) + 1)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)

        def layer(k: int) -> torch.Tensor:
            return out.last_hidden_state if k == 1 else final_norm(model)(out.hidden_states[-k])

        low, f = math.floor(n), n - math.floor(n)
        return layer(low) if f == 0 else (1 - f) * layer(low) + f * layer(low + 1)


def original_tolerance(
    z: torch.Tensor, m: torch.Tensor, *, forward_ulps: float = FORWARD_ULPS, unit: float = U32
) -> torch.Tensor:
    """Elementwise bound on the float32 "original" emphasis of one call's chunk index.

    ``z`` (texts, 77, width) float64, ``m`` (texts, 77, 1). The result ``w * s`` with
    ``w = z * m`` and ``s = mean0 / wmean`` divides by means that are small next to the
    values (``max|z| / |mean0|`` is 100 to 500 for the tiny CLIP), so errors are amplified:

    - forward error ``|dz| <= eps = forward_ulps * unit * max|z|`` moves ``w`` by ``m * eps``
      and, to first order, ``s`` by ``s * (d0 / mean0 - d1 / wmean)``, with ``d0 = mean dz``,
      ``d1 = mean(m dz) = d0 + mean((m - 1) dz)``; that is at most ``|s| * eps * A``,
      ``A = |wmean - mean0| / |mean0 * wmean| + mean|m - 1| / |wmean|`` (the two means share
      ``dz``, so ``A`` is 5 to 40 here, not ``max|z| / |mean|``);
    - float32 rounding of the two means: ``MEAN_ULPS * U32 * (mean|z| / |mean0| +
      mean|w| / |wmean|)`` relative to ``s``;
    - the products, the division and the cast to the model dtype: ``4 * U32 + unit``.
    """
    mean0, w = z.mean(), z * m
    wmean = w.mean()
    s = mean0 / wmean
    out = w * s
    sensitivity = (wmean - mean0).abs() / (mean0 * wmean).abs() + (m - 1).abs().mean() / wmean.abs()
    rounding = MEAN_ULPS * U32 * (z.abs().mean() / mean0.abs() + w.abs().mean() / wmean.abs())
    eps = forward_ulps * unit * z.abs().max()
    return eps * (m * s.abs() + out.abs() * sensitivity) + out.abs() * (rounding + 4 * U32 + unit)


def original_truth(
    model: Any, texts: Sequence[Any], n: float = 1, *, unit: float = U32
) -> list[Expected]:
    """``direct_call_original`` in float64 (on ``float64_twin(model)``), with tolerances.

    Returns one ``Expected`` per text: the exact spec result of the call and the bound
    ``original_tolerance`` on a float32 (``unit``: the model dtype's roundoff) result.
    """
    twin = float64_twin(model)
    count = max(len(chunks) for chunks in texts)
    empty = [(EMPTY_IDS, (1.0,) * 77)]
    rows = [
        [(c.ids, c.weights) for c in chunks] + empty * (count - len(chunks)) for chunks in texts
    ]
    values: list[list[torch.Tensor]] = [[] for _ in texts]
    tols: list[list[torch.Tensor]] = [[] for _ in texts]
    for index in range(count):
        z = _layer(twin, torch.tensor([list(row[index][0]) for row in rows]), n)
        m = torch.tensor([list(row[index][1]) for row in rows], dtype=torch.float64)[..., None]
        mean0, weighted = z.mean(), z * m
        out = weighted * (mean0 / weighted.mean())
        tol = original_tolerance(z, m, unit=unit).expand_as(out)
        for text in range(len(texts)):
            values[text].append(out[text])
            tols[text].append(tol[text])
    return [Expected(torch.cat(v), torch.cat(t)) for v, t in zip(values, tols, strict=True)]


def assert_matches(got: torch.Tensor, expected: Expected) -> None:
    """``|got - expected.value| <= expected.tol`` everywhere (compared in float64)."""
    err = (got.detach().double() - expected.value).abs()
    ratio = float((err / expected.tol).max())
    assert got.shape == expected.value.shape
    assert ratio <= 1, f"max error {float(err.max()):.3g} is {ratio:.2f} times the bound"


def assert_differs(other: torch.Tensor, expected: Expected) -> None:
    """``other`` (a wrong reading) fails ``assert_matches(other, expected)``: the bound is
    tight enough to tell the two readings apart."""
    assert bool(((other.detach().double() - expected.value).abs() > expected.tol).any())
