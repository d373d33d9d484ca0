"""Deprojector folders: save/load round trip, warnings, hostile files, the v1 layout."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sdstack.errors import SdstackWarning
from sdstack.text.clip_skip import text_transformer
from sdstack.text.deprojector.files import (
    DeprojectorFileError,
    clip_fingerprint,
    load_deprojector,
    save_deprojector,
)
from sdstack.text.deprojector.model import Deprojector
from sdstack.text.deprojector.v1_layout import is_v1_layout, load_v1_layout
from tests.text.deprojector.test_model import clip_layer, tiny_clip_with_projection, token_ids

TEXTS = ["a cat", "a red hat on a dog, oil painting"]


@pytest.fixture(scope="module")
def model(tiny_text_encoder, tokenizer):
    deprojector = Deprojector.from_clip(
        tiny_text_encoder, tokenizer, layers=2, decoder="parallel", input_mlp=True, ensemble=2
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: off CLIP's values
        for parameter in deprojector.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return deprojector.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deprojector")
    save_deprojector(model, folder / "d")
    return folder / "d"


def _no_warnings():
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error")
    return context


def test_round_trip_is_exact(model, saved, tiny_text_encoder, tokenizer):
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]  # no temporaries
    context = _no_warnings()
    try:
        loaded = load_deprojector(saved, text_encoder=tiny_text_encoder, clip_skip=1)
    finally:
        context.__exit__(None, None, None)
    assert loaded.config == model.config and not loaded.training
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    embedding = model.embed(tiny_text_encoder, tokenizer, TEXTS)
    assert torch.equal(loaded.decode(embedding), model.decode(embedding))
    data = json.loads((saved / "config.json").read_text())
    assert data["clip_hash"] == clip_fingerprint(tiny_text_encoder)
    assert data["decoder"] == "parallel" and data["ensemble"] == 2


def test_round_trip_keeps_the_query_term(model, saved):
    assert model.config.query_rank == 32 and model.query_up.abs().max() > 0  # "trained"
    loaded = load_deprojector(saved)
    assert loaded.config.query_rank == 32
    assert torch.equal(loaded.query_up, model.query_up)
    assert torch.equal(loaded.query_down, model.query_down)


def test_config_saved_before_query_rank_loads_as_before(tiny_text_encoder, tokenizer, tmp_path):
    old = Deprojector.from_clip(tiny_text_encoder, tokenizer, decoder="parallel", query_rank=0)
    save_deprojector(old, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["query_rank"]  # the file an earlier sdstack wrote
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_deprojector(tmp_path)
    assert loaded.config.query_rank == 0 and loaded.query_up is None
    embedding = old.embed(tiny_text_encoder, tokenizer, TEXTS)
    assert torch.equal(loaded.decode(embedding), old.decode(embedding))


def test_round_trip_with_a_projection(tokenizer, tmp_path):
    clip = tiny_clip_with_projection()
    model = Deprojector.from_clip(clip, tokenizer, projection=clip.text_projection.weight)
    save_deprojector(model, tmp_path)
    loaded = load_deprojector(tmp_path, device="cpu")
    assert loaded.config.embedding == "text_embeds"
    assert torch.equal(loaded.projection, model.projection)
    assert torch.equal(loaded.inverse_projection, model.inverse_projection)
    assert loaded.config.condition_number == model.config.condition_number


def test_another_clip_warns(saved):
    from sdstack.models.tiny import tiny_text_encoder

    with pytest.warns(SdstackWarning, match=r"was trained on CLIP [0-9a-f]{12}, but this text"):
        load_deprojector(saved, text_encoder=tiny_text_encoder(seed=1))


def test_another_clip_skip_warns(saved):
    with pytest.warns(SdstackWarning, match="trained for clip skip 1, used at clip skip 2"):
        load_deprojector(saved, clip_skip=2)


def test_fingerprint_is_dtype_and_version_independent(tiny_text_encoder):
    from sdstack.models.tiny import tiny_text_encoder as build

    fingerprint = clip_fingerprint(tiny_text_encoder)
    half = build(seed=0).half()
    assert clip_fingerprint(half) == clip_fingerprint(half.float())
    changed = build(seed=0)
    with torch.no_grad():
        text_transformer(changed).final_layer_norm.bias[0] += 0.5
    assert clip_fingerprint(changed) != fingerprint
    assert clip_fingerprint(build(seed=0)) == fingerprint


# -- hostile folders -----------------------------------------------------------------------


def _copy(saved, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    return folder


def _config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), r"config.json: no deprojector config"),
        (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
        (lambda f: (f / "config.json").write_bytes(b"\xff\xfe"), "is not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "must be a JSON object, got list"),
        (lambda f: (f / "config.json").write_text("[" * 100000), "is not valid JSON"),
        (
            lambda f: (f / "config.json").write_text(" " * 1_000_001),
            "more than the 1000000 a deprojector config can need",
        ),
        (
            lambda f: (f / "config.json").write_text(json.dumps(dict(_config(f), layers=3))),
            r"tensors do not match the config \(missing stacks.0.layers.2",
        ),
        (
            lambda f: (f / "config.json").write_text(json.dumps(dict(_config(f), width=1 << 40))),
            r"width must be an integer in \[1, 16384\]",
        ),
        (
            lambda f: (f / "config.json").write_text(json.dumps(dict(_config(f), wat=1))),
            "unknown field",
        ),
        (lambda f: (f / "model.safetensors").unlink(), "missing"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x01"), "safetensors"),
        (
            lambda f: (f / "model.safetensors").write_bytes(
                (f / "model.safetensors").read_bytes()[:-10]
            ),
            "truncated safetensors file",
        ),
        (
            lambda f: (f / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"),
            "safetensors",
        ),
    ],
)
def test_damaged_folders_are_clear_errors(saved, tmp_path, damage, message):
    folder = _copy(saved, tmp_path)
    damage(folder)
    with pytest.raises(DeprojectorFileError, match=message):
        load_deprojector(folder)


def _rewrite_weights(saved, tmp_path, change):
    from safetensors.torch import load_file

    folder = _copy(saved, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("bos"), r"missing bos"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unexpected 'extra'"),
        (lambda s: s.update(bos=torch.zeros(31)), r"tensor 'bos' has shape \[31\], the config"),
        (lambda s: s.update(bos=torch.zeros(32, dtype=torch.int64)), "has dtype I64"),
        (lambda s: s.update(bos=torch.full((32,), float("nan"))), "'bos' holds NaN"),
    ],
)
def test_wrong_tensors_are_clear_errors(saved, tmp_path, change, message):
    folder = _rewrite_weights(saved, tmp_path, change)
    with pytest.raises(DeprojectorFileError, match=message):
        load_deprojector(folder)


def test_half_precision_weights_load(saved, tmp_path):
    def to_half(state):
        for key in list(state):
            state[key] = state[key].half()

    loaded = load_deprojector(_rewrite_weights(saved, tmp_path, to_half))
    assert loaded.bos.dtype == torch.float32


def test_not_a_folder(tmp_path):
    with pytest.raises(DeprojectorFileError, match="does not exist"):
        load_deprojector(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeprojectorFileError, match="is not a folder"):
        load_deprojector(tmp_path / "file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").mkdir()
    with pytest.raises(DeprojectorFileError, match="is not a regular file"):
        load_deprojector(tmp_path / "d")


def test_unwritable_target_is_a_clear_error(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeprojectorFileError, match="cannot write the deprojector"):
        save_deprojector(model, tmp_path / "file" / "sub")


# -- the author's v1 layout -----------------------------------------------------------------


@pytest.fixture(scope="module")
def v1(tokenizer, tmp_path_factory):
    """A v1 folder written with the author's key names, from a perturbed tiny deprojector."""
    clip = tiny_clip_with_projection()
    source = Deprojector.from_clip(
        clip, tokenizer, projection=clip.text_projection.weight, relative_to_null=False
    )
    generator = torch.Generator().manual_seed(5)
    state = {
        "projection.weight": source.inverse_projection.clone(),
        "position_ids": torch.arange(77)[None],
        "position_embedding.weight": source.position_embedding.detach().clone(),
        "final_layer_norm.weight": source.final_layer_norm.weight.detach().clone(),
        "final_layer_norm.bias": source.final_layer_norm.bias.detach().clone(),
        "sos_embed": source.bos.clone(),
    }
    for key, value in source.stacks[0].layers[0].state_dict().items():
        noise = 0.02 * torch.randn(value.shape, generator=generator)
        state[f"encoder_layer.{key}"] = value.detach() + noise
    folder = tmp_path_factory.mktemp("v1")
    torch.save(state, folder / "pytorch_model.bin")
    config = clip.config.to_dict()
    config.update(model_type="clip_text_model", architectures=["CLIPTextDeprojector"])
    (folder / "config.json").write_text(json.dumps(config))
    return clip, folder, state


