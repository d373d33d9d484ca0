"""Tests of sdstack.text; the helpers below compute truths directly from the CLIP model.

They run the text model on one chunk at a time (batch 1) and apply the spec formulas by
hand, independently of ``PromptEncoder``'s batched path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
