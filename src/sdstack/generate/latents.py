"""Latents in and out: initial noise, img2img start and init image, VAE decode to pixels."""

from __future__ import annotations

from typing import Any

import torch


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


def encode_init_image(
    vae: Any, image: Any, width: int, height: int, tiling: str = "auto"
) -> torch.Tensor:
    """VAE-encode an init image resized to ``width x height`` (Lanczos), as the posterior
    mean times ``scaling_factor`` (deterministic; the reference samples the posterior);
    in tiles when ``tiling`` says so (:func:`sdstack.generate.vae_tiling.vae_encode`)."""
    import numpy as np
    from PIL import Image

    from sdstack.generate.vae_tiling import vae_encode

    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None]
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae_encode(vae, pixels, tiling)
    return latents.float() * vae.config.scaling_factor


def decode_latents(vae: Any, latents: torch.Tensor, tiling: str = "auto") -> list[Any]:
    """VAE decode ``latents / scaling_factor`` to RGB PIL images, as the reference does.

    ``x = clamp((x + 1) / 2, 0, 1)``, then ``(255 * x).astype(uint8)``: the reference
    truncates, where diffusers rounds, so about half the pixel values are one level lower
    than diffusers' output for the same latents. ``tiling`` (auto, on, off): decode in
    tiles (:func:`sdstack.generate.vae_tiling.vae_decode`).
    """
    import numpy as np
    from PIL import Image

    from sdstack.generate.vae_tiling import vae_decode

    scaled = (latents / vae.config.scaling_factor).to(device=vae.device, dtype=vae.dtype)
    pixels = torch.clamp((vae_decode(vae, scaled, tiling).float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * pixels.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
    return [Image.fromarray(array, mode="RGB") for array in arrays]
