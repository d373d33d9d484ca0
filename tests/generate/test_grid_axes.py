"""Grid axes against the reference X/Y/Z plot (spec grid.md): names and labels, checked
values, what each axis sets on a job, loop order by cost, the size guard, seeds, infotext."""

from __future__ import annotations

import dataclasses
import itertools
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.generate.grid_axes import (
    GRID_AXES,
    Axis,
    GridAxisError,
    UnknownGridAxisError,
    make_axis,
    parse_axis,
)
from sdstack.generate.grid_rules import (
    GridSizeError,
    check_grid_pixels,
    fix_seeds,
    grid_infotext_fields,
    loop_order,
)
from sdstack.generate.job import GenerationJob
from sdstack.generate.params import GenerationParams
from sdstack.lora.spec import LoraSpec
from sdstack.prompt.networks import extract_networks
from sdstack.validate import SettingError


def make_job(prompt: str = "a photo of a dog", **settings) -> GenerationJob:
    params = GenerationParams(
        prompt, negative=settings.pop("negative", "ugly dog"), seed=7, **settings
    )
    return GenerationJob(params, model="models/base.safetensors", model_hash="abc123")


def changes(before: GenerationJob, after: GenerationJob) -> dict[str, object]:
    """Every field of the job and its params that differs, name -> new value."""
    out = {
        f.name: getattr(after.params, f.name)
        for f in dataclasses.fields(GenerationParams)
        if getattr(before.params, f.name) != getattr(after.params, f.name)
    }
    for f in dataclasses.fields(GenerationJob):
        if f.name != "params" and getattr(before, f.name) != getattr(after, f.name):
            out[f.name] = getattr(after, f.name)
    return out


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Seed", "seed"),
        ("Steps", "steps"),
        ("CFG Scale", "cfg"),
        ("cfg-scale", "cfg"),
        ("Sampler", "sampler"),
        ("Schedule type", "schedule-type"),
        ("schedule_type", "schedule-type"),
        ("Clip skip", "clip-skip"),
        ("clip_skip", "clip-skip"),
        ("CLIP SKIP", "clip-skip"),
        ("Denoising", "denoising"),
        ("Checkpoint name", "checkpoint"),
        ("VAE", "vae"),
        ("Prompt S/R", "prompt-sr"),
        ("prompt_sr", "prompt-sr"),
        ("Emphasis", "emphasis"),
        ("Size", "size"),
    ],
)
def test_reference_labels_and_spellings_name_the_axes(name, kind):
    assert GRID_AXES.canonical(name) == kind
    assert GRID_AXES.get(name).name == kind


def test_registry_holds_the_issue_axes_with_reference_costs():
    assert GRID_AXES.names() == (
        "seed", "steps", "cfg", "sampler", "schedule-type", "clip-skip", "emphasis", "size",
        "denoising", "token-merging", "checkpoint", "vae", "prompt-sr", "lora", "lora-te",
        "lora-unet", "merge-alpha", "merge-blocks",
    )  # fmt: skip
    costs = {name: kind.cost for name, kind in GRID_AXES.items() if kind.cost}
    assert costs == {"checkpoint": 1.0, "vae": 0.7}
    conditioning = {name for name, kind in GRID_AXES.items() if kind.conditioning_only}
    assert conditioning == {"clip-skip", "prompt-sr", "emphasis"}


def test_unknown_axis_suggests_the_nearest():
    with pytest.raises(UnknownGridAxisError) as caught:
        parse_axis("clip-skp=1,2")
    assert str(caught.value) == (
        "unknown grid axis 'clip-skp'; did you mean 'clip-skip'? Expected one of: seed, "
        "steps, cfg, sampler, schedule-type, clip-skip, emphasis, size, denoising, "
        "token-merging, checkpoint, vae, prompt-sr, lora, lora-te, lora-unet, merge-alpha, "
        "merge-blocks"
    )
    assert isinstance(caught.value, GridAxisError)


def test_a_reference_axis_sdstack_lacks_says_so():
    with pytest.raises(
        UnknownGridAxisError,
        match=r"^grid axis 'Hires steps' of the reference "
        r"is not supported \(sdstack has no such setting\); expected one of: seed",
    ):
        parse_axis("hires_steps=10,20")  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clip-skip", "grid axis 'clip-skip': expected AXIS=VALUES, e.g. clip-skip=1,2,3"),
        ("lora=0,1", "grid axis 'lora' needs the LoRA's name: lora:NAME=VALUES, e.g. lora:film"),
        ("steps:x=1", "grid axis 'steps:x': steps takes no ':NAME' part; expected steps=VALUES"),
    ],
)
def test_axis_text_forms(text, message):
    with pytest.raises(GridAxisError) as caught:
        parse_axis(text)
    assert str(caught.value).startswith(message)


