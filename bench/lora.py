"""A stack of three LoRAs applied, re-weighted, switched and removed: sdstack
``set_loras`` vs diffusers + PEFT (``load_lora_weights``, ``set_adapters``,
``fuse_lora``/``unfuse_lora``).

Fixtures: the real-shape SD1.5 checkpoint of ``make_fixtures.py`` (made if missing) and three
rank-32 kohya LoRAs written here into ``bench/fixtures/lora/`` (git-ignored): seeded random
fp16 ``lora_down``/``lora_up`` with ``.alpha`` = rank / 2 over every attention projection
of the UNet (``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
transformer block) and every linear layer of the CLIP text encoder (``q/k/v/out_proj``,
``mlp.fc1``/``fc2``). ``lora_down ~ N(0, 1/in)``, ``lora_up ~ N(0, 0.01/rank)``, so each
delta ``alpha/rank * up @ down`` is about a tenth of the weights' N(0, 0.02) spread.

Phases, timed one by one on a model already loaded and paged in (the same for both sides):

1. apply A 1.0 + B 0.8 + C 0.6 (ours: read the files and patch; diffusers: three
   ``load_lora_weights``, ``set_adapters``, ``fuse_lora``);
2. change one multiplier, A 1.0 -> 0.5 (diffusers: ``unfuse_lora``, ``set_adapters``,
   ``fuse_lora``);
3. switch to B 0.7 + C 1.0 (diffusers: ``unfuse_lora``, ``set_adapters``, ``fuse_lora``);
4. remove all (ours: ``set_loras(model, [])``; diffusers: ``unfuse_lora``,
   ``unload_lora_weights``).

Each side runs in its own subprocess (peak RSS is its ``ru_maxrss``). The touched weights
are written to a scratch file before phase 1 (so that keeping them costs no memory); after
phases 1 and 3 the sum of |W - W0| checks that both sides applied the same deltas, and after
phase 4 the max |W - W0| is the residue removal leaves (ours: exactly 0 by construction).

Usage::

    .venv/bin/python bench/lora.py --quick       # tiny shapes, seconds
    .venv/bin/python bench/lora.py               # real-shape SD1.5, fp16
    .venv/bin/python bench/lora.py --profile 25  # + cProfile of the sdstack worker
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SDSTACK_ROOT", None)
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_fixtures  # noqa: E402  (bench/ sibling module)

SEED = 2024
NAMES = ("a", "b", "c")
PHASES: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
    ("apply A 1.0 + B 0.8 + C 0.6", (("a", 1.0), ("b", 0.8), ("c", 0.6))),
    ("multiplier A 1.0 -> 0.5", (("a", 0.5), ("b", 0.8), ("c", 0.6))),
    ("switch to B 0.7 + C 1.0", (("b", 0.7), ("c", 1.0))),
    ("remove all", ()),
)
UNET_PATTERN = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_PATTERN = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


# --------------------------------------------------------------------------- fixtures


def touched_modules(config_dir: Path) -> list[tuple[str, str, int, int]]:
    """(component, module path, in, out) of every layer the LoRAs touch, from meta modules.

    Text-encoder paths are spelled with ``text_model.`` first whatever transformers does.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.assemble import build_meta

    def config(name: str) -> dict:
        return json.loads((config_dir / name / "config.json").read_text(encoding="utf-8"))

    found = []
    unet = build_meta(UNet2DConditionModel, config("unet"))
    for name, module in unet.named_modules():
        if UNET_PATTERN.search(name):
            found.append(("unet", name, module.in_features, module.out_features))
    text_config = config("text_encoder")
    allowed = set(CLIPTextConfig().to_dict()) | {"vocab_size"}
    with torch.device("meta"):
        text = CLIPTextModel(
            CLIPTextConfig(**{k: v for k, v in text_config.items() if k in allowed})
        )
    for name, module in text.named_modules():
        if TEXT_PATTERN.search(name):
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            found.append(("text_encoder", path, module.in_features, module.out_features))
    return found


