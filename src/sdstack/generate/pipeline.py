"""txt2img and img2img with the reference UI's seeds, schedules and infotext.

The work is split so that a caller can reuse what is expensive:

1. :func:`prepare`: check the settings, encode the prompt schedules (and the init image)
   once -> a :class:`PreparedJob`;
2. :func:`sample`: denoise one batch from its seeds -> latents (any number of times per
   prepared job, any seeds);
3. :func:`decode`: VAE-decode latents to images.

:func:`sdstack.generate.run.generate` runs the three over ``batch_count`` batches. A
loaded model (``ModelComponents``) is reused across any number of jobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdstack.generate.denoise import GuidedDenoiser, run_denoising
from sdstack.generate.deprojected import deprojected_schedule, prepare_deprojected
from sdstack.generate.encoding import infotext_prompt_text
from sdstack.generate.hooks import StepCallback, StepRecord, UNetHook
from sdstack.generate.infotext import build_infotext, generation_fields
from sdstack.generate.latents import (
    decode_latents,
    encode_init_image,
    image_noise,
    img2img_start,
)
from sdstack.generate.params import GenerationParams, check_inputs
from sdstack.generate.samplers import SamplerSpec, make_scheduler, resolve_sampler
from sdstack.generate.token_merging import token_merging
from sdstack.validate import check_emphasis

__all__ = [
    "GeneratedImage",
    "PreparedJob",
    "decode",
    "decode_latents",
    "encode_init_image",
    "image_noise",
    "img2img_start",
    "prepare",
    "sample",
]

PhaseCallback = Callable[[str], None]
"""``on_phase(name)`` when a phase starts: "loras" (when the job has any), "encoding",
"sampling", "decoding"."""


@dataclass
class GeneratedImage:
    """One output image, the seed it was made with and its infotext."""

    image: Any  # PIL.Image.Image, RGB
    seed: int
    infotext: str
    index: int = 0


@dataclass
class PreparedJob:
    """A checked job with its conditioning encoded: sample it as often as you like.

    Attributes:
        components: the loaded model.
        params: the settings, sampler and emphasis names made canonical.
        spec, schedule_type: the sampler and the schedule type asked for.
        denoiser: the guided denoiser holding the encoded prompt schedules.
        init_latents: img2img start latents, or None.
        start, steps_run: the first step index and the number of steps run.
        fields: the infotext fields (``Seed`` set per image).
        calls_per_batch: denoiser calls one batch makes.
        loras: the LoRA stack the model carries (``sdstack.lora.LoraStack``) or None.
        infotext_prompt: the prompt the infotext writes (with tags for LoRAs that are
            not tags of the prompt).
    """

    components: Any
    params: GenerationParams
    spec: SamplerSpec
    schedule_type: str
    denoiser: GuidedDenoiser
    init_latents: torch.Tensor | None
    start: int
    steps_run: int
    fields: dict[str, Any]
    calls_per_batch: int
    loras: Any = None
    infotext_prompt: str | None = None

    def infotext(self, seed: int) -> str:
        """The reference infotext of the image made with ``seed``."""
        fields = {**self.fields, "Seed": seed}
        if self.denoiser.padded:
            fields["Pad conds"] = True  # reference: only when some call was padded
        prompt = self.params.prompt if self.infotext_prompt is None else self.infotext_prompt
        return build_infotext(prompt, self.params.negative, fields)


@torch.inference_mode()
def prepare(
    components: Any,
    params: GenerationParams,
    *,
    embeddings: Any = None,
    hooks: Sequence[UNetHook] = (),
    loras: Any = None,
    networks: Sequence[Any] = (),
    lora_hashes: Mapping[str, str] | None = None,
    controls: Sequence[Any] = (),
    control_options: Mapping[str, Any] | None = None,
    deprojector: Any = None,
) -> PreparedJob:
    """Check ``params``, apply its LoRA stack, encode the prompt, negative and init image.

    LoRAs: the prompt's ``<lora:...>`` tags, then ``networks``, found in ``loras`` (a
    ``LoraLibrary``; default: ``$SDSTACK_ROOT``'s LoRA folders), by name, then by the
    hash ``lora_hashes`` gives the name; applied through the model's patcher (see
    ``sdstack.lora.job_stack``). Prompt schedules (``[a:b:when]``, ``[a|b]``) are resolved
    over ``steps``, or ``2 * steps`` for the second-order samplers (Heun, DPM2, DPM2 a,
    DPM++ SDE) as the reference does. The empty prompt is encoded only with ``pad_conds``.
    ``controls`` (``sdstack.control.ControlUnit``) run their ControlNets on every UNet
    call (``sdstack.control.hook``); ``control_options`` may give ``root`` (where model
    names are found) and ``cache`` (a ``ControlNetCache`` shared across jobs).
    ``deprojector`` (a folder, ``Deprojector`` or ``JobDeprojector``; needed by and only
    by ``params.encoding == "deprojected"``) replaces the prompt's schedule with the
    deprojected expression (``sdstack.generate.deprojected``; "auto" clip skip = its N).

    Raises:
        SettingError, UnknownSamplerError, SamplerUnavailableError: bad settings.
        PromptNotSupportedError: extra-network tags other than LoRA.
        LoraNotFoundError, LoraFileError: a LoRA that cannot be found or used.
    """
    from sdstack.control.prepare import job_control_hooks
    from sdstack.lora.job_stack import infotext_prompt, prepare_job_loras, with_bundled_embeddings

    # 1. Check inputs; apply the LoRA stack; canonical names for the infotext.
    check_inputs(params)
    params, deprojected = prepare_deprojected(components, params, deprojector)
    params, stack = prepare_job_loras(
        components, params, networks=networks, hashes=lora_hashes, library=loras
    )
    embeddings = with_bundled_embeddings(embeddings, stack)
    spec, schedule_type = resolve_sampler(params.sampler, params.schedule_type)
    params = dataclasses.replace(
        params,
        sampler=spec.name,
        schedule_type=schedule_type,
        emphasis=check_emphasis(params.emphasis),
    )
    scheduler = make_scheduler(spec, schedule_type, components.scheduler_config)
    start, steps_run = 0, params.steps
    if params.is_img2img:
        start, steps_run = img2img_start(params.steps, params.denoising_strength)
    calls = len(_timesteps(scheduler, params.steps, start))
    # 2. The ControlNet units: models, control maps, their UNet hook.
    control_hooks, control_fields = job_control_hooks(
        components, params, controls, steps=steps_run, calls=calls, options=control_options
    )
    # 3. Encode the prompt schedules, the init image (img2img); the infotext fields.
    denoiser = _guided_denoiser(
        components, params, spec, embeddings, (*hooks, *control_hooks), deprojected
    )
    init_latents = None
    if params.is_img2img:
        init_latents = encode_init_image(
            components.vae, params.init_image, params.width, params.height, params.vae_tiling
        )
    used = _used_embeddings(denoiser)
    fields = generation_fields(
        params, components=components, embeddings=embeddings, used_embeddings=used, loras=stack
    )
    fields.update({**control_fields, **(deprojected.fields() if deprojected else {})})
    return PreparedJob(
        components, params, spec, schedule_type, denoiser, init_latents, start, steps_run,
        fields, calls, stack, infotext_prompt(infotext_prompt_text(params), stack),
    )  # fmt: skip


def _guided_denoiser(
    components: Any,
    params: GenerationParams,
    spec: SamplerSpec,
    embeddings: Any,
    hooks: Sequence[UNetHook],
    deprojected: Any = None,
) -> GuidedDenoiser:
    """The prompt and negative schedules encoded, in a denoiser with the hooks (the
    prompt's deprojected with a ``JobDeprojector``)."""
    from sdstack.text import PromptEncoder

    encoder = PromptEncoder(components.text_encoder, components.tokenizer, embeddings)
    style = {"clip_skip": params.clip_skip, "emphasis": params.emphasis}
    schedule_steps = spec.schedule_steps(params.steps)
    if deprojected is not None:
        cond = deprojected_schedule(params.prompt, deprojected, components, schedule_steps)
    else:
        cond = encoder.encode_schedule(params.prompt, schedule_steps, split_and=True, **style)
    uncond = encoder.encode_schedule(params.negative, schedule_steps, split_and=False, **style)
    empty = encoder.empty(**style) if params.pad_conds else None
    return GuidedDenoiser(
        components.unet,
        cond,
        uncond,
        params.cfg_scale,
        empty,
        pad_conds=params.pad_conds,
        hooks=hooks,
    )


def _timesteps(scheduler: Any, steps: int, start: int, device: Any = None) -> Any:
    scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps[start * scheduler.order :]


@torch.inference_mode()
def sample(
    prepared: PreparedJob,
    seeds: Sequence[int],
    *,
    callback: StepCallback | None = None,
    cancel: Any = None,
    batch: int = 0,
    batches: int = 1,
    done: int = 0,
) -> torch.Tensor:
    """Denoise one batch, image ``i`` from ``seeds[i]``; returns its latents.

    Each image's initial noise (and ancestral noise) comes from a CPU
    ``torch.Generator`` seeded with its seed (reference "RNG: CPU"). ``callback``
    receives a :class:`StepRecord` after every denoiser call; ``batch``, ``batches``
    and ``done`` (calls already made by earlier batches) place this batch in a job.

    Raises:
        GenerationCancelled: ``cancel`` was set.
    """
    components, params = prepared.components, prepared.params
    unet, scale = components.unet, components.vae_scale_factor
    shape = (unet.config.in_channels, params.height // scale, params.width // scale)
    noises, generators = zip(*(image_noise(seed, shape) for seed in seeds), strict=True)
    noise = torch.cat(noises).to(unet.device)
    scheduler = make_scheduler(prepared.spec, prepared.schedule_type, components.scheduler_config)
    if hasattr(scheduler, "noise_sampler_seed"):
        # DPM++ SDE: one Brownian tree per image from its own seed, as the reference's
        # BrownianTreeNoiseSampler(seed=seeds); diffusers' default draws one tree for the
        # batch from the global RNG, so no image would be reproducible.
        scheduler.noise_sampler_seed = list(seeds)
    timesteps = _timesteps(scheduler, params.steps, prepared.start, unet.device)
    if prepared.init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(prepared.start * scheduler.order)
        init = prepared.init_latents.to(unet.device).expand(len(seeds), -1, -1, -1)
        latents = scheduler.add_noise(init, noise, timesteps[:1])
    total = prepared.calls_per_batch * batches
    on_step = None
    if callback is not None:
        count = iter(range(done + 1, done + prepared.calls_per_batch + 1))

        def on_step(timestep: Any, sigma: float, state: torch.Tensor, x0: torch.Tensor) -> None:
            callback(StepRecord(next(count), total, batch, batches, timestep, sigma, state, x0))

    with token_merging(unet, params.token_merging):  # restores the UNet exactly after
        return run_denoising(
            scheduler,
            timesteps,
            latents,
            prepared.denoiser,
            generators=list(generators),
            on_step=on_step,
            cancel=cancel,
        )


@torch.inference_mode()
def decode(components: Any, latents: torch.Tensor, tiling: str = "auto") -> list[Any]:
    """RGB PIL images from latents, with the reference's pixel conversion
    (see :func:`sdstack.generate.latents.decode_latents`); ``tiling``: auto, on, off."""
    return decode_latents(components.vae, latents, tiling)


def _used_embeddings(denoiser: GuidedDenoiser) -> list[str]:
    names: list[str] = []
    for schedule in (denoiser.cond_schedule, denoiser.uncond_schedule):
        for _end, parts in schedule:
            for cond, _weight in parts:
                names += [n for n in getattr(cond, "embeddings_used", ()) if n not in names]
    return names


def __getattr__(name: str) -> Any:
    """``generate`` moved to :mod:`sdstack.generate.run`; importable from here still."""
    if name == "generate":
        from sdstack.generate.run import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
