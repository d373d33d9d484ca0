"""Merge block values (spec merge.md "Blocks"): presets, the 26-value parser, and the value
of every key of the real SD1.5 checkpoint (tests/models/data/sd15_checkpoint_keys.txt)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.merge import (
    MERGE_BLOCK_PRESETS,
    MergeBlockError,
    MergeError,
    alpha_of_key,
    check_merge_blocks,
    parse_merge_blocks,
)
from sdstack.models.key_map import MERGE_BLOCKS

KEYS_FILE = Path(__file__).parents[1] / "models" / "data" / "sd15_checkpoint_keys.txt"
SD15_KEYS = [
    line.split(" ")[0]
    for line in KEYS_FILE.read_text(encoding="utf-8").splitlines()
    if line and not line.startswith("#")
]
INDEX_VALUES = tuple(float(i) for i in range(26))  # block value = its position
UNET = "model.diffusion_model."


def values(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


# ---- presets ---------------------------------------------------------------------------

# The tables supermerger and sd-meh publish (BASE first), copied as data.
PUBLISHED = {
    "ALL_A": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL_B": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "WRAP08": "0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1",
    "WRAP12": "0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1",
    "WRAP14": "0,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1",
    "WRAP16": "0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1",
    "MID12_50": "0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0",
    "OUT07": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1",
    "OUT12": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1",
    "OUT12_5": "0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1",
    "RING08_SOFT": "0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0",
    "RING08_5": "0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0",
    "RING10_5": "0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0",
    "RING10_3": "0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0",
    "FLAT_25": "0" + ",0.25" * 25,
    "FLAT_75": "0" + ",0.75" * 25,
}
# Samples of the published curves (printed to 15 digits): position -> value.
PUBLISHED_CURVES = {
    "GRAD_V": {0: 0, 1: 1, 2: 0.9166666667, 13: 0, 14: 0.0833333333, 25: 1},
    "GRAD_A": {0: 0, 1: 0, 7: 0.5, 13: 1, 24: 0.0833333333, 25: 0},
    "SMOOTHSTEP": {0: 0, 2: 0.00506365740740741, 7: 0.15625, 13: 0.5, 21: 0.925925925925926},
    "REVERSE_SMOOTHSTEP": {1: 1, 4: 0.95703125, 13: 0.5, 22: 0.0429687499999996, 25: 0},
    "COSINE": {1: 1, 2: 0.995722430686905, 9: 0.75, 13: 0.5, 24: 0.00427756931309475},
    "REVERSE_COSINE": {1: 0, 5: 0.0669872981077808, 13: 0.5, 17: 0.75, 25: 1},
}


def test_presets_are_the_published_tables():
    for name, table in PUBLISHED.items():
        assert MERGE_BLOCK_PRESETS[name] == values(table), name
    for name, samples in PUBLISHED_CURVES.items():
        preset = MERGE_BLOCK_PRESETS[name]
        for position, value in samples.items():
            digits = 1e-10 if name.startswith("GRAD") else 1e-14  # as printed
            assert preset[position] == pytest.approx(value, abs=digits), (name, position)
    assert set(MERGE_BLOCK_PRESETS) == set(PUBLISHED) | set(PUBLISHED_CURVES)
    assert all(
        len(v) == 26 and all(math.isfinite(x) for x in v) for v in MERGE_BLOCK_PRESETS.values()
    )


def test_presets_read_in_any_case():
    assert parse_merge_blocks("grad_v") == MERGE_BLOCK_PRESETS["GRAD_V"]
    assert parse_merge_blocks("  Ring08 Soft ") == MERGE_BLOCK_PRESETS["RING08_SOFT"]


# ---- the parser ------------------------------------------------------------------------


def test_26_numbers_in_block_order():
    text = " , ".join(str(i / 10) for i in range(26))
    parsed = parse_merge_blocks(text)
    assert parsed == tuple(i / 10 for i in range(26))
    assert dict(zip(MERGE_BLOCKS, parsed, strict=True))["M00"] == 1.3


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=26, max_size=26))
def test_any_26_finite_numbers_read_back(numbers):
    assert parse_merge_blocks(",".join(repr(x) for x in numbers)) == tuple(numbers)


ORDER = "BASE, IN00..IN11, M00, OUT00..OUT11"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            ",".join(["0.5"] * 25),
            f"merge blocks '{','.join(['0.5'] * 25)[:77]}...': 25 values; expected 26 ({ORDER}); "
            "a 25-value list (Merge Block Weighted) has no BASE: put the BASE value first",
        ),
        ("1,0", f"merge blocks '1,0': 2 values; expected 26 ({ORDER})"),
        (
            "0," * 26,
            f"merge blocks '{'0,' * 26}': 27 values; expected 26 ({ORDER})",
        ),
        (
            "0,0,x" + ",0" * 23,
            f"merge blocks '{('0,0,x' + ',0' * 23)}': IN01 value 'x' is not a finite number",
        ),
        (
            "nan" + ",0" * 25,
            f"merge blocks '{('nan' + ',0' * 25)}': BASE value 'nan' is not a finite number",
        ),
        (
            "0" + ",1" * 24 + ",inf",
            f"merge blocks '{('0' + ',1' * 24 + ',inf')}': OUT11 value 'inf' is not a finite "
            "number",
        ),
    ],
)
def test_bad_block_lists(text, message):
    with pytest.raises(MergeBlockError) as caught:
        parse_merge_blocks(text)
    assert str(caught.value) == message
    assert isinstance(caught.value, MergeError)


PRESETS = ", ".join(MERGE_BLOCK_PRESETS)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("GRAD_B", "did you mean 'GRAD_V', 'GRAD_A'? "),
        ("smothstep", "did you mean 'SMOOTHSTEP', 'REVERSE_SMOOTHSTEP'? "),
        ("0.5", ""),
        ("", ""),
    ],
)
def test_unknown_presets_name_the_nearest(text, hint):
    with pytest.raises(MergeBlockError) as caught:
        parse_merge_blocks(text)
    assert str(caught.value) == (
        f"merge blocks {text!r}: not a preset; {hint}expected a preset ({PRESETS}) or 26 "
        f"comma-separated numbers ({ORDER})"
    )


def test_block_values_given_in_code():
    assert check_merge_blocks([1] * 26) == (1.0,) * 26
    with pytest.raises(MergeBlockError) as caught:
        check_merge_blocks([0.5] * 25, "alpha_blocks")
    assert str(caught.value) == f"alpha_blocks: 25 values; expected 26 ({ORDER})"
    with pytest.raises(MergeBlockError) as caught:
        check_merge_blocks([0.5] * 13 + [math.nan] + [0.5] * 12, "beta_blocks")
    assert str(caught.value) == "beta_blocks: M00 value nan is not a finite number"


# ---- the value of each key -------------------------------------------------------------

# One or more real keys of every block, with the block read off the SD1 layout by hand.
SAMPLES = {
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": "BASE",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": "BASE",
    "first_stage_model.decoder.conv_out.weight": "BASE",
    "first_stage_model.quant_conv.bias": "BASE",
    UNET + "input_blocks.0.0.weight": "IN00",
    UNET + "time_embed.0.weight": "IN00",
    UNET + "time_embed.2.bias": "IN00",
    UNET + "input_blocks.1.0.in_layers.2.weight": "IN01",
    UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": "IN02",
    UNET + "input_blocks.3.0.op.weight": "IN03",
    UNET + "input_blocks.4.0.skip_connection.weight": "IN04",
    UNET + "input_blocks.5.1.proj_out.bias": "IN05",
    UNET + "input_blocks.6.0.op.bias": "IN06",
    UNET + "input_blocks.7.1.norm.weight": "IN07",
    UNET + "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight": "IN08",
    UNET + "input_blocks.9.0.op.weight": "IN09",
    UNET + "input_blocks.10.0.emb_layers.1.weight": "IN10",
    UNET + "input_blocks.11.0.out_layers.3.bias": "IN11",
    UNET + "middle_block.0.in_layers.0.weight": "M00",
    UNET + "middle_block.1.transformer_blocks.0.attn1.to_q.weight": "M00",
    UNET + "middle_block.2.out_layers.3.weight": "M00",
    UNET + "output_blocks.0.0.skip_connection.bias": "OUT00",
    UNET + "output_blocks.1.0.in_layers.2.weight": "OUT01",
    UNET + "output_blocks.2.1.conv.weight": "OUT02",
    UNET + "output_blocks.3.1.proj_in.weight": "OUT03",
    UNET + "output_blocks.4.1.transformer_blocks.0.norm3.bias": "OUT04",
    UNET + "output_blocks.5.2.conv.bias": "OUT05",
    UNET + "output_blocks.6.0.emb_layers.1.bias": "OUT06",
    UNET + "output_blocks.7.1.transformer_blocks.0.attn2.to_out.0.weight": "OUT07",
    UNET + "output_blocks.8.2.conv.weight": "OUT08",
    UNET + "output_blocks.9.1.proj_out.weight": "OUT09",
    UNET + "output_blocks.10.0.in_layers.0.bias": "OUT10",
    UNET + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": "OUT11",
    UNET + "out.0.weight": "OUT11",
    UNET + "out.2.bias": "OUT11",
}


def test_samples_of_every_block():
    assert set(SAMPLES.values()) == set(MERGE_BLOCKS)
    for key, block in SAMPLES.items():
        assert key in SD15_KEYS, key
        assert alpha_of_key(key, -1.0, INDEX_VALUES) == MERGE_BLOCKS.index(block), key


def block_by_hand(key: str) -> str:
    """The spec's rule, written again with regular expressions."""
    found = re.match(r"model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.", key)
    if found:
        return f"{'IN' if found[1] == 'input_blocks' else 'OUT'}{int(found[2]):02d}"
    if key.startswith(UNET + "middle_block."):
        return "M00"
    if key.startswith(UNET + "out."):
        return "OUT11"
    if key.startswith(UNET + "time_embed."):
        return "IN00"
    assert not key.startswith(UNET), key
    return "BASE"


