"""Denoising step time: sdstack ``generate`` vs diffusers ``StableDiffusionPipeline``.

Same process, same UNet/VAE/CLIP modules, same scheduler (reference "Euler": diffusers
``EulerDiscreteScheduler``, linspace timesteps), CFG on (batch 2 per UNet call), same
seed, one image. Each run's per-step time is the gap between consecutive step callbacks
(ours: ``callback``; diffusers: ``callback_on_step_end``), so it holds one UNet call plus
the loop's own work and nothing else; the whole run (text encoding, steps, VAE decode) is
timed too. Ours and diffusers run alternately after a warm-up; medians are compared.
A parity line gives the largest difference of the final latents of the two runs.

Model: full size = ``bench/fixtures/sd15-random-fp16.safetensors`` with
``bench/fixtures/sd15-config`` (``bench/make_fixtures.py``); when absent, a real-shape
SD1.5 model with random weights built from the packaged configs. ``--quick`` = the tiny
random model at 64x64.

Usage::

    .venv/bin/python bench/step.py --quick          # seconds: checks the script and ratios
    .venv/bin/python bench/step.py                  # 512x512 real shapes (quiet machine)
    .venv/bin/python bench/step.py --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "lowres, blurry"


def real_shape_components(dtype, device):
    """The SD1.5 fixture if present, else a random real-shape SD1.5 model in memory."""
    import torch

    from sdstack.models import ModelComponents, load_model

    checkpoint = FIXTURES / "sd15-random-fp16.safetensors"
    if checkpoint.is_file():
        return load_model(
            checkpoint, config_dir=FIXTURES / "sd15-config", dtype=dtype, device=device
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.assemble import packaged_config
    from sdstack.models.text_encoder import sd15_text_config
    from sdstack.prompt import load_tokenizer

    torch.manual_seed(0)
    text = {k: v for k, v in sd15_text_config().items() if k != "architectures"}
    components = ModelComponents(
        unet=UNet2DConditionModel.from_config(packaged_config("unet/config.json")).eval(),
        vae=AutoencoderKL.from_config(packaged_config("vae/config.json")).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)).eval(),
        tokenizer=load_tokenizer(),
        name="sd15-random",
    )
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return components.to(device=device, dtype=torch_dtype)


def diffusers_pipeline(components, scheduler):
    """diffusers' pipeline around the very same modules."""
    return components.diffusers_pipeline(scheduler)


def run_ours(components, params, sync):
    """(step gaps, whole-run seconds, final latents) of one ``generate`` call."""
    from sdstack.generate import generate

    stamps, last = [], {}

    def callback(record):
        sync()
        stamps.append(time.perf_counter())
        last["latents"] = record.latents

    start = time.perf_counter()
    generate(components, params, callback=callback)
    sync()
    total = time.perf_counter() - start
    return [b - a for a, b in itertools.pairwise(stamps)], total, last["latents"]


def run_diffusers(pipe, params, sync):
    """The same run through ``StableDiffusionPipeline.__call__``."""
    import torch

    stamps, last = [], {}

    def on_step_end(pipeline, step, timestep, kwargs):
        sync()
        stamps.append(time.perf_counter())
        last["latents"] = kwargs["latents"]
        return kwargs

    start = time.perf_counter()
    pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=params.steps,
        guidance_scale=params.cfg_scale,
        height=params.height,
        width=params.width,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pil",
        callback_on_step_end=on_step_end,
    )
    sync()
    total = time.perf_counter() - start
    return [b - a for a, b in itertools.pairwise(stamps)], total, last["latents"]


def measure(components, params, repeats, sync):
    """Medians per step and per run for ours and diffusers, run alternately."""
    from sdstack.generate.samplers import SAMPLERS, make_scheduler

    scheduler = make_scheduler(SAMPLERS["Euler"], "Automatic", components.scheduler_config)
    pipe = diffusers_pipeline(components, scheduler)
    pipe.set_progress_bar_config(disable=True)
    run_ours(components, params, sync)  # warm-up
    run_diffusers(pipe, params, sync)
    gaps = {"ours": [], "diffusers": []}
    totals = {"ours": [], "diffusers": []}
    finals = {}
    for _ in range(repeats):
        for name, fn, arg in (("ours", run_ours, components), ("diffusers", run_diffusers, pipe)):
            step_gaps, total, finals[name] = fn(arg, params, sync)
            gaps[name] += step_gaps
            totals[name].append(total)
    diff = (finals["ours"].float() - finals["diffusers"].float()).abs().max().item()
    return (
        {k: statistics.median(v) for k, v in gaps.items()},
        {k: statistics.median(v) for k, v in totals.items()},
        diff,
    )


def print_table(steps_med, totals_med, diff, label) -> None:
    print(f"{label}\n")
    print("| measure | sdstack ms | diffusers ms | overhead |")
    print("|---|---:|---:|---:|")
    for name, values in (
        ("one denoising step (median)", steps_med),
        ("whole run (encode + steps + decode)", totals_med),
    ):
        ours, peer = values["ours"] * 1e3, values["diffusers"] * 1e3
        print(f"| {name} | {ours:.2f} | {peer:.2f} | {100 * (ours / peer - 1):+.1f}% |")
    print(f"\nparity: max |final latents ours - diffusers| = {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 64x64, 4 steps, 3 repeats"
    )
    parser.add_argument("--steps", type=int, help="steps per run (default 4 quick, 6 full)")
    parser.add_argument("--repeats", type=int, help="timed runs of each (default 3 / 5)")
    parser.add_argument("--size", type=int, help="width = height (default 64 / 512)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args()

    import torch

    from sdstack.generate import GenerationParams

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    if args.quick:
        from sdstack.models.tiny import tiny_components

        components = tiny_components(seed=0)
        if args.device != "cpu":
            components.to(device=args.device)
    else:
        components = real_shape_components(args.dtype, args.device)
    size = args.size or (64 if args.quick else 512)
    steps = args.steps or (4 if args.quick else 6)
    params = GenerationParams(
        PROMPT,
        negative=NEGATIVE,
        steps=steps,
        cfg_scale=7.0,
        sampler="Euler",
        seed=1,
        width=size,
        height=size,
    )
    steps_med, totals_med, diff = measure(
        components, params, args.repeats or (3 if args.quick else 5), sync
    )
    label = (
        f"{components.name}, {size}x{size}, Euler, {steps} steps, CFG 7 (UNet batch 2), "
        f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print_table(steps_med, totals_med, diff, label)


if __name__ == "__main__":
    main()
