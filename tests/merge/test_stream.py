"""``merge_checkpoints`` on tiny SD1 checkpoints: streamed output, rules, metadata, safety."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from sdstack.errors import SdstackWarning
from sdstack.merge import MergeError
from sdstack.merge.stream import MergeSettings, merge_checkpoints, merge_state_dicts
from tests.merge import merge_files as mf

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """A (the conftest tiny model), B and C (seeds 1, 2) as files and state dicts."""
    folder = tmp_path_factory.mktemp("merge-inputs")
    a_path, config = tiny_checkpoint
    b_path = mf.save(mf.tiny_state(1), folder / "b.safetensors")
    c_path = mf.save(mf.tiny_state(2), folder / "c.safetensors")
    states = {name: mf.load(path) for name, path in (("a", a_path), ("b", b_path), ("c", c_path))}
    return {"a": a_path, "b": b_path, "c": c_path, "config": config, **{
        name.upper(): state for name, state in states.items()
    }}  # fmt: skip


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def assert_same_bits(left: dict, right: dict) -> None:
    assert list(left) == list(right) or sorted(left) == sorted(right)
    assert set(left) == set(right)
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert torch.equal(left[key], right[key]), key


SETTINGS = [
    (MergeSettings(alpha=0.3), False),
    (MergeSettings(method="add-difference", alpha=0.7, dtype="bf16"), True),
    (MergeSettings(method="sum-twice", alpha=0.4, beta=0.2, alpha_blocks=(0.1,) * 26), True),
    (MergeSettings(method="ties", alpha=1.0, dtype="fp32", options={"density": 0.5}), True),
    (MergeSettings(method="dare", alpha=0.5, options={"drop": 0.5, "seed": 3}), True),
    (MergeSettings(method="slerp", alpha=0.25, dtype="fp32"), False),
]


@pytest.mark.parametrize(("settings", "three"), SETTINGS, ids=lambda s: getattr(s, "method", ""))
def test_streamed_file_equals_the_in_memory_merge(models, tmp_path, settings, three):
    c_path, c_state = (models["c"], models["C"]) if three else (None, None)
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(models["a"], models["b"], c_path, out, settings)
    expected = merge_state_dicts(models["A"], models["B"], c_state, settings)
    if settings.method != "slerp":
        assert_same_bits(mf.load(out), expected)
        return
    # slerp reduces each tensor to norms and a dot product: a vectorised reduction over
    # memory-mapped (file) and in-memory tensors may group the sums differently with the
    # data's alignment, so the angle, and each element, can move by a few float32 ulps.
    merged = mf.load(out)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        atol = 16 * 2.0**-24 * float(value.abs().max())
        torch.testing.assert_close(merged[key], value, rtol=0, atol=atol, msg=key)


def test_row_ranges_give_the_bits_of_whole_tensors(models, tmp_path, monkeypatch):
    from sdstack.merge import stream

    settings = MergeSettings(method="train-difference", alpha=0.6, dtype="fp32")
    whole = merge_state_dicts(models["A"], models["B"], models["C"], settings)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 1000)  # the token embedding: 2000 pieces
    out = tmp_path / "chunked.safetensors"
    merge_checkpoints(models["a"], models["b"], models["c"], out, settings)
    assert_same_bits(mf.load(out), whole)


def test_merged_file_loads_and_holds_the_weighted_sum(models, tmp_path):
    from sdstack.models import load_model

    alpha = 0.3
    out = tmp_path / "ws.safetensors"
    result = merge_checkpoints(
        models["a"], models["b"], None, out, MergeSettings(alpha=alpha, dtype="fp32")
    )
    assert result.tensors == len(models["A"]) and result.merged == len(models["A"])
    loaded = load_model(out, config_dir=models["config"])
    pairs = [
        (loaded.unet.conv_in.weight, mf.CONV_IN),
        (loaded.unet.down_blocks[0].resnets[0].conv1.weight, mf.RESBLOCK_CONV),
        (loaded.vae.decoder.conv_in.weight, mf.VAE_CONV),
    ]
    for tensor, key in pairs:
        a, b = models["A"][key].double(), models["B"][key].double()
        exact = (1 - alpha) * a + alpha * b
        bound = 4 * EPS32 * ((1 - alpha) * a.abs() + alpha * b.abs())
        assert ((tensor.detach().double() - exact).abs() <= bound).all(), key


def test_floating_tensors_are_written_in_the_output_dtype(models, tmp_path):
    out = tmp_path / "half.safetensors"
    merge_checkpoints(models["a"], models["b"], None, out, MergeSettings(alpha=0.5))
    merged = mf.load(out)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    key = mf.TOKEN_EMBEDDING
    exact = 0.5 * models["A"][key].double() + 0.5 * models["B"][key].double()
    # fp16 rounding (half an ulp, 2^-11 relative; subnormals: 2^-25 absolute) of the fp32 sum
    bound = exact.abs() * (2**-11 + 4 * EPS32) + 2**-25
    assert ((merged[key].double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("failure", [RuntimeError("injected"), KeyboardInterrupt()])
def test_an_interrupted_merge_leaves_no_file(models, tmp_path, monkeypatch, failure):
    from sdstack.merge import methods

    real, calls = methods.merge_tensor, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 200:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(methods, "merge_tensor", failing)
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(type(failure)):
        merge_checkpoints(models["a"], models["b"], None, out, MergeSettings())
    assert len(calls) == 200
    assert files_in(out.parent) == []


def _no_reads(monkeypatch):
    from sdstack.merge.reader import SafetensorsReader

    def refuse(self, key, rows=None):
        raise AssertionError(f"tensor {key} read before the checks")

    monkeypatch.setattr(SafetensorsReader, "read", refuse)


def test_an_sdxl_file_is_refused_before_anything_is_read(models, tmp_path, monkeypatch):
    sdxl = mf.save(mf.sdxl_like(), tmp_path / "xl.safetensors")
    out = tmp_path / "merged.safetensors"
    _no_reads(monkeypatch)
    with pytest.raises(MergeError) as error:
        merge_checkpoints(models["a"], sdxl, None, out, MergeSettings())
    mine = {k for k in models["A"] if k.startswith(mf.UNET)} - {mf.CONV_IN}
    theirs = {k for k in mf.sdxl_like() if k.startswith(mf.UNET)} - {mf.CONV_IN}
    count = len(mine) + len(theirs - mine)  # each of A's differs; B's own are not in A
    assert str(error.value) == (
        f"{sdxl}: cannot merge it with {models['a']}: this looks like an SDXL checkpoint "
        "(conditioner.embedders.* keys); expected an SD1.x checkpoint with the tensor names "
        f"and shapes of A ({count} differ: model.diffusion_model.input_blocks.0.0.bias "
        "[20] (A: [32]), model.diffusion_model.input_blocks.1.0.emb_layers.1.bias missing, "
        f"model.diffusion_model.input_blocks.1.0.emb_layers.1.weight missing and {count - 3} more)"
    )
    assert files_in(tmp_path) == ["xl.safetensors"]
    with pytest.raises(
        MergeError, match=r"xl.safetensors: cannot merge it: this looks like an SDXL"
    ):
        merge_checkpoints(sdxl, models["a"], None, out, MergeSettings())


def test_a_model_of_other_shapes_is_refused(models, tmp_path, monkeypatch):
    other = mf.save(mf.other_shapes_state(), tmp_path / "wide.safetensors")
    out = tmp_path / "merged.safetensors"
    _no_reads(monkeypatch)
    with pytest.raises(MergeError) as error:
        merge_checkpoints(models["a"], other, None, out, MergeSettings())
    wide = mf.load(other)
    count = sum(tuple(wide[k].shape) != tuple(v.shape) for k, v in models["A"].items())
    assert set(wide) == set(models["A"])  # same names: every difference is a shape
    level = "model.diffusion_model.input_blocks.4.0."
    assert str(error.value) == (
        f"{other}: cannot merge it with {models['a']}: its tensors have other shapes; expected "
        f"an SD1.x checkpoint with the tensor names and shapes of A ({count} differ: "
        f"{level}emb_layers.1.bias [96] (A: [64]), {level}emb_layers.1.weight [96, 128] "
        f"(A: [64, 128]), {level}in_layers.2.bias [96] (A: [64]) and {count - 3} more)"
    )
    assert files_in(tmp_path) == ["wide.safetensors"]


def test_an_output_that_is_an_input_is_refused(models, tmp_path):
    copy = mf.save(models["B"], tmp_path / "b.safetensors")
    before = copy.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(MergeError) as error:
            merge_checkpoints(models["a"], copy, None, copy, MergeSettings(), overwrite=overwrite)
        assert str(error.value) == (
            f"output {copy}: is an input file ({copy}); write to a new file name"
        )
    assert copy.read_bytes() == before


def test_position_ids_are_int64_0_to_76_even_from_float_inputs(models, tmp_path):
    a = mf.save(
        {**models["A"], mf.POSITION_IDS: mf.broken_position_ids()}, tmp_path / "a.safetensors"
    )
    b_ids = mf.broken_position_ids() + 0.25
    b = mf.save({**models["B"], mf.POSITION_IDS: b_ids}, tmp_path / "b.safetensors")
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(a, b, None, out, MergeSettings(alpha=0.5))
    ids = mf.load(out)[mf.POSITION_IDS]
    assert ids.dtype == torch.int64
    assert torch.equal(ids, torch.arange(77).reshape(1, 77))


def test_recipe_metadata_in_the_reference_schema(models, tmp_path):
    out = tmp_path / "mix.safetensors"
    settings = MergeSettings(method="add-difference", alpha=0.7, discard="^model_ema")
    merge_checkpoints(models["a"], models["b"], models["c"], out, settings)
    meta = mf.metadata(out)
    assert meta["format"] == "pt"
    recipe = json.loads(meta["sd_merge_recipe"])
    sha = {k: hashlib.sha256(models[k].read_bytes()).hexdigest() for k in "abc"}
    assert recipe == {
        "type": "sdstack",
        "primary_model_hash": sha["a"],
        "secondary_model_hash": sha["b"],
        "tertiary_model_hash": sha["c"],
        "interp_method": "Add difference",
        "multiplier": 0.7,
        "save_as_half": True,
        "custom_name": "mix",
        "bake_in_vae": "None",
        "discard_weights": "^model_ema",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
        "method": "add-difference",
        "alpha": 0.7,
        "beta": 0.0,
        "blocks": {"alpha": None, "beta": None},
        "options": {},
        "dtype": "fp16",
        "text_encoder": "merge",
        "vae_from": "merge",
    }
    parents = json.loads(meta["sd_merge_models"])
    assert list(parents) == [sha["a"], sha["b"], sha["c"]]
    for key in "abc":
        data = models[key].read_bytes()
        legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
        entry = {"name": models[key].name, "legacy_hash": legacy, "sd_merge_recipe": None}
        assert parents[sha[key]] == entry


def test_provenance_accumulates_over_chained_merges(models, tmp_path):
    first = tmp_path / "first.safetensors"
    merge_checkpoints(models["a"], models["b"], None, first, MergeSettings(alpha=0.2))
    second = tmp_path / "second.safetensors"
    merge_checkpoints(first, models["c"], None, second, MergeSettings(alpha=0.6))
    first_meta, second_meta = mf.metadata(first), mf.metadata(second)
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, models["c"])}
    parents = json.loads(second_meta["sd_merge_models"])
    grandparents = json.loads(first_meta["sd_merge_models"])
    assert list(parents) == [sha["first.safetensors"], *grandparents, sha["c.safetensors"]]
    assert parents[sha["first.safetensors"]]["sd_merge_recipe"] == json.loads(
        first_meta["sd_merge_recipe"]
    )
    assert (
        json.loads(second_meta["sd_merge_recipe"])["primary_model_hash"] == sha["first.safetensors"]
    )


def test_discard_leaves_out_the_keys_it_matches(models, tmp_path):
    out = tmp_path / "novae.safetensors"
    result = merge_checkpoints(
        models["a"], models["b"], None, out, MergeSettings(discard=r"^first_stage_model\.")
    )
    vae = sorted(k for k in models["A"] if k.startswith("first_stage_model."))
    assert result.discarded == tuple(vae) and vae
    assert set(mf.load(out)) == set(models["A"]) - set(vae)


@pytest.mark.parametrize("layout", ["diffusers", "ldm-bare"])
def test_a_baked_vae_replaces_first_stage_model(models, tmp_path, layout):
    from sdstack.models.ldm_file import to_ldm_state_dict
    from sdstack.models.tiny import tiny_components

    parts = tiny_components(3)
    ldm = {k: v.detach().clone() for k, v in to_ldm_state_dict(parts).items()}
    vae_ldm = {k: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    if layout == "diffusers":
        vae_state = {k: v.detach().clone() for k, v in parts.vae.state_dict().items()}
    else:
        vae_state = {k.removeprefix("first_stage_model."): v for k, v in vae_ldm.items()}
    vae_file = mf.save({**vae_state, "loss.logvar": torch.zeros(())}, tmp_path / "vae.safetensors")
    out = tmp_path / "baked.safetensors"
    settings = MergeSettings(alpha=0.5, dtype="fp32", vae=vae_file)
    merge_checkpoints(models["a"], models["b"], None, out, settings)
    merged = mf.load(out)
    assert set(merged) == set(models["A"])
    for key, tensor in vae_ldm.items():
        assert torch.equal(merged[key], tensor), key
    assert json.loads(mf.metadata(out)["sd_merge_recipe"])["bake_in_vae"] == "vae.safetensors"


def test_a_vae_is_baked_into_a_model_without_one(models, tmp_path):
    def without_vae(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}

    vae = {k: v for k, v in models["C"].items() if k.startswith("first_stage_model.")}
    vae_file = mf.save(vae, tmp_path / "vae.safetensors")
    settings = MergeSettings(dtype="fp32", vae=vae_file)
    merged = merge_state_dicts(without_vae(models["A"]), without_vae(models["B"]), None, settings)
    assert set(merged) == set(models["A"])
    assert all(torch.equal(merged[k], v) for k, v in vae.items())


def test_a_vae_of_other_shapes_is_refused(models, tmp_path):
    state = {k: v for k, v in models["A"].items() if k.startswith("first_stage_model.")}
    state[mf.VAE_CONV] = state[mf.VAE_CONV][:8]
    bad = mf.save(state, tmp_path / "bad-vae.safetensors")
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError) as error:
        merge_checkpoints(models["a"], models["b"], None, out, MergeSettings(vae=bad))
    shape = list(models["A"][mf.VAE_CONV].shape)
    assert str(error.value) == (
        f"{bad}: does not fit the VAE of {models['a']}; expected the same tensors and shapes "
        f"(1 differ: {mf.VAE_CONV} {[8, *shape[1:]]} (A: {shape}))"
    )
    assert files_in(tmp_path) == ["bad-vae.safetensors"]


@pytest.mark.parametrize(("channels", "flag"), [(9, "is_inpainting"), (8, "is_instruct_pix2pix")])
def test_a_9_or_8_channel_a_merges_the_first_4_channels(models, tmp_path, channels, flag):
    state = mf.with_conv_in(models["A"], channels, seed=11)
    a = mf.save(state, tmp_path / "a.safetensors")
    out = tmp_path / "merged.safetensors"
    alpha = 0.25
    merge_checkpoints(a, models["b"], None, out, MergeSettings(alpha=alpha, dtype="fp32"))
    conv = mf.load(out)[mf.CONV_IN]
    assert conv.shape[1] == channels
    assert torch.equal(conv[:, 4:], state[mf.CONV_IN][:, 4:])
    exact = (1 - alpha) * state[mf.CONV_IN][:, :4].double() + alpha * models["B"][
        mf.CONV_IN
    ].double()
    assert (conv[:, :4].double() - exact).abs().max() <= 4 * EPS32 * exact.abs().max()
    recipe = json.loads(mf.metadata(out)["sd_merge_recipe"])
    assert recipe[flag] is True
    with pytest.raises(MergeError) as error:
        merge_checkpoints(models["b"], a, None, tmp_path / "x.safetensors", MergeSettings())
    kind = {9: "an inpainting", 8: "an instruct-pix2pix"}[channels]
    assert str(error.value) == (
        f"{a}: is {kind} checkpoint ({channels}-channel conv_in) and {models['b']} is not: give "
        f"the {kind.split()[-1]} model first, as A (its extra conv_in channels are kept and the "
        "first 4 merged)"
    )


def test_keys_missing_in_c_keep_a_and_keys_only_in_b_are_dropped(models):
    key = mf.TEXT + "final_layer_norm.weight"
    c = {k: v for k, v in models["C"].items() if k != key}
    a = {**models["A"], "alphas_cumprod": torch.linspace(1, 0, 10)}
    b = {
        **models["B"],
        "alphas_cumprod": torch.linspace(0, 1, 10),
        "model_ema.decay": torch.ones(()),
    }
    settings = MergeSettings(method="add-difference", alpha=0.5, dtype="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_state_dicts(a, b, c, settings)
    assert torch.equal(merged[key], a[key])  # 0 difference: A + a * 0
    assert torch.equal(merged["alphas_cumprod"], a["alphas_cumprod"])  # no "model": A's
    assert "model_ema.decay" not in merged
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, SdstackWarning))
    assert messages == [
        "B: 1 tensors that A does not have are left out (e.g. model_ema.decay)",
        f"C: lacks 1 of A's tensors (e.g. {key}); A's values are kept for them",
    ]
    other = mf.RESBLOCK_CONV
    expected = a[other] + 0.5 * (b[other] - c[other])
    assert torch.equal(merged[other], expected)


def test_text_encoder_and_vae_sides(models):
    settings = MergeSettings(alpha=0.5, dtype="fp32", text_encoder="b", vae_from="a")
    merged = merge_state_dicts(models["A"], models["B"], None, settings)
    assert torch.equal(merged[mf.TOKEN_EMBEDDING], models["B"][mf.TOKEN_EMBEDDING])
    assert torch.equal(merged[mf.VAE_CONV], models["A"][mf.VAE_CONV])
    assert not torch.equal(merged[mf.CONV_IN], models["A"][mf.CONV_IN])


def test_text_encoder_spelled_without_text_model_matches(models):
    b = {k.replace(mf.TEXT, "cond_stage_model.transformer."): v for k, v in models["B"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdstackWarning)
        merged = merge_state_dicts(models["A"], b, None, MergeSettings(alpha=1.0, dtype="fp32"))
    assert torch.equal(merged[mf.TOKEN_EMBEDDING], models["B"][mf.TOKEN_EMBEDDING])


def test_block_values_weight_each_block(models):
    blocks = tuple(float(i) / 25 for i in range(26))  # BASE 0, IN00 0.04, ..., OUT11 1
    settings = MergeSettings(alpha=0.5, alpha_blocks=blocks, dtype="fp32")
    merged = merge_state_dicts(models["A"], models["B"], None, settings)
    assert torch.equal(merged[mf.TOKEN_EMBEDDING], models["A"][mf.TOKEN_EMBEDDING])  # BASE 0
    out = mf.UNET + "out.2.weight"  # OUT11: 1
    assert torch.equal(merged[out], models["B"][out])


def test_a_pickle_input_merges_like_its_safetensors(models, tmp_path):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": models["B"]}, ckpt)
    streamed, pickled = tmp_path / "s.safetensors", tmp_path / "p.safetensors"
    merge_checkpoints(models["a"], models["b"], None, streamed, MergeSettings(alpha=0.4))
    merge_checkpoints(models["a"], ckpt, None, pickled, MergeSettings(alpha=0.4))
    assert_same_bits(mf.load(streamed), mf.load(pickled))


def test_safetensors_inputs_are_read_without_mapping(models, tmp_path, monkeypatch):
    import safetensors

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open maps the file")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch.UntypedStorage, "from_file", refuse)
    out = tmp_path / "m.safetensors"
    merge_checkpoints(models["a"], models["b"], None, out, MergeSettings())
    assert out.stat().st_size > 0


def test_progress_counts_tensors_then_the_hashing_left(models, tmp_path):
    a = mf.save(models["A"], tmp_path / "a.safetensors")  # new files: hashes not cached
    b = mf.save(models["B"], tmp_path / "b.safetensors")
    events = []
    out = tmp_path / "m.safetensors"
    merge_checkpoints(a, b, None, out, MergeSettings(), progress=lambda *e: events.append(e))
    merging = [event for event in events if event[0] == "merging"]
    count = len(models["A"])
    assert merging == [("merging", done, count) for done in range(1, count + 1)]
    size = a.stat().st_size + b.stat().st_size
    assert events[-1] == ("hashing", size, size)
    events.clear()
    merge_checkpoints(a, b, None, out, MergeSettings(), progress=lambda *e: events.append(e),
                      overwrite=True)  # fmt: skip
    assert events[-1] == ("merging", count, count)  # hashes cached now


def test_the_header_holds_the_hashes_computed_meanwhile(models, tmp_path):
    from sdstack.models.safetensors_header import check_safetensors_layout

    a = mf.save(models["A"], tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    merge_checkpoints(a, models["b"], None, out, MergeSettings())
    check_safetensors_layout(out)  # the rewritten header still tiles the file
    recipe = json.loads(mf.metadata(out)["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == hashlib.sha256(a.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("settings", "c", "message"),
    [
        (MergeSettings(method="add-difference"), False,
         "merge method 'add-difference' (A + a(B-C)) needs three models A, B, C; got two: give C"),
        (MergeSettings(), True,
         "merge method 'weighted-sum' ((1-a)A + aB) merges two models A and B; got a third (C), "
         "which it would not use"),
        (MergeSettings(beta=0.5), False, "beta 0.5: merge method 'weighted-sum' has no beta"),
        (MergeSettings(alpha=math.inf), False, "alpha: inf; expected a finite number"),
        (MergeSettings(dtype="fp8"), False, "dtype 'fp8': expected one of fp16, bf16, fp32"),
        (MergeSettings(text_encoder="c"), False, "text_encoder: 'c'; expected one of merge, a, b"),
        (MergeSettings(discard="("), False,
         "discard '(': not a regular expression (missing ), unterminated subpattern at "
         "position 0)"),
        (MergeSettings(vae="v.safetensors", vae_from="b"), False,
         "vae_from 'b' and vae 'v.safetensors': both choose the VAE; give one of them"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_file_is_opened(tmp_path, settings, c, message):
    missing = [tmp_path / f"{name}.safetensors" for name in "abc"]
    with pytest.raises(MergeError) as error:
        merge_checkpoints(missing[0], missing[1], missing[2] if c else None,
                          tmp_path / "o.safetensors", settings)  # fmt: skip
    assert str(error.value) == message


RSS_CHILD = """
import resource, sys
from sdstack.merge import stream
a, b, out, small_a, small_b, small_out = sys.argv[1:]
stream.merge_checkpoints(small_a, small_b, None, small_out, stream.MergeSettings())  # warm-up
stream.CHUNK_ELEMENTS = 1 << 16  # scaled down with the model: 2^22 for 2 GB checkpoints
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stream.merge_checkpoints(a, b, None, out, stream.MergeSettings(alpha=0.5))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_peak_memory_stays_under_a_quarter_of_one_model(models, tmp_path):
    # A 49408 x 128 token embedding makes each input 36 MiB, two thirds of it one tensor,
    # which the merge reads, merges and writes in row ranges (scaled down with the model):
    # the peak grows by less than a quarter of one input over a warmed-up process. A
    # whole-tensor merge (CHUNK_ELEMENTS = 2^30) grows by 40 MiB here.
    generator = torch.Generator().manual_seed(21)
    big = {}
    for name in "AB":
        embedding = torch.randn((49408, 128), generator=generator)
        big[name] = mf.save({**models[name], mf.TOKEN_EMBEDDING: embedding},
                            tmp_path / f"big-{name}.safetensors")  # fmt: skip
    out = tmp_path / "big-out.safetensors"
    small = tmp_path / "small-out.safetensors"
    args = [big["A"], big["B"], out, models["a"], models["b"], small]
    done = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, *map(str, args)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    grown = int(done.stdout.split()[-1]) * 1024
    assert out.stat().st_size > 0
    assert grown < big["A"].stat().st_size / 4, (grown, done.stderr)
