"""The LDM <-> diffusers key map on the real SD1.5 architecture (built on meta from the
packaged configs), checked against diffusers' own single-file converters."""

from __future__ import annotations

import pytest
import torch

from sdstack.models.ldm_keys import (
    UNET_PREFIX,
    VAE_PREFIX,
    expand_key_map,
    unet_key_map,
    unet_module_table,
    vae_key_map,
)


@pytest.fixture(scope="module")
def sd15():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdstack.models.assemble import build_meta, packaged_config

    unet = build_meta(UNet2DConditionModel, packaged_config("unet/config.json"))
    vae = build_meta(AutoencoderKL, packaged_config("vae/config.json"))
    return unet, vae


def test_sd15_unet_map_is_a_bijection_over_all_686_tensors(sd15):
    unet, _ = sd15
    rows = unet_key_map(unet)
    assert len(rows) == len(unet.state_dict()) == 686
    assert len({row.ldm for row in rows}) == 686


def test_sd15_unet_map_agrees_with_diffusers_converter(sd15):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, _ = sd15
    rows = unet_key_map(unet)
    # Tag every LDM tensor with its row number; the converter must route it to our name.
    ldm = {UNET_PREFIX + row.ldm: torch.tensor([i]) for i, row in enumerate(rows)}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == {row.diffusers for row in rows}
    assert [int(converted[row.diffusers]) for row in rows] == list(range(len(rows)))


def test_sd15_vae_map_agrees_with_diffusers_converter(sd15):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, vae = sd15
    rows = vae_key_map(vae)
    assert len(rows) == len(vae.state_dict()) == 248
    ldm = {
        VAE_PREFIX + row.ldm: torch.full((1, 1, 1, 1) if row.conv1x1 else (1,), float(i))
        for i, row in enumerate(rows)
    }
    converted = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(converted) == {row.diffusers for row in rows}
    assert [int(converted[row.diffusers].flatten()[0]) for row in rows] == list(range(len(rows)))
    squeezed = {row.diffusers for row in rows if row.conv1x1}
    assert {k for k, v in converted.items() if v.ndim == 2} == squeezed
    assert len(squeezed) == 8  # q, k, v, proj_out weights of the encoder and decoder mid blocks


@pytest.mark.parametrize(
    ("diffusers", "ldm"),
    [
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("down_blocks.0.resnets.1.norm1.weight", "input_blocks.2.0.in_layers.0.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        (
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
        ("mid_block.attentions.0.proj_out.bias", "middle_block.1.proj_out.bias"),
        ("mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        ("up_blocks.3.attentions.2.norm.weight", "output_blocks.11.1.norm.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_out.bias", "out.2.bias"),
    ],
)
def test_sd15_unet_known_pairs(sd15, diffusers, ldm):
    rows = {row.diffusers: row.ldm for row in unet_key_map(sd15[0])}
    assert rows[diffusers] == ldm


@pytest.mark.parametrize(
    ("diffusers", "ldm"),
    [
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
        ),
        ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
        ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"),
        ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"),
        ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
        ("decoder.up_blocks.2.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight"),
        ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ],
)
def test_sd15_vae_known_pairs(sd15, diffusers, ldm):
    rows = {row.diffusers: row.ldm for row in vae_key_map(sd15[1])}
    assert rows[diffusers] == ldm


def test_tiny_unet_map_agrees_with_diffusers_converter(tiny_components):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_components.unet
    rows = unet_key_map(unet)
    ldm = {UNET_PREFIX + row.ldm: torch.tensor([i]) for i, row in enumerate(rows)}
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert [int(converted[row.diffusers]) for row in rows] == list(range(len(rows)))


def test_unknown_module_is_an_error(sd15):
    table = unet_module_table(sd15[0].config)
    expected = r"key map: no LDM module for diffusers key 'add_embedding"
    with pytest.raises(ValueError, match=expected):
        expand_key_map(["add_embedding.linear_1.weight"], table)
