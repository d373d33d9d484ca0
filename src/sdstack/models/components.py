"""The loaded pieces of an SD1.x model, as every loader returns them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdstack.models.precision import ComponentDtypes

# SD1.x noise schedule (v1-inference.yaml): scaled_linear betas over 1000 steps.
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}


@dataclass
class ModelComponents:
    """UNet, VAE, CLIP text encoder and tokenizer of one SD1.x model.

    Attributes:
        unet: ``diffusers.UNet2DConditionModel``.
        vae: ``diffusers.AutoencoderKL``; ``vae.config.scaling_factor`` scales latents.
        text_encoder: ``transformers.CLIPTextModel``.
        tokenizer: ``transformers.CLIPTokenizer`` (the packaged SD1.x vocabulary).
        scheduler_config: the diffusers scheduler config of the model's noise schedule.
        name: what the reference UI's infotext writes as ``Model`` (the file stem).
        path: the checkpoint file or diffusers folder it came from; ``None`` when built
            in memory. Used for the ``Model hash`` infotext field.
        vae_path: a separate VAE file, when one replaced the checkpoint's own.
        patcher: the ``sdstack.models.patcher.ModelPatcher`` that applies LoRAs and
            other weight patches to these networks (made on first use).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SD1_SCHEDULER_CONFIG))
    name: str = "model"
    path: Path | None = None
    vae_path: Path | None = None
    patcher: Any = field(default=None, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 on SD1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def dtypes(self) -> ComponentDtypes:
        """The dtype each network holds its weights in now (its first floating parameter),
        e.g. ``str(components.dtypes)`` = ``"UNet bf16, text encoder fp32, VAE bf16"``."""
        from sdstack.models.precision import ComponentDtypes

        return ComponentDtypes(
            unet=_weight_dtype(self.unet),
            text_encoder=_weight_dtype(self.text_encoder),
            vae=_weight_dtype(self.vae),
        )

    def to(
        self,
        device: Any = None,
        dtype: Any = None,
        *,
        memory_format: Any = None,
        modules: tuple[str, ...] = ("unet", "vae", "text_encoder"),
    ) -> ModelComponents:
        """Move (cast, re-lay out) the networks named in ``modules`` in place; returns self.

        ``memory_format`` (``torch.channels_last`` / ``torch.contiguous_format``) applies
        to 4-D weights only, as ``torch.nn.Module.to`` does. Applied patches (LoRAs) are
        taken off first and put back after the move, so the originals move too and the
        patched weights are rebuilt in the new dtype. Only the arguments given are passed
        on (diffusers warns about any ``dtype=`` passed to ``.to``, even None).
        """
        owned = self.patcher.owned if self.patcher is not None else {}
        if self.patcher is not None:
            self.patcher.restore()
            self.patcher.forget_cache()
        moves = {"device": device, "dtype": dtype, "memory_format": memory_format}
        given = {key: value for key, value in moves.items() if value is not None}
        for name in modules:
            getattr(self, name).to(**given)
        if owned:
            self.patcher.apply_owned(owned)
        return self

    def diffusers_pipeline(self, scheduler: Any = None) -> Any:
        """A diffusers ``StableDiffusionPipeline`` over these same modules (shared, not copied).

        For interoperability and side-by-side checks against diffusers: no safety checker or
        feature extractor; ``scheduler`` defaults to DDIM built from ``scheduler_config``.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.scheduler_config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _weight_dtype(module: Any) -> Any:
    """The dtype of ``module``'s first floating-point parameter (float32 when it has none)."""
    import torch

    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
