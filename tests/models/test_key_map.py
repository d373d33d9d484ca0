"""The one key map of SD1.x, checked against the real SD1.5 key lists in ``data/``.

``data/sd15_checkpoint_keys.txt`` is every tensor key (with shape) of the SD1.5 single-file
checkpoint and ``data/sd1_kohya_lora_modules.txt`` every module of a standard kohya SD1
LoRA, both copied from public projects (sources in their headers). Also: the LDM <-> diffusers
module tables checked against diffusers' own single-file converters. Blocks and the tiny
models' maps: test_key_map_blocks.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from sdstack.errors import SdstackError
from sdstack.models.key_map import LBW_BLOCKS, KeyMapError, UnknownLayerError, sd1_key_map
from sdstack.models.key_map.ldm import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    expand_key_map,
    unet_key_map,
    unet_module_table,
    vae_key_map,
)

DATA = Path(__file__).parent / "data"


def _data_lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _real_checkpoint() -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of the real SD1.5 checkpoint."""
    shapes = {}
    for line in _data_lines("sd15_checkpoint_keys.txt"):
        key, shape = line.split(" ")
        shapes[key] = tuple(int(n) for n in shape.split(","))
    return shapes


REAL = _real_checkpoint()
KOHYA = _data_lines("sd1_kohya_lora_modules.txt")
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"  # a buffer, rebuilt on load


@pytest.fixture(scope="module")
def key_map():
    return sd1_key_map()


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


# --- the real SD1.5 checkpoint key list ------------------------------------------------


def test_real_list_holds_the_whole_sd15_checkpoint():
    prefixes = Counter(key.split(".")[0] for key in REAL)
    assert prefixes == {"model": 686, "first_stage_model": 248, "cond_stage_model": 197}


@pytest.mark.parametrize(
    ("component", "prefix", "count"),
    [("unet", UNET_PREFIX, 686), ("vae", VAE_PREFIX, 248), ("text_encoder", TEXT_PREFIX, 196)],
)
def test_parameter_counts_match_the_real_checkpoint(key_map, component, prefix, count):
    params = sum(len(layer.params) for layer in key_map.component(component))
    real = [key for key in REAL if key.startswith(prefix) and key != POSITION_IDS]
    assert params == len(real) == count


def test_every_real_tensor_key_is_exactly_one_layer_parameter_and_back(key_map):
    found = {}
    for key, shape in REAL.items():
        if key == POSITION_IDS:
            continue
        hit = key_map.find_tensor(key)
        assert hit is not None, key
        layer, leaf = hit
        assert f"{layer.ldm}.{leaf}" == key
        assert layer.ldm_shape(leaf) == shape, key
        found[(layer.key, leaf)] = key
    every_param = {(layer.key, leaf) for layer in key_map for leaf in layer.param_names}
    assert set(found) == every_param
    assert len(found) == len(REAL) - 1 == 1130


def test_vae_attention_projections_are_the_only_1x1_reshapes(key_map):
    squeezed = [layer for layer in key_map if layer.conv1x1]
    assert len(squeezed) == 8
    for layer in squeezed:
        assert REAL[layer.ldm + ".weight"] == (*layer.shape("weight"), 1, 1) == (512, 512, 1, 1)
        assert layer.kind == "linear" and layer.component == "vae"


def test_position_ids_and_foreign_keys_are_no_layer(key_map):
    assert key_map.find_tensor(POSITION_IDS) is None
    assert key_map.find_tensor("model.diffusion_model.input_blocks.0.0.scale") is None
    assert key_map.find_tensor("alphas_cumprod") is None


# --- the real kohya LoRA module list ---------------------------------------------------


def test_every_real_kohya_lora_module_is_found(key_map):
    layers = [key_map.find(name) for name in KOHYA]
    assert [name for name, layer in zip(KOHYA, layers, strict=True) if layer is None] == []
    assert [layer.kohya for layer in layers] == KOHYA
    assert len(set(layers)) == len(KOHYA) == 264
    assert Counter(layer.component for layer in layers) == {"text_encoder": 72, "unet": 192}
    # networks.lora targets the Linear and 1x1 Conv2d layers of each transformer block.
    for layer in layers:
        shape = layer.shape("weight")
        assert layer.kind == "linear" or (layer.kind == "conv" and shape[2:] == (1, 1))


