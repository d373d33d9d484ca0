"""generate() on the tiny model: seeds, batches, samplers, img2img, schedules, progress."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import numpy as np
import pytest
import torch

from sdstack.generate import (
    SAMPLERS,
    GenerationCancelled,
    GenerationParams,
    GenerationParamsError,
    UnknownSamplerError,
    generate,
)
from sdstack.generate.pipeline import decode_latents, image_noise, img2img_start
from sdstack.text import PromptEncoder
from tests.generate import latent_atol
from tests.text import assert_forward_close, forward_atol

# diffusers' schedulers trip numpy 2 deprecation warnings on every step
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALL = {"width": 64, "height": 64, "steps": 3, "sampler": "Euler", "cfg_scale": 5.0}


def run(components, prompt="a red cat", *, callback=None, cancel=None, on_image=None, **overrides):
    params = GenerationParams(prompt, **{**SMALL, **overrides})
    return generate(components, params, callback=callback, cancel=cancel, on_image=on_image)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image)


class SpyUNet:
    """Forwards to a real UNet and records each call's encoder_hidden_states."""

    def __init__(self, inner):
        self.inner, self.contexts = inner, []
        self.device, self.dtype, self.config = inner.device, inner.dtype, inner.config

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.contexts.append(encoder_hidden_states.clone())
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states)


def test_same_seed_same_pixels_other_seed_differs(tiny_components):
    first, again = run(tiny_components, seed=11), run(tiny_components, seed=11)
    other = run(tiny_components, seed=12)
    assert first[0].image.size == (64, 64) and first[0].image.mode == "RGB"
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))
    assert "Seed: 11," in first[0].infotext


def test_batch_image_i_uses_seed_plus_i(tiny_components):
    """Ancestral noise too comes from the image's own generator, so batching is invisible."""
    batch = run(tiny_components, seed=40, batch_size=2, batch_count=2, sampler="Euler a")
    assert [r.seed for r in batch] == [40, 41, 42, 43]
    single = run(tiny_components, seed=43, sampler="Euler a")
    diff = np.abs(pixels(batch[3]).astype(int) - pixels(single[0]).astype(int))
    # Batched kernels round differently: within one level (derived and measured in
    # test_batch_consistency.py).
    assert diff.max() <= 1
    assert "Seed: 43," in batch[3].infotext


def test_random_seed_drawn_once(tiny_components):
    results = run(tiny_components, seed=-1, batch_size=2)
    assert results[1].seed == results[0].seed + 1


def test_initial_noise_is_reference_cpu_rng():
    with torch.random.fork_rng(devices=[]):  # the reference's own calls; state restored
        torch.manual_seed(1234)
        expected = torch.randn(4, 8, 8)
    noise, _ = image_noise(1234, (4, 8, 8))
    assert torch.equal(noise[0], expected)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs(tiny_components, name):
    requires = SAMPLERS[name].requires
    if requires and importlib.util.find_spec(requires) is None:
        pytest.skip(f"{name} needs {requires}")
    result = run(tiny_components, sampler=name, steps=2, seed=3)
    array = pixels(result[0])
    assert array.shape == (64, 64, 3) and array.std() > 0
    assert f"Sampler: {name}," in result[0].infotext


def test_unknown_sampler_is_refused_before_work(tiny_components):
    with pytest.raises(UnknownSamplerError, match=re.escape("did you mean 'DPM++ 2M'")):
        run(tiny_components, sampler="DPM+ 2M")


def test_size_must_be_multiple_of_8(tiny_components):
    with pytest.raises(ValueError, match=r"width must be a multiple of 8, got 100"):
        run(tiny_components, width=100)


def test_other_network_tags_are_refused_and_missing_loras_named(tiny_components, monkeypatch):
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    with pytest.raises(ValueError, match=r"extra-network tag\(s\) <hypernet:x>: only <lora"):
        run(tiny_components, prompt="a cat <hypernet:x:0.8>")
    with pytest.raises(ValueError, match=r"^no LoRA named 'detail' \(no LoRA folder: give"):
        run(tiny_components, prompt="a cat <lora:detail:0.8>")


