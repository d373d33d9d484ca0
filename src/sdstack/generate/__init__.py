"""Image generation: our denoising loop over diffusers' UNet, VAE and schedulers.

Reference (AUTOMATIC1111 v1.10) behaviour: sampler names and schedule types, per-step
prompt schedules, AND (composable diffusion), seeds ``seed + i``, infotext.

Names are imported on first use, so ``from sdstack.generate import parse_infotext``
(``sdstack info``) does not import torch.
"""

from __future__ import annotations

from sdstack.lazy import lazy_exports

_EXPORTS = {
    "GenerationCancelled": "denoise",
    "GuidedDenoiser": "denoise",
    "combine_guidance": "denoise",
    "ImageFileError": "images",
    "InfotextError": "images",
    "load_init_image": "images",
    "OutputError": "outputs",
    "check_output_folder": "outputs",
    "read_infotext": "images",
    "save_image": "images",
    "build_infotext": "infotext",
    "generation_fields": "infotext",
    "params_from_infotext": "infotext",
    "parse_infotext": "infotext",
    "GenerationParams": "params",
    "GenerationParamsError": "params",
    "check_inputs": "params",
    "GeneratedImage": "pipeline",
    "PreparedJob": "pipeline",
    "decode": "pipeline",
    "generate": "run",
    "prepare": "pipeline",
    "sample": "pipeline",
    "GenerationJob": "job",
    "JobDeprojector": "deprojected",
    "open_deprojector": "deprojected",
    "ENCODINGS": "encoding",
    "StepRecord": "hooks",
    "UNetCall": "hooks",
    "UNetHook": "hooks",
    "SAMPLERS": "samplers",
    "SCHEDULE_TYPES": "samplers",
    "SamplerSpec": "samplers",
    "SamplerUnavailableError": "samplers",
    "UnknownSamplerError": "samplers",
    "resolve_sampler": "samplers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("sdstack.generate", _EXPORTS, globals())
