"""A whole job: LoRAs, encoding, then batch after batch of sampling and decoding.

:func:`generate` runs :mod:`sdstack.generate.pipeline`'s three steps (``prepare``,
``sample``, ``decode``) over ``batch_count`` batches, handing each image over as soon as it
is decoded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdstack.generate.hooks import StepCallback, UNetHook
from sdstack.generate.job import GenerationJob
from sdstack.generate.params import MAX_SEED, GenerationParams
from sdstack.generate.pipeline import GeneratedImage, PhaseCallback, decode, prepare, sample

__all__ = ["generate"]


def generate(
    components: Any,
    job: GenerationParams | GenerationJob,
    *,
    embeddings: Any = None,
    hooks: Sequence[UNetHook] = (),
    callback: StepCallback | None = None,
    on_phase: PhaseCallback | None = None,
    cancel: Any = None,
    on_image: Callable[[GeneratedImage], None] | None = None,
    loras: Any = None,
    controls: Sequence[Any] | None = None,
    control_options: Mapping[str, Any] | None = None,
    deprojector: Any = None,
) -> list[GeneratedImage]:
    """Reference txt2img/img2img: ``batch_count`` batches of ``batch_size`` images.

    Seeds: ``params.seed`` (``-1`` draws one at random, once); image ``i`` of the job
    uses ``seed + i``. Guidance per call: ``u + cfg * sum_i w_i * (c_i - u)`` over the
    AND parts (see ``denoise``). Prompt and negative of different token lengths run as
    two UNet calls, or, with ``params.pad_conds``, padded with empty-prompt chunks into
    one call (infotext ``Pad conds: True``).

    Args:
        components: a loaded model (:class:`sdstack.models.ModelComponents`).
        job: the settings, or a :class:`GenerationJob` (its ``embeddings`` folder is
            loaded when ``embeddings`` is not given).
        embeddings: an ``EmbeddingLibrary`` for textual-inversion names in prompts.
        hooks: functions run before every UNet call (see ``sdstack.generate.hooks``).
        callback: receives a :class:`StepRecord` after every denoiser call.
        on_phase: ``on_phase(name)`` as "loras", "encoding", "sampling" (each batch) and
            "decoding" (each batch) start.
        cancel: ``threading.Event``-like or callable; checked before every denoiser call.
        on_image: ``on_image(result)`` for each image as soon as it is decoded, before the
            next batch starts (so a caller can save it: a later failure or cancellation
            then loses nothing already made).
        loras: a ``sdstack.lora.LoraLibrary`` where LoRA names are found (default: the
            job's ``lora_dirs`` after ``$SDSTACK_ROOT``'s LoRA folders). The job's stack
            (prompt tags, then ``job.networks``) is applied, replacing the stack of an
            earlier job; it stays applied after the job (the next job switches it).
        controls: ControlNet units (``sdstack.control.ControlUnit``); default: the job's
            ``controls``. ``control_options``: ``root`` (where ControlNet names are
            found), ``cache`` (a ``sdstack.control.ControlNetCache`` for many jobs).
        deprojector: for ``encoding="deprojected"``: a folder, a ``Deprojector`` or a
            ``JobDeprojector`` (``sdstack.generate.deprojected.open_deprojector``, to
            load once for many jobs); default: the job's ``deprojector`` folder.

    Returns:
        One :class:`GeneratedImage` per image, in seed order.

    Raises:
        SettingError, UnknownSamplerError, SamplerUnavailableError: bad settings.
        GenerationCancelled: ``cancel`` was set.
    """
    params = job.params if isinstance(job, GenerationJob) else job
    if embeddings is None and isinstance(job, GenerationJob) and job.embeddings is not None:
        embeddings = _embedding_library(components, job.embeddings)
    phase = on_phase or (lambda _name: None)
    # 1. Apply the LoRAs, check and encode.
    lora_options: dict[str, Any] = {"loras": loras}
    if isinstance(job, GenerationJob):
        lora_options.update(networks=job.networks, lora_hashes=job.lora_hashes)
        if loras is None and job.lora_dirs:
            lora_options["loras"] = _lora_library(job.lora_dirs)
    from sdstack.lora.job_stack import job_lora_specs, prepare_job_loras

    if job_lora_specs(params.prompt, lora_options.get("networks", ())):
        phase("loras")  # reading and applying them can take seconds; then cheap in prepare
        prepare_job_loras(components, params, **_job_lora_arguments(lora_options))
    phase("encoding")
    if controls is None:
        controls = job.controls if isinstance(job, GenerationJob) else ()
    if deprojector is None and isinstance(job, GenerationJob):
        deprojector = job.deprojector
    prepared = prepare(
        components,
        params,
        embeddings=embeddings,
        hooks=hooks,
        controls=controls,
        control_options=control_options,
        deprojector=deprojector,
        **lora_options,
    )
    seed = params.seed if params.seed != -1 else random.randrange(MAX_SEED)
    # 2. Sample, decode and hand over batch by batch.
    results: list[GeneratedImage] = []
    for batch in range(params.batch_count):
        seeds = [seed + batch * params.batch_size + i for i in range(params.batch_size)]
        phase("sampling")
        latents = sample(
            prepared,
            seeds,
            callback=callback,
            cancel=cancel,
            batch=batch,
            batches=params.batch_count,
            done=batch * prepared.calls_per_batch,
        )
        phase("decoding")
        images = decode(components, latents, params.vae_tiling)
        for image, image_seed in zip(images, seeds, strict=True):
            result = GeneratedImage(image, image_seed, prepared.infotext(image_seed), len(results))
            results.append(result)
            if on_image is not None:
                on_image(result)
    return results


def _job_lora_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """``prepare``'s LoRA keyword arguments -> ``prepare_job_loras``'s."""
    return {
        "networks": options.get("networks", ()),
        "hashes": options.get("lora_hashes"),
        "library": options.get("loras"),
    }


def _lora_library(folders: Sequence[str]) -> Any:
    from sdstack.lora.library import LoraLibrary
    from sdstack.models.root import open_library

    return LoraLibrary(open_library(None), folders)


def _embedding_library(components: Any, folder: str) -> Any:
    from sdstack.text import EmbeddingLibrary

    width = components.text_encoder.get_input_embeddings().embedding_dim
    return EmbeddingLibrary.from_dir(folder, width=width)
