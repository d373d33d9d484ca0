"""The public job: GenerationJob <-> infotext, prepare/sample/decode reuse, UNet hooks and
the step record (its ``denoised`` checked against diffusers' own ``pred_original_sample``)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sdstack.generate import (
    SAMPLERS,
    GenerationJob,
    GenerationParams,
    UNetCall,
    decode,
    generate,
    prepare,
    sample,
)
from sdstack.generate.denoise import denoised_estimate, noise_level
from sdstack.generate.infotext import build_infotext
from sdstack.generate.samplers import make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALL = {"width": 64, "height": 64, "steps": 3, "sampler": "Euler", "cfg_scale": 5.0}


def params(prompt="a red cat", **overrides) -> GenerationParams:
    return GenerationParams(prompt, **{**SMALL, **overrides})


def test_prepared_job_samples_any_seeds_like_generate(tiny_components):
    """One prepare, several sample() calls: the same latents generate() makes per seed."""
    prepared = prepare(tiny_components, params(seed=10))
    for seed in (10, 11):
        expected = generate(tiny_components, params(seed=seed))[0]
        latents = sample(prepared, [seed])
        # identical computation (same batch shape, same kernels): bit-equal
        assert list(decode(tiny_components, latents)[0].getdata()) == list(expected.image.getdata())
        assert prepared.infotext(seed) == expected.infotext


def test_job_infotext_round_trip(tiny_components):
    job = GenerationJob(params("a (red:1.2) cat", negative="ugly", seed=4, clip_skip=2))
    made = generate(tiny_components, job)[0]
    assert job.infotext(tiny_components, seed=4) == made.infotext
    again = GenerationJob.from_infotext(made.infotext)
    assert again.params == dataclasses.replace(job.params)
    assert again.unhonoured == {}
    assert again.model == tiny_components.name


def test_from_infotext_lists_what_it_cannot_honour():
    text = build_infotext(
        "a cat",
        "",
        {
            "Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x512",
            "Denoising strength": 0.7, "Hires upscale": 2, "Hires upscaler": "Latent",
            "Face restoration": "CodeFormer", "Version": "v1.10.1",
        },
    )  # fmt: skip
    job = GenerationJob.from_infotext(text, steps=5)
    assert job.params.steps == 5 and job.params.sampler == "Euler a"
    assert job.unhonoured == {
        "Denoising strength": "0.7",
        "Hires upscale": "2",
        "Hires upscaler": "Latent",
        "Face restoration": "CodeFormer",
        "RNG": "GPU",
    }


def test_hooks_see_every_unet_call_with_its_rows(tiny_components):
    seen: list[tuple[tuple[str, ...], int, tuple[int, ...]]] = []

    def spy(call: UNetCall) -> UNetCall:
        seen.append((call.row_kinds, call.step, tuple(call.encoder_hidden_states.shape)))
        assert math.isfinite(call.sigma) and call.sigma > 0
        return call

    prompt = "a red cat AND a blue sky"  # 2 AND parts + the negative in one call
    generate(tiny_components, params(prompt, batch_size=2, seed=1), hooks=[spy])
    kinds = ("cond",) * 4 + ("uncond",) * 2
    assert seen == [(kinds, step, (6, 77, 32)) for step in range(3)]


def test_a_hook_can_add_unet_inputs_and_change_the_conditioning(tiny_components):
    plain = generate(tiny_components, params(seed=2))[0]
    config = tiny_components.unet.config

    def zero_residuals(call: UNetCall) -> UNetCall:
        rows = call.sample.shape[0]
        down = [torch.zeros(rows, c, s, s) for c, s in _down_shapes(config, call.sample)]
        mid = torch.zeros(rows, config.block_out_channels[-1], *down[-1].shape[2:])
        kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return dataclasses.replace(call, unet_kwargs=kwargs)

    # adding zero residuals is an exact no-op (h + 0 == h)
    same = generate(tiny_components, params(seed=2), hooks=[zero_residuals])[0]
    assert list(same.image.getdata()) == list(plain.image.getdata())

    def no_text(call: UNetCall) -> UNetCall:
        return dataclasses.replace(call, encoder_hidden_states=call.encoder_hidden_states * 0)

    changed = generate(tiny_components, params(seed=2), hooks=[no_text])[0]
    assert list(changed.image.getdata()) != list(plain.image.getdata())


def _down_shapes(config, sample):
    """(channels, size) of each down-block residual of diffusers' UNet2DConditionModel."""
    size = sample.shape[-1]
    shapes = [(config.block_out_channels[0], size)]
    for index, channels in enumerate(config.block_out_channels):
        shapes += [(channels, size)] * config.layers_per_block
        if index < len(config.block_out_channels) - 1:
            size //= 2
            shapes.append((channels, size))
    return shapes


