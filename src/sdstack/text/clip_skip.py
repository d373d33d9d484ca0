"""CLIP skip: which text-encoder layer conditions the UNet (reference numbering, 1 = last).

Reference web UI "Clip skip" N (kohya sd-scripts ``--clip_skip N`` is the same):

- N == 1: ``last_hidden_state`` (the last layer, already final-layer-normed);
- N > 1: ``final_layer_norm(hidden_states[-N])``, the output of the N-th layer from the end.

``hidden_states`` (``output_hidden_states=True``) holds ``num_layers + 1`` entries: the
embedding output, then one per layer; N ranges over ``1..num_layers``.

How other tools number the same choice:

====================================================  ===============================
tool / setting                                        same as sdstack ``clip_skip=N``
====================================================  ===============================
reference web UI "Clip skip: N"                       N
kohya sd-scripts ``--clip_skip N``                    N
diffusers ``clip_skip=k``                             N = k + 1 (``None``: N = 1)
ComfyUI ``CLIPSetLastLayer(stop_at_clip_layer=-N)``   N
====================================================  ===============================

A fractional N (an sdstack extension) blends the two neighbouring layers' normalised
outputs linearly: with ``n = floor(N)`` and ``f = N - n``,
``out(N) = (1 - f) * out(n) + f * out(n + 1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sdstack.validate import check_clip_skip as check_clip_skip


def text_transformer(model: Any) -> Any:
    """The module holding ``embeddings``, ``encoder`` and ``final_layer_norm``.

    transformers 4.x: ``CLIPTextModel.text_model``; 5.x: the ``CLIPTextModel`` itself.
    """
    inner = getattr(model, "text_model", None)
    return inner if inner is not None else model


def final_layer_norm(model: Any) -> Any:
    """The text model's final LayerNorm, on transformers 4.x and 5.x alike."""
    return text_transformer(model).final_layer_norm


def token_embedding(model: Any) -> Any:
    """The token-embedding ``nn.Embedding`` (vocabulary x width), on 4.x and 5.x alike."""
    return text_transformer(model).embeddings.token_embedding


def num_layers(model: Any) -> int:
    """Number of transformer layers (12 on SD1.x)."""
    return int(model.config.num_hidden_layers)


def layer_output(
    hidden_states: tuple[torch.Tensor, ...],
    last_hidden_state: torch.Tensor,
    norm: Any,
    n: int,
) -> torch.Tensor:
    """Reference output for integer clip skip ``n``: last_hidden_state or LN(hidden_states[-n])."""
    if n == 1:
        return last_hidden_state
    return norm(hidden_states[-n])


def clip_skip_output(
    hidden_states: tuple[torch.Tensor, ...],
    last_hidden_state: torch.Tensor,
    norm: Any,
    clip_skip: float,
) -> torch.Tensor:
    """Conditioning for (possibly fractional) clip skip N; see the module docstring.

    ``out(N) = (1 - f) * out(floor N) + f * out(floor N + 1)`` with ``f = N - floor N``;
    an integer N is exactly ``out(N)``.
    """
    low = math.floor(clip_skip)
    fraction = clip_skip - low
    out_low = layer_output(hidden_states, last_hidden_state, norm, low)
    if fraction == 0:
        return out_low
    out_high = layer_output(hidden_states, last_hidden_state, norm, low + 1)
    return (1 - fraction) * out_low + fraction * out_high