# --- values checked for their setting ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "clip-skip=1,13",
            "grid axis 'clip-skip=1,13': Clip skip value must be between 1 and 12 (SD1 has 12 "
            "CLIP layers; 1 = last layer, 2 = penultimate), got 13",
        ),
        (
            "sampler=Euler a,Eular",
            "grid axis 'sampler=Euler a,Eular': unknown sampler 'Eular'; did you mean 'Euler'",
        ),
        (
            "size=512x512,512",
            "grid axis 'size=512x512,512': Size value '512' is not WIDTHxHEIGHT; expected e.g. "
            "512x768",
        ),
        (
            "size=500x512",
            "grid axis 'size=500x512': Size value '500x512': width 500 is not a multiple of 8 "
            "(nearest: 496 or 504)",
        ),
        ("size=32x64", "grid axis 'size=32x64': Size value '32x64' width must be between 64"),
        ("size=4096x4096", "grid axis 'size=4096x4096': Size value '4096x4096' is 16,777,216"),
        ("steps=0-2", "grid axis 'steps=0-2': Steps value must be between 1 and 1000, got 0"),
        ("seed=-2", "grid axis 'seed=-2': Seed value must be between 0 and 4294967295 (or -1"),
        ("cfg=7,101", "grid axis 'cfg=7,101': CFG Scale value must be between 0 and 100"),
        ("Denoising=1.5", "grid axis 'denoising=1.5': Denoising value must be between 0 and 1"),
        ("emphasis=loud", "grid axis 'emphasis=loud': Emphasis value: unknown emphasis mode"),
        ("schedule-type=Karas", "grid axis 'schedule-type=Karas': unknown schedule type 'Karas'"),
        ("lora:film=0,x", "grid axis 'lora:film=0,x': 'x' is not a number or a range"),
        (
            "lora-te:film=2000",
            "grid axis 'lora-te:film=2000': LoRA weight value: 2000.0 is not a multiplier; "
            "expected a number within +-1000",
        ),
        ("checkpoint=a,", "grid axis 'checkpoint=a,': Checkpoint name value is empty"),
        ("prompt-sr=,cat", "grid axis 'prompt-sr=,cat': the first value is the text to replace"),
        ("steps=", "grid axis 'steps=': '' gives no values"),
    ],
)
def test_bad_values_name_the_value_and_what_was_expected(text, message):
    with pytest.raises(GridAxisError) as caught:
        parse_axis(text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_values_are_typed_and_canonical():
    assert parse_axis("clip-skip=1-4").values == (1, 2, 3, 4)
    assert parse_axis("Clip skip=1,1.5,2").values == (1, 1.5, 2)
    assert parse_axis("schedule-type=karras, uniform").values == ("Karras", "Uniform")
    assert parse_axis("emphasis=No norm,original").values == ("no-norm", "original")
    assert parse_axis("size=512 x 768,640X640").values == ("512x768", "640x640")
    assert parse_axis("seed=-1,0,4294967295").values == (-1, 0, 4294967295)
    assert parse_axis("sampler=euler a,DPM++ 2M Karras").values == ("euler a", "DPM++ 2M Karras")
    axis = parse_axis("lora:my lora = 0-1 [3]")
    assert (axis.target, axis.values, axis.text) == ("my lora", (0.0, 0.5, 1.0), "0-1 [3]")


def test_make_axis_from_a_list_writes_the_csv_text():
    axis = make_axis("Prompt S/R", ["dog", "a, b"])
    assert axis.values == ("dog", "a, b") and axis.text == 'dog,"a, b"'
    assert parse_axis(f"Prompt S/R={axis.text}") == axis
    assert make_axis("clip-skip", [1, 1.5, "2"]).values == (1, 1.5, 2)
    with pytest.raises(GridAxisError, match="grid axis 'steps=\\[True\\]': True is not"):
        make_axis("steps", [True])
    with pytest.raises(GridAxisError, match="no values"):
        make_axis("steps", [])


# --- labels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("clip-skip=1,2,1.5", ["Clip skip: 1", "Clip skip: 2", "Clip skip: 1.5"]),
        ("cfg=7,7.5", ["CFG Scale: 7.0", "CFG Scale: 7.5"]),
        ("cfg=0-0.3 [4]", ["CFG Scale: 0.0", "CFG Scale: 0.1", "CFG Scale: 0.2", "CFG Scale: 0.3"]),
        ("seed=123", ["Seed: 123"]),
        ("steps=20", ["Steps: 20"]),
        ("Prompt S/R=dog,cat", ["dog", "cat"]),
        ("sampler=Euler a", ["Euler a"]),
        ("checkpoint=models/sd/a.safetensors,b.ckpt", ["a.safetensors", "b.ckpt"]),
        ("vae=vaes/x.safetensors,None", ["VAE: x.safetensors", "VAE: None"]),
        ("schedule-type=Karras", ["Schedule type: Karras"]),
        ("denoising=0.5", ["Denoising: 0.5"]),
        ("size=512x768", ["Size: 512x768"]),
        ("emphasis=original", ["Emphasis: original"]),
        ("lora:film=0,0.5", ["LoRA film: 0.0", "LoRA film: 0.5"]),
        ("lora-te:film=1", ["LoRA TE film: 1.0"]),
        ("lora-unet:film=1", ["LoRA UNet film: 1.0"]),
    ],
)
def test_labels_as_the_reference_formats_them(text, labels):
    assert parse_axis(text).labels() == labels


