"""Comparison grids: a 4-value clip-skip grid batched in one process vs four ``sdstack
generate`` processes vs unbatched cells in one process; a 3-value LoRA-weight grid's
switch time per cell.

Same settings on every side: the real-shape SD1.5 fixture of ``make_fixtures.py``
(``sd15-random-fp16.safetensors`` + ``sd15-config/``, made if missing) loaded as
``--dtype`` (fp32: the CPU has no fast fp16 kernels), ``--size`` (256x256), ``--steps``
(4) Euler, CFG 7 (prompt and negative are one chunk each: one UNet call of 2 rows per
cell and step), seed 1, one image per cell, every image saved as a PNG with its infotext.
``--quick``: the tiny fixture (``bench/fixtures/quick/``) at 64x64.

(a) ``clip-skip=1,2,3,4``, each side in fresh processes, wall time from process start to
exit (interpreter start, imports, model load, encode, sample, decode, save), so the model
load is counted wherever it happens:

- ``grid batched``: ``run_grid(plan_grid(job, "clip-skip=1,2,3,4"), model, batch=True)``,
  one process, one load; the four cells share one UNet batch per step (8 rows);
- ``grid unbatched``: the same with ``batch=False`` (each cell sampled alone);
- ``4 generate() calls``: ``generate(model, cell.job)`` for each cell, one process;
- ``4 sdstack generate``: four processes, each ``sdstack.cli.main(["generate", ...])``,
  i.e. the console script plus the counting hooks below, each loading the model.

Every process counts the UNet calls, their rows and the time inside them with forward
hooks on ``model.unet`` (attached by wrapping ``sdstack.models.loading.load_model``,
which also times the load). Cell images are compared with the unbatched grid's: exact on
the unbatched paths, within the batched-kernel rounding for the batched grid.

(b) ``lora:lora-a=0,0.5,1`` with a rank-32 kohya LoRA (``bench/lora.py``'s ``lora-a``:
every UNet attention projection and CLIP linear, 200 layers) run by ``run_grid``
(cells with different LoRA stacks are not batched). Per cell: the LoRA phase of
``prepare`` (``sdstack.lora.job_stack.prepare_job_loras``: find, hash, read or reuse the
file, ``set_loras``), and inside it ``ModelPatcher.apply``, the file reads
(``read_lora``) and hashing (``lora_sha256``), against the cell's total (from the
previous cell's ``on_cell`` to its own: LoRA switch, encode, sample, decode, save). The
grid runs ``--passes`` times in the same process (pass 2 starts from weight 1 and finds
the file kept).

Usage::

    .venv/bin/python bench/grid.py --quick     # tiny model, 64x64 (about 2 minutes: 8 processes)
    .venv/bin/python bench/grid.py             # real shapes, 256x256, fp32 (about 6 minutes)
    .venv/bin/python bench/grid.py --size 128 --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
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

import lora as lora_bench  # noqa: E402  (bench/ sibling module)
import make_fixtures  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "lowres, blurry"
SEED, SAMPLER, CFG = 1, "Euler", 7.0
CLIP_SKIPS = (1, 2, 3, 4)
LORA_NAME, LORA_WEIGHTS = "lora-a", (0, 0.5, 1)
SIDES = ("grid batched", "grid unbatched", "4 generate() calls", "4 sdstack generate")
REFERENCE = "grid unbatched"


# --------------------------------------------------------------------------- meters


class UNetMeter:
    """UNet calls, rows (batch size) and seconds inside ``forward``, by forward hooks."""

    def __init__(self) -> None:
        self.calls, self.rows, self.seconds, self._started = 0, 0, 0.0, 0.0
        self.first_context = None  # encoder_hidden_states of the first call

    def attach(self, unet) -> None:
        def before(_module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            if self.first_context is None:
                self.first_context = kwargs["encoder_hidden_states"].detach().float().clone()
            self.calls += 1
            self.rows += int(sample.shape[0])
            self._started = time.perf_counter()

        def after(_module, _args, _kwargs, _output):
            self.seconds += time.perf_counter() - self._started

        unet.register_forward_pre_hook(before, with_kwargs=True)
        unet.register_forward_hook(after, with_kwargs=True)

    def report(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "unet_s": self.seconds}


def meter_loads(meter: UNetMeter, record: dict, decoded: list | None = None) -> None:
    """Wrap ``load_model``: its time goes to ``record["load_s"]``, the meter onto the UNet;
    ``decoded`` collects the VAE decoder's input of every decode (one per cell)."""
    import sdstack.models.loading as loading

    original = loading.load_model

    def keep(_module, args):
        decoded.append(args[0].detach().float().clone())

    def timed_load(*args, **kwargs):
        started = time.perf_counter()
        model = original(*args, **kwargs)
        record["load_s"] = record.get("load_s", 0.0) + time.perf_counter() - started
        record["loads"] = record.get("loads", 0) + 1
        meter.attach(model.unet)
        if decoded is not None:
            model.vae.decoder.register_forward_pre_hook(keep)
        return model

    loading.load_model = timed_load


