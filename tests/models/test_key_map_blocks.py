"""Merge blocks and LoRA-block-weight blocks of the key map (spec merge.md, lora.md), and the
key map of the tiny models against their live module trees."""

from __future__ import annotations

import types
from collections import Counter, defaultdict

import pytest
import torch

from sdstack.models.key_map import (
    COMPONENTS,
    LBW_BLOCKS,
    MERGE_BLOCKS,
    KeyMapError,
    block_of_module,
    key_map_of,
    lbw_index,
    live_module,
    merge_block_of_key,
    sd1_key_map,
)


@pytest.fixture(scope="module")
def key_map():
    return sd1_key_map()


@pytest.fixture(scope="module")
def tiny_map(tiny_components):
    return key_map_of(tiny_components)


def test_block_lists_are_the_spec_lists():
    assert (
        "BASE",
        *[f"IN{i:02d}" for i in range(12)],
        "M00",
        *[f"OUT{i:02d}" for i in range(12)],
    ) == MERGE_BLOCKS
    assert len(MERGE_BLOCKS) == 26
    spec_lbw = "BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03, OUT04, OUT05, OUT06, "
    spec_lbw += "OUT07, OUT08, OUT09, OUT10, OUT11"
    assert tuple(spec_lbw.split(", ")) == LBW_BLOCKS


@pytest.mark.parametrize(
    ("component", "module", "block"),
    [
        ("unet", "conv_in", "IN00"),
        ("unet", "time_embedding.linear_1", "IN00"),
        ("unet", "down_blocks.0.resnets.0.conv1", "IN01"),
        ("unet", "down_blocks.0.attentions.1.proj_in", "IN02"),
        ("unet", "down_blocks.0.downsamplers.0.conv", "IN03"),
        ("unet", "down_blocks.1.resnets.0.conv_shortcut", "IN04"),
        ("unet", "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k", "IN08"),
        ("unet", "down_blocks.2.downsamplers.0.conv", "IN09"),
        ("unet", "down_blocks.3.resnets.1.time_emb_proj", "IN11"),
        ("unet", "mid_block.attentions.0.proj_out", "M00"),
        ("unet", "mid_block.resnets.1.norm2", "M00"),
        ("unet", "up_blocks.0.resnets.0.conv1", "OUT00"),
        ("unet", "up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("unet", "up_blocks.1.attentions.0.proj_in", "OUT03"),
        ("unet", "up_blocks.1.upsamplers.0.conv", "OUT05"),
        ("unet", "up_blocks.2.upsamplers.0.conv", "OUT08"),
        ("unet", "up_blocks.3.attentions.2.norm", "OUT11"),
        ("unet", "conv_norm_out", "OUT11"),
        ("unet", "conv_out", "OUT11"),
        ("text_encoder", "text_model.encoder.layers.11.mlp.fc2", "BASE"),
        ("vae", "decoder.up_blocks.0.resnets.0.conv1", "BASE"),
    ],
)
def test_diffusers_path_rule(component, module, block):
    assert block_of_module(component, module) == block


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("model.diffusion_model.input_blocks.0.0.weight", "IN00"),
        ("model.diffusion_model.time_embed.2.bias", "IN00"),
        ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "IN04"),
        ("model.diffusion_model.input_blocks.11.0.in_layers.2.weight", "IN11"),
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight", "M00"),
        ("model.diffusion_model.output_blocks.5.2.conv.weight", "OUT05"),
        ("model.diffusion_model.output_blocks.11.1.proj_out.bias", "OUT11"),
        ("model.diffusion_model.out.2.weight", "OUT11"),
        ("first_stage_model.decoder.mid.attn_1.q.weight", "BASE"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.bias", "BASE"),
    ],
)
def test_ldm_key_rule(key, block):
    assert merge_block_of_key(key) == block


def test_diffusers_rule_and_ldm_rule_agree_on_every_unet_layer(key_map, tiny_map):
    for layer in [*key_map.component("unet"), *tiny_map.component("unet")]:
        assert layer.block == merge_block_of_key(layer.ldm), layer.key
        assert layer.block == merge_block_of_key(f"{layer.ldm}.{layer.param_names[0]}")


