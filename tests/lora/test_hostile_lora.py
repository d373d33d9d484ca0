"""Hostile and broken LoRA files: every one gives a LoraFileError whose message is pinned.

Truncated or corrupt files, tensors of the wrong shape or dtype, NaN alphas and weights,
missing parts, ranks larger than the layer, headers declaring more than the file holds,
absurd tensor counts, refused pickles, algorithms sdstack does not read. None may raise
anything but a LoraFileError, and none may allocate more than the file holds.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from sdstack.lora import formats
from sdstack.lora.formats import read_lora
from sdstack.lora.network import LoraFileError
from sdstack.models.key_map import key_map_of
from tests.lora import lora_files as lf

Q = "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
NAME = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "unet:down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def keys(tiny_components):
    return key_map_of(tiny_components)


def lora(rank=4, out=64, inp=64, alpha=1.0, name=NAME):
    return {
        f"{name}.lora_down.weight": torch.zeros(rank, inp),
        f"{name}.lora_up.weight": torch.zeros(out, rank),
        f"{name}.alpha": torch.tensor(alpha),
    }


def refused(path, keys) -> str:
    with pytest.raises(LoraFileError) as caught:
        read_lora(path, keys)
    return str(caught.value).replace(str(path), "FILE")


def write(tmp_path, state, metadata=None, name="bad.safetensors"):
    return lf.save(tmp_path / name, state, metadata)


def peft(keys):
    name = keys[Q].peft
    return {
        f"{name}.lora_A.weight": torch.zeros(4, 64),
        f"{name}.lora_B.weight": torch.zeros(64, 4),
    }


def raw_safetensors(path, header: dict, data: bytes):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_truncated_file(tmp_path, keys):
    path = write(tmp_path, lora())
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    assert refused(path, keys) == (
        f"FILE: truncated safetensors file: the header declares {size} bytes but the file has "
        f"{size - 100} (100 missing); download it again"
    )


def test_not_a_safetensors_file(tmp_path, keys):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    assert refused(path, keys).startswith(
        "FILE: corrupt or truncated safetensors header: header length"
    )


def test_header_declaring_a_huge_tensor(tmp_path, keys):
    entry = {"dtype": "F32", "shape": [2**40, 64], "data_offsets": [0, 16]}
    header = {"lora_unet_x.lora_down.weight": entry}
    path = raw_safetensors(tmp_path / "huge.safetensors", header, b"\0" * 16)
    assert refused(path, keys) == (
        "FILE: corrupt safetensors header: tensor 'lora_unet_x.lora_down.weight' (F32 "
        "[1099511627776, 64]) needs 281474976710656 bytes but its data_offsets [0, 16] span 16"
    )


def test_absurd_tensor_count(tmp_path, keys, monkeypatch):
    monkeypatch.setattr(formats, "MAX_TENSORS", 2)
    path = write(tmp_path, lora())
    assert refused(path, keys) == (
        "FILE: 3 tensors; a LoRA file holds at most 2 (SD 1.x has under 1,200 layers with weights)"
    )


def test_wrong_down_shape(tmp_path, keys):
    path = write(tmp_path, lora(inp=48))
    assert refused(path, keys) == (
        f"FILE: {NAME}.lora_down.weight: shape (4, 48), does not fit layer {Q} (weight (64, 64)); "
        "expected (4, 64) or (4, 64, 1, 1)"
    )


def test_wrong_up_shape(tmp_path, keys):
    path = write(tmp_path, lora(out=60))
    assert refused(path, keys) == (
        f"FILE: {NAME}.lora_up.weight: shape (60, 4), does not fit layer {Q} (weight (64, 64)); "
        "expected (64, 4) or (64, 4, 1, 1)"
    )


def test_conv_lora_with_the_wrong_kernel(tmp_path, keys):
    name = keys[CONV].kohya
    state = {
        f"{name}.lora_down.weight": torch.zeros(4, 32, 5, 5),
        f"{name}.lora_up.weight": torch.zeros(32, 4, 1, 1),
    }
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {name}.lora_down.weight: shape (4, 32, 5, 5), does not fit layer {CONV} (weight "
        "(32, 32, 3, 3)); expected (4, 288) or (4, 32, 3, 3)"
    )


def test_rank_larger_than_the_layer(tmp_path, keys):
    path = write(tmp_path, lora(rank=200))
    assert refused(path, keys) == (
        f"FILE: {NAME}.lora_down.weight: shape (200, 64), does not fit layer {Q} "
        "(weight (64, 64)); expected (200, 64) or (200, 64, 1, 1) with a rank from 1 to 64"
    )


def test_wrong_dtype(tmp_path, keys):
    state = lora()
    state[f"{NAME}.lora_down.weight"] = torch.zeros(4, 64, dtype=torch.int32)
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.lora_down.weight: dtype int32; expected a floating-point tensor "
        "(F32, F16 or BF16)"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_alpha(tmp_path, keys, value):
    assert refused(write(tmp_path, lora(alpha=value)), keys) == (
        f"FILE: {NAME}.alpha: alpha is {value}; expected a finite number"
    )


def test_alpha_that_is_not_one_number(tmp_path, keys):
    state = lora()
    state[f"{NAME}.alpha"] = torch.ones(2)
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.alpha: alpha has shape (2,) and dtype float32; expected a single real number"
    )


def test_nan_scale_key(tmp_path, keys):
    state = {**lora(), f"{NAME}.scale": torch.tensor(float("nan"))}
    assert (
        refused(write(tmp_path, state), keys)
        == f"FILE: {NAME}.scale: scale is nan; expected a finite number"
    )


def test_nan_in_a_weight(tmp_path, keys):
    state = lora()
    state[f"{NAME}.lora_up.weight"][3, 1] = float("nan")
    assert (
        refused(write(tmp_path, state), keys)
        == f"FILE: {NAME}.lora_up.weight: holds NaN or infinite values"
    )


@pytest.mark.parametrize(
    "present, missing",
    [("lora_down.weight", "lora_up.weight"), ("lora_up.weight", "lora_down.weight")],
)
def test_missing_up_or_down(tmp_path, keys, present, missing):
    state = {k: v for k, v in lora().items() if not k.endswith(missing)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME} (layer {Q}): has {present} but no {missing}; a lora module needs "
        "lora_down.weight + lora_up.weight"
    )


def test_alpha_without_weights(tmp_path, keys):
    state = {f"{NAME}.alpha": torch.tensor(1.0)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME} (layer {Q}): has only alpha; expected the module's weights too "
        "(lora_down.weight and lora_up.weight for a LoRA)"
    )


def test_mixed_algorithms(tmp_path, keys):
    state = {**lora(), f"{NAME}.hada_w1_a": torch.zeros(64, 4)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME} (layer {Q}): mixes parts of lora and loha (hada_w1_a, lora_down.weight, "
        "lora_up.weight)"
    )


@pytest.mark.parametrize(
    "parts, algorithm",
    [(("oft_blocks",), "OFT"), (("a1.weight", "a2.weight", "b1.weight", "b2.weight"), "GLoRA")],
)
def test_unsupported_lycoris_algorithms_are_named(tmp_path, keys, parts, algorithm):
    state = {f"{NAME}.{part}": torch.zeros(4, 4) for part in parts}
    message = refused(write(tmp_path, state), keys)
    assert message == (
        f"FILE: {NAME} (layer {Q}): uses {algorithm} ({', '.join(sorted(parts))}), which "
        "sdstack does not read; expected LoRA/LoCon, LoHa, LoKr, full, norm or IA3 modules"
    )


def test_unknown_part(tmp_path, keys):
    state = {**lora(), f"{NAME}.lora_side.weight": torch.zeros(2)}
    assert (
        refused(write(tmp_path, state), keys)
        == f"FILE: {NAME} (layer {Q}): unknown key part(s) lora_side.weight"
    )


def test_two_keys_for_one_part(tmp_path, keys):
    compvis = keys[Q].compvis
    state = {**lora(), f"{compvis}.lora_down.weight": torch.zeros(4, 64)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: keys '{NAME}.lora_down.weight' and '{compvis}.lora_down.weight' both hold "
        f"lora_down.weight of layer {Q}; expected one key per part"
    )


def test_tucker_core_on_a_linear_layer(tmp_path, keys):
    state = {**lora(), f"{NAME}.lora_mid.weight": torch.zeros(4, 4, 3, 3)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.lora_mid.weight: shape (4, 4, 3, 3), does not fit layer {Q} "
        "(weight (64, 64)); expected no lora_mid (the layer is linear)"
    )


def test_lokr_factor_that_does_not_divide_the_layer(tmp_path, keys):
    state = {f"{NAME}.lokr_w1": torch.zeros(3, 8), f"{NAME}.lokr_w2": torch.zeros(8, 8)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.lokr_w1: shape (3, 8), does not fit layer {Q} (weight (64, 64)); expected "
        "factors (a, b) with a dividing 64 and b dividing 64"
    )


def test_bias_delta_for_a_layer_without_bias(tmp_path, keys):
    state = {f"{NAME}.diff": torch.zeros(64, 64), f"{NAME}.diff_b": torch.zeros(64)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.diff_b: shape (64,), does not fit layer {Q} (weight (64, 64)); expected "
        "nothing: the layer has no bias"
    )


def test_dora_scale_of_the_wrong_shape(tmp_path, keys):
    state = {**lora(), f"{NAME}.dora_scale": torch.ones(3)}
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}.dora_scale: shape (3,), does not fit layer {Q} (weight (64, 64)); expected "
        "(1, 64) or (64, 1)"
    )


def test_dora_on_the_difference_is_refused(tmp_path, keys):
    state = {
        **lora(),
        f"{NAME}.dora_scale": torch.ones(1, 64),
        f"{NAME}.wd_for_diff": torch.tensor(True),
    }
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {NAME}: DoRA on the difference weight (wd_for_diff), which sdstack does not read "
        "(the reference UI neither)"
    )


def test_lora_on_the_token_embedding(tmp_path, keys):
    name = "lora_te_text_model_embeddings_token_embedding"
    state = lora(name=name, out=49408, inp=32)
    assert refused(write(tmp_path, state), keys) == (
        f"FILE: {name}: a lora module on layer text_encoder:text_model.embeddings.token_embedding "
        "(embedding); expected a linear or conv layer"
    )


def test_bundled_embedding_of_the_wrong_width(tmp_path, keys):
    state = {"bundle_emb.wide.emb_params": torch.zeros(2, 768)}
    assert refused(write(tmp_path, state), keys) == (
        "FILE: bundle_emb.wide.emb_params: embedding width 768; expected 32 (the text "
        "encoder's token width)"
    )


def test_bundled_embedding_with_too_many_vectors(tmp_path, keys):
    state = {"bundle_emb.long.string_to_param.*": torch.zeros(76, 32)}
    assert refused(write(tmp_path, state), keys) == (
        "FILE: bundle_emb.long.string_to_param.*: shape (76, 32); expected (vectors, width) "
        "with 1 to 75 vectors, or (width,)"
    )


def test_adapter_metadata_that_is_not_json(tmp_path, keys):
    state = peft(keys)
    path = write(tmp_path, state, {"lora_adapter_metadata": "{r: 4"})
    assert refused(path, keys) == (
        "FILE: metadata lora_adapter_metadata is not JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1)); expected the JSON object diffusers "
        "writes (lora_alpha, r, alpha_pattern...)"
    )


def test_adapter_metadata_with_a_nan_alpha(tmp_path, keys):
    state = peft(keys)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": float("nan")})}
    assert refused(write(tmp_path, state, metadata), keys) == (
        "FILE: metadata lora_adapter_metadata: unet.lora_alpha is nan; expected a finite number"
    )


class Payload:
    """Pickled by reference to this module: the weights-only reader must refuse it."""


def test_pickle_that_wants_a_python_object(tmp_path, keys):
    path = tmp_path / "evil.pt"
    torch.save({f"{NAME}.lora_down.weight": torch.zeros(4, 64), "payload": Payload()}, path)
    assert refused(path, keys) == (
        "FILE: refused to load this pickle checkpoint: the weights-only unpickler refuses to call "
        "tests.lora.test_hostile_lora.Payload (a weights-only load rebuilds only tensors and plain "
        "containers and never runs code from the file); use a .safetensors version of the model "
        "(or convert this file with a tool you trust)"
    )


def test_nothing_matches(tmp_path, keys):
    state = {"lora_unet_nowhere.lora_down.weight": torch.zeros(1), "junk": torch.zeros(1)}
    assert refused(write(tmp_path, state), keys) == (
        "FILE: no key matches a layer of this model (2 keys: 'junk', "
        "'lora_unet_nowhere.lora_down.weight'); expected a LoRA file (kohya "
        "lora_unet_*/lora_te_*, diffusers unet./text_encoder. lora_A/lora_B, LyCORIS)"
    )


def test_unknown_suffix_and_missing_file(tmp_path, keys):
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    assert refused(text, keys) == (
        "FILE: unknown LoRA file type '.txt'; expected one of .safetensors, .pt, .ckpt, .pth, .bin"
    )
    assert refused(tmp_path / "gone.safetensors", keys) == "LoRA file not found: FILE"