def test_float_labels_round_to_8_places():
    # format_value_add_label: round(x, 8) before f"{label}: {x}" (0.1 * 3 is 0.30000000000000004)
    axis = make_axis("cfg", [0.1 * 3, 1 / 3])
    assert axis.labels() == ["CFG Scale: 0.3", "CFG Scale: 0.33333333"]


# --- apply: each axis sets what it should and nothing else ------------------------------


@pytest.mark.parametrize(
    ("text", "value_index", "expected"),
    [
        ("seed=5,6", 1, {"seed": 6}),
        ("steps=3", 0, {"steps": 3}),
        ("cfg=4.5", 0, {"cfg_scale": 4.5}),
        ("sampler=Euler a", 0, {"sampler": "Euler a"}),
        ("schedule-type=Karras", 0, {"schedule_type": "Karras"}),
        ("clip-skip=1.5", 0, {"clip_skip": 1.5}),
        ("emphasis=No norm", 0, {"emphasis": "no-norm"}),
        ("size=640x384", 0, {"width": 640, "height": 384}),
        ("denoising=0.3", 0, {"denoising_strength": 0.3}),
        ("checkpoint=other.safetensors", 0, {"model": "other.safetensors", "model_hash": None}),
        ("vae=ft-mse.safetensors", 0, {"vae": "ft-mse.safetensors"}),
    ],
)
def test_each_axis_sets_its_field_only(text, value_index, expected):
    job = make_job()
    axis = parse_axis(text)
    after = axis.apply(job, axis.values[value_index])
    assert changes(job, after) == expected
    assert changes(job, make_job()) == {}  # the job itself is unchanged


def test_vae_none_is_the_checkpoints_own_and_automatic_keeps_the_jobs():
    job = dataclasses.replace(make_job(), vae="mine.pt")
    axis = parse_axis("vae=None,Automatic")
    assert axis.apply(job, "None").vae is None
    assert axis.apply(job, "Automatic") == job


def test_prompt_sr_replaces_every_occurrence_in_both_prompts():
    job = make_job("a dog and a dog", negative="dog hair")
    axis = parse_axis("Prompt S/R=dog,cat")
    first = axis.apply(job, "dog")  # the first value replaces itself
    assert changes(job, first) == {}
    cat = axis.apply(job, "cat")
    assert changes(job, cat) == {"prompt": "a cat and a cat", "negative": "cat hair"}
    only_negative = make_job("a photo", negative="blurry dog")
    assert axis.apply(only_negative, "cat").params.negative == "blurry cat"


def test_prompt_sr_not_found_is_an_error_before_any_work():
    axis = parse_axis("Prompt S/R=dog,cat")
    job = make_job("a photo of a horse", negative="")
    expected = (
        "Prompt S/R did not find 'dog' in the prompt or the negative prompt; the first value "
        "is the text to replace (prompt-sr=dog,cat for 'a dog')"
    )
    with pytest.raises(GridAxisError) as caught:
        axis.check(job)
    assert str(caught.value) == expected
    with pytest.raises(GridAxisError, match="did not find 'dog'"):
        axis.apply(job, "cat")
    parse_axis("steps=1").check(job)  # other axes have nothing to check


