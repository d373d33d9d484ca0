"""The whole job as a user runs it: ``sdstack generate`` vs diffusers ``from_single_file``.

Fresh process per run: checkpoint file -> text encoding -> ``--steps`` denoising steps ->
VAE decode -> PNG, at ``--size`` (512x512) square, CFG 7 (2 UNet rows per step), seed 1,
the same prompt and no negative prompt, Euler on every side:

- ``sdstack``: ``sdstack generate --model CKPT PROMPT --steps N --size 512x512 --seed 1
  --cfg 7 --sampler Euler --out DIR`` with its defaults otherwise (no ``--dtype``: the
  default ``auto``, bf16 UNet and VAE on a CPU with native bf16, fp32 on one without;
  channels-last weights on the CPU; ``--config-dir`` only for the tiny ``--quick``
  fixture), run
  as ``sdstack.cli.main`` in the worker process with the counting wrappers below;
- ``diffusers fp32``: ``StableDiffusionPipeline.from_single_file(ckpt, config=folder,
  local_files_only=True)`` with its defaults (fp32), ``EulerDiscreteScheduler`` from the
  pipeline's scheduler config, ``pipe(prompt, num_inference_steps=N, guidance_scale=7,
  height, width, generator)``, the image saved as a PNG;
- ``diffusers bf16``: the same with ``torch_dtype=torch.bfloat16`` (``--bf16-steps``
  steps, 1 by default at full size: on a CPU without native bf16 a 512x512 bf16 job takes
  many minutes; ``--no-bf16`` skips it).

``wall s`` is ``time.perf_counter`` around ``subprocess.run`` (interpreter start, imports,
load, encode, sample, decode, save, exit) minus the worker's own measuring section after
the job (the bare UNet calls below); ``peak RSS`` is the worker's ``ru_maxrss`` at its end
(the bare calls reuse the job's buffers and do not raise it). Inside each worker the
per-step time is the median gap between consecutive step callbacks (sdstack: the CLI's
``JobProgress.on_step``; diffusers: ``callback_on_step_end``), i.e. one step's UNet calls
plus the loop's own work. For sdstack the worker keeps the inputs of the first step's
UNet calls (a forward pre-hook) and after the job replays them ``--bare-calls`` times on
the same UNet under ``torch.inference_mode`` in the job's dtype: ``overhead = step / bare
- 1``. Every worker also times its UNet's ``forward`` during the job (forward hooks:
``UNet in job s``, the median call after the first), which gives diffusers' overhead and
tells a slow loop from a UNet that runs slower inside the job than alone. The sides
alternate run by run (``--repeats``; medians).

Usage::

    .venv/bin/python bench/job.py --quick                 # tiny fixture, 64x64 (~30 s)
    flock /tmp/bench.lock .venv/bin/python bench/job.py   # 512x512, 4 steps (bf16 side: 20+ min)
    .venv/bin/python bench/job.py --no-bf16               # the same without bf16 (2.5 min)
    .venv/bin/python bench/job.py --device cuda --dtype fp16 --steps 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SDSTACK_ROOT", None)
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_fixtures  # noqa: E402  (bench/ sibling module)

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
SEED, CFG = 1, 7.0
GOAL_WALL, GOAL_RSS, GOAL_OVERHEAD = 0.4, 0.4, 0.02


# --------------------------------------------------------------------------- workers


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def bare_unet_seconds(unet, calls: list[tuple], repeats: int, sync) -> float:
    """Median seconds of replaying one step's UNet calls (same inputs, same dtype)."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            for args, kwargs in calls:
                unet(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def ours_worker(args: argparse.Namespace) -> dict:
    """``sdstack generate`` in this process, with step stamps and the first step's inputs."""
    import sdstack.commands.generate as command
    from sdstack.cli import main
    from sdstack.commands.progress import JobProgress

    stamps, first_step, seen, in_job = [], [], {}, []
    sync = _sync(args.device)
    on_step = JobProgress.on_step

    def timed_on_step(self, record) -> None:
        sync()
        stamps.append(time.perf_counter())
        on_step(self, record)

    def keep_inputs(_module, call_args, call_kwargs) -> None:
        seen["calls"] = seen.get("calls", 0) + 1
        if not stamps:  # the UNet calls of the first step
            first_step.append((call_args, call_kwargs))
        sync()
        seen["started"] = time.perf_counter()

    def time_call(*_args) -> None:
        sync()
        in_job.append(time.perf_counter() - seen["started"])

    run_job = command.run_job

    def metered_run_job(components, *call_args, **call_kwargs):
        seen["model"] = components
        unet = components.unet
        handles = [unet.register_forward_pre_hook(keep_inputs, with_kwargs=True)]
        handles.append(unet.register_forward_hook(time_call))
        try:
            return run_job(components, *call_args, **call_kwargs)
        finally:
            for handle in handles:
                handle.remove()

    JobProgress.on_step = timed_on_step
    command.run_job = metered_run_job
    argv = ["generate", "--model", args.checkpoint, PROMPT, "--steps", str(args.steps)]
    argv += ["--size", f"{args.size}x{args.size}", "--seed", str(SEED), "--cfg", str(CFG)]
    argv += ["--sampler", "Euler", "--out", args.out]
    if args.quick:
        argv += ["--config-dir", args.config]
    if args.device != "cpu":
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    status = main(argv)
    if status:
        raise SystemExit(f"sdstack generate exited with {status}")
    job_end = time.perf_counter()
    unet = seen["model"].unet
    bare = bare_unet_seconds(unet, first_step, args.bare_calls, sync)
    return {
        "gaps": _gaps(stamps),
        "bare_s": bare,
        "unet_s": statistics.median(in_job[1:] or in_job),
        "unet_calls_per_step": seen["calls"] / args.steps,
        "dtype": str(next(unet.parameters()).dtype).removeprefix("torch."),
        "extra_s": time.perf_counter() - job_end,
    }


def diffusers_worker(args: argparse.Namespace) -> dict:
    """diffusers' single-file pipeline with its defaults (or ``--dtype``), Euler, a PNG."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    stamps, unet_times, started = [], [], []
    sync = _sync(args.device)

    def on_step_end(_pipe, _step, _timestep, kwargs):
        sync()
        stamps.append(time.perf_counter())
        return kwargs

    def before(*_args) -> None:
        sync()
        started.append(time.perf_counter())

    def after(*_args) -> None:
        sync()
        unet_times.append(time.perf_counter() - started[-1])

    options = {"config": args.config, "local_files_only": True}
    if args.dtype:
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        options["torch_dtype"] = dtypes[args.dtype]
    pipe = StableDiffusionPipeline.from_single_file(args.checkpoint, **options)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if args.device != "cpu":
        pipe = pipe.to(args.device)
    pipe.unet.register_forward_pre_hook(before)
    pipe.unet.register_forward_hook(after)
    image = pipe(
        PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=CFG,
        height=args.size,
        width=args.size,
        generator=torch.Generator("cpu").manual_seed(SEED),
        callback_on_step_end=on_step_end,
    ).images[0]
    image.save(Path(args.out) / f"00000-{SEED}.png")
    return {
        "gaps": _gaps(stamps),
        "unet_s": statistics.median(unet_times[1:] or unet_times),
        "unet_calls_per_step": len(unet_times) / args.steps,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "extra_s": 0.0,
    }


def worker(args: argparse.Namespace) -> dict:
    """One side's job in this process; its measurements (and peak RSS) as a dict."""
    record = (ours_worker if args.worker == "sdstack" else diffusers_worker)(args)
    import torch

    record["threads"] = torch.get_num_threads()
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


# --------------------------------------------------------------------------- driver


def run_side(kind: str, dtype: str | None, steps: int, args: argparse.Namespace) -> dict:
    """One fresh worker process; wall time around it, less its measuring section."""
    with tempfile.TemporaryDirectory(prefix="job-bench-") as out:
        command = [sys.executable, __file__, "--worker", kind, "--checkpoint", str(args.checkpoint)]
        command += ["--config", str(args.config), "--steps", str(steps), "--size", str(args.size)]
        command += ["--device", args.device, "--out", out, "--bare-calls", str(args.bare_calls)]
        command += ["--dtype", dtype] if dtype else []
        command += ["--quick"] if args.quick else []
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
        pngs = list(Path(out).glob("*.png"))
        if len(pngs) != 1:
            raise SystemExit(f"{kind} worker wrote {len(pngs)} PNG files, expected 1")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["wall_s"] = elapsed - record["extra_s"]
    record["steps"] = steps
    return record


def sides(args: argparse.Namespace) -> list[tuple[str, str, str | None, int]]:
    """(label, worker kind, --dtype given to it or None for its default, steps)."""
    peer = args.dtype or "fp32"
    chosen = [("sdstack", "sdstack", args.dtype, args.steps)]
    chosen.append((f"diffusers {peer}", "diffusers", args.dtype, args.steps))
    if not args.no_bf16 and peer != "bf16":
        chosen.append(("diffusers bf16", "diffusers", "bf16", args.bf16_steps or args.steps))
    return chosen


def median_runs(runs: list[dict]) -> dict:
    """Medians of the runs' wall, RSS, step gaps (pooled) and bare UNet time."""
    gaps = [gap for run in runs for gap in run["gaps"]]
    merged = dict(runs[0])
    merged["wall_s"] = statistics.median(run["wall_s"] for run in runs)
    merged["peak_mb"] = statistics.median(run["peak_mb"] for run in runs)
    merged["step_s"] = statistics.median(gaps) if gaps else float("nan")
    for key in ("bare_s", "unet_s"):
        if key in merged:
            merged[key] = statistics.median(run[key] for run in runs)
    return merged


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Every side ``--repeats`` times, alternating run by run; medians per side."""
    chosen = sides(args)
    runs: dict[str, list[dict]] = {label: [] for label, *_ in chosen}
    for _ in range(args.repeats):
        for label, kind, dtype, steps in chosen:
            runs[label].append(run_side(kind, dtype, steps, args))
    return {label: median_runs(side_runs) for label, side_runs in runs.items()}


def _unet_s(r: dict) -> float:
    """sdstack: the bare replay after the job; diffusers: time inside its UNet's forward."""
    return r["bare_s"] if "bare_s" in r else r["unet_s"]


def _seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def table(results: dict[str, dict]) -> str:
    lines = [
        "| side | dtype | steps | wall s | peak RSS MB | UNet calls / step | step s (median) | "
        "UNet in job s | bare UNet s | step / UNet |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        ratio = r["step_s"] / _unet_s(r) - 1
        overhead = "-" if math.isnan(ratio) else f"{100 * ratio:+.1f}%"
        lines.append(
            f"| {label} | {r['dtype']} | {r['steps']} | {r['wall_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['unet_calls_per_step']:g} | {_seconds(r['step_s'])} | "
            f"{_seconds(r['unet_s'])} | {_seconds(r.get('bare_s'))} | {overhead} |"
        )
    return "\n".join(lines)


def goals(results: dict[str, dict]) -> str:
    """The issue's goals: wall and peak RSS at most 0.4x diffusers' default, overhead <= 2%."""
    labels = list(results)
    ours, peer = results["sdstack"], results[labels[1]]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    wall, rss = ours["wall_s"] / peer["wall_s"], ours["peak_mb"] / peer["peak_mb"]
    overhead = ours["step_s"] / ours["bare_s"] - 1
    lines = [
        f"- whole job sdstack / {labels[1]}: {wall:.2f}x (goal <= {GOAL_WALL}x: "
        f"{verdict(wall <= GOAL_WALL)})",
        f"- peak RSS sdstack / {labels[1]}: {rss:.2f}x (goal <= {GOAL_RSS}x: "
        f"{verdict(rss <= GOAL_RSS)})",
        f"- sdstack step over the bare UNet: {100 * overhead:+.1f}% (goal <= "
        f"{100 * GOAL_OVERHEAD:.0f}%: {verdict(overhead <= GOAL_OVERHEAD)})",
        f"- step sdstack / {labels[1]}: {ours['step_s'] / peer['step_s']:.2f}x",
    ]
    for label in labels[2:]:
        other = results[label]
        lines.append(
            f"- UNet call sdstack / {label}: {ours['bare_s'] / other['unet_s']:.2f}x; peak "
            f"RSS {ours['peak_mb'] / other['peak_mb']:.2f}x; wall (its job at "
            f"{other['steps']} steps) {ours['wall_s'] / other['wall_s']:.2f}x"
        )
    return "\n".join(lines)


def fixture(quick: bool) -> tuple[Path, Path]:
    if quick:
        if make_fixtures.QUICK_CHECKPOINT.is_file():
            return make_fixtures.QUICK_CHECKPOINT, make_fixtures.QUICK_CONFIG
        return make_fixtures.make_quick()
    return make_fixtures.make_full()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny fixture at 64x64")
    parser.add_argument("--steps", type=int, default=4, help="steps per job (default 4)")
    parser.add_argument("--bf16-steps", type=int, help="steps of the bf16 side (1; quick 4)")
    parser.add_argument("--no-bf16", action="store_true", help="skip diffusers in bf16")
    parser.add_argument("--size", type=int, help="width = height (default 512; quick 64)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (median; 1)")
    parser.add_argument("--bare-calls", type=int, help="bare UNet replays (2; quick 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="given to both sides (default: none, each side's default)",
    )
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("sdstack", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 512)
    args.bare_calls = args.bare_calls or (5 if args.quick else 2)
    args.bf16_steps = args.bf16_steps or (args.steps if args.quick else 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.checkpoint, args.config = str(args.checkpoint), str(args.config)
        print(json.dumps(worker(args)))
        return 0
    args.checkpoint, args.config = fixture(args.quick)
    load_before = os.getloadavg()[0]
    results = measure(args)
    from importlib import metadata

    size = args.checkpoint.stat().st_size / 1e6
    print(
        f"{args.checkpoint.name} ({size:.0f} MB), {args.size}x{args.size}, Euler, CFG {CFG:g}, "
        f"seed {SEED}, {args.device}, torch threads {results['sdstack']['threads']}, "
        f"diffusers {metadata.version('diffusers')}; fresh process per run, sides alternate, "
        f"median of {args.repeats} run(s); load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after\n"
    )
    print(table(results))
    print()
    print(goals(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