@torch.no_grad()
def test_v1_layout_maps_to_the_v1_computation(v1, tokenizer):
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    clip, folder, state = v1
    assert is_v1_layout(folder)
    with pytest.warns(SdstackWarning, match="stores no null embedding"):
        model = load_deprojector(folder)
    config = model.config
    assert (config.embedding, config.relative_to_null, config.layers) == ("text_embeds", False, 1)
    assert config.clip_hash is None
    ids = token_ids(tokenizer, TEXTS)
    truth = clip(input_ids=ids)
    embeds = truth.text_embeds
    torch.testing.assert_close(model.embed(clip, tokenizer, TEXTS), embeds, atol=1e-5, rtol=1e-5)
    # the v1 forward written from the author's code: pooled = projection(embeds), input
    # [pooled, sos, h_1 .. h_75] + position embeddings, one CLIPEncoderLayer, final LN
    layer = CLIPEncoderLayer(clip.config).eval()
    layer.load_state_dict(
        {k.removeprefix("encoder_layer."): v for k, v in state.items() if "encoder_layer" in k}
    )
    pooled = embeds @ state["projection.weight"].T
    target = truth.last_hidden_state
    x = torch.cat([pooled[:, None], target[:, :-1]], dim=1) + state["position_embedding.weight"]
    norm = torch.nn.LayerNorm(32, eps=clip.config.layer_norm_eps)
    norm.load_state_dict(
        {"weight": state["final_layer_norm.weight"], "bias": state["final_layer_norm.bias"]}
    )
    expected = norm(clip_layer(layer, x))
    got = model.teacher_forced(embeds, target)
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=2e-5, rtol=1e-5)
    assert torch.equal(got[:, 0], state["sos_embed"].expand(2, -1))


