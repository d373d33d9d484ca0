"""The ControlNet hook: residuals, control modes, guidance schedule, several units, and
the whole loop against diffusers' StableDiffusionControlNetPipeline on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdstack.control.hook import DOWN_KEY, MID_KEY, ControlNetHook, PreparedControl, sampler_step
from sdstack.control.modes import control_mode, control_scales
from sdstack.control.unit import ControlUnit
from sdstack.generate import GenerationParams, generate
from sdstack.generate.hooks import ROW_COND, ROW_UNCOND, UNetCall
from tests.generate import latent_atol
from tests.text import FORWARD_ULPS, U32

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def random_controlnet(unet, seed: int):
    """A ControlNet for ``unet``'s shapes with every weight random (zero convs included),
    so that its residuals are far from zero."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        for name, parameter in model.named_parameters():
            if (
                "controlnet_down_blocks" in name
                or "controlnet_mid_block" in name
                or ("conv_out" in name and "cond_embedding" in name)
            ):
                torch.nn.init.normal_(parameter, std=0.2)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def controlnets(tiny_components):
    return [random_controlnet(tiny_components.unet, seed) for seed in (1, 2)]


def hint_image(size: int = 64, seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def hint_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


def prepared(model, *, mode="Balanced", weight=1.0, start=0.0, end=1.0, image=None):
    unit = ControlUnit("none", "tiny", None, weight, start, end, control_mode=mode)
    return PreparedControl(unit, model, hint_tensor(image or hint_image()), "tiny [00000000]")


def a_call(rows_cond: int = 2, rows_uncond: int = 1, tokens: int = 77, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = rows_cond + rows_uncond
    sample = torch.randn(rows, 4, 8, 8, generator=generator)
    states = torch.randn(rows, tokens, 32, generator=generator)
    kinds = (ROW_COND,) * rows_cond + (ROW_UNCOND,) * rows_uncond
    return UNetCall(sample, torch.tensor(500), states, 0, 1.0, kinds, 1)


def direct(model, call, hint):
    down, mid = model(
        call.sample,
        call.timestep,
        encoder_hidden_states=call.encoder_hidden_states,
        controlnet_cond=hint.expand(call.sample.shape[0], -1, -1, -1),
        return_dict=False,
    )
    return [*down, mid]


def residuals(call):
    return [*call.unet_kwargs[DOWN_KEY], call.unet_kwargs[MID_KEY]]


def atol_of(outputs, scale=1.0):
    """float32 forward rounding relative to the largest residual (a batch of other rows
    may take another GEMM path): FORWARD_ULPS units of float32 of max|r|, times the scale."""
    return FORWARD_ULPS * U32 * scale * max(float(o.abs().max()) for o in outputs)


@torch.inference_mode()
def test_balanced_adds_weight_times_every_residual_to_every_row(controlnets):
    call = a_call()
    control = prepared(controlnets[0], weight=0.7)
    out = ControlNetHook([control], steps=10, calls=10)(call)
    truth = direct(controlnets[0], call, control.hint)
    assert len(residuals(out)) == 7  # the tiny UNet: 6 skip residuals + the middle
    for ours, theirs in zip(residuals(out), truth, strict=True):
        torch.testing.assert_close(ours, 0.7 * theirs, rtol=0, atol=atol_of(truth))


def test_scales_follow_the_reference_formulas():
    assert control_scales(control_mode("Balanced"), 0.8) == [0.8] * 13
    soft = control_scales(control_mode("My prompt is more important"), 1.0)
    assert soft[12] == 1.0 and soft[11] == pytest.approx(0.825)
    assert soft[0] == pytest.approx(0.825**12) == pytest.approx(0.09941, abs=1e-5)
    assert control_scales(control_mode("controlnet"), 2.0) == [2 * s for s in soft]


@torch.inference_mode()
def test_my_prompt_is_more_important_is_soft_injection_on_all_rows(controlnets):
    call = a_call()
    control = prepared(controlnets[0], mode="My prompt is more important", weight=1.5)
    out = ControlNetHook([control], steps=10, calls=10)(call)
    truth = direct(controlnets[0], call, control.hint)
    for i, (ours, theirs) in enumerate(zip(residuals(out), truth, strict=True)):
        scale = 1.5 * 0.825 ** (6 - i)
        torch.testing.assert_close(ours, scale * theirs, rtol=0, atol=atol_of(truth, 1.5))


@torch.inference_mode()
def test_controlnet_is_more_important_leaves_the_negative_rows_without_residual(controlnets):
    """Reference: run every row, multiply the uncond rows by cond_mark = 0. Ours runs only
    the cond rows: the same values up to the rounding of a smaller batch."""
    call = a_call(rows_cond=2, rows_uncond=2)
    call.row_kinds = (ROW_COND, ROW_UNCOND, ROW_COND, ROW_UNCOND)
    control = prepared(controlnets[0], mode="ControlNet is more important")
    out = ControlNetHook([control], steps=10, calls=10)(call)
    truth = direct(controlnets[0], call, control.hint)
    mark = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(4, 1, 1, 1)
    for i, (ours, theirs) in enumerate(zip(residuals(out), truth, strict=True)):
        expected = 0.825 ** (6 - i) * theirs * mark
        torch.testing.assert_close(ours, expected, rtol=0, atol=atol_of(truth))
        assert not ours[1].any() and not ours[3].any()


@torch.inference_mode()
def test_a_call_of_negative_rows_only_gets_nothing_in_cfg_injection(controlnets):
    call = a_call(rows_cond=0, rows_uncond=2)
    control = prepared(controlnets[0], mode="ControlNet is more important")
    assert ControlNetHook([control], steps=10, calls=10)(call) is call


@torch.inference_mode()
def test_two_units_add_and_add_to_residuals_already_there(controlnets):
    call = a_call()
    first = prepared(controlnets[0], weight=0.5)
    second = prepared(controlnets[1], weight=1.25, image=hint_image(seed=9))
    earlier = [torch.full_like(r, 0.5) for r in direct(controlnets[0], call, first.hint)]
    call.unet_kwargs = {DOWN_KEY: tuple(earlier[:-1]), MID_KEY: earlier[-1]}
    out = ControlNetHook([first, second], steps=10, calls=10)(call)
    a = direct(controlnets[0], call, first.hint)
    b = direct(controlnets[1], call, second.hint)
    for ours, x, y in zip(residuals(out), a, b, strict=True):
        torch.testing.assert_close(ours, 0.5 + 0.5 * x + 1.25 * y, rtol=0, atol=atol_of(a + b, 2))


def test_guidance_schedule_is_inclusive_fractions_of_the_steps(controlnets):
    """Reference: skipped when pct < start or pct > end, pct = step / steps."""
    control = prepared(controlnets[0], start=0.2, end=0.5)
    hook = ControlNetHook([control], steps=10, calls=10)
    assert [k for k in range(10) if hook.active(k)] == [2, 3, 4, 5]
    late = ControlNetHook([prepared(controlnets[0], start=0.75, end=1.0)], steps=4, calls=4)
    assert [k for k in range(4) if late.active(k)] == [3]


def test_second_order_calls_map_to_their_sampler_step():
    # Heun over 4 steps: 7 denoiser calls, two per step except the last.
    assert [sampler_step(k, 7, 4) for k in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [sampler_step(k, 5, 5) for k in range(5)] == [0, 1, 2, 3, 4]


class SpyUNet:
    """Forwards to a real UNet; records each call's context length and residual presence."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.device, self.dtype, self.config = inner.device, inner.dtype, inner.config

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.calls.append((encoder_hidden_states.shape, DOWN_KEY in kwargs))
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


SMALL = {"width": 64, "height": 64, "steps": 4, "sampler": "Euler", "cfg_scale": 5.0, "seed": 4}


def test_guidance_end_switches_the_unet_calls_in_a_real_run(tiny_components, controlnets):
    import dataclasses

    spy = SpyUNet(tiny_components.unet)
    components = dataclasses.replace(tiny_components, unet=spy)
    control = prepared(controlnets[0], end=0.5)
    hook = ControlNetHook([control], steps=4, calls=4)
    generate(components, GenerationParams("a cat", **SMALL), hooks=[hook])
    assert [has for _shape, has in spy.calls] == [True, True, True, False]


def test_long_prompt_and_parts_reach_the_controlnet(tiny_components, controlnets):
    """A 3-chunk prompt with an AND part: the ControlNet sees the UNet's 231-token rows."""
    seen = []

    class SpyControl(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
            seen.append(tuple(encoder_hidden_states.shape))
            return controlnets[0](sample, timestep, encoder_hidden_states, **kwargs)

    prompt = ", ".join(["a red cat on a mat"] * 30) + " AND a dog"
    hook = ControlNetHook([prepared(SpyControl())], steps=2, calls=2)
    results = generate(
        tiny_components, GenerationParams(prompt, **{**SMALL, "steps": 2}), hooks=[hook]
    )
    plain = generate(tiny_components, GenerationParams(prompt, **{**SMALL, "steps": 2}))
    assert seen[0][1] == 231 and seen[0][0] == 2  # the two AND parts, padded to 231 tokens
    assert seen[1][1] == 77  # the negative prompt: its own call
    assert not np.array_equal(np.asarray(results[0].image), np.asarray(plain[0].image))


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_balanced_matches_diffusers_controlnet_pipeline(tiny_components, controlnets, weight):
    """Independent truth: diffusers' StableDiffusionControlNetPipeline on the same UNet,
    ControlNet, scheduler, image and seed; final latents agree to the bound of
    ``latent_atol`` (the negative's row is first in diffusers' batch, last in ours)."""
    from diffusers import StableDiffusionControlNetPipeline

    from sdstack.generate.samplers import make_scheduler, resolve_sampler

    spec, schedule = resolve_sampler("Euler")
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_components.vae,
        text_encoder=tiny_components.text_encoder,
        tokenizer=tiny_components.tokenizer,
        unet=tiny_components.unet,
        controlnet=controlnets[0],
        scheduler=make_scheduler(spec, schedule, tiny_components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    image = hint_image()
    theirs = pipe(
        "a red cat",
        image=image,
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=64,
        width=64,
        controlnet_conditioning_scale=weight,
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    ).images
    finals = []
    hook = ControlNetHook([prepared(controlnets[0], weight=weight, image=image)], steps=4, calls=4)
    generate(
        tiny_components,
        GenerationParams("a red cat", negative="blurry", **SMALL),
        hooks=[hook],
        callback=lambda record: finals.append(record.latents.clone()),
    )
    plain = []
    generate(
        tiny_components,
        GenerationParams("a red cat", negative="blurry", **SMALL),
        callback=lambda record: plain.append(record.latents.clone()),
    )
    atol = latent_atol(len(finals), theirs, 5.0)
    torch.testing.assert_close(finals[-1], theirs, rtol=0, atol=atol)
    assert (finals[-1] - plain[-1]).abs().max() > 100 * atol  # the ControlNet did act