def lora_weights(prompt: str, name: str = "film") -> list[tuple[float, float, dict]]:
    """(te, unet, named) of every LoRA tag called ``name``, read by the prompt parser."""
    _, tags = extract_networks(prompt)
    return [(t.te, t.unet, t.named) for t in tags if t.kind == "lora" and t.name == name]


@pytest.mark.parametrize(
    ("tag", "axis", "written", "te", "unet"),
    [
        ("<lora:film:0.8>", "lora", "<lora:film:0.5>", 0.5, 0.5),
        ("<lora:film:0.8>", "lora-te", "<lora:film:0.5:0.8>", 0.5, 0.8),
        ("<lora:film:0.8>", "lora-unet", "<lora:film:0.8:0.5>", 0.8, 0.5),
        ("<lora:film>", "lora-unet", "<lora:film:1:0.5>", 1.0, 0.5),
        ("<lora:film:0.8:0.3>", "lora", "<lora:film:0.5>", 0.5, 0.5),
        ("<lora:film:0.8:0.3>", "lora-te", "<lora:film:0.5:0.3>", 0.5, 0.3),
        ("<lora:film:te=0.2:unet=0.4>", "lora-unet", "<lora:film:0.2:0.5>", 0.2, 0.5),
        ("<lora:film:1:1:8>", "lora", "<lora:film:0.5:0.5:8>", 0.5, 0.5),  # dyn stays 4th
        ("<lyco:film:1>", "lora", "<lyco:film:0.5>", 0.5, 0.5),
        ("<lora:film:0.8:lbw=MIDD>", "lora-te", "<lora:film:0.5:0.8:lbw=MIDD>", 0.5, 0.8),
    ],
)
def test_lora_axes_rewrite_the_tag_in_place(tag, axis, written, te, unet):
    job = make_job(f"a dog, {tag}, <lora:other:0.3> sharp")
    after = parse_axis(f"{axis}:film=0.5").apply(job, 0.5)
    assert after.params.prompt == f"a dog, {written}, <lora:other:0.3> sharp"
    (got,) = lora_weights(after.params.prompt)
    before = lora_weights(job.params.prompt)[0]
    assert got[:2] == (te, unet)
    assert {k: v for k, v in got[2].items() if k not in ("te", "unet")} == {
        k: v for k, v in before[2].items() if k not in ("te", "unet")
    }
    assert lora_weights(after.params.prompt, "other") == [(0.3, 0.3, {})]
    assert changes(job, after) == {"prompt": after.params.prompt}
    if ":8>" not in written:  # (sdstack refuses dyn; the reference reads it)
        after.check()  # the rewritten prompt is a valid job


def test_every_tag_of_that_lora_is_rewritten():
    job = make_job("<lora:film:1> a [dog:<lora:film:0.2>:5]")
    after = parse_axis("lora:film=0.25").apply(job, 0.25)
    assert after.params.prompt == "<lora:film:0.25> a [dog:<lora:film:0.25>:5]"


@pytest.mark.parametrize(
    ("axis", "entry"),
    [
        ("lora", LoraSpec("film", 0.5)),
        ("lora-te", LoraSpec("film", 0.5, 1.0)),
        ("lora-unet", LoraSpec("film", 1.0, 0.5)),
    ],
)
def test_without_a_tag_the_lora_goes_to_the_networks(axis, entry):
    job = dataclasses.replace(make_job(), networks=(("detail", 0.7),))
    after = parse_axis(f"{axis}:film=0.5").apply(job, 0.5)
    assert changes(job, after) == {"networks": (("detail", 0.7), entry)}


def test_an_existing_networks_entry_is_changed_in_place():
    job = dataclasses.replace(make_job(), networks=(("film", 0.7, 0.2), ("detail", 1.0)))
    after = parse_axis("lora-te:film=0.5").apply(job, 0.5)
    assert after.networks == (LoraSpec("film", 0.5, 0.2), ("detail", 1.0))
    both = parse_axis("lora:film=0.5").apply(job, 0.5)
    assert both.networks[0] == LoraSpec("film", 0.5)
    assert [s.unet_multiplier for s in both.lora_specs()] == [0.5, 1.0]


