"""Tiny random SD1-like models for tests, the demo and examples.

Same architecture families and conventions as SD1.x (CLIP text model over the real
49,408-token vocabulary, cross-attention UNet, 4-channel latents, VAE that downsamples
by 8), but a few thousand times smaller, so one denoising step takes milliseconds on a
CPU. Weights are drawn from a seeded generator, LayerNorm parameters included (a fresh
LayerNorm has bias 0, which makes the reference emphasis mean restoration 0/0).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdstack.models.components import SD1_SCHEDULER_CONFIG, ModelComponents

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def randomize_norms(module: Any, generator: Any) -> None:
    """Give every LayerNorm/GroupNorm a random affine (weight ~ 1 + 0.1 N, bias ~ 0.1 N)."""
    import torch

    for sub in module.modules():
        if isinstance(sub, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and sub.weight is not None:
            with torch.no_grad():
                sub.weight.copy_(1 + 0.1 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))


@contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for module initialisation, then restore the caller's."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_text_encoder(seed: int = 0) -> Any:
    """A 5-layer, width-32 ``CLIPTextModel`` over the full SD1.x vocabulary."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with _global_seed(seed):  # default init draws from the global RNG; restored after
        model = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def tiny_unet(seed: int = 0) -> Any:
    """A two-level cross-attention ``UNet2DConditionModel`` (context width 32)."""
    import torch
    from diffusers import UNet2DConditionModel

    with _global_seed(seed):  # default init draws from the global RNG; restored after
        model = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def tiny_vae(seed: int = 0) -> Any:
    """A four-level ``AutoencoderKL`` (downsampling 8, 4 latent channels)."""
    import torch
    from diffusers import AutoencoderKL

    with _global_seed(seed):  # default init draws from the global RNG; restored after
        model = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def tiny_components(seed: int = 0) -> ModelComponents:
    """All three tiny networks plus the packaged tokenizer, ready to generate with."""
    from sdstack.prompt.tokenizer import load_tokenizer

    return ModelComponents(
        unet=tiny_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=load_tokenizer(),
        scheduler_config=dict(SD1_SCHEDULER_CONFIG),
        name="tiny-random",
    )
