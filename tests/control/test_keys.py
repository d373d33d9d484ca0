"""ControlNet key maps (sdstack.control.keys) against the real SD1.5 key list and the spec.

The independent truth for the SD1.5 ControlNet ldm keys: its trunk is the SD1.5 UNet's
encoder, so ``time_embed.*``, ``input_blocks.*`` and ``middle_block.*`` (names and shapes)
come from the real checkpoint key list ``tests/models/data/sd15_checkpoint_keys.txt``; the
hint encoder and zero convs are added as the spec lists them (8 convs hint_ch->16, 16->16,
16->32, 32->32, 32->96, 96->96, 96->256, 256->320 at input_hint_block.0, 2, ..., 14;
zero_convs.{0..11}.0 ch->ch 1x1; middle_block_out.0 1280->1280 1x1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.control.keys import (
    CONTROL_PREFIX,
    ControlLayout,
    ControlNetKeyError,
    control_config,
    diffusers_layout,
    diffusers_names,
    diffusers_to_ldm,
    ldm_layout,
    ldm_names,
    ldm_to_diffusers,
    packaged_control_config,
)

DATA = Path(__file__).parent.parent / "models" / "data" / "sd15_checkpoint_keys.txt"
UNET = "model.diffusion_model."
HINT = [(16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (320, 256)]
ZERO_CHANNELS = [320] * 4 + [640] * 3 + [1280] * 5


def sd15_controlnet_shapes() -> dict[str, tuple[int, ...]]:
    """Bare ldm keys -> shapes of the SD1.5 ControlNet (module docstring)."""
    shapes = {}
    for line in DATA.read_text().splitlines():
        if not line.startswith(UNET):
            continue
        key, shape = line.split()
        key = key[len(UNET) :]
        if key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            shapes[key] = tuple(int(n) for n in shape.split(","))
    for i, (out, inp) in enumerate(HINT):
        shapes[f"input_hint_block.{2 * i}.weight"] = (out, inp, 3, 3)
        shapes[f"input_hint_block.{2 * i}.bias"] = (out,)
    for k, ch in enumerate(ZERO_CHANNELS):
        shapes[f"zero_convs.{k}.0.weight"] = (ch, ch, 1, 1)
        shapes[f"zero_convs.{k}.0.bias"] = (ch,)
    shapes["middle_block_out.0.weight"] = (1280, 1280, 1, 1)
    shapes["middle_block_out.0.bias"] = (1280,)
    return shapes


@pytest.fixture(scope="module")
def packaged_meta():
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel.from_config(packaged_control_config())


def test_sd15_key_list_maps_onto_the_packaged_model(packaged_meta):
    real = sd15_controlnet_shapes()
    assert len(real) == 340  # 340 tensors in the SD1.5 ControlNet
    assert ldm_layout(real) == ControlLayout(levels=4, layers=2, hint_convs=8)
    names = ldm_names(real)
    expected = {k: tuple(v.shape) for k, v in packaged_meta.state_dict().items()}
    assert set(names.values()) == set(expected)
    assert {names[k]: s for k, s in real.items()} == expected  # every shape too
    # and back: the diffusers model's keys give exactly the real ldm names
    assert set(diffusers_names(expected).values()) == set(real)


def test_sd15_names_as_diffusers_own_converter_gives_them():
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = {
        CONTROL_PREFIX + k: torch.empty(s, device="meta")
        for k, s in sd15_controlnet_shapes().items()
    }
    theirs = convert_controlnet_checkpoint(dict(state), {"layers_per_block": 2})
    ours = ldm_to_diffusers(state)
    assert set(ours) == set(theirs)
    assert all(ours[key] is theirs[key] for key in ours)


def test_config_derived_from_the_sd15_shapes_is_the_packaged_config():
    real = sd15_controlnet_shapes()
    names = ldm_names(real)
    derived = control_config({names[k]: s for k, s in real.items()})
    packaged = packaged_control_config()
    packaged.pop("_class_name")
    assert derived == packaged


@pytest.mark.parametrize(
    ("diffusers", "ldm"),
    [
        ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight"),
        *[
            (f"controlnet_cond_embedding.blocks.{i}.bias", f"input_hint_block.{2 * i + 2}.bias")
            for i in range(6)
        ],
        ("controlnet_cond_embedding.conv_out.weight", "input_hint_block.14.weight"),
        *[(f"controlnet_down_blocks.{i}.weight", f"zero_convs.{i}.0.weight") for i in range(12)],
        ("controlnet_mid_block.bias", "middle_block_out.0.bias"),
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_1.weight", "time_embed.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        ("down_blocks.1.resnets.1.time_emb_proj.bias", "input_blocks.5.0.emb_layers.1.bias"),
        ("down_blocks.2.attentions.1.proj_in.weight", "input_blocks.8.1.proj_in.weight"),
        ("down_blocks.3.resnets.1.conv2.weight", "input_blocks.11.0.out_layers.3.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
        ("mid_block.resnets.0.norm2.weight", "middle_block.0.out_layers.0.weight"),
        ("mid_block.resnets.1.conv1.weight", "middle_block.2.in_layers.2.weight"),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        ),
    ],
)
def test_spec_mapping_rows(diffusers, ldm):
    real = sd15_controlnet_shapes()
    assert ldm_names(real)[ldm] == diffusers


@pytest.fixture(scope="module")
def tiny_state():
    from sdstack.control.tiny import tiny_controlnet

    return tiny_controlnet(seed=3).state_dict()


def test_tiny_round_trip_keeps_the_tensors(tiny_state):
    ldm = diffusers_to_ldm(tiny_state, prefix=CONTROL_PREFIX)
    assert all(key.startswith(CONTROL_PREFIX) for key in ldm)
    assert ldm_layout(k[len(CONTROL_PREFIX) :] for k in ldm) == ControlLayout(2, 2, 8)
    back = ldm_to_diffusers(ldm)
    assert set(back) == set(tiny_state)
    assert all(back[key] is tiny_state[key] for key in back)  # renamed, never copied
    bare = diffusers_to_ldm(tiny_state)
    assert set(ldm_to_diffusers(bare)) == set(tiny_state)


@pytest.mark.parametrize("prefix", [CONTROL_PREFIX, ""])
def test_same_names_as_diffusers_own_converter(tiny_state, prefix):
    """diffusers' single-file converter (``convert_controlnet_checkpoint``) is the peer."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ldm = diffusers_to_ldm(tiny_state, prefix=prefix)
    theirs = convert_controlnet_checkpoint(dict(ldm), {"layers_per_block": 2})
    ours = ldm_to_diffusers(ldm)
    assert set(ours) == set(theirs)
    assert all(ours[key] is theirs[key] for key in ours)