# Tensors per block from the SD1 layout (spec merge.md): ResBlock 10 (12 with a skip conv),
# transformer 26, down/upsampler conv 2, conv_in 2, time_embed 4, final norm + conv 4;
# BASE = text encoder 197 (with position_ids) + VAE 248.
LAYOUT_COUNTS = {
    "BASE": 197 + 248,
    "IN00": 2 + 4,
    "IN01": 36,
    "IN02": 36,
    "IN03": 2,
    "IN04": 12 + 26,
    "IN05": 36,
    "IN06": 2,
    "IN07": 12 + 26,
    "IN08": 36,
    "IN09": 2,
    "IN10": 10,
    "IN11": 10,
    "M00": 10 + 26 + 10,
    "OUT00": 12,
    "OUT01": 12,
    "OUT02": 12 + 2,
    **{f"OUT{i:02d}": 12 + 26 for i in (3, 4, 6, 7, 9, 10)},
    "OUT05": 12 + 26 + 2,
    "OUT08": 12 + 26 + 2,
    "OUT11": 12 + 26 + 4,
}


def test_every_sd15_key_gets_its_block_value():
    assert len(SD15_KEYS) == 1131
    counts = Counter()
    for key in SD15_KEYS:
        value = alpha_of_key(key, -1.0, INDEX_VALUES)
        block = MERGE_BLOCKS[int(value)]
        assert block == block_by_hand(key), key
        counts[block] += 1
    assert counts == LAYOUT_COUNTS