def test_every_cell_of_a_two_axis_grid_checks():
    job = make_job("a dog <lora:film:1>")
    x, y = parse_axis("clip-skip=1,2"), parse_axis("lora-unet:film=0,1")
    for vx, vy in itertools.product(x.values, y.values):
        cell = x.apply(y.apply(job, vy), vx)
        cell.check()
        assert (cell.params.clip_skip, lora_weights(cell.params.prompt)[0][1]) == (vx, vy)


# --- loop order by cost -----------------------------------------------------------------

CHECKPOINT, VAE, STEPS = "checkpoint=a", "vae=v", "steps=1"


def axes_of(x: str | None, y: str | None, z: str | None) -> dict[str, Axis | None]:
    return {k: parse_axis(v) if v else None for k, v in (("x", x), ("y", y), ("z", z))}


@pytest.mark.parametrize(
    ("x", "y", "z", "order"),
    [
        (STEPS, STEPS, STEPS, ("z", "y", "x")),  # default
        (STEPS, None, None, ("z", "y", "x")),
        (CHECKPOINT, VAE, STEPS, ("x", "y", "z")),  # x top; y > z
        (CHECKPOINT, STEPS, VAE, ("x", "z", "y")),  # x top; z > y
        (CHECKPOINT, STEPS, STEPS, ("x", "z", "y")),  # x top; tie: the later-named
        (CHECKPOINT, None, None, ("x", "z", "y")),
        (VAE, CHECKPOINT, STEPS, ("y", "x", "z")),  # y top; x > z
        (STEPS, CHECKPOINT, VAE, ("y", "z", "x")),  # y top; z > x
        (STEPS, CHECKPOINT, STEPS, ("y", "z", "x")),  # y top; tie
        (VAE, STEPS, CHECKPOINT, ("z", "x", "y")),  # z top; x > y
        (STEPS, VAE, CHECKPOINT, ("z", "y", "x")),  # z top; y > x
        (STEPS, STEPS, CHECKPOINT, ("z", "y", "x")),  # z top; tie
        (CHECKPOINT, CHECKPOINT, STEPS, ("z", "y", "x")),  # no strict top: default
        (CHECKPOINT, STEPS, CHECKPOINT, ("z", "y", "x")),
        (VAE, VAE, VAE, ("z", "y", "x")),
    ],
)
def test_loop_order_by_cost(x, y, z, order):
    assert loop_order(axes_of(x, y, z)) == order


@given(st.tuples(*[st.sampled_from([None, STEPS, VAE, CHECKPOINT])] * 3))
@settings(max_examples=64, deadline=None)
def test_loop_order_follows_the_rule(texts):
    axes = axes_of(*texts)
    cost = {a: axes[a].kind.cost if axes[a] else 0.0 for a in "xyz"}
    first, second, third = loop_order(axes)
    assert sorted((first, second, third)) == ["x", "y", "z"]
    others = [a for a in "xyz" if a != first]
    if all(cost[first] > cost[a] for a in others):  # a strict top goes outermost
        assert cost[second] >= cost[third]
        if cost[second] == cost[third]:
            assert second > third  # the later-named
    else:
        assert (first, second) == ("z", "y")
        assert not any(all(cost[a] > cost[b] for b in "xyz" if b != a) for a in "xyz")


# --- the size guard ---------------------------------------------------------------------


def test_grid_pixel_guard_message():
    check_grid_pixels(761, 1, 1, 512, 512)  # 199.49 MP rounds to 199 < 200
    with pytest.raises(GridSizeError) as caught:
        check_grid_pixels(762, 1, 1, 512, 512)  # 199.75 MP rounds to 200
    assert str(caught.value) == (
        "resulting grid would be too large (200 MPixels: 762x1x1 cells of 512x512); the "
        "maximum is 200 MPixels: raise it with --max-megapixels (max_megapixels= in "
        "Python), or use fewer values or a smaller size"
    )
    check_grid_pixels(762, 1, 1, 512, 512, max_megapixels=201)


def test_grid_pixel_guard_rounds_as_python_and_counts_every_axis():
    check_grid_pixels(1, 1, 1, 2500, 1000, max_megapixels=3)  # round(2.5) == 2
    with pytest.raises(GridSizeError, match=r"\(4 MPixels: 1x1x1 cells of 3500x1000\)"):
        check_grid_pixels(1, 1, 1, 3500, 1000, max_megapixels=4)  # round(3.5) == 4
    with pytest.raises(GridSizeError, match=r"\(2 MPixels: 2x3x4 cells of 256x256\)"):
        check_grid_pixels(2, 3, 4, 256, 256, max_megapixels=2)  # 24 x 65536 = 1.57 MP
    with pytest.raises(SettingError, match="max_megapixels must be a positive number"):
        check_grid_pixels(1, 1, 1, 64, 64, max_megapixels=0)


