"""Image generation: our denoising loop over diffusers' UNet, VAE and schedulers.

Reference (AUTOMATIC1111 v1.10) behaviour: sampler names and schedule types, per-step
prompt schedules, AND (composable diffusion), seeds ``seed + i``, infotext.
"""

from sdstack.generate.denoise import GenerationCancelled, GuidedDenoiser, combine_guidance
from sdstack.generate.images import InfotextError, read_infotext, save_image
from sdstack.generate.infotext import (
    build_infotext,
    generation_fields,
    params_from_infotext,
    parse_infotext,
)
from sdstack.generate.params import GenerationParams, GenerationParamsError, check_inputs
from sdstack.generate.pipeline import GeneratedImage, generate
from sdstack.generate.samplers import (
    SAMPLERS,
    SCHEDULE_TYPES,
    SamplerSpec,
    SamplerUnavailableError,
    UnknownSamplerError,
    resolve_sampler,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULE_TYPES",
    "GeneratedImage",
    "GenerationCancelled",
    "GenerationParams",
    "GenerationParamsError",
    "GuidedDenoiser",
    "InfotextError",
    "SamplerSpec",
    "SamplerUnavailableError",
    "UnknownSamplerError",
    "build_infotext",
    "check_inputs",
    "combine_guidance",
    "generate",
    "generation_fields",
    "params_from_infotext",
    "parse_infotext",
    "read_infotext",
    "resolve_sampler",
    "save_image",
]