def test_without_block_values_every_key_gets_alpha():
    assert {alpha_of_key(key, 0.35, None) for key in SD15_KEYS} == {0.35}


def test_presets_weight_keys_by_block():
    gradient = MERGE_BLOCK_PRESETS["GRAD_A"]
    assert alpha_of_key(UNET + "middle_block.1.proj_in.weight", 0.5, gradient) == 1.0
    assert alpha_of_key(UNET + "out.2.weight", 0.5, gradient) == 0.0
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert alpha_of_key(text_key, 0.5, MERGE_BLOCK_PRESETS["ALL_B"]) == 1.0


def test_keys_outside_the_sd1_blocks_are_refused():
    key = UNET + "label_emb.0.0.weight"
    with pytest.raises(MergeBlockError) as caught:
        alpha_of_key(key, 0.5, INDEX_VALUES)
    assert str(caught.value) == (
        f"checkpoint key {key!r}: in no SD1 merge block, so block values cannot weight it; "
        "expected an SD1 checkpoint (merge without block values to use one alpha)"
    )
    assert alpha_of_key(key, 0.5, None) == 0.5
    with pytest.raises(MergeBlockError) as caught:
        alpha_of_key(UNET + "out.0.weight", 0.5, INDEX_VALUES[:25])
    assert str(caught.value) == f"merge blocks: 25 values; expected 26 ({ORDER})"


def test_block_lists_are_checked_without_torch():
    code = (
        "import sys; from sdstack.merge import parse_merge_blocks, MergeBlockError; "
        "parse_merge_blocks('GRAD_V'); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
