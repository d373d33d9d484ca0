"""ControlNet step time: sdstack's ControlNet hook vs diffusers' ControlNet pipeline.

Same process, same real-shape SD1.5 UNet/VAE/CLIP (``bench/step.py``'s fixture), the same
real-shape ControlNets (``ControlNetModel.from_unet`` with seeded random zero
convolutions, so the residuals are not zero), reference "Euler" on both sides, CFG on
(batch 2 per UNet call), 512x512, one image, one random control image. Per-step time is
the gap between the first and the second step callback (the second denoiser call: one
UNet call plus one ControlNet call per unit); 0, 1 and 2 units on each side (diffusers:
``MultiControlNetModel`` for 2), sides alternating. The overhead per unit is the step
time with units minus without, divided by the units. A parity line gives the largest
difference between the two sides' final latents with one unit.

Usage::

    .venv/bin/python bench/control.py --quick   # tiny model at 64x64: checks the script
    .venv/bin/python bench/control.py           # 512x512 real shapes (a quiet machine)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "lowres, blurry"


def random_controlnet(unet, seed: int, embedding_channels):
    """A ControlNet of ``unet``'s shapes, zero convs drawn from N(0, 0.02^2)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
    for name, parameter in model.named_parameters():
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.to(unet.dtype).eval().requires_grad_(False)


def control_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def ours(components, controls, images, size: int, steps: int):
    """(second-step seconds, final latents) of sdstack generate with the units as a hook."""
    import numpy as np
    import torch

    from sdstack.control.hook import ControlNetHook, PreparedControl
    from sdstack.control.unit import ControlUnit
    from sdstack.generate import GenerationParams, generate

    prepared = []
    for model, image in zip(controls, images, strict=True):
        hint = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        prepared.append(PreparedControl(ControlUnit("none", "bench"), model, hint.to(model.dtype)))
    hooks = [ControlNetHook(prepared, steps=steps, calls=steps)] if prepared else []
    stamps, finals = [], []

    def on_step(record):
        stamps.append(time.perf_counter())
        finals.append(record.latents)

    params = GenerationParams(
        PROMPT, negative=NEGATIVE, steps=steps, sampler="Euler", cfg_scale=7.0, seed=1,
        width=size, height=size,
    )  # fmt: skip
    generate(components, params, hooks=hooks, callback=on_step)
    return stamps[1] - stamps[0], finals[-1]


def theirs(components, controls, images, size: int, steps: int):
    """The same with diffusers' StableDiffusion(ControlNet)Pipeline on the same modules."""
    import torch
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    from sdstack.generate.samplers import make_scheduler, resolve_sampler

    spec, schedule = resolve_sampler("Euler")
    scheduler = make_scheduler(spec, schedule, components.scheduler_config)
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    settings = dict(
        negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size,
        width=size, generator=torch.Generator().manual_seed(1), output_type="latent",
        callback_on_step_end=on_step,
    )  # fmt: skip
    if not controls:
        pipe = components.diffusers_pipeline(scheduler)
    else:
        controlnet = controls[0] if len(controls) == 1 else MultiControlNetModel(list(controls))
        pipe = StableDiffusionControlNetPipeline(
            vae=components.vae, text_encoder=components.text_encoder,
            tokenizer=components.tokenizer, unet=components.unet, controlnet=controlnet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        settings["image"] = images[0] if len(controls) == 1 else list(images)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, **settings).images
    return stamps[1] - stamps[0], latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model at 64x64")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    if args.quick:
        from sdstack.models.tiny import tiny_components

        components, size, channels = tiny_components(seed=0), 64, (8, 8, 16, 16)
    else:
        from step import real_shape_components

        components, size, channels = real_shape_components(torch.float32, "cpu"), 512, None
    channels = channels or (16, 32, 96, 256)
    controls = [random_controlnet(components.unet, seed, channels) for seed in (1, 2)]
    images = [control_image(size, seed) for seed in (3, 4)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {size}x{size}, "
          f"batch 2 per UNet call (CFG), Euler")  # fmt: skip
    rows, parity = [], None
    for units in (0, 1, 2):
        ours_s, ours_latents = ours(components, controls[:units], images[:units], size, args.steps)
        theirs_s, their_latents = theirs(
            components, controls[:units], images[:units], size, args.steps
        )
        if units == 1:
            parity = float((ours_latents - their_latents).abs().max())
        rows.append((units, ours_s, theirs_s))
        print(f"  measured {units} unit(s): ours {ours_s:.3f} s, diffusers {theirs_s:.3f} s",
              flush=True)  # fmt: skip
    base_ours, base_theirs = rows[0][1], rows[0][2]
    print("\n| units | ours s/step | diffusers s/step | ours / diffusers | ours per unit s |"
          " diffusers per unit s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for units, ours_s, theirs_s in rows:
        per_ours = (ours_s - base_ours) / units if units else 0.0
        per_theirs = (theirs_s - base_theirs) / units if units else 0.0
        print(f"| {units} | {ours_s:.3f} | {theirs_s:.3f} | {ours_s / theirs_s:.2f}x | "
              f"{per_ours:.3f} | {per_theirs:.3f} |")  # fmt: skip
    print(f"\nparity, one unit: max |ours - diffusers| of the final latents = {parity:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
