"""LoRA training speed and memory: ``train_lora`` steps vs the bare UNet forward+backward.

Same model, same batch shape (batch 1 at ``--resolution``, SD1.5 shapes: 4 latent
channels at 1/8, context 77x768), each configuration in a process of its own so that its
peak memory is its own:

- ``loop``: ``sdstack.train.train_lora`` (rank 16 LoRA on the UNet and the text encoder,
  AdamW, clip skip 2, latents cached), timed between the progress reports of consecutive
  steps once every image's latents are cached (the first epoch, which runs the VAE, is
  not timed);
- ``bare``: ``unet(z_t, t, c)`` and ``mse.backward()`` with the weights frozen and the
  gradient taken to the input, i.e. the activation gradients LoRA training needs anyway,
  without any LoRA, text-encoder pass, optimizer or data work.

Both with and without gradient checkpointing. ``loop / bare`` is the loop's overhead
(LoRA modules, the text encoder with gradients, AdamW, data). Memory: the peak resident
set size while stepping (sampled every 20 ms, the model included) and, on CUDA, the peak
allocated memory.

Model: ``bench/fixtures/sd15-random-fp16.safetensors`` (``bench/make_fixtures.py``)
loaded as fp32, else a real-shape SD1.5 model with random weights built in memory.
``--quick``: the tiny model at 64x64 (checks the script in seconds).

Usage::

    .venv/bin/python bench/train.py --quick
    .venv/bin/python bench/train.py                      # SD1.5 shapes, 256x256, CPU
    .venv/bin/python bench/train.py --device cuda --resolution 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = (("bare", False), ("loop", False), ("bare", True), ("loop", True))


class PeakRss:
    """Samples this process's resident set size (``/proc/self/statm``) in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRss:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def load_components(quick: bool, device: str):
    if quick:
        from sdstack.models.tiny import tiny_components

        return tiny_components(seed=0).to(device=device)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step import real_shape_components

    return real_shape_components("fp32", device)


def draw_data(folder: Path, size: int):
    """Two captioned shapes at ``size`` x ``size`` in ``1_shapes`` (one bucket)."""
    from PIL import Image, ImageDraw

    from sdstack.train.dataset import scan_dataset

    subset = folder / "1_shapes"
    subset.mkdir(parents=True)
    for name, colour in (("red_circle", "red"), ("blue_square", "blue")):
        image = Image.new("RGB", (size, size), "white")
        box = (size // 8, size // 8, size - size // 8, size - size // 8)
        draw = ImageDraw.Draw(image)
        (draw.ellipse if "circle" in name else draw.rectangle)(box, fill=colour)
        image.save(subset / f"{name}.png")
        (subset / f"{name}.txt").write_text(name.replace("_", " ") + ", shape")
    return scan_dataset(folder)


def sync_for(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def run_loop(components, args, checkpointing: bool) -> list[float]:
    """Step times of ``train_lora`` after the first epoch (2 images, batch 1)."""
    from sdstack.train.loop import train_lora
    from sdstack.train.settings import TrainSettings

    sync, stamps = sync_for(args.device), []
    warm = 2  # the first epoch: both images through the VAE, then cached

    def progress(record) -> None:
        if record.phase == "training":
            sync()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        data = draw_data(Path(folder) / "data", args.resolution)
        settings = TrainSettings(
            resolution=(args.resolution, args.resolution), steps=warm + 1 + args.steps,
            batch_size=1, rank=16, alpha=8.0, clip_skip=2, learning_rate=1e-4,
            gradient_checkpointing=checkpointing, device=args.device,
            mixed_precision=args.mixed_precision,
        )  # fmt: skip
        train_lora(components, data, settings, progress=progress)
    return [b - a for a, b in itertools.pairwise(stamps[warm:])]


def run_bare(components, args, checkpointing: bool) -> list[float]:
    """Step times of the bare UNet forward+backward on the same batch shape."""
    import torch

    unet, sync = components.unet, sync_for(args.device)
    device = next(unet.parameters()).device
    side = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, side, side), generator=generator).to(device)
    context = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
    context = context.to(device)
    unet.requires_grad_(False)
    if checkpointing:
        unet.train()
        unet.enable_gradient_checkpointing()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    times = []
    for _ in range(3 + args.steps):
        sync()
        start = time.perf_counter()
        noisy = latents.clone().requires_grad_(True)
        timestep = torch.randint(0, 1000, (1,), generator=generator).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            prediction = unet(noisy, timestep, context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    return times[3:]


def child(args) -> None:
    """One configuration; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    components = load_components(args.quick, args.device)
    loaded = PeakRss.current()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    kind, checkpointing = args.child, args.checkpointing
    with PeakRss() as rss:
        times = (run_loop if kind == "loop" else run_bare)(components, args, checkpointing)
    result = {
        "kind": kind, "checkpointing": checkpointing, "step_s": statistics.median(times),
        "times": times, "rss_loaded_mb": loaded / 2**20, "rss_peak_mb": rss.peak / 2**20,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    if args.device.startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def parent(args) -> None:
    results = []
    for kind, checkpointing in CONFIGS:
        command = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--resolution",
            str(args.resolution),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--mixed-precision",
            args.mixed_precision,
            "--threads",
            str(args.threads),
        ]
        command += ["--checkpointing"] if checkpointing else []
        command += ["--quick"] if args.quick else []  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=False)
        line = [x for x in output.stdout.splitlines() if x.startswith("RESULT ")]
        if output.returncode or not line:
            sys.exit(f"{kind} (checkpointing {checkpointing}) failed:\n{output.stderr[-3000:]}")
        results.append(json.loads(line[0][len("RESULT ") :]))
        print(f"done: {kind}, checkpointing {checkpointing}", file=sys.stderr)
    report(args, results)


def report(args, results) -> None:
    model = "tiny" if args.quick else "SD1.5 shapes"
    print(f"{model}, {args.resolution}x{args.resolution}, batch 1, {args.device}, "
          f"{results[0]['threads']} threads, precision {args.mixed_precision}, "
          f"median of {args.steps} steps")  # fmt: skip
    header = "| configuration | gradient checkpointing | s/step | steps/s | peak RSS (MB) |"
    cuda = "cuda_peak_mb" in results[0]
    print(header + (" CUDA peak (MB) |" if cuda else ""))
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    by_key = {(r["kind"], r["checkpointing"]): r for r in results}
    for r in results:
        name = "train_lora step" if r["kind"] == "loop" else "bare UNet fwd+bwd"
        row = (f"| {name} | {'on' if r['checkpointing'] else 'off'} | {r['step_s']:.3f} | "
               f"{1 / r['step_s']:.3f} | {r['rss_peak_mb']:.0f} |")  # fmt: skip
        print(row + (f" {r['cuda_peak_mb']:.0f} |" if cuda else ""))
    for checkpointing in (False, True):
        loop, bare = by_key[("loop", checkpointing)], by_key[("bare", checkpointing)]
        print(f"loop / bare, checkpointing {'on' if checkpointing else 'off'}: "
              f"{loop['step_s'] / bare['step_s']:.2f}x time, "
              f"{loop['rss_peak_mb'] - bare['rss_peak_mb']:+.0f} MB peak RSS")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model at 64x64")
    parser.add_argument("--resolution", type=int, default=None, help="256 (quick: 64)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", help="no, fp16, bf16 (CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resolution is None:
        args.resolution = 64 if args.quick else 256
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