def metered_load(args, meter: UNetMeter, record: dict, decoded: list | None = None):
    """The fixture loaded through the wrapped ``load_model`` (see :func:`meter_loads`)."""
    import sdstack.models.loading as loading

    meter_loads(meter, record, decoded)
    return loading.load_model(args.checkpoint, config_dir=args.config, dtype=args.dtype)


def timed(module, name: str, events: list, cell: list, result=None) -> None:
    """Replace ``module.name`` by a wrapper appending ``(name, cell, seconds, extra)``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        value = original(*args, **kwargs)
        extra = result(value) if result is not None else None
        events.append((name, cell[0], time.perf_counter() - started, extra))
        return value

    setattr(module, name, wrapper)


# --------------------------------------------------------------------------- workers


def base_job(args, **extra):
    from sdstack.generate import GenerationJob, GenerationParams

    params = GenerationParams(
        PROMPT, negative=NEGATIVE, steps=args.steps, cfg_scale=CFG, sampler=SAMPLER,
        seed=SEED, width=args.size, height=args.size,
    )  # fmt: skip
    return GenerationJob(params, model=str(args.checkpoint), **extra)


def clip_skip_worker(args) -> dict:
    """One in-process side of case (a): load once, make the four cells, save them."""
    import torch

    from sdstack.generate import generate, save_image
    from sdstack.generate.grid import plan_grid, run_grid

    meter, record, decoded = UNetMeter(), {}, []
    model = metered_load(args, meter, record, decoded)
    plan = plan_grid(base_job(args), "clip-skip=" + ",".join(map(str, CLIP_SKIPS)))
    started = time.perf_counter()
    if args.worker == "generate-loop":
        paths = []
        for cell in plan.cells:
            for result in generate(model, cell.job):
                paths.append(save_image(result.image, result.infotext, args.out, seed=SEED))
    else:
        result = run_grid(plan, model, out=args.out, batch=args.worker == "grid-batched")
        paths = [cell.path for cell in sorted(result.cells, key=lambda c: c.index)]
    record["cells_s"] = time.perf_counter() - started
    torch.save({"decoded": decoded, "context": meter.first_context}, args.out / "decoded.pt")
    record["decoded"] = [str(args.out / "decoded.pt")]
    return {**record, **meter.report(), "paths": [str(p) for p in paths]}


def lora_worker(args) -> dict:
    """Case (b): the LoRA-weight grid ``--passes`` times; per-cell switch events."""
    import sdstack.lora.formats
    import sdstack.lora.job_stack
    import sdstack.models.library
    from sdstack.generate.grid import plan_grid, run_grid
    from sdstack.models.patcher import ModelPatcher

    meter, record = UNetMeter(), {}
    model = metered_load(args, meter, record)
    events: list = []
    cell = [0]
    timed(sdstack.lora.job_stack, "prepare_job_loras", events, cell)
    timed(sdstack.lora.formats, "read_lora", events, cell)
    timed(sdstack.models.library, "lora_sha256", events, cell)
    timed(ModelPatcher, "apply", events, cell, lambda s: [s.layers_rebuilt, s.layers_restored])
    axis = f"lora:{LORA_NAME}=" + ",".join(map(str, LORA_WEIGHTS))
    cells = []
    for _ in range(args.passes):
        plan = plan_grid(base_job(args, lora_dirs=(str(args.loras),)), axis)
        stamps = [time.perf_counter()]
        calls = [meter.report()]

        def on_cell(_cell, stamps=stamps, calls=calls):
            stamps.append(time.perf_counter())
            calls.append(meter.report())
            cell[0] += 1

        run_grid(plan, model, out=args.out, on_cell=on_cell)
        for i, weight in enumerate(LORA_WEIGHTS):
            unet_s = calls[i + 1]["unet_s"] - calls[i]["unet_s"]
            cells.append({"weight": weight, "total_s": stamps[i + 1] - stamps[i], "unet_s": unet_s})
    for name, index, seconds, extra in events:
        entry = cells[index]
        entry[name] = entry.get(name, 0.0) + seconds
        entry[name + "_n"] = entry.get(name + "_n", 0) + 1
        if extra is not None:
            entry["layers"] = extra
    return {**record, "cells": cells}


def cli_shim(report: str, argv: list[str]) -> int:
    """``sdstack.cli.main(argv)`` (the console script) with the counting hooks."""
    import torch

    from sdstack.cli import main

    meter, record, decoded = UNetMeter(), {}, []
    meter_loads(meter, record, decoded)
    code = main(argv)
    torch.save({"decoded": decoded, "context": meter.first_context}, report + ".pt")
    record["decoded"] = [report + ".pt"]
    Path(report).write_text(json.dumps({**record, **meter.report()}), encoding="utf-8")
    return code


# --------------------------------------------------------------------------- sides


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (``/proc/stat``; 0 where absent)."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").split("\n")[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(value) for value in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process(command: list[str]) -> dict:
    """Run ``command``: its wall time and the CPU seconds other processes took meanwhile."""
    busy, children = busy_cpu_seconds(), children_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")
    ours = children_cpu_seconds() - children
    return {"wall_s": wall, "other_cpu_s": max(0.0, busy_cpu_seconds() - busy - ours)}


def worker_command(args, worker: str, out: Path) -> list[str]:
    command = [sys.executable, __file__, "--worker", worker, "--checkpoint", str(args.checkpoint)]
    command += ["--config", str(args.config), "--dtype", args.dtype, "--out", str(out)]
    command += ["--size", str(args.size), "--steps", str(args.steps)]
    return [*command, "--loras", str(args.loras), "--passes", str(args.passes)]


def run_worker(args, worker: str, out: Path) -> dict:
    report = out / "report.json"
    times = run_process([*worker_command(args, worker, out), "--report", str(report)])
    return {**json.loads(report.read_text(encoding="utf-8")), **times, "processes": 1}


def run_cli_side(args, out: Path) -> dict:
    """Four ``generate`` processes; their walls, loads and UNet counts summed."""
    total: dict = {"processes": len(CLIP_SKIPS), "paths": [], "decoded": []}
    for clip_skip in CLIP_SKIPS:
        folder, report = out / f"clip-skip-{clip_skip}", out / f"cli-{clip_skip}.json"
        command = [sys.executable, __file__, "--cli", str(report), "generate", PROMPT]
        command += ["--model", str(args.checkpoint), "--config-dir", str(args.config)]
        command += ["--negative", NEGATIVE, "--steps", str(args.steps), "--cfg", f"{CFG:g}"]
        command += ["--sampler", SAMPLER, "--seed", str(SEED), "--size", f"{args.size}x{args.size}"]
        command += ["--clip-skip", str(clip_skip), "--dtype", args.dtype]
        command += ["--out", str(folder), "--quiet"]
        times = run_process(command)
        record = json.loads(report.read_text(encoding="utf-8"))
        for key, value in {**record, **times}.items():
            total[key] = total.get(key, 0) + value
        total["paths"] += [str(p) for p in sorted(folder.glob("*.png"))]
    return total


def run_clip_skip_case(args, scratch: Path) -> dict[str, list[dict]]:
    """Every side ``--repeats`` times, the order rotating by one each repeat."""
    workers = dict(zip(SIDES[:3], ("grid-batched", "grid-unbatched", "generate-loop"), strict=True))
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        order = SIDES[repeat % len(SIDES) :] + SIDES[: repeat % len(SIDES)]
        for side in order:
            out = scratch / f"{workers.get(side, 'cli')}-{repeat}"
            out.mkdir(parents=True)
            if side in workers:
                runs[side].append(run_worker(args, workers[side], out))
            else:
                runs[side].append(run_cli_side(args, out))
    return runs


# --------------------------------------------------------------------------- report


def max_pixel_difference(paths: list[str], reference: list[str]) -> int:
    import numpy as np
    from PIL import Image

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    return max(int(abs(pixels(a) - pixels(b)).max()) for a, b in zip(paths, reference, strict=True))


def clip_skip_table(runs: dict[str, list[dict]]) -> str:
    lines = [
        "| side | processes | model loads | wall s | load s | UNet calls | UNet rows | UNet s "
        "| rest s | wall vs batched | vs unbatched: max abs diff decoder input / pixels "
        "| other processes' CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "load_s", "unet_s")}
           for side, rs in runs.items()}  # fmt: skip
    reference = runs[REFERENCE][0]
    for side, side_runs in runs.items():
        first, m = side_runs[0], med[side]
        diff = max_pixel_difference(first["paths"], reference["paths"])
        diff = f"{max_latent_difference(first, reference):.3g} / {diff}"
        rest = m["wall_s"] - m["load_s"] - m["unet_s"]
        other = max(r["other_cpu_s"] for r in side_runs)
        lines.append(
            f"| {side} | {first['processes']} | {first['loads']} | {m['wall_s']:.1f} | "
            f"{m['load_s']:.1f} | {first['calls']} | {first['rows']} | {m['unet_s']:.1f} | "
            f"{rest:.1f} | {m['wall_s'] / med['grid batched']['wall_s']:.2f}x | {diff} | "
            f"{other:.1f} |"
        )
    return "\n".join(lines)


def decoded_latents(run: dict) -> list:
    """Every cell's VAE decoder input, in cell order."""
    import torch

    return [t for path in run["decoded"] for t in torch.load(path)["decoded"]]


