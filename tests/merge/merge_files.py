"""Checkpoint files for the merge tests: tiny SD1 models, foreign key sets, edited copies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
TEXT = "cond_stage_model.transformer.text_model."
POSITION_IDS = TEXT + "embeddings.position_ids"
RESBLOCK_CONV = UNET + "input_blocks.1.0.in_layers.2.weight"
TOKEN_EMBEDDING = TEXT + "embeddings.token_embedding.weight"
VAE_CONV = "first_stage_model.decoder.conv_in.weight"


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """The tiny SD1-like model of ``seed`` as an LDM state dict (its own tensors, copied)."""
    from sdstack.models.ldm_file import to_ldm_state_dict
    from sdstack.models.tiny import tiny_components

    state = to_ldm_state_dict(tiny_components(seed))
    return {key: tensor.detach().clone().contiguous() for key, tensor in state.items()}


def save(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    """``state`` as a ``.safetensors`` file (``format: pt`` unless ``metadata`` says)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(path), metadata or {"format": "pt"}
    )
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file (through the safetensors library)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return file.metadata() or {}


def broken_position_ids() -> torch.Tensor:
    """Float position ids as broken merges left them: 75.9995 at 76, 37.99998 at 38, and
    3.0001 at 3 (not whole, but truncating right)."""
    ids = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    ids[0, 76], ids[0, 38], ids[0, 3] = 75.9995, 37.99998, 3.0001
    return ids


def sdxl_like() -> dict[str, torch.Tensor]:
    """A few SDXL-style tensors (two text encoders under ``conditioner.embedders``)."""
    generator = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    return {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": rand(
            16, 8
        ),
        "conditioner.embedders.1.model.token_embedding.weight": rand(16, 8),
        CONV_IN: rand(20, 4, 3, 3),
        UNET + "input_blocks.0.0.bias": rand(20),
        UNET + "label_emb.0.0.weight": rand(20, 12),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": rand(8, 24),
    }


def other_shapes_state() -> dict[str, torch.Tensor]:
    """A tiny SD1-like model whose second UNet level is 96 channels wide (not 64)."""
    from diffusers import UNet2DConditionModel

    from sdstack.models.ldm_file import to_ldm_state_dict
    from sdstack.models.tiny import TINY_UNET_CONFIG, tiny_text_encoder, tiny_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (32, 96)})
    parts = SimpleNamespace(unet=unet, vae=tiny_vae(5), text_encoder=tiny_text_encoder(5))
    return {k: v.detach().clone() for k, v in to_ldm_state_dict(parts).items()}


def with_conv_in(state: dict[str, torch.Tensor], channels: int, seed: int) -> dict:
    """``state`` with a ``channels``-input conv_in (seeded values; the first 4 kept)."""
    weight = state[CONV_IN]
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn((weight.shape[0], channels - 4, *weight.shape[2:]), generator=generator).to(
        weight.dtype
    )
    return {**state, CONV_IN: torch.cat([weight, extra], dim=1)}