def test_kohya_unet_modules_fill_the_16_lbw_transformer_blocks(key_map):
    unet = [key_map.find(name) for name in KOHYA if name.startswith("lora_unet_")]
    assert Counter(layer.lbw_block for layer in unet) == {block: 12 for block in LBW_BLOCKS[1:]}
    text = [key_map.find(name) for name in KOHYA if name.startswith("lora_te_")]
    assert {(layer.block, layer.lbw_index) for layer in text} == {("BASE", 0)}


# --- names in every scheme, and find() -------------------------------------------------


def test_one_unet_layer_in_every_scheme(key_map):
    layer = key_map["unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer.module == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert layer.ldm == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert layer.kohya == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert layer.compvis == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert layer.webui == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert layer.peft == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert (layer.params, layer.kind, layer.block) == ((("weight", (320, 320)),), "linear", "IN01")
    assert (layer.lbw_block, layer.lbw_index, layer.conv1x1) == ("IN01", 1, False)


def test_one_text_encoder_and_one_vae_layer_in_every_scheme(key_map):
    text = key_map["text_encoder:text_model.encoder.layers.0.self_attn.q_proj"]
    assert text.ldm == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert text.kohya == text.compvis == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert text.webui == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert text.peft == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert text.params == (("weight", (768, 768)), ("bias", (768,)))
    vae = key_map["vae:decoder.mid_block.attentions.0.to_out.0"]
    assert (vae.ldm, vae.conv1x1) == ("first_stage_model.decoder.mid.attn_1.proj_out", True)
    assert (vae.kohya, vae.peft) == (
        "lora_vae_decoder_mid_block_attentions_0_to_out_0",
        "vae.decoder.mid_block.attentions.0.to_out.0",
    )
    assert (vae.block, vae.ldm_shape("weight"), vae.ldm_shape("bias")) == (
        "BASE",
        (512, 512, 1, 1),
        (512,),
    )


def test_find_round_trips_every_name_of_every_layer(key_map):
    for layer in key_map:
        names = set(layer.aliases())
        schemes = {layer.key, layer.module, layer.ldm, layer.kohya, layer.compvis}
        assert {*schemes, layer.webui, layer.peft} <= names
        assert all(key_map.find(name) is layer for name in names), layer.key
        assert key_map[layer.key] is layer
    assert len(key_map) == 614


@pytest.mark.parametrize(
    "name",
    [
        "text_encoder:text_model.encoder.layers.3.mlp.fc2",
        "text_encoder:encoder.layers.3.mlp.fc2",
        "text_encoder.text_model.encoder.layers.3.mlp.fc2",
        "text_encoder.encoder.layers.3.mlp.fc2",
        "lora_te_text_model_encoder_layers_3_mlp_fc2",
        "transformer_text_model_encoder_layers_3_mlp_fc2",
        "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2",
        "cond_stage_model.transformer.encoder.layers.3.mlp.fc2",
        "text_model.encoder.layers.3.mlp.fc2",
        "encoder.layers.3.mlp.fc2",
    ],
)
def test_text_encoder_spellings_with_and_without_text_model(key_map, name):
    assert key_map.find(name).key == "text_encoder:text_model.encoder.layers.3.mlp.fc2"


@pytest.mark.parametrize(
    "name",
    [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # SDXL
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # a tensor, not a layer
        "unet:down_blocks.0",  # a container, not a layer
        "",
    ],
)
def test_find_misses_are_none(key_map, name):
    assert key_map.find(name) is None


def test_unknown_layer_key_is_a_key_error_naming_the_nearest(key_map):
    with pytest.raises(UnknownLayerError) as caught:
        key_map["unet:conv_inn"]
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, SdstackError)
    assert str(caught.value).startswith(
        "layer 'unet:conv_inn': not in this key map; expected a layer key "
        "'<component>:<module>' such as 'unet:conv_in'; did you mean 'unet:conv_in'"
    )


def test_unknown_component_is_an_error(key_map):
    with pytest.raises(KeyMapError, match=r"^component 'clip': expected one of unet, text_enc"):
        key_map.component("clip")


def test_importing_the_key_map_does_not_import_torch():
    import os
    import subprocess
    import sys

    code = "import sys, sdstack.models.key_map; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True
    )
    assert out.stdout.strip() == "False"