def test_img2img_strength_sets_steps_and_changes_result(tiny_components):
    init = run(tiny_components, seed=5)[0].image
    counts: dict[float, int] = {}
    images = {}
    for strength in (0.3, 0.8):
        calls = []
        result = run(
            tiny_components,
            seed=6,
            steps=5,
            init_image=init,
            denoising_strength=strength,
            callback=lambda *a, c=calls: c.append(a),
        )
        counts[strength] = len(calls)
        images[strength] = pixels(result[0])
        assert f"Denoising strength: {strength}," in result[0].infotext
    # reference k-diffusion img2img: int(strength * steps) + 1 steps run
    assert counts == {0.3: 2, 0.8: 5}
    assert not np.array_equal(images[0.3], images[0.8])


def test_img2img_start():
    assert img2img_start(20, 0.75) == (4, 16)
    assert img2img_start(20, 1.0) == (0, 20)
    assert img2img_start(20, 0.0) == (19, 1)


def test_schedule_switches_at_the_right_call(tiny_components):
    """`a [cat:dog:2] x`, 4 steps: calls 0-2 see 'a cat x', call 3 sees 'a dog x'."""
    spy = SpyUNet(tiny_components.unet)
    components = dataclasses.replace(tiny_components, unet=spy)
    run(components, prompt="a [cat:dog:2] x", negative="blur", steps=4)
    encoder = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer)
    cat, dog = (encoder.encode(t).tensor[0] for t in ("a cat x", "a dog x"))
    negative = encoder.encode("blur").tensor[0]
    assert len(spy.contexts) == 4
    for call, context in enumerate(spy.contexts):
        # All weights 1; the job encodes "a cat x" and "a dog x" in one forward (one call).
        assert_forward_close(context[0], cat if call <= 2 else dog)
        assert_forward_close(context[1], negative)


def test_second_order_samplers_schedule_over_twice_the_steps(tiny_components):
    """Reference: Heun resolves schedules over 2*steps and counts denoiser calls."""
    spy = SpyUNet(tiny_components.unet)
    components = dataclasses.replace(tiny_components, unet=spy)
    run(components, prompt="a [cat:dog:0.5] x", steps=3, sampler="Heun")
    encoder = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer)
    cat = encoder.encode("a cat x").tensor[0]
    # cat and dog differ by ~1; batched encodings of one agree to forward rounding.
    uses_cat = [torch.allclose(c[0], cat, rtol=0, atol=forward_atol(cat)) for c in spy.contexts]
    assert uses_cat == [True, True, True, True, False]  # when = int(0.5 * 6) = 3


def test_and_parts_batched_with_weights(tiny_components):
    spy = SpyUNet(tiny_components.unet)
    components = dataclasses.replace(tiny_components, unet=spy)
    run(components, prompt="a cat AND a dog :0.5", steps=2, batch_size=2)
    assert [c.shape[0] for c in spy.contexts] == [6, 6]  # (2 parts + negative) x 2 images


def test_progress_callback_and_cancel(tiny_components):
    seen = []
    run(
        tiny_components,
        batch_count=2,
        callback=lambda r: seen.append((r.step, r.total, tuple(r.latents.shape))),
    )
    assert seen == [(i, 6, (1, 4, 8, 8)) for i in range(1, 7)]
    with pytest.raises(GenerationCancelled):
        run(tiny_components, cancel=lambda: True)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M"])