def kohya_name(component: str, path: str) -> str:
    """``lora_unet_`` / ``lora_te_`` + the module path with ``.`` -> ``_``."""
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def write_loras(config_dir: Path, folder: Path, rank: int) -> dict[str, Path]:
    """Three seeded kohya LoRAs (``lora-a/b/c.safetensors``) in ``folder``; kept if present."""
    import torch
    from safetensors.torch import save_file

    paths = {name: folder / f"lora-{name}.safetensors" for name in NAMES}
    if all(path.is_file() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    modules = touched_modules(config_dir)
    for index, (name, path) in enumerate(paths.items()):
        generator = torch.Generator().manual_seed(SEED + index)
        tensors = {}
        for component, module, fan_in, fan_out in modules:
            key = kohya_name(component, module)
            down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            up = torch.randn(fan_out, rank, generator=generator) * (0.1 / rank**0.5)
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank / 2),
            "ss_output_name": f"bench-{name}",
        }
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    return paths


# --------------------------------------------------------------------------- worker


def live_module(root, path: str):
    """The module at ``path``, with or without the text encoder's ``text_model.`` level."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def touched_weights(model, modules) -> list:
    """The current ``weight`` tensor of every touched module (PEFT: of its base layer)."""
    weights = []
    for component, path, _, _ in modules:
        module = live_module(getattr(model, component), path)
        module = getattr(module, "base_layer", module)
        weights.append(module.weight.detach())
    return weights


def snapshot(weights, path: Path) -> None:
    """Raw bytes of each weight, one after another (one tensor in memory at a time)."""
    with path.open("wb") as file:
        for weight in weights:
            file.write(weight.contiguous().view(-1).numpy().tobytes())


def compare(weights, path: Path) -> dict:
    """Against the snapshot: max |W - W0|, sum |W - W0| (float64) and weights not equal."""
    import torch

    worst, total, changed = 0.0, 0.0, 0
    with path.open("rb") as file:
        for weight in weights:
            raw = bytearray(file.read(weight.numel() * weight.element_size()))
            original = torch.frombuffer(raw, dtype=weight.dtype).view(weight.shape)
            if not torch.equal(original, weight):
                changed += 1
                difference = (weight.double() - original.double()).abs()
                worst = max(worst, float(difference.max()))
                total += float(difference.sum())
    return {"max": worst, "sum": total, "changed": changed}


def touch(model) -> None:
    """Read every parameter once (pages in memory-mapped weights before the clock runs)."""
    import torch

    with torch.no_grad():
        for part in (model.unet, model.vae, model.text_encoder):
            for parameter in part.parameters():
                float(parameter.float().sum())


def ours_phase(model, paths: dict[str, Path], stack) -> None:
    from sdstack.lora.stack import set_loras

    set_loras(model, [(str(paths[name]), weight) for name, weight in stack])


def diffusers_phase(pipe, paths: dict[str, Path], stack, state: dict) -> None:
    components = ["unet", "text_encoder"]
    if state.get("fused"):
        pipe.unfuse_lora(components=components)
        state["fused"] = False
    if not stack:
        pipe.unload_lora_weights()
        return
    for name, _ in stack:
        if name not in state.setdefault("loaded", set()):
            pipe.load_lora_weights(str(paths[name]), adapter_name=name)
            state["loaded"].add(name)
    names = [name for name, _ in stack]
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in stack])
    pipe.fuse_lora(components=components, adapter_names=names)
    state["fused"] = True


def load_side(side: str, checkpoint: str, config: str, dtype: str):
    import torch

    if side == "sdstack":
        from sdstack.models import load_model

        return load_model(checkpoint, dtype=dtype, config_dir=config)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        checkpoint,
        config=config,
        local_files_only=True,
        safety_checker=None,
        torch_dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype],
    )


def worker(
    side: str, checkpoint: str, config: str, dtype: str, loras: str, scratch: str, top: int = 0
) -> dict:
    """Load, snapshot, then the four phases in this process; timings, RSS and checks.

    ``top`` > 0: cProfile the phases (not the checks) and print the top entries on stderr.
    """
    import cProfile

    import diffusers  # noqa: F401  (imports before the clock, for both sides)
    import peft  # noqa: F401
    import torch

    import sdstack.lora.algorithms
    import sdstack.lora.formats
    import sdstack.lora.stack  # noqa: F401

    torch.set_grad_enabled(False)
    paths = {name: Path(loras) / f"lora-{name}.safetensors" for name in NAMES}
    modules = touched_modules(Path(config))
    model = load_side(side, checkpoint, config, dtype)
    touch(model)
    snapshot(touched_weights(model, modules), Path(scratch))
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds, checks, peak_mb, state = [], [], loaded_mb, {}
    profile = cProfile.Profile() if top else None
    for _, stack in PHASES:
        started = time.perf_counter()
        if profile is not None:
            profile.enable()
        if side == "sdstack":
            ours_phase(model, paths, stack)
        else:
            diffusers_phase(model, paths, stack, state)
        if profile is not None:
            profile.disable()
        seconds.append(time.perf_counter() - started)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        checks.append(compare(touched_weights(model, modules), Path(scratch)))
    Path(scratch).unlink()
    if profile is not None:
        print_profile(profile, top)
    return {
        "seconds": seconds,
        "checks": checks,
        "loaded_mb": loaded_mb,
        "peak_mb": peak_mb,
        "weights": len(modules),
        "dtype": str(touched_weights(model, modules)[0].dtype),
    }


def run_side(side: str, args, loras: Path) -> dict:
    scratch = loras / f"w0-{side}.bin"
    command = [sys.executable, __file__, "--worker", side, "--checkpoint", str(args.checkpoint)]
    command += ["--config", str(args.config), "--dtype", args.dtype, "--loras", str(loras)]
    command += ["--scratch", str(scratch)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.profile and side == "sdstack":
        command += ["--profile", str(args.profile)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    scratch.unlink(missing_ok=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{result.stderr[-4000:]}")
    if args.profile and side == "sdstack":
        print(result.stderr, file=sys.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_runs(args, loras: Path) -> tuple[dict, dict]:
    """``args.repeats`` runs per side, alternating; per-phase medians of times and RSS."""
    import statistics

    runs: dict[str, list[dict]] = {"sdstack": [], "diffusers": []}
    for _ in range(args.repeats):
        for side, side_runs in runs.items():
            side_runs.append(run_side(side, args, loras))
    merged = []
    for side_runs in runs.values():
        first = dict(side_runs[0])
        phases = zip(*(r["seconds"] for r in side_runs), strict=True)
        first["seconds"] = [statistics.median(times) for times in phases]
        for key in ("peak_mb", "loaded_mb"):
            first[key] = statistics.median(r[key] for r in side_runs)
        checks = zip(*(r["checks"] for r in side_runs), strict=True)
        first["checks"] = [max(runs_of_phase, key=lambda c: c["max"]) for runs_of_phase in checks]
        merged.append(first)
    return merged[0], merged[1]


# --------------------------------------------------------------------------- report


def versions() -> str:
    from importlib import metadata

    names = ("torch", "diffusers", "peft", "transformers")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def table(ours: dict, theirs: dict) -> str:
    lines = ["| phase | ours s | diffusers s | ratio |", "|---|---:|---:|---:|"]
    o, t = ours["seconds"], theirs["seconds"]
    rows = [(label, o[i], t[i]) for i, (label, _) in enumerate(PHASES)]
    rows.append(("apply + switch", o[0] + o[2], t[0] + t[2]))
    for label, o, t in rows:
        lines.append(f"| {label} | {o:.3f} | {t:.3f} | {o / t:.3f}x |")
    for label, key in (("peak RSS MB", "peak_mb"), ("loaded model RSS MB", "loaded_mb")):
        lines.append(
            f"| {label} | {ours[key]:.0f} | {theirs[key]:.0f} | {ours[key] / theirs[key]:.2f}x |"
        )
    growth = [side["peak_mb"] - side["loaded_mb"] for side in (ours, theirs)]
    lines.append(
        f"| RSS growth in the phases MB | {growth[0]:.0f} | {growth[1]:.0f} | "
        f"{growth[0] / max(1.0, growth[1]):.2f}x |"
    )
    o, t = ours["checks"][-1], theirs["checks"][-1]
    lines.append(f"| after removal: max abs(W - W0) | {o['max']:.3g} | {t['max']:.3g} | |")
    lines.append(
        f"| after removal: weights not bit-exact | {o['changed']} / {ours['weights']} | "
        f"{t['changed']} / {theirs['weights']} | |"
    )
    return "\n".join(lines)


def agreement(ours: dict, theirs: dict) -> str:
    """How closely the two sides' applied deltas agree (sum |W - W0| after phases 1-3)."""
    parts, worst = [], 0.0
    for (label, _), o, t in zip(PHASES[:3], ours["checks"], theirs["checks"], strict=False):
        relative = abs(o["sum"] - t["sum"]) / max(t["sum"], 1e-30)
        worst = max(worst, relative)
        parts.append(f"{label.split()[0]} {o['sum']:.4g} vs {t['sum']:.4g} ({relative:.1e})")
    verdict = "agree" if worst < 0.01 else "DIFFER: one side applied something else"
    return f"sum abs(W - W0), ours vs diffusers ({verdict}): " + "; ".join(parts)


