"""txt2img and img2img with the reference UI's seeds, schedules and infotext."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sdstack.generate.denoise import GuidedDenoiser, run_denoising
from sdstack.generate.infotext import build_infotext, generation_fields
from sdstack.generate.params import MAX_SEED, GenerationParams, check_inputs
from sdstack.generate.samplers import SamplerSpec, make_scheduler, resolve_sampler

ProgressCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class GeneratedImage:
    """One output image, the seed it was made with and its infotext."""

    image: Any  # PIL.Image.Image, RGB
    seed: int
    infotext: str
    index: int = 0


def reject_network_tags(prompt: str) -> None:
    """Extra-network tags (``<lora:name:1>``) are not applied yet: refuse, naming the tag.

    Raises:
        ValueError: the prompt holds a tag.
    """
    from sdstack.prompt import extract_networks

    _text, tags = extract_networks(prompt)
    if tags:
        names = ", ".join(f"<{tag.kind}:{tag.name}>" for tag in tags)
        raise ValueError(
            f"prompt contains extra-network tag(s) {names}: LoRA/extra networks are not "
            "supported yet; remove the tag(s) from the prompt"
        )


def image_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Generator]:
    """Reference "RNG: CPU" initial noise: ``torch.randn(shape)`` from a CPU generator seeded
    with ``seed``; the generator is returned to continue (ancestral/SDE noise)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32), generator


def img2img_start(steps: int, strength: float) -> tuple[int, int]:
    """Reference k-diffusion img2img: ``t_enc = int(min(strength, 0.999) * steps)``.

    The reference keeps the ``steps``-step schedule and runs its last ``t_enc + 1``
    steps (``sigmas[steps - t_enc - 1:]``), starting from the init latents plus noise at
    that step's sigma (diffusers ``add_noise`` at that timestep). Prompt schedules stay
    resolved over the full ``steps`` and are indexed from the first call that runs, as
    in the reference. Returns ``(first step index, steps run)``.
    """
    t_enc = int(min(strength, 0.999) * steps)
    steps_run = min(t_enc + 1, steps)
    return steps - steps_run, steps_run