def test_keys_outside_control_model_are_dropped(tiny_state):
    ldm = diffusers_to_ldm(tiny_state, prefix=CONTROL_PREFIX)
    ldm["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    assert set(ldm_to_diffusers(ldm)) == set(tiny_state)


def test_two_dimensional_projections_become_1x1_convs(tiny_state):
    ldm = diffusers_to_ldm(tiny_state)
    key = "input_blocks.4.1.proj_in.weight"
    conv = ldm[key]
    ldm[key] = conv[:, :, 0, 0]
    ldm["input_blocks.4.1.proj_out.weight"] = ldm["input_blocks.4.1.proj_out.weight"][:, :, 0, 0]
    back = ldm_to_diffusers(ldm)
    assert torch.equal(back["down_blocks.1.attentions.0.proj_in.weight"], conv)
    assert back["down_blocks.1.attentions.0.proj_out.weight"].shape == conv.shape


def test_unknown_keys_are_named(tiny_state):
    ldm = diffusers_to_ldm(tiny_state)
    ldm["input_blocks.1.0.in_layers.9.weight"] = torch.zeros(1)
    ldm["something_else.weight"] = torch.zeros(1)
    with pytest.raises(
        ControlNetKeyError,
        match=r"2 keys are not part of an SD1\.x ControlNet "
        r"\(input_blocks\.1\.0\.in_layers\.9\.weight, something_else\.weight\)",
    ):
        ldm_to_diffusers(ldm)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("zero_convs.", r"ControlNet zero convs \[\]: expected zero_convs\.0"),
        ("zero_convs.2.", r"ControlNet zero convs \[0, 1, 3, 4, 5\]"),
        (
            "input_hint_block.14.",
            r"hint encoder \(input_hint_block\) has convs \[0, 1, 2, 3, 4, 5, 6\]",
        ),
        ("zero_convs.5.", r"5 zero convs and downsamplers at input_blocks \[3\]: not the SD1"),
    ],
)
def test_irregular_ldm_numbering(tiny_state, drop, message):
    ldm = {k: v for k, v in diffusers_to_ldm(tiny_state).items() if not k.startswith(drop)}
    with pytest.raises(ControlNetKeyError, match=message):
        ldm_to_diffusers(ldm)


