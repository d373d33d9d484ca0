"""LoRA stack entries (prompt tags, --lora, Python tuples) and lbw= block weights."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.lora.block_weights import (
    LBW_BLOCKS,
    LBW_PRESETS,
    MERGE_BLOCKS,
    BlockWeightError,
    block_factor,
    parse_block_weights,
)
from sdstack.lora.spec import (
    LoraSpec,
    LoraSpecError,
    parse_lora_option,
    spec_from_tag,
    specs_from_entries,
)
from sdstack.prompt.networks import extract_networks


def tag(text: str):
    return spec_from_tag(extract_networks(text)[1][0])


def test_spec_presets_word_for_word():
    # The spec's table (lora.md, "Block weights").
    assert LBW_PRESETS["MIDD"] == (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    assert LBW_PRESETS["OUTALL"] == (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    assert LBW_PRESETS["INS"] == (1, 1, 1, 1) + (0,) * 13
    assert all(len(v) == 17 for v in LBW_PRESETS.values())
    assert LBW_BLOCKS[7] == "M00" and LBW_BLOCKS[8] == "OUT03" and len(MERGE_BLOCKS) == 26


def test_presets_read_in_any_case_and_lists_of_17_or_26():
    assert parse_block_weights("midd") == LBW_PRESETS["MIDD"]
    values = parse_block_weights(",".join(["0.5"] * 17))
    assert values == (0.5,) * 17
    assert parse_block_weights(" , ".join(["1"] * 26)) == (1.0,) * 26


def test_block_factor_17_values_give_unlisted_blocks_zero():
    midd = LBW_PRESETS["MIDD"]
    assert block_factor(midd, "BASE") == 1 and block_factor(midd, "IN01") == 0
    assert block_factor(midd, "M00") == 1 and block_factor(midd, "OUT11") == 0
    for unlisted in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"):
        assert block_factor(LBW_PRESETS["ALL"], unlisted) == 0
    assert block_factor(None, "IN00") == 1


def test_block_factor_26_values_name_every_block():
    values = tuple(float(i) for i in range(26))
    assert [block_factor(values, b) for b in MERGE_BLOCKS] == list(values)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("MIDDLE", "lbw='MIDDLE': not a preset; expected one of NONE, ALL, INS"),
        ("1,0,1", "lbw='1,0,1': 3 values; expected 17 (BASE, IN01"),
        ("1," * 16 + "x", "'x' is not a number within +-1000"),
        ("1," * 16 + "nan", "'nan' is not a number within +-1000"),
        ("1," * 16 + "1e9", "'1e9' is not a number within +-1000"),
    ],
)
def test_bad_block_weights_are_named(text, message):
    with pytest.raises(BlockWeightError) as caught:
        parse_block_weights(text)
    assert message in str(caught.value) and str(caught.value).startswith(f"lbw={text!r}: ")


def test_prompt_tags_become_specs():
    assert tag("<lora:film:0.8>") == LoraSpec("film", 0.8, 0.8, in_prompt=True)
    assert tag("<lora:film:0.8:0.3>").unet_multiplier == 0.3
    assert tag("<lyco:film:te=0.2:unet=0.9>") == LoraSpec("film", 0.2, 0.9, in_prompt=True)
    spec = tag("<lora:film:1:lbw=MIDD>")
    assert spec.lbw == LBW_PRESETS["MIDD"] and spec.lbw_text == "MIDD"
    assert spec.tag() == "<lora:film:1:lbw=MIDD>"


def test_tag_errors_name_the_tag():
    with pytest.raises(BlockWeightError, match=r"^<lora:film:1:lbw=XYZ>: lbw='XYZ': not a"):
        tag("<lora:film:1:lbw=XYZ>")
    multiplier = r"^<lora:film:1e9> text-encoder multiplier: 1000000000.0 is not"
    with pytest.raises(LoraSpecError, match=multiplier):
        tag("<lora:film:1e9>")
    with pytest.raises(LoraSpecError, match=r"dyn= \(DyLoRA dimension\) is not supported"):
        tag("<lora:film:1:1:8>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("film", LoraSpec("film")),
        ("film:0.6", LoraSpec("film", 0.6)),
        ("film:0.6:0.2", LoraSpec("film", 0.6, 0.2)),
        ("C:/loras/film.safetensors:0.5", LoraSpec("C:/loras/film.safetensors", 0.5)),
        ("/a:b/film.pt", LoraSpec("/a:b/film.pt")),
        ("film:-1", LoraSpec("film", -1.0)),
    ],
)
def test_lora_option(text, expected):
    assert parse_lora_option(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (":0.5", "--lora ':0.5': no file or name; expected FILE_OR_NAME[:w[:unet_w]]"),
        ("film:x", "--lora 'film:x': 'x' is not a multiplier; expected FILE_OR_NAME"),
        ("film:inf", "--lora film:inf: multiplier: 'inf' is not a multiplier"),
    ],
)
def test_bad_lora_option(text, message):
    with pytest.raises(LoraSpecError, match="^" + __import__("re").escape(message)):
        parse_lora_option(text)


@given(
    name=st.text(
        st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), min_size=1
    ).filter(lambda s: s.strip()),
    te=st.floats(-1000, 1000, allow_nan=False),
    unet=st.one_of(st.none(), st.floats(-1000, 1000, allow_nan=False)),
)
def test_lora_option_round_trips(name, te, unet):
    text = f"{name}:{te!r}" + (f":{unet!r}" if unet is not None else "")
    assert parse_lora_option(text) == LoraSpec(name, te, unet)


def test_python_entries():
    assert specs_from_entries(["a", ("b", 0.5), ("c", 0.1, 0.2), LoraSpec("d")]) == [
        LoraSpec("a"),
        LoraSpec("b", 0.5),
        LoraSpec("c", 0.1, 0.2),
        LoraSpec("d"),
    ]
    with pytest.raises(LoraSpecError, match=r"LoRA stack entry 0: \('a', 1, 2, 3\); expected"):
        specs_from_entries([("a", 1, 2, 3)])
    with pytest.raises(LoraSpecError, match=r"LoRA stack entry 0 \(a\) multiplier: 'x' is not"):
        specs_from_entries([("a", "x")])
    with pytest.raises(LoraSpecError, match=r"entry 0 \(a\) multiplier: True is not a"):
        specs_from_entries([("a", True)])