def encode_init_image(vae: Any, image: Any, width: int, height: int) -> torch.Tensor:
    """VAE-encode an init image resized to ``width x height`` (Lanczos), as the posterior
    mean times ``scaling_factor`` (deterministic; the reference samples the posterior)."""
    import numpy as np
    from PIL import Image

    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None]
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """VAE decode ``latents / scaling_factor`` to RGB PIL images, as the reference does.

    ``x = clamp((x + 1) / 2, 0, 1)``, then ``(255 * x).astype(uint8)``: the reference
    truncates, where diffusers rounds, so about half the pixel values are one level lower
    than diffusers' output for the same latents.
    """
    import numpy as np
    from PIL import Image

    scaled = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    pixels = torch.clamp((vae.decode(scaled).sample.float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * pixels.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [Image.fromarray(array, mode="RGB") for array in arrays]


@dataclass
class _Job:
    components: Any
    params: GenerationParams
    spec: SamplerSpec
    schedule_type: str
    denoiser: GuidedDenoiser
    init_latents: torch.Tensor | None
    start: int
    steps_run: int


def _run_batch(job: _Job, seeds: list[int], on_step: Callable, cancel: Any) -> torch.Tensor:
    params, unet = job.params, job.components.unet
    scale = job.components.vae_scale_factor
    shape = (unet.config.in_channels, params.height // scale, params.width // scale)
    noises, generators = zip(*(image_noise(seed, shape) for seed in seeds), strict=True)
    noise = torch.cat(noises).to(unet.device)
    scheduler = make_scheduler(job.spec, job.schedule_type, job.components.scheduler_config)
    scheduler.set_timesteps(params.steps, device=unet.device)
    timesteps = scheduler.timesteps[job.start * scheduler.order :]
    if job.init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(job.start * scheduler.order)
        init = job.init_latents.to(unet.device).expand(len(seeds), -1, -1, -1)
        latents = scheduler.add_noise(init, noise, timesteps[:1])
    return run_denoising(
        scheduler,
        timesteps,
        latents,
        job.denoiser,
        generators=list(generators),
        on_step=on_step,
        cancel=cancel,
    )


def _prepare(components: Any, params: GenerationParams, embeddings: Any) -> _Job:
    from sdstack.text import PromptEncoder

    spec, schedule_type = resolve_sampler(params.sampler, params.schedule_type)
    encoder = PromptEncoder(components.text_encoder, components.tokenizer, embeddings)
    style = {"clip_skip": params.clip_skip, "emphasis": params.emphasis}
    schedule_steps = spec.schedule_steps(params.steps)
    cond = encoder.encode_schedule(params.prompt, schedule_steps, split_and=True, **style)
    uncond = encoder.encode_schedule(params.negative, schedule_steps, split_and=False, **style)
    # The empty prompt pads conditionings only with pad_conds: skip its forward otherwise.
    empty = encoder.empty(**style) if params.pad_conds else None
    denoiser = GuidedDenoiser(
        components.unet, cond, uncond, params.cfg_scale, empty, pad_conds=params.pad_conds
    )
    init_latents, start, steps_run = None, 0, params.steps
    if params.is_img2img:
        start, steps_run = img2img_start(params.steps, params.denoising_strength)
        init_latents = encode_init_image(
            components.vae, params.init_image, params.width, params.height
        )
    return _Job(components, params, spec, schedule_type, denoiser, init_latents, start, steps_run)


def _used_embeddings(denoiser: GuidedDenoiser) -> list[str]:
    names: list[str] = []
    for schedule in (denoiser.cond_schedule, denoiser.uncond_schedule):
        for _end, parts in schedule:
            for cond, _weight in parts:
                names += [n for n in getattr(cond, "embeddings_used", ()) if n not in names]
    return names


@torch.inference_mode()
def generate(
    components: Any,
    params: GenerationParams,
    *,
    embeddings: Any = None,
    callback: ProgressCallback | None = None,
    cancel: Any = None,
    on_image: Callable[[GeneratedImage], None] | None = None,
) -> list[GeneratedImage]:
    """Reference txt2img/img2img: ``batch_count`` batches of ``batch_size`` images.

    Seeds: ``params.seed`` (``-1`` draws one at random, once); image ``i`` of the job
    uses ``seed + i``; its initial noise (and ancestral noise) comes from a CPU
    ``torch.Generator`` seeded with that seed, so results do not depend on the batch
    size or the device's RNG (infotext ``RNG: CPU``).

    Prompt schedules (``[a:b:when]``, ``[a|b]``) are resolved over ``steps``, or
    ``2 * steps`` for the second-order samplers (Heun, DPM2, DPM2 a, DPM++ SDE) as the
    reference does, and indexed by the 0-based denoiser call. Guidance per call:
    ``u + cfg * sum_i w_i * (c_i - u)`` over the AND parts (see ``denoise``). Prompt and
    negative of different token lengths run as two UNet calls, or, with
    ``params.pad_conds``, padded with empty-prompt chunks into one call (the infotext
    then gets ``Pad conds: True``, as in the reference, when padding happened).

    Args:
        components: a loaded model (:class:`sdstack.models.ModelComponents`).
        params: the settings; checked first.
        embeddings: an ``EmbeddingLibrary`` for textual-inversion names in prompts.
        callback: ``callback(step, total_steps, latents)`` after every denoiser call;
            ``step`` counts from 1 over the whole job, ``total_steps`` = denoiser calls
            of all batches.
        cancel: ``threading.Event``-like or callable; checked before every denoiser call.
        on_image: ``on_image(result)`` for each image as soon as it is decoded, before the
            next batch starts (so a caller can save it: a later failure or cancellation
            then loses nothing already made).

    Returns:
        One :class:`GeneratedImage` per image, in seed order.

    Raises:
        GenerationParamsError, UnknownSamplerError, SamplerUnavailableError: bad settings.
        ValueError: extra-network tags in the prompt.
        GenerationCancelled: ``cancel`` was set.
    """
    # 1. Check inputs.
    check_inputs(params)
    reject_network_tags(params.prompt)
    seed = params.seed if params.seed != -1 else random.randrange(MAX_SEED)
    # 2. Encode the prompt schedules and the init image; the infotext fields.
    job = _prepare(components, params, embeddings)
    used = _used_embeddings(job.denoiser)
    fields = generation_fields(
        params, components=components, embeddings=embeddings, used_embeddings=used
    )
    on_step = _progress(callback, len(_probe_timesteps(job)) * params.batch_count)
    # 3. Sample batch by batch, decode, write each image's infotext.
    results: list[GeneratedImage] = []
    for batch in range(params.batch_count):
        seeds = [seed + batch * params.batch_size + i for i in range(params.batch_size)]
        latents = _run_batch(job, seeds, on_step, cancel)
        for image, image_seed in zip(decode_latents(components.vae, latents), seeds, strict=True):
            image_fields = {**fields, "Seed": image_seed, **_pad_field(job.denoiser)}
            infotext = build_infotext(params.prompt, params.negative, image_fields)
            results.append(GeneratedImage(image, image_seed, infotext, len(results)))
            if on_image is not None:
                on_image(results[-1])
    return results


def _pad_field(denoiser: GuidedDenoiser) -> dict[str, Any]:
    """Reference ``Pad conds: True``: only when the option padded some call's context."""
    return {"Pad conds": True} if denoiser.padded else {}


def _progress(callback: ProgressCallback | None, total: int) -> Callable[[torch.Tensor], None]:
    done = 0

    def on_step(latents: torch.Tensor) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total, latents)

    return on_step


def _probe_timesteps(job: _Job) -> Any:
    scheduler = make_scheduler(job.spec, job.schedule_type, job.components.scheduler_config)
    scheduler.set_timesteps(job.params.steps)
    return scheduler.timesteps[job.start * scheduler.order :]
