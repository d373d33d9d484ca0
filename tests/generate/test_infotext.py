"""Infotext: reference order and quoting, parsing reference-style texts, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdstack.generate.infotext import (
    build_infotext,
    generation_fields,
    params_from_infotext,
    parse_infotext,
    quote,
)
from sdstack.generate.params import GenerationParams
from sdstack.models.components import ModelComponents

# Written the way the reference UI v1.10 writes them (field order, quoting).
REFERENCE_V110 = (
    "masterpiece, best quality, (1girl:1.2), [smile:grin:0.4]\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3948572,"
    " Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: "
    "735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, "
    'Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "detail: '
    '0123456789ab, style: abcdef012345", TI hashes: "easynegative: c74b4e810b03", '
    "Version: v1.10.1"
)
REFERENCE_OLD = (
    "a photo of an astronaut riding a horse on mars\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x512, "
    "Model hash: cc6cb27103, Model: v1-5-pruned-emaonly, ENSD: 31337"
)


def test_reference_v110_text():
    info = parse_infotext(REFERENCE_V110)
    assert info["Prompt"] == "masterpiece, best quality, (1girl:1.2), [smile:grin:0.4]"
    assert info["Negative prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    assert info["Schedule type"] == "Karras" and info["CFG scale"] == "6.5"
    assert (info["Size-1"], info["Size-2"]) == ("512", "768")
    assert info["Lora hashes"] == "detail: 0123456789ab, style: abcdef012345"
    assert info["TI hashes"] == "easynegative: c74b4e810b03"
    assert info["Hires upscaler"] == "Latent" and info["Version"] == "v1.10.1"
    assert info["RNG"] == "GPU"  # default when absent
    kwargs = params_from_infotext(info)
    assert kwargs["sampler"] == "DPM++ 2M" and kwargs["schedule_type"] == "Karras"
    assert (kwargs["width"], kwargs["height"], kwargs["clip_skip"]) == (512, 768, 2)
    assert kwargs["denoising_strength"] == 0.45 and kwargs["seed"] == 3948572


def test_reference_old_combined_sampler_name():
    info = parse_infotext(REFERENCE_OLD)
    assert info["Negative prompt"] == "" and info["ENSD"] == "31337"
    assert info["Clip skip"] == "1" and info["Schedule type"] == "Automatic"
    kwargs = params_from_infotext(info)
    assert (kwargs["sampler"], kwargs["schedule_type"]) == ("DPM++ 2M", "Karras")
    assert kwargs["cfg_scale"] == 7.0 and kwargs["steps"] == 20


def test_last_line_with_fewer_than_3_params_is_prompt():
    info = parse_infotext("a cat\nSteps: 20, Seed: 1")
    assert info["Prompt"] == "a cat\nSteps: 20, Seed: 1" and "Steps" not in info


def test_multiline_negative_prompt():
    text = "a\nb\nNegative prompt: x\ny\nSteps: 2, Sampler: Euler, Seed: 3"
    info = parse_infotext(text)
    assert (info["Prompt"], info["Negative prompt"]) == ("a\nb", "x\ny")


def test_quote():
    assert quote("Euler a") == "Euler a"
    assert quote("a, b") == '"a, b"'
    assert quote('say "hi": now') == '"say \\"hi\\": now"'
    assert quote("über\nline") == '"über\\nline"'
    assert quote(7.0) == "7" and quote(7.5) == "7.5"


def test_field_order_and_none_dropped():
    text = build_infotext(
        "p",
        "",
        {
            "Version": "v",
            "Seed": 1,
            "Emphasis": "No norm",
            "Steps": 2,
            "Clip skip": None,
            "Sampler": "Euler",
        },
    )
    assert text == "p\nSteps: 2, Sampler: Euler, Seed: 1, Emphasis: No norm, Version: v"


def test_generation_fields(tmp_path):
    model = tmp_path / "my-model.safetensors"
    model.write_bytes(b"x" * 100)
    vae = tmp_path / "my-vae.pt"
    vae.write_bytes(b"y" * 100)
    components = ModelComponents(None, None, None, None, name="my-model", path=model, vae_path=vae)
    params = GenerationParams(
        "(cat)",
        sampler="DPM++ 2M Karras",
        clip_skip=2,
        seed=5,
        emphasis="no-norm",
        init_image=object(),
        denoising_strength=0.5,
        cfg_scale=7.5,
    )
    text = build_infotext(
        params.prompt, params.negative, generation_fields(params, components=components)
    )
    from sdstack.models.hashes import short_hash

    assert text == (
        "(cat)\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, "
        f"Seed: 5, Size: 512x512, Model hash: {short_hash(model)}, Model: my-model, "
        f"VAE hash: {short_hash(vae)}, VAE: my-vae.pt, Denoising strength: 0.5, Clip skip: 2, "
        "RNG: CPU, Emphasis: No norm, Version: sdstack 0.1.0"
    )


def test_ti_hashes_field():
    emb = type("E", (), {"short_hash": "c74b4e810b03"})()
    components = ModelComponents(None, None, None, None, name="m")
    fields = generation_fields(
        GenerationParams("x"),
        components=components,
        embeddings={"easyneg": emb, "other": emb},
        used_embeddings=["easyneg"],
    )
    text = build_infotext("easyneg", "", fields)
    assert 'TI hashes: "easyneg: c74b4e810b03", Version' in text
    assert parse_infotext(text)["TI hashes"] == "easyneg: c74b4e810b03"


TRICKY = [
    'a "quoted", colon: thing',
    "multi\nline prompt, with (emphasis:1.2)",
    "ünïcødé 猫 🐱, [a:b:0.5]",
    "backslash \\( not emphasis \\)",
]


@pytest.mark.parametrize("prompt", TRICKY)
def test_round_trip_tricky_prompts(prompt):
    params = GenerationParams(
        prompt,
        negative="neg: one, two\nthree",
        seed=9,
        sampler="DPM++ 2M SDE",
        schedule_type="Karras",
        clip_skip=3,
    )
    components = ModelComponents(None, None, None, None, name='odd, "name": x')
    fields = generation_fields(params, components=components)
    info = parse_infotext(build_infotext(params.prompt, params.negative, fields))
    assert info["Model"] == 'odd, "name": x'
    back = GenerationParams(**params_from_infotext(info))
    assert back == dataclasses.replace(params)


line_text = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)
    .map(str.strip)
    .filter(lambda s: s and not s.startswith("Negative prompt:"))
)


@settings(max_examples=60, deadline=None)
@example(prompt=["a"], negative=[], value='"quoted"')
@given(
    prompt=st.lists(line_text, min_size=1, max_size=3),
    negative=st.lists(line_text, max_size=2),
    value=line_text,
)
def test_round_trip_property(prompt, negative, value):
    prompt_text, negative_text = "\n".join(prompt), "\n".join(negative)
    fields = {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "Extra": value}
    info = parse_infotext(build_infotext(prompt_text, negative_text, fields))
    assert info["Prompt"] == prompt_text
    assert info["Negative prompt"] == negative_text
    assert info["Extra"] == value.strip()


def test_json_output_is_serialisable():
    assert json.loads(json.dumps(parse_infotext(REFERENCE_V110)))["Seed"] == "3948572"


def test_params_from_infotext_emphasis_and_errors():
    text = "(a:1.2)\nSteps: 5, Sampler: Euler, Seed: 1, Emphasis: No norm"
    assert params_from_infotext(parse_infotext(text))["emphasis"] == "no-norm"
    bad = parse_infotext("a\nSteps: many, Sampler: Euler, Seed: 1")
    message = r"infotext field 'Steps': cannot read 'many' as an integer"
    with pytest.raises(ValueError, match=message):
        params_from_infotext(bad)
    with pytest.raises(ValueError, match=r"unknown sampler 'Fancy'"):
        params_from_infotext(parse_infotext("a\nSteps: 5, Sampler: Fancy, Seed: 1"))


def test_pad_conds_round_trip():
    """Reference extra parameter ``Pad conds: True`` (after the other extras, Version last)."""
    params = GenerationParams("(cat)", seed=2, emphasis="no-norm", pad_conds=True)
    components = ModelComponents(None, None, None, None, name="m")
    fields = {**generation_fields(params, components=components), "Pad conds": True}
    text = build_infotext(params.prompt, params.negative, fields)
    assert text.endswith("RNG: CPU, Emphasis: No norm, Pad conds: True, Version: sdstack 0.1.0")
    back = GenerationParams(**params_from_infotext(parse_infotext(text)))
    assert back == params and back.pad_conds is True
    plain = parse_infotext("a\nSteps: 5, Sampler: Euler, Seed: 1")
    assert "pad_conds" not in params_from_infotext(plain)
    assert GenerationParams(**params_from_infotext(plain)).pad_conds is False
    bad = parse_infotext("a\nSteps: 5, Sampler: Euler, Seed: 1, Pad conds: yes")
    with pytest.raises(ValueError, match=r"field 'Pad conds': cannot read 'yes' as True or False"):
        params_from_infotext(bad)


@pytest.mark.parametrize(("clip_skip", "written"), [(1, None), (2, "2"), (2.0, "2"), (1.5, "1.5")])
def test_clip_skip_written_only_above_1_and_read_back(clip_skip, written):
    """Reference: ``Clip skip: N`` only when N > 1; whole numbers without a decimal point.

    Fractional values (sdstack's blend of two layers) are written as they are.
    """
    params = GenerationParams("a cat", seed=1, clip_skip=clip_skip)
    fields = generation_fields(params, components=ModelComponents(None, None, None, None))
    text = build_infotext(params.prompt, params.negative, fields)
    parsed = params_from_infotext(parse_infotext(text))
    if written is None:
        assert "Clip skip" not in text
        assert parsed["clip_skip"] == 1  # the reference's default for a missing field
    else:
        assert f", Clip skip: {written}, " in text
        assert parsed["clip_skip"] == clip_skip
        assert type(parsed["clip_skip"]) is (int if float(clip_skip).is_integer() else float)