def goals(ours: dict, theirs: dict) -> str:
    o, t = ours["seconds"], theirs["seconds"]
    ratio = (o[0] + o[2]) / (t[0] + t[2])
    residue = ours["checks"][-1]
    marks = [
        f"apply + switch {ratio:.3f}x of diffusers (goal <= 0.2x: "
        f"{'met' if ratio <= 0.2 else 'MISSED'})",
        f"multiplier change {o[1]:.3f} s (goal < 1 s: {'met' if o[1] < 1 else 'MISSED'})",
        f"removal residue {residue['max']:.3g} (goal exact: "
        f"{'met' if residue['changed'] == 0 else 'MISSED'}; diffusers "
        f"{theirs['checks'][-1]['max']:.3g})",
    ]
    return "Goal: " + "; ".join(marks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, rank 4 (seconds)")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--loras", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side (median)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in both workers")
    parser.add_argument("--profile", type=int, metavar="N", help="cProfile sdstack: top N")
    parser.add_argument("--worker", choices=("sdstack", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--side", choices=("sdstack", "diffusers"), help="run one side only (no table)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker_args = (args.worker, str(args.checkpoint), str(args.config), args.dtype)
        worker_args += (str(args.loras), str(args.scratch))
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(*worker_args, args.profile or 0)))
        return 0
    make = make_fixtures.make_quick if args.quick else make_fixtures.make_full
    args.checkpoint, args.config = make()
    rank = 4 if args.quick else 32
    loras = make_fixtures.FIXTURES / ("quick/lora" if args.quick else "lora")
    paths = write_loras(args.config, loras, rank)
    if args.side:
        print(json.dumps(run_side(args.side, args, loras), indent=1))
        return 0
    load_before = os.getloadavg()[0]
    ours, theirs = median_runs(args, loras)
    size = sum(path.stat().st_size for path in paths.values()) / 1e6
    threads = args.threads or "default"
    print(
        f"checkpoint {args.checkpoint.name}, {args.dtype} ({ours['dtype']} / "
        f"{theirs['dtype']}); 3 kohya LoRAs, rank {rank}, {ours['weights']} layers each, "
        f"{size:.1f} MB in all; {versions()}; {os.cpu_count()} CPUs, torch threads "
        f"{threads}; one process per side, sides alternate, median of {args.repeats} run(s) "
        f"per side; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(ours, theirs))
    print()
    print(agreement(ours, theirs))
    print(goals(ours, theirs))
    return 0


def print_profile(profile, top: int) -> None:
    """The ``top`` functions by cumulative and by own time, on stderr."""
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    print(stream.getvalue(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
