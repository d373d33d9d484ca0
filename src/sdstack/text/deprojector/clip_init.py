"""The teacher CLIP's side of the deprojector: its outputs and the weights copied from it.

- :func:`clip_outputs`: CLIP's pooled EOS state and its hidden state at a clip skip (the
  deprojector's input and target);
- :func:`clip_config`: a :class:`DeprojectorConfig` with the text encoder's layer shapes
  and fingerprint;
- :func:`copy_clip_weights`: CLIP layers ``first .. end - 1``, the position embeddings and
  the final LayerNorm into every ensemble member, members after the first perturbed by
  ``ENSEMBLE_NOISE`` (1%) of each weight matrix's standard deviation;
- :func:`init_query_term`: the parallel decoder's low-rank term ``(s V) U_k`` at its
  start: ``V ~ N(0, 1/W)`` (seeded by ``QUERY_SEED``, so ``from_clip`` is deterministic)
  and ``U = 0``, so the term is 0 and the decoder starts as the one without it.

``Deprojector.from_clip`` (model.py) runs these; this module does not import model.py.
"""

from __future__ import annotations

from typing import Any

import torch

from sdstack.text.clip_skip import final_layer_norm, layer_output, text_transformer
from sdstack.text.deprojector.config import DeprojectorConfig

ENSEMBLE_NOISE = 0.01
QUERY_SEED = 0


@torch.no_grad()
def clip_outputs(
    text_encoder: Any, tokenizer: Any, texts: list[str], clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's pooled output and the hidden state at ``clip_skip`` for ``texts``.

    Texts (a list; one string is one text) are tokenised to 77 tokens (padded, truncated,
    as SD1 does). The pooled output is
    ``last_hidden_state`` at the first EOS token (CLIPTextModel's ``pooler_output``); the
    states are ``last_hidden_state`` (1) or ``final_layer_norm(hidden_states[-N])``.

    Returns:
        ``(pooled (B, W), states (B, 77, W))`` on the text encoder's device and dtype.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    device = next(text_encoder.parameters()).device
    if not texts:
        width = int(text_encoder.config.hidden_size)
        dtype = next(text_encoder.parameters()).dtype
        empty = torch.zeros(0, width, device=device, dtype=dtype)
        return empty, torch.zeros(0, tokenizer.model_max_length, width, device=device, dtype=dtype)
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    out = text_encoder(input_ids=ids, output_hidden_states=clip_skip > 1)
    last = out.last_hidden_state
    is_eos = ids == tokenizer.eos_token_id
    eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), ids.argmax(dim=1))
    pooled = last[torch.arange(ids.shape[0], device=device), eos]
    states = layer_output(out.hidden_states, last, final_layer_norm(text_encoder), clip_skip)
    return pooled, states


def clip_config(text_encoder: Any, **options: Any) -> DeprojectorConfig:
    """The config of a deprojector with ``text_encoder``'s layer shapes and fingerprint."""
    from sdstack.text.deprojector.files import clip_fingerprint  # files imports model

    cfg = text_encoder.config
    return DeprojectorConfig(
        width=int(cfg.hidden_size),
        heads=int(cfg.num_attention_heads),
        intermediate_size=int(cfg.intermediate_size),
        layer_norm_eps=float(cfg.layer_norm_eps),
        hidden_act=str(cfg.hidden_act),
        clip_hash=clip_fingerprint(text_encoder),
        **options,
    )


@torch.no_grad()
def copy_clip_weights(model: Any, text_encoder: Any, first: int, end: int) -> None:
    """Copy CLIP layers ``first..end-1`` into each of ``model.stacks`` (members after the
    first perturbed), and the position embeddings and final LayerNorm into ``model``."""
    transformer = text_transformer(text_encoder)
    clip_layers = transformer.encoder.layers[first:end]
    for member, stack in enumerate(model.stacks):
        for mine, theirs in zip(stack.layers, clip_layers, strict=True):
            mine.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
        if member > 0:
            stack.perturb(member, ENSEMBLE_NOISE)
    position = transformer.embeddings.position_embedding.weight
    model.position_embedding.copy_(position[: model.config.positions].float())
    norm = {k: v.float() for k, v in transformer.final_layer_norm.state_dict().items()}
    model.final_layer_norm.load_state_dict(norm)


@torch.no_grad()
def init_query_term(down: torch.Tensor, up: torch.Tensor) -> None:
    """``down`` (V, W x r) <- N(0, 1/W) seeded by ``QUERY_SEED``; ``up`` (U) <- 0."""
    generator = torch.Generator().manual_seed(QUERY_SEED)
    width = down.shape[0]
    values = torch.randn(down.shape, generator=generator, dtype=torch.float32) / width**0.5
    down.copy_(values.to(down.device, down.dtype))
    up.zero_()