def test_matches_diffusers_pipeline(tiny_components, sampler):
    """Independent truth: diffusers' StableDiffusionPipeline, same weights, scheduler, seed.

    The final latents must agree to float32 rounding; the pixels then follow the
    reference's conversion, checked against diffusers' decoded image with that formula.
    """
    from sdstack.generate.samplers import make_scheduler, resolve_sampler

    spec, schedule = resolve_sampler(sampler)
    pipe = tiny_components.diffusers_pipeline(
        make_scheduler(spec, schedule, tiny_components.scheduler_config)
    )
    pipe.set_progress_bar_config(disable=True)
    settings = {"negative_prompt": "blurry", "num_inference_steps": 3, "guidance_scale": 5.0}
    settings |= {"height": 64, "width": 64}
    latents = pipe(
        "a red cat", output_type="latent", generator=torch.Generator().manual_seed(21), **settings
    ).images
    decoded = pipe(
        "a red cat", output_type="pt", generator=torch.Generator().manual_seed(21), **settings
    ).images[0]
    finals = []
    ours = run(
        tiny_components,
        negative="blurry",
        sampler=sampler,
        seed=21,
        callback=lambda record: finals.append(record.latents.clone()),
    )
    # Not the identical batched computation: diffusers puts the negative's UNet row first,
    # we put it last, and some GEMM paths round by row position (MKL_CBWR=COMPATIBLE with
    # one thread: 4.8e-5 after 3 steps; the default AVX-512 path: equal). Bound: latent_atol.
    atol = latent_atol(len(finals), latents, settings["guidance_scale"])
    torch.testing.assert_close(finals[-1], latents, rtol=0, atol=atol)
    # diffusers' [0, 1] image is (x / 2 + 0.5).clamp(0, 1); the reference's is (x + 1) / 2.
    # The two formulas differ by one float32 rounding and the decoded values by far less
    # than 2 / 255, so a truncated value moves by at most one level.
    expected = (255.0 * decoded.permute(1, 2, 0).numpy()).astype(np.uint8)
    assert np.abs(pixels(ours[0]).astype(int) - expected).max() <= 1


def test_decoded_pixels_follow_the_reference_conversion(tiny_components):
    """Reference: ``x = clamp((x + 1) / 2, 0, 1)``, then ``(255 * x).astype(uint8)`` (truncates)."""
    vae = tiny_components.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        images = decode_latents(vae, latents)
        x = vae.decode(latents / vae.config.scaling_factor).sample.float()
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).numpy()
    for image, sample in zip(images, x, strict=True):
        expected = (255.0 * np.moveaxis(sample, 0, 2)).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)


def test_embeddings_change_result_and_write_ti_hashes(tiny_components):
    from sdstack.text import Embedding

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    library = {"mytoken": Embedding("mytoken", vectors, None, "abcdef123456")}
    params = GenerationParams("a photo of mytoken", **SMALL, seed=4)
    with_ti = generate(tiny_components, params, embeddings=library)[0]
    without = generate(tiny_components, params)[0]
    assert 'TI hashes: "mytoken: abcdef123456", Version' in with_ti.infotext
    assert "TI hashes" not in without.infotext
    assert not np.array_equal(pixels(with_ti), pixels(without))


def test_emphasis_and_clip_skip_reach_the_encoder(tiny_components):
    base = run(tiny_components, prompt="a (red:1.5) cat", seed=8)[0]
    no_norm = run(tiny_components, prompt="a (red:1.5) cat", seed=8, emphasis="no-norm")[0]
    skip = run(tiny_components, prompt="a (red:1.5) cat", seed=8, clip_skip=2)[0]
    assert "Emphasis: No norm, Version" in no_norm.infotext
    assert "Clip skip: 2, RNG: CPU" in skip.infotext and "Clip skip" not in base.infotext
    assert not np.array_equal(pixels(base), pixels(no_norm))
    assert not np.array_equal(pixels(base), pixels(skip))


def test_img2img_moves_further_from_init_with_strength(tiny_components):
    from sdstack.generate.pipeline import encode_init_image

    init = run(tiny_components, seed=1)[0].image
    init_latents = encode_init_image(tiny_components.vae, init, 64, 64)
    distances = []
    for strength in (0.0, 0.5, 1.0):
        final = {}
        run(
            tiny_components,
            seed=2,
            steps=5,
            cfg_scale=1.0,
            init_image=init,
            denoising_strength=strength,
            callback=lambda record, final=final: final.update(x=record.latents),
        )
        distances.append((final["x"] - init_latents).abs().mean().item())
    assert distances[0] < 0.1 < distances[1] < distances[2]


