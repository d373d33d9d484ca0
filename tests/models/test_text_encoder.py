"""build_text_encoder / load_text_encoder: every key layout round-trips to the same outputs."""

from __future__ import annotations

import pytest
import torch

from sdstack.models.text_encoder import (
    TextEncoderError,
    build_text_encoder,
    load_text_encoder,
    sd15_text_config,
)
from sdstack.models.tiny import TINY_TEXT_CONFIG

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])
PREFIXES = [
    "",
    "text_model.",
    "cond_stage_model.transformer.",
    "cond_stage_model.transformer.text_model.",
]


def _outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
    return out.last_hidden_state, out.pooler_output, out.hidden_states[-2]


def _assert_same_outputs(model, reference):
    # The same tensors in the same architecture, run on the same batch: the identical
    # computation, so exactly equal (any key-mapping slip changes outputs by O(1)).
    for got, want in zip(_outputs(model), _outputs(reference), strict=True):
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def state(tiny_text_encoder):
    """Unprefixed keys (transformers 5.x names; 4.x models add ``text_model.``)."""
    items = tiny_text_encoder.state_dict().items()
    return {k.removeprefix("text_model."): v.clone() for k, v in items}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("position_ids", [None, "float", "rounded"])
def test_round_trip_in_every_layout(tiny_text_encoder, state, prefix, position_ids):
    tensors = {prefix + k: v for k, v in state.items()}
    if position_ids is not None:
        values = torch.arange(77.0)[None]
        if position_ids == "rounded":  # broken merges store slightly-off positions
            values = values - 0.0001
        tensors[prefix + "embeddings.position_ids"] = values
    model = build_text_encoder(tensors, config=TINY_TEXT_CONFIG)
    assert not model.training
    _assert_same_outputs(model, tiny_text_encoder)
    assert torch.equal(
        getattr(model, "text_model", model).embeddings.position_ids, torch.arange(77)[None]
    )


def test_full_checkpoint_uses_only_text_keys(tiny_text_encoder, state):
    tensors = {"cond_stage_model.transformer.text_model." + k: v for k, v in state.items()}
    tensors["model.diffusion_model.out.0.weight"] = torch.zeros(4)
    tensors["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    _assert_same_outputs(build_text_encoder(tensors, config=TINY_TEXT_CONFIG), tiny_text_encoder)


def test_dtype_and_default_dtype(state):
    half = {k: v.half() for k, v in state.items()}
    assert build_text_encoder(half, config=TINY_TEXT_CONFIG).dtype == torch.float16
    model = build_text_encoder(half, config=TINY_TEXT_CONFIG, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_missing_and_unexpected_keys_are_named(state):
    missing = {k: v for k, v in state.items() if k != "final_layer_norm.weight"}
    with pytest.raises(TextEncoderError, match=r"missing 'final_layer_norm.weight' \(1 in all\)"):
        build_text_encoder(missing, config=TINY_TEXT_CONFIG)
    extra = dict(state, **{"text_model.logit_scale": torch.zeros(())})
    with pytest.raises(TextEncoderError, match=r"unexpected keys 'logit_scale' \(1 in all\)"):
        build_text_encoder(extra, config=TINY_TEXT_CONFIG)
    with pytest.raises(TextEncoderError, match="holds no CLIP text-encoder tensors"):
        build_text_encoder({"model.diffusion_model.x": torch.zeros(1)}, config=TINY_TEXT_CONFIG)


def test_wrong_config_is_reported(state):
    with pytest.raises(TextEncoderError, match=r"missing 'encoder.layers.10.*\(112 in all\)"):
        build_text_encoder(state)  # packaged 12-layer config, 5-layer weights
    wide = dict(TINY_TEXT_CONFIG, hidden_size=64)
    message = r"'embeddings.token_embedding.weight' has shape \(49408, 32\), expected \(49408, 64\)"
    with pytest.raises(TextEncoderError, match=message):
        build_text_encoder(state, config=wide)


def test_packaged_config_is_sd15_clip_vit_l14():
    config = sd15_text_config()
    expected = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    assert {k: config[k] for k in expected} == expected
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**expected))
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_load_diffusers_folder(tmp_path, tiny_text_encoder):
    tiny_text_encoder.save_pretrained(tmp_path / "model" / "text_encoder")
    _assert_same_outputs(load_text_encoder(tmp_path / "model"), tiny_text_encoder)
    _assert_same_outputs(load_text_encoder(tmp_path / "model" / "text_encoder"), tiny_text_encoder)


def test_load_single_file_uses_packaged_config(tmp_path, monkeypatch, tiny_text_encoder, state):
    from safetensors.torch import save_file

    import sdstack.models.text_encoder as module

    path = tmp_path / "te.safetensors"
    save_file({"cond_stage_model.transformer." + k: v for k, v in state.items()}, str(path))
    monkeypatch.setattr(module, "sd15_text_config", lambda: dict(TINY_TEXT_CONFIG))
    _assert_same_outputs(load_text_encoder(path), tiny_text_encoder)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text encoder path '.*nowhere' does not exist"):
        load_text_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text-encoder weights in folder"):
        load_text_encoder(tmp_path / "empty")


def test_load_reads_files_as_load_model_does(tmp_path, state):
    """Truncated safetensors and unsafe pickles get load_model's errors, not raw exceptions."""
    from safetensors.torch import save_file

    from sdstack.models import CheckpointError

    path = tmp_path / "te.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"te\.safetensors: truncated safetensors file"):
        load_text_encoder(path)
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    torch.save({"weights": state, "hook": print}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load this pickle checkpoint"):
        load_text_encoder(folder)