def test_sd1_layout_is_the_spec_layout(key_map):
    # merge.md: IN00 conv_in; IN01,02,04,05,07,08 ResBlock + transformer; IN03,06,09
    # downsample; IN10,11 ResBlock; M00 Res+Attn+Res; OUT00-02 ResBlock; OUT03-11 ResBlock +
    # transformer; upsamplers in OUT02, 05, 08.
    parts = defaultdict(set)
    for layer in key_map.component("unet"):
        path = layer.module.split(".")
        inside = {"down_blocks": 2, "up_blocks": 2, "mid_block": 1}.get(path[0], 0)
        parts[layer.block].add(path[inside])
    transformer = {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"}
    transformer |= {f"OUT{i:02d}" for i in range(3, 12)}
    assert {block for block, kinds in parts.items() if "attentions" in kinds} == transformer
    assert {block for block, kinds in parts.items() if "resnets" in kinds} == (
        {f"IN{i:02d}" for i in (1, 2, 4, 5, 7, 8, 10, 11)}
        | {"M00"}
        | {f"OUT{i:02d}" for i in range(12)}
    )
    assert {block for block, kinds in parts.items() if kinds == {"downsamplers"}} == {
        "IN03",
        "IN06",
        "IN09",
    }
    assert {block for block, kinds in parts.items() if "upsamplers" in kinds} == {
        "OUT02",
        "OUT05",
        "OUT08",
    }
    assert parts["IN00"] == {"conv_in", "time_embedding"}
    assert {"conv_norm_out", "conv_out"} <= parts["OUT11"]
    assert set(parts) | {"BASE"} == set(MERGE_BLOCKS)
    assert Counter(layer.component for layer in key_map if layer.block == "BASE") == {
        "text_encoder": 99,
        "vae": 124,
    }


@pytest.mark.parametrize(
    ("key", "index"),
    [
        ("text_encoder:text_model.encoder.layers.0.self_attn.q_proj", 0),
        ("unet:down_blocks.0.attentions.0.proj_in", 1),
        ("unet:down_blocks.0.resnets.1.conv1", 2),
        ("unet:down_blocks.2.attentions.1.proj_out", 6),
        ("unet:mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 7),
        ("unet:up_blocks.1.attentions.0.proj_in", 8),
        ("unet:up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", 16),
        ("unet:conv_in", None),
        ("unet:time_embedding.linear_2", None),
        ("unet:down_blocks.0.downsamplers.0.conv", None),
        ("unet:down_blocks.3.resnets.0.conv1", None),
        ("unet:up_blocks.0.resnets.2.conv2", None),
    ],
)
def test_lbw_index_of_layers(key_map, key, index):
    layer = key_map[key]
    assert layer.lbw_index == index == lbw_index(layer.block)
    assert layer.lbw_block == (None if index is None else LBW_BLOCKS[index])


def test_block_rules_refuse_paths_outside_the_sd1_unet():
    with pytest.raises(KeyMapError, match=r"^unet module 'add_embedding.linear_1': no merge blo"):
        block_of_module("unet", "add_embedding.linear_1")
    with pytest.raises(KeyMapError, match=r"falls in block IN12; expected IN00..IN11"):
        block_of_module("unet", "down_blocks.3.downsamplers.0.conv")
    with pytest.raises(KeyMapError, match=r"^component 'clip': expected one of unet, text_enc"):
        block_of_module("clip", "encoder")
    with pytest.raises(KeyMapError, match=r"^checkpoint key 'model.diffusion_model.label_emb"):
        merge_block_of_key("model.diffusion_model.label_emb.0.0.weight")


# --- the tiny models ---------------------------------------------------------------------


def test_tiny_key_map_matches_the_live_module_tree(tiny_components, tiny_map):
    for layer in tiny_map:
        module = live_module(tiny_components, layer)
        own = tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))
        assert own == layer.params, layer.key
    for component in COMPONENTS:
        root = getattr(tiny_components, component)
        mapped = [
            id(getattr(live_module(tiny_components, layer), leaf))
            for layer in tiny_map.component(component)
            for leaf in layer.param_names
        ]
        assert len(mapped) == len(set(mapped))
        assert set(mapped) == {id(param) for param in root.parameters()}


def test_tiny_ldm_names_are_the_single_file_writers(tiny_components, tiny_map):
    from sdstack.models.ldm_file import to_ldm_state_dict

    written = {key: tuple(t.shape) for key, t in to_ldm_state_dict(tiny_components).items()}
    mapped = {
        f"{layer.ldm}.{leaf}": layer.ldm_shape(leaf)
        for layer in tiny_map
        for leaf in layer.param_names
    }
    assert mapped == written


def test_key_map_of_is_cached_by_config(tiny_components, tiny_map, key_map):
    same = types.SimpleNamespace(
        unet=tiny_components.unet,
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
    )
    assert key_map_of(same) is tiny_map
    assert tiny_map is not key_map and len(tiny_map) < len(key_map)
    assert tiny_map.find("lora_unet_down_blocks_1_attentions_0_proj_in").block == "IN04"


def test_live_module_follows_a_text_model_level(tiny_components, tiny_map):
    holder = torch.nn.Module()  # the transformers 4 layout: modules under .text_model
    holder.text_model = tiny_components.text_encoder
    old = types.SimpleNamespace(text_encoder=holder)
    for layer in tiny_map.component("text_encoder"):
        assert live_module(old, layer) is live_module(tiny_components, layer)


def test_live_module_of_another_architecture_is_a_clear_error(tiny_components, key_map):
    layer = key_map["unet:down_blocks.3.resnets.0.conv1"]
    expected = (
        r"^layer 'unet:down_blocks.3.resnets.0.conv1': no module 'down_blocks.3.resnets.0.conv1' "
        r"in this model's unet \(UNet2DConditionModel\); the key map was built for another"
    )
    with pytest.raises(KeyMapError, match=expected):
        live_module(tiny_components, layer)
    with pytest.raises(KeyMapError, match=r"^layer 'unet:conv_in': the model has no unet"):
        live_module(types.SimpleNamespace(), key_map["unet:conv_in"])
