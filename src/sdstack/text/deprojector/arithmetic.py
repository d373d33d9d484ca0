"""Embedding arithmetic on sentence embeddings, deprojected to UNet conditioning.

Evaluates the expressions of :mod:`sdstack.prompt.arithmetic` relative to the empty
prompt's embedding ``null`` (the spec: inputs relative to the empty prompt; slerp centred
on it works better than centred on zero). Every node has a difference ``d = e - null``:

- text ``"a"``: ``d = e("a") - null``;
- weighted sum ``w_1 x_1 + w_2 x_2 ...``: ``d = sum_i w_i d(x_i)``, so
  ``{"a" + "b" - "c"}`` is ``null + (a - null) + (b - null) - (c - null)`` and
  ``{0.7*"a" + 0.3*"b"}`` is the linear interpolation ``0.7 a + 0.3 b``;
- interpolation ``x ~t~ y``: ``d = slerp(d(x), d(y), t)``, the direction moved along the
  great circle and the norm linearly::

      u = d(x) / |d(x)|,  v = d(y) / |d(y)|,  omega = arccos(u . v)
      d = ((1 - t) |d(x)| + t |d(y)|) * (sin((1 - t) omega) u + sin(t omega) v) / sin(omega)

  and ``(1 - t) d(x) + t d(y)`` when either difference is zero or ``sin(omega) < 1e-6``
  (the directions are parallel, or opposite, where no great circle is singled out);
- ``pooled("a, b, c")``, the spec's pooled encoding: ``e = null + sum_i (e_i - null)``
  over the comma-separated pieces; with ``renorm``, ``e`` is then rescaled to the mean
  norm of the pieces, ``e * mean_i |e_i| / |e|`` (left as is if ``|e| = 0``).

The result is ``null + d``, except that a lone text is its embedding itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sdstack.prompt.arithmetic import (
    Expression,
    Interpolation,
    PooledSum,
    Sum,
    Text,
    expression_texts,
    parse_embedding_expression,
)
from sdstack.text.deprojector import DeprojectorError

_PARALLEL = 1e-6  # sin(omega) below which slerp falls back to linear interpolation


def evaluate_expression(
    expression: Expression,
    embed: Callable[[list[str]], torch.Tensor],
    null: torch.Tensor,
) -> torch.Tensor:
    """The sentence embedding an expression denotes (the formulas of this module).

    Args:
        expression: a parsed expression (``parse_embedding_expression``).
        embed: texts -> their sentence embeddings, (n, W); called once, with the
            different texts of the expression (``expression_texts``).
        null: the empty prompt's embedding, (W,) or (1, W).

    Returns:
        (W,) in the dtype of the embeddings promoted to at least float32, on null's device.

    Raises:
        DeprojectorError: ``expression`` is not a parsed expression, ``null`` not a (W,)
            tensor, or ``embed`` returned something other than an (n, W) tensor.
    """
    if not isinstance(expression, (Text, Sum, Interpolation, PooledSum)):
        raise DeprojectorError(
            "expression must be parsed first (sdstack.prompt.arithmetic."
            f"parse_embedding_expression), got {type(expression).__name__}"
        )
    null = _check_null(null)
    texts = expression_texts(expression)
    vectors = _check_embeddings(embed(texts), len(texts), null.shape[0])
    dtype = torch.promote_types(torch.promote_types(vectors.dtype, null.dtype), torch.float32)
    vectors = vectors.to(null.device, dtype)
    null = null.to(dtype)
    if isinstance(expression, Text):
        return vectors[0]
    embeddings = dict(zip(texts, vectors, strict=True))
    return null + _difference(expression, embeddings, null)


def deprojected_states(
    text: str | Expression,
    deprojector: Any,
    text_encoder: Any,
    tokenizer: Any,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """UNet conditioning from an embedding-arithmetic prompt: parse, embed, evaluate, decode.

    Args:
        text: a prompt (a plain text, or a ``{...}`` expression) or a parsed expression.
        deprojector: a :class:`~sdstack.text.deprojector.model.Deprojector`; its ``embed``
            encodes the texts and its ``null`` is the empty prompt's embedding.
        text_encoder, tokenizer: the CLIP text model the deprojector was trained on.
        device: where the states are returned (default: the deprojector's device).

    Returns:
        (1, 77, W): ``deprojector.decode`` of the evaluated embedding.

    Raises:
        EmbeddingExpressionError: a prompt outside the expression grammar.
    """
    # 1. parse (a plain text is one Text)
    expression = parse_embedding_expression(text) if isinstance(text, str) else text
    with torch.no_grad():
        # 2. embed every different text in one batch, and evaluate relative to null
        embedding = evaluate_expression(
            expression,
            lambda texts: deprojector.embed(text_encoder, tokenizer, texts),
            deprojector.null,
        )
        # 3. deproject the one embedding
        states = deprojector.decode(embedding[None].to(deprojector.null.dtype))
    return states if device is None else states.to(device)


def slerp(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two vectors about zero, norm interpolated linearly.

    ``((1 - t)|u| + t|v|) (sin((1 - t) w) u/|u| + sin(t w) v/|v|) / sin(w)``,
    ``w = arccos(u.v / |u||v|)``; ``(1 - t) u + t v`` if ``u`` or ``v`` is zero or
    ``sin(w) < 1e-6``. ``slerp(u, v, 0) == u`` and ``slerp(u, v, 1) == v``.
    """
    norm_u = torch.linalg.vector_norm(u).item()
    norm_v = torch.linalg.vector_norm(v).item()
    if t == 0.0 or t == 1.0:
        return u if t == 0.0 else v
    linear = (1.0 - t) * u + t * v
    if norm_u == 0.0 or norm_v == 0.0:
        return linear
    cosine = max(-1.0, min(1.0, (torch.dot(u, v).item() / norm_u) / norm_v))
    omega = math.acos(cosine)
    sine = math.sin(omega)
    if sine < _PARALLEL:
        return linear
    direction = (math.sin((1.0 - t) * omega) / norm_u) * u + (math.sin(t * omega) / norm_v) * v
    return direction * (((1.0 - t) * norm_u + t * norm_v) / sine)


def _difference(
    node: Expression, embeddings: dict[str, torch.Tensor], null: torch.Tensor
) -> torch.Tensor:
    """``d = e(node) - null`` (the rules of the module docstring)."""
    if isinstance(node, Text):
        return embeddings[node.text] - null
    if isinstance(node, Sum):
        total = torch.zeros_like(null)
        for term in node.terms:
            total = total + term.weight * _difference(term.operand, embeddings, null)
        return total
    if isinstance(node, Interpolation):
        start = _difference(node.start, embeddings, null)
        return slerp(start, _difference(node.end, embeddings, null), node.t)
    if isinstance(node, PooledSum):
        return _pooled(node, embeddings, null) - null
    raise DeprojectorError(f"not an embedding expression node: {type(node).__name__}")


def _pooled(node: PooledSum, embeddings: dict[str, torch.Tensor], null: torch.Tensor):
    """``null + sum_i (e_i - null)``, with ``renormalise`` scaled to ``mean_i |e_i|``."""
    pieces = [embeddings[piece] for piece in node.pieces]
    total = null + sum((piece - null for piece in pieces), torch.zeros_like(null))
    if not node.renormalise:
        return total
    norm = torch.linalg.vector_norm(total)
    if norm.item() == 0.0:
        return total
    mean = torch.stack([torch.linalg.vector_norm(piece) for piece in pieces]).mean()
    return total * (mean / norm)


def _check_null(null: Any) -> torch.Tensor:
    if not isinstance(null, torch.Tensor) or null.ndim not in (1, 2) or null.shape[-1] == 0:
        got = tuple(getattr(null, "shape", ())) or type(null).__name__
        raise DeprojectorError(f"null embedding must be a (W,) tensor, got {got}")
    if null.ndim == 2 and null.shape[0] != 1:
        raise DeprojectorError(f"null embedding must be a (W,) tensor, got {tuple(null.shape)}")
    if not null.is_floating_point():
        raise DeprojectorError(f"null embedding must be floating point, got {null.dtype}")
    return null.reshape(-1)


def _check_embeddings(vectors: Any, count: int, width: int) -> torch.Tensor:
    expected = (count, width)
    if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != expected:
        got = tuple(getattr(vectors, "shape", ())) or type(vectors).__name__
        raise DeprojectorError(
            f"embed returned {got} for {count} texts; expected a tensor of shape {expected} "
            "(one embedding per text, as wide as the null embedding)"
        )
    if not vectors.is_floating_point():
        raise DeprojectorError(f"embed returned {vectors.dtype}; expected floating point")
    return vectors