def test_odd_hint_indices_are_refused(tiny_state):
    ldm = diffusers_to_ldm(tiny_state)
    ldm["input_hint_block.1.weight"] = torch.zeros(1)
    with pytest.raises(ControlNetKeyError, match=r"odd indices \[1\]"):
        ldm_to_diffusers(ldm)


def test_irregular_diffusers_numbering(tiny_state):
    broken = {k: v for k, v in tiny_state.items() if not k.startswith("down_blocks.0.")}
    with pytest.raises(ControlNetKeyError, match=r"down blocks \[1\]"):
        diffusers_to_ldm(broken)
    broken = {k: v for k, v in tiny_state.items() if "conv_out" not in k}
    with pytest.raises(ControlNetKeyError, match="conv_in/conv_out missing"):
        diffusers_layout(broken)


def _ldm_keys(levels: int, layers: int, hint_convs: int, attention: list[bool]) -> list[str]:
    """ldm keys written out by the SD1 numbering rule (independently of the module table)."""
    keys = ["time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight"]
    index = 0
    for level in range(levels):
        for _ in range(layers):
            index += 1
            keys += [
                f"input_blocks.{index}.0.in_layers.0.weight",
                f"input_blocks.{index}.0.out_layers.3.bias",
            ]
            if attention[level]:
                keys.append(f"input_blocks.{index}.1.transformer_blocks.0.attn2.to_k.weight")
        if level < levels - 1:
            index += 1
            keys.append(f"input_blocks.{index}.0.op.weight")
    keys += [f"zero_convs.{k}.0.weight" for k in range(index + 1)]
    keys += [f"input_hint_block.{2 * i}.weight" for i in range(hint_convs)]
    keys += [
        "middle_block.0.emb_layers.1.weight",
        "middle_block.1.proj_out.bias",
        "middle_block.2.skip_connection.weight",
        "middle_block_out.0.weight",
    ]
    return keys


@settings(max_examples=40, deadline=None)
@given(
    levels=st.integers(1, 5),
    layers=st.integers(1, 4),
    half_hint=st.integers(1, 6),
    attention=st.lists(st.booleans(), min_size=5, max_size=5),
    prefixed=st.booleans(),
)
def test_any_sd1_style_layout_round_trips(levels, layers, half_hint, attention, prefixed):
    keys = _ldm_keys(levels, layers, 2 * half_hint, attention)
    assert ldm_layout(keys) == ControlLayout(levels, layers, 2 * half_hint)
    given_keys = [CONTROL_PREFIX + k for k in keys] if prefixed else keys
    names = ldm_names(given_keys)
    assert set(names) == set(keys)
    assert len(set(names.values())) == len(keys)
    assert diffusers_names(names.values()) == {v: k for k, v in names.items()}