def test_a_hook_must_return_the_call(tiny_components):
    with pytest.raises(TypeError, match="a hook must return the UNetCall to make"):
        generate(tiny_components, params(seed=1), hooks=[lambda call: None])


def test_step_records_count_the_whole_job(tiny_components):
    records = []
    generate(tiny_components, params(batch_count=2, seed=1), callback=records.append)
    assert [(r.step, r.total, r.batch, r.batches) for r in records] == [
        (1, 6, 0, 2), (2, 6, 0, 2), (3, 6, 0, 2), (4, 6, 1, 2), (5, 6, 1, 2), (6, 6, 1, 2),
    ]  # fmt: skip
    assert records[-1].latents.shape == records[-1].denoised.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "Heun", "LMS", "DDIM", "DPM2"])
def test_denoised_matches_the_schedulers_own_estimate(tiny_components, name):
    """Independent truth: diffusers' ``pred_original_sample`` for the same call."""
    scheduler = make_scheduler(SAMPLERS[name], "Automatic", tiny_components.scheduler_config)
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps[:4]:
        model_input = scheduler.scale_model_input(latents, timestep)
        output = torch.randn(1, 4, 8, 8, generator=generator)
        sigma = noise_level(scheduler, timestep)
        ours = denoised_estimate(model_input, output, sigma, "epsilon")
        extra = {"generator": generator} if name == "Euler a" else {}
        step = scheduler.step(output, timestep, latents, **extra)
        latents = step.prev_sample
        truth = step.pred_original_sample
        if truth is None:  # DPM2's second stage reports none
            continue
        # x0 = x_t * sqrt(1 + s^2) - s * eps in float32, summed in another order than
        # diffusers: a few ulps (1.2e-7) of the largest term ~ (1 + s) * (1 + max|x|).
        # Measured: at most 4% of this bound on every sampler here.
        tolerance = 1e-6 * (1 + sigma) * (1 + latents.abs().max().item())
        assert torch.allclose(ours, truth, rtol=0, atol=tolerance)


def test_job_dtype_defaults_to_auto_and_is_checked():
    from sdstack.validate import SettingError

    job = GenerationJob(params())
    assert (job.dtype, job.device) == ("auto", "cpu")
    with pytest.raises(SettingError, match=r"dtype 'fp64': expected one of auto, fp32"):
        dataclasses.replace(job, dtype="fp64").check()


def test_job_load_uses_its_dtype_device_and_files(tiny_checkpoint):
    from sdstack.models.precision import resolve_dtypes
    from sdstack.validate import SettingError

    checkpoint, config = tiny_checkpoint
    job = GenerationJob(params(), model=str(checkpoint), dtype="bf16")
    model = job.load(config_dir=config)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    auto = dataclasses.replace(job, dtype="auto").load(config_dir=config)
    assert auto.dtypes == resolve_dtypes("auto", "cpu")
    with pytest.raises(SettingError, match="names no model"):
        GenerationJob(params()).load()