LONG_PROMPT = ", ".join(["a red cat"] * 30)  # > 75 tokens: two chunks


@pytest.mark.parametrize("pad_conds", [False, True])
def test_long_prompt_short_negative_calls_and_infotext(tiny_components, pad_conds):
    """Reference CFGDenoiser: unequal lengths -> positive and negative in separate calls;
    with "Pad prompt/negative prompt" the negative gets the empty prompt's chunk and one
    call is made, and the infotext says ``Pad conds: True``."""
    spy = SpyUNet(tiny_components.unet)
    components = dataclasses.replace(tiny_components, unet=spy)
    result = run(components, prompt=LONG_PROMPT, negative="blurry", steps=2, pad_conds=pad_conds)
    encoder = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer)
    prompt, negative = encoder.encode(LONG_PROMPT).tensor, encoder.encode("blurry").tensor
    assert prompt.shape[1] == 154
    if pad_conds:
        padded = torch.cat([negative, encoder.empty().tensor], dim=1)
        assert [c.shape[:2] for c in spy.contexts] == [(2, 154)] * 2
        # Unweighted texts: exactly the forward outputs, possibly batched differently.
        assert_forward_close(spy.contexts[0], torch.cat([prompt, padded]))
        assert "RNG: CPU, Pad conds: True, Version" in result[0].infotext
    else:
        assert [c.shape[:2] for c in spy.contexts] == [(1, 154), (1, 77)] * 2
        assert_forward_close(spy.contexts[0], prompt)
        assert_forward_close(spy.contexts[1], negative)
        assert "Pad conds" not in result[0].infotext


def test_pad_conds_changes_the_image_only_for_unequal_lengths(tiny_components):
    def both(prompt):
        return [
            run(tiny_components, prompt, negative="blurry", seed=3, pad_conds=p)[0]
            for p in (False, True)
        ]

    short = both("a red cat")
    assert np.array_equal(pixels(short[0]), pixels(short[1]))
    assert short[0].infotext == short[1].infotext  # nothing padded: no "Pad conds"
    long = both(LONG_PROMPT)
    assert not np.array_equal(pixels(long[0]), pixels(long[1]))


def test_pad_conds_must_be_bool(tiny_components):
    with pytest.raises(ValueError, match=r"pad_conds must be True or False, got 1"):
        run(tiny_components, pad_conds=1)


def test_fractional_clip_skip_blends_and_is_recorded(tiny_components):
    """clip_skip=1.5 is neither 1 nor 2, and the infotext records it."""
    one, half, two = (run(tiny_components, seed=3, clip_skip=c)[0] for c in (1, 1.5, 2))
    assert "Clip skip: 1.5" in half.infotext
    assert not np.array_equal(pixels(half), pixels(one))
    assert not np.array_equal(pixels(half), pixels(two))
    with pytest.raises(GenerationParamsError, match=r"clip_skip must be between 1 and 12 .*0.5"):
        run(tiny_components, clip_skip=0.5)


def test_on_image_delivers_finished_batches_before_a_later_cancel(tiny_components):
    """Images reach ``on_image`` as they are decoded: a cancel in batch 2 keeps batch 1."""
    delivered = []
    calls = {"n": 0}

    def cancel_in_second_batch() -> bool:
        calls["n"] += 1
        return calls["n"] > SMALL["steps"]  # checked before each call: batch 2's first

    with pytest.raises(GenerationCancelled):
        run(
            tiny_components,
            seed=11,
            batch_size=2,
            batch_count=2,
            cancel=cancel_in_second_batch,
            on_image=delivered.append,
        )
    assert [result.seed for result in delivered] == [11, 12]
    single = run(tiny_components, seed=12)[0]  # within one level: test_batch_consistency.py
    assert np.abs(pixels(delivered[1]).astype(int) - pixels(single)).max() <= 1