# --- seeds ------------------------------------------------------------------------------


def test_seeds_of_minus_one_are_drawn_once_per_grid():
    job = make_job().replace(seed=-1)
    axes = {"x": parse_axis("seed=-1,5,-1"), "y": parse_axis("steps=1,2"), "z": None}
    fixed_job, fixed = fix_seeds(job, axes, rng=random.Random(3))
    truth = random.Random(3)  # the job's seed first, then the axis's -1s in order
    draws = [truth.randrange(4294967294) for _ in range(3)]
    assert fixed_job.params.seed == draws[0]
    assert fixed["x"].values == (draws[1], 5, draws[2])
    assert fixed["x"].fixed_seeds and fixed["x"].text == "-1,5,-1"
    assert fixed["y"] == axes["y"] and fixed["z"] is None
    assert job.params.seed == -1 and axes["x"].values == (-1, 5, -1)  # inputs unchanged
    assert fixed["x"].labels() == [f"Seed: {draws[1]}", "Seed: 5", f"Seed: {draws[2]}"]


def test_a_fixed_job_seed_draws_nothing():
    _, fixed = fix_seeds(make_job(), {"x": parse_axis("seed=-1"), "y": None}, rng=random.Random(1))
    assert fixed["x"].values == (random.Random(1).randrange(4294967294),)


def test_vary_seeds_keeps_minus_one():
    job = make_job().replace(seed=-1)
    axes = {"x": parse_axis("seed=-1,5"), "y": None, "z": None}
    same_job, same = fix_seeds(job, axes, vary_seeds=True, rng=random.Random(0))
    assert same_job == job and same == axes and not same["x"].fixed_seeds


# --- infotext ---------------------------------------------------------------------------


def test_grid_infotext_fields():
    _, axes = fix_seeds(
        make_job(),
        {"x": parse_axis("seed=1,2"), "y": parse_axis("Clip skip=1-3"), "z": None},
        rng=random.Random(0),
    )
    fields = grid_infotext_fields(axes["x"], axes["y"], axes["z"])
    assert list(fields.items()) == [
        ("Script", "X/Y/Z plot"),
        ("X Type", "Seed"),
        ("X Values", "1,2"),
        ("Fixed X Values", "1, 2"),
        ("Y Type", "Clip skip"),
        ("Y Values", "1-3"),
    ]
    z = parse_axis("lora-te:film=0,1")
    with_z = grid_infotext_fields(None, None, z)
    assert with_z == {"Script": "X/Y/Z plot", "Z Type": "LoRA TE:film", "Z Values": "0,1"}
    assert parse_axis(f"{z.type_label}={z.text}") == z  # X Type + X Values read back
    unfixed = grid_infotext_fields(parse_axis("seed=-1"))
    assert "Fixed X Values" not in unfixed


# --- light imports ----------------------------------------------------------------------


def test_axes_import_and_parse_without_torch():
    code = (
        "import sys\n"
        "from sdstack.generate.grid_axes import parse_axis\n"
        "from sdstack.generate.job import GenerationJob\n"
        "from sdstack.generate.params import GenerationParams\n"
        "job = GenerationJob(GenerationParams('a dog <lora:film:1>'))\n"
        "for t in ('clip-skip=1-4', 'sampler=Euler a', 'cfg=0-1 [3]', 'lora:film=0,1',\n"
        "          'Prompt S/R=dog,cat', 'size=512x768'):\n"
        "    a = parse_axis(t); a.apply(job, a.values[-1]).check()\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


_values = st.one_of(
    st.text(alphabet=st.sampled_from('0123456789+-.,()[] "xXe9'), max_size=30),
    st.text(max_size=30),
    st.integers(-(10**500), 10**500).map(str),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([*GRID_AXES.names(), "lora:film", "Clip skip", "nope"]), _values)
def test_parse_axis_never_raises_anything_but_grid_axis_error(name, values):
    try:
        axis = parse_axis(f"{name}={values}")
    except GridAxisError:
        return
    assert axis.values and len(axis.labels()) == len(axis.values)