def test_v1_null_from_the_clip_or_the_file(v1, tokenizer, tmp_path):
    clip, folder, state = v1
    model = load_deprojector(folder, text_encoder=clip, tokenizer=tokenizer)
    empty = model.embed(clip, tokenizer, [""])[0]
    torch.testing.assert_close(model.null, empty, atol=1e-6, rtol=0)
    with_null = tmp_path / "v1null"
    with_null.mkdir()
    (with_null / "config.json").write_text((folder / "config.json").read_text())
    pooled = model.pooled_from_embedding(empty[None])[0]
    torch.save(dict(state, null_embed=pooled), with_null / "pytorch_model.bin")
    with pytest.warns(SdstackWarning, match=r"may have been trained on the author's relative"):
        again = load_v1_layout(with_null)
    torch.testing.assert_close(again.null, empty, atol=1e-5, rtol=1e-5)


def _v1_copy(v1, tmp_path, config_change=None, state_change=None):
    _, folder, state = v1
    out = tmp_path / "v1copy"
    out.mkdir()
    config = json.loads((folder / "config.json").read_text())
    if config_change:
        config_change(config)
    (out / "config.json").write_text(json.dumps(config))
    state = dict(state)
    if state_change:
        state_change(state)
    torch.save(state, out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize(
    ("config_change", "state_change", "message"),
    [
        (lambda c: c.update(ensemble_size=2), None, "ensemble_size 2: only the v1 layout"),
        (lambda c: c.update(relative_to_null=True), None, "relative_to_null is True; only"),
        (lambda c: c.pop("hidden_size"), None, "hidden_size must be an integer, got None"),
        (lambda c: c.update(hidden_act="relu"), None, "hidden_act must be one of"),
        (None, lambda s: s.pop("sos_embed"), "missing sos_embed"),
        (None, lambda s: s.update(extra=torch.zeros(2)), "unexpected 'extra'"),
        (None, lambda s: s.update(sos_embed=torch.zeros(3)), r"'sos_embed' has shape \[3\]"),
        (None, lambda s: s.update(null_embed=torch.zeros(3)), r"null_embed has shape \[3\]"),
        (
            None,
            lambda s: s.update(sos_embed=print),
            "the weights-only unpickler refuses to call builtins.print",
        ),
    ],
)
def test_hostile_v1_folders(v1, tmp_path, config_change, state_change, message):
    folder = _v1_copy(v1, tmp_path, config_change, state_change)
    with pytest.raises(DeprojectorFileError, match=message):
        load_deprojector(folder)


def test_v1_garbage_weights(v1, tmp_path):
    folder = _v1_copy(v1, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DeprojectorFileError, match=r"pytorch_model\.bin: File is not a zip file"):
        load_deprojector(folder)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_V1_KEYS = [
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "layer_norm_eps",
    "hidden_act",
    "projection_dim",
    "ensemble_size",
    "relative_to_null",
]


@settings(max_examples=150, deadline=None)
@given(st.one_of(_JSON, st.dictionaries(st.sampled_from(_V1_KEYS), _JSON)))
def test_any_v1_config_reads_or_raises_the_clear_error(data):
    from pathlib import Path

    from sdstack.text.deprojector.v1_layout import v1_config

    base = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 37}
    if isinstance(data, dict):
        data = dict(base, **data)
    try:
        config = v1_config(Path("config.json"), data)
    except DeprojectorFileError:
        return
    assert config.layers == 1 and config.embedding == "text_embeds"