def max_latent_difference(run: dict, reference: dict) -> float:
    pairs = zip(decoded_latents(run), decoded_latents(reference), strict=True)
    return max(float((a - b).abs().max()) for a, b in pairs)


def cells_distinct(run: dict) -> str:
    """Max abs differences between the cells of one batched grid: their prompt
    conditionings (cond rows of the first UNet call: cell after cell, cond then uncond),
    decoder inputs and 8-bit pixels."""
    import torch

    latents, paths = decoded_latents(run), run["paths"]
    context = torch.load(run["decoded"][0])["context"].chunk(len(paths))
    parts = []
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            cond = float((context[i][0] - context[j][0]).abs().max())
            latent = float((latents[i] - latents[j]).abs().max())
            pixel = max_pixel_difference([paths[i]], [paths[j]])
            parts.append(f"{CLIP_SKIPS[i]} vs {CLIP_SKIPS[j]}: {cond:.3g} / {latent:.3g} / {pixel}")
    return "; ".join(parts)


def lora_table(result: dict) -> str:
    lines = [
        "| pass | cell | LoRA weight | LoRA switch s | of which patcher s | layers rebuilt / "
        "restored | file reads (s) | hashing s | UNet s | cell total s | switch / total |",
        "|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    per_pass = len(LORA_WEIGHTS)
    for index, cell in enumerate(result["cells"]):
        switch = cell.get("prepare_job_loras", 0.0)
        layers = cell.get("layers") or [0, 0]
        reads = f"{cell.get('read_lora_n', 0)} ({cell.get('read_lora', 0.0):.3f})"
        lines.append(
            f"| {index // per_pass + 1} | {index % per_pass + 1} | {cell['weight']} | "
            f"{switch:.3f} | {cell.get('apply', 0.0):.3f} | {layers[0]} / {layers[1]} | "
            f"{reads} | {cell.get('lora_sha256', 0.0):.3f} | {cell['unet_s']:.2f} | "
            f"{cell['total_s']:.2f} | {100 * switch / cell['total_s']:.1f}% |"
        )
    return "\n".join(lines)


def lora_shape(path: Path) -> tuple[int, int]:
    """(rank, layers) of a kohya file, from its ``lora_down`` tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        keys = file.keys()  # safe_open is not iterable
        downs = [key for key in keys if key.endswith(".lora_down.weight")]
        return file.get_slice(downs[0]).get_shape()[0], len(downs)


def versions() -> str:
    from importlib import metadata

    names = ("sdstack", "torch", "diffusers", "transformers")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def settings(args) -> str:
    import torch

    return (
        f"{args.checkpoint.name} as {args.dtype}, {args.size}x{args.size}, {SAMPLER}, "
        f"{args.steps} steps, CFG {CFG:g}, seed {SEED}, 1 image per cell; {versions()}; "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cli"]:
        return cli_shim(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64 (about 2 minutes)")
    parser.add_argument("--size", type=int, help="width = height (default 256; 64 quick)")
    parser.add_argument("--steps", type=int, default=4, help="Euler steps (default 4)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (median)")
    parser.add_argument("--passes", type=int, default=2, help="LoRA grid passes (default 2)")
    for hidden in ("--worker", "--checkpoint", "--config", "--out", "--loras", "--report"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        for name in ("checkpoint", "config", "out", "loras"):
            setattr(args, name, Path(getattr(args, name)))
        work = lora_worker if args.worker == "lora" else clip_skip_worker
        Path(args.report).write_text(json.dumps(work(args)), encoding="utf-8")
        return 0
    # 1. Fixtures (kept when present), the checkpoint read once into the page cache.
    make = make_fixtures.make_quick if args.quick else make_fixtures.make_full
    args.checkpoint, args.config = make()
    args.size = args.size or (64 if args.quick else 256)
    args.loras = make_fixtures.FIXTURES / ("quick/lora" if args.quick else "lora")
    lora_bench.write_loras(args.config, args.loras, 4 if args.quick else 32)
    with args.checkpoint.open("rb") as file:
        while file.read(1 << 24):
            pass
    # 2. The two cases, one process at a time.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="grid-bench-") as folder:
        scratch = Path(folder)
        runs = run_clip_skip_case(args, scratch)
        (scratch / "lora").mkdir()
        lora_result = run_worker(args, "lora", scratch / "lora")
        load_after = os.getloadavg()[0]
        table = clip_skip_table(runs)  # compares the saved images
        distinct = cells_distinct(runs["grid batched"][0])
    # 3. The tables.
    print(f"{settings(args)}; load average {load_before:.2f} before, {load_after:.2f} after\n")
    print(f"(a) clip-skip={','.join(map(str, CLIP_SKIPS))}: median of {args.repeats} run(s)\n")
    print(table)
    print(
        "\nbatched grid, cell vs cell (clip skips), max abs diff of the prompt conditioning / "
        f"decoder input / pixels: {distinct}"
    )
    rank, layers = lora_shape(args.loras / f"{LORA_NAME}.safetensors")
    weights = ",".join(map(str, LORA_WEIGHTS))
    print(
        f"\n(b) lora:{LORA_NAME}={weights}: rank-{rank} kohya LoRA, {layers} layers, "
        f"{args.passes} pass(es) in one process (load {lora_result['load_s']:.1f} s, not in "
        f"the cells; other processes' CPU {lora_result['other_cpu_s']:.1f} s)\n"
    )
    print(lora_table(lora_result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
