"""``sdstack train lora``: train a kohya-format LoRA from a folder of captioned images.

Thin: options become a ``TrainSettings`` (checked before anything is read), the data
folder is scanned (``sdstack.train.scan_dataset``), ``--dry-run`` prints the plan
without loading the model, otherwise the model is loaded and ``sdstack.train.train_lora``
runs with one progress line (loss, step/s, time left). Ctrl-C stops at the next step and
saves a training state to ``--resume`` from. torch is imported inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sdstack.commands.arguments import add_command_group

OPTION_NAMES = {
    "clip_skip": "--clip-skip", "network": "--network", "rank": "--rank",
    "alpha": "--alpha", "conv_rank": "--conv-rank", "conv_alpha": "--conv-alpha",
    "train_unet": "--text-encoder-only", "train_text_encoder": "--unet-only",
    "steps": "--steps", "epochs": "--epochs", "learning_rate": "--lr",
    "unet_lr": "--unet-lr", "text_encoder_lr": "--te-lr", "lr_scheduler": "--lr-scheduler",
    "lr_warmup_steps": "--warmup-steps", "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm", "gradient_accumulation_steps": "--grad-accum",
    "gradient_checkpointing": "--gradient-checkpointing",
    "mixed_precision": "--mixed-precision", "min_snr_gamma": "--min-snr-gamma",
    "noise_offset": "--noise-offset", "resolution": "--resolution",
    "enable_bucket": "--no-bucket", "min_bucket_reso": "--min-bucket-reso",
    "max_bucket_reso": "--max-bucket-reso", "bucket_reso_steps": "--bucket-steps",
    "bucket_no_upscale": "--bucket-no-upscale", "batch_size": "--batch-size",
    "seed": "--seed", "shuffle_caption": "--shuffle-caption", "keep_tokens": "--keep-tokens",
    "caption_dropout_rate": "--caption-dropout", "caption_tag_dropout_rate": "--tag-dropout",
    "caption_separator": "--caption-separator", "caption_extensions": "--caption-extension",
    "flip_aug": "--flip", "cache_latents": "--no-cache-latents",
    "latent_cache_dir": "--latent-cache", "output": "--out", "save_every": "--save-every",
    "save_every_epochs": "--save-every-epochs", "save_precision": "--save-precision",
    "resume": "--resume", "sample_prompts": "--sample", "sample_every": "--sample-every",
    "sample_steps": "--sample-steps", "sample_sampler": "--sample-sampler",
    "sample_cfg": "--sample-cfg", "sample_negative": "--sample-negative",
    "sample_seed": "--sample-seed", "device": "--device", "training_comment": "--comment",
}  # fmt: skip
"""TrainSettings field -> the option that sets it, for messages."""


def register(subparsers: Any) -> None:
    """Add ``train`` and ``train lora``."""
    commands = add_command_group(
        subparsers,
        "train",
        help="train a LoRA (kohya format) from a folder of captioned images",
        description="Training for SD1.x models.",
    )
    _register_lora(commands)


def _resolution(text: str) -> tuple[int, int]:
    """``--resolution``: ``S``, ``W,H`` or ``WxH``."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected S, W,H or WxH, got {text!r}")
    return (sizes[0], sizes[-1])


def _add(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    parser.add_argument(*names, **kwargs)


def _register_lora(commands: Any) -> None:
    p = commands.add_parser(
        "lora",
        help="train a LoRA / LoCon on a folder of images with captions",
        description="Train a kohya sd-scripts LoRA: images with same-stem .txt/.caption "
        "files in N_concept subfolders (N repeats), aspect-ratio buckets around "
        "--resolution, the text encoder at --clip-skip exactly as generation runs it, "
        "AdamW, epsilon loss (optional min-SNR gamma, noise offset). Writes OUT with "
        "kohya's ss_* metadata, OUT-stem-loss.csv/.png, and with --save-every N a LoRA "
        "and a training state (.trainstate, for --resume) every N steps.",
    )
    _add(p, "--model", required=True, metavar="M", help="SD1.x checkpoint or diffusers folder")
    _add(p, "--data", required=True, metavar="DIR", help="training images folder")
    _add(p, "--out", required=True, metavar="OUT", help="the LoRA .safetensors to write")
    _add(p, "--clip-skip", type=int, default=None, metavar="N", help="1 = last layer (default)")
    _add(p, "--network", default="lora", help="lora or locon (adds the 3x3 convs)")
    _add(p, "--rank", type=int, default=16, help="LoRA rank / network dim (16)")
    _add(p, "--alpha", type=float, default=8.0, help="LoRA alpha (8); scale = alpha/rank")
    _add(p, "--conv-rank", type=int, default=None, help="LoCon 3x3 rank (default: --rank)")
    _add(p, "--conv-alpha", type=float, default=None, help="LoCon 3x3 alpha (1)")
    length = p.add_mutually_exclusive_group()
    _add(length, "--steps", type=int, default=None, metavar="N", help="optimizer steps (1600)")
    _add(length, "--epochs", type=int, default=None, metavar="E", help="epochs instead")
    _add(p, "--lr", type=float, default=1e-4, help="learning rate (1e-4)")
    _add(p, "--unet-lr", type=float, default=None, help="UNet learning rate (--lr)")
    _add(p, "--te-lr", type=float, default=None, help="text-encoder learning rate (--lr)")
    _add(p, "--lr-scheduler", default="constant", help="constant, constant_with_warmup, cosine")
    _add(p, "--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up steps")
    _add(p, "--weight-decay", type=float, default=0.01, help="AdamW weight decay (0.01)")
    _add(p, "--max-grad-norm", type=float, default=1.0, help="gradient clip (1; 0 = off)")
    _add(p, "--grad-accum", type=int, default=1, metavar="N", help="micro-batches per step")
    _add(p, "--gradient-checkpointing", action="store_true", help="save memory, ~30%% slower")
    _add(p, "--mixed-precision", default="no", help="no, fp16 or bf16 (CUDA only)")
    _add(p, "--min-snr-gamma", type=float, default=None, help="min-SNR loss weight (e.g. 5)")
    _add(p, "--noise-offset", type=float, default=None, help="noise offset (e.g. 0.05)")
    _add(p, "--resolution", type=_resolution, default=(512, 512), help="S or WxH (512)")
    _add(p, "--no-bucket", action="store_true", help="one bucket of --resolution")
    _add(p, "--min-bucket-reso", type=int, default=None, help="smallest bucket side (256)")
    _add(p, "--max-bucket-reso", type=int, default=None, help="largest bucket side (1024)")
    _add(p, "--bucket-steps", type=int, default=64, help="bucket sides are multiples (64)")
    _add(p, "--bucket-no-upscale", action="store_true", help="never enlarge images")
    _add(p, "--batch-size", type=int, default=1, help="images per batch (1)")
    _add(p, "--seed", type=int, default=0, help="seed of every random draw (0)")
    _add(p, "--shuffle-caption", action="store_true", help="shuffle the caption's tags")
    _add(p, "--keep-tokens", type=int, default=0, metavar="K", help="first K tags stay fixed")
    _add(p, "--caption-dropout", type=float, default=0.0, help="rate of empty captions")
    _add(p, "--tag-dropout", type=float, default=0.0, help="rate of dropped tags")
    _add(p, "--caption-separator", default=",", help="tag separator (,)")
    _add(p, "--caption-extension", action="append", default=None, metavar="EXT",
         help="caption suffix (repeatable; default .txt then .caption)")  # fmt: skip
    _add(p, "--flip", action="store_true", help="random horizontal flips")
    _add(p, "--latent-cache", default=None, metavar="DIR", help="latent cache folder")
    _add(p, "--no-cache-latents", action="store_true", help="keep latents in a temporary folder")
    _add(p, "--save-every", type=int, default=None, metavar="N", help="save every N steps")
    _add(p, "--save-every-epochs", type=int, default=None, metavar="N", help="every N epochs")
    _add(p, "--save-precision", default="fp16", help="fp16 (default), bf16 or fp32")
    _add(p, "--resume", default=None, metavar="STATE", help="a .trainstate to continue from")
    _add(p, "--sample", action="append", default=[], metavar="PROMPT", help="sample prompt")
    _add(p, "--sample-every", type=int, default=None, metavar="N", help="sample every N steps")
    _add(p, "--sample-steps", type=int, default=20, help="sampling steps (20)")
    _add(p, "--sample-sampler", default="Euler a", help="sampler of the samples (Euler a)")
    _add(p, "--sample-cfg", type=float, default=7.0, help="CFG scale of the samples (7)")
    _add(p, "--sample-negative", default="", help="negative prompt of the samples")
    _add(p, "--sample-seed", type=int, default=None, help="seed of the samples (--seed)")
    _add(p, "--unet-only", action="store_true", help="no text-encoder LoRA")
    _add(p, "--text-encoder-only", action="store_true", help="no UNet LoRA")
    _add(p, "--comment", default=None, help="ss_training_comment")
    _add(p, "--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    _add(p, "--vae", default=None, metavar="FILE", help="a VAE file replacing the model's")
    _add(p, "--config-dir", default=None, metavar="DIR",
         help="diffusers-layout config folder for a model not shaped like SD1.5")  # fmt: skip
    _add(p, "--dry-run", action="store_true", help="print buckets, counts and steps; no model")
    _add(p, "--quiet", action="store_true", help="no progress display")
    p.set_defaults(handler=run_lora)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The checked ``TrainSettings`` of the parsed options (messages name the options)."""
    from sdstack.train.settings import TrainSettings, check_train_settings

    settings = TrainSettings(
        clip_skip=args.clip_skip, network=args.network, rank=args.rank, alpha=args.alpha,
        conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
        train_unet=not args.text_encoder_only, train_text_encoder=not args.unet_only,
        steps=args.steps, epochs=args.epochs, learning_rate=args.lr, unet_lr=args.unet_lr,
        text_encoder_lr=args.te_lr, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, gradient_accumulation_steps=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision, min_snr_gamma=args.min_snr_gamma,
        noise_offset=args.noise_offset, resolution=args.resolution,
        enable_bucket=not args.no_bucket, min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_steps,
        bucket_no_upscale=args.bucket_no_upscale, batch_size=args.batch_size, seed=args.seed,
        shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens,
        caption_dropout_rate=args.caption_dropout, caption_tag_dropout_rate=args.tag_dropout,
        caption_separator=args.caption_separator,
        caption_extensions=tuple(args.caption_extension or (".txt", ".caption")),
        flip_aug=args.flip, cache_latents=not args.no_cache_latents,
        latent_cache_dir=None if args.latent_cache is None else Path(args.latent_cache),
        output=Path(args.out), save_every=args.save_every,
        save_every_epochs=args.save_every_epochs, save_precision=args.save_precision,
        resume=None if args.resume is None else Path(args.resume),
        sample_prompts=tuple(args.sample), sample_every=args.sample_every,
        sample_steps=args.sample_steps, sample_sampler=args.sample_sampler,
        sample_cfg=args.sample_cfg, sample_negative=args.sample_negative,
        sample_seed=args.sample_seed, device=args.device, training_comment=args.comment,
    )  # fmt: skip
    return check_train_settings(settings, OPTION_NAMES)


def _check_paths(args: argparse.Namespace) -> None:
    from sdstack.cli import CommandError
    from sdstack.generate.outputs import check_output_folder

    if not Path(args.model).exists():
        raise CommandError(f"--model {args.model!r}: no such file or folder")
    if not Path(args.data).is_dir():
        raise CommandError(f"--data {args.data!r}: not a folder of training images")
    if Path(args.out).is_dir():
        raise CommandError(f"--out {args.out!r}: is a folder, expected a .safetensors file")
    check_output_folder(Path(args.out).parent, "--out")


def run_lora(args: argparse.Namespace) -> int:
    """Handler of ``sdstack train lora``."""
    from sdstack.train.dataset import scan_dataset

    # 1. Check the options and paths, read the data folder.
    settings = settings_from_args(args)
    _check_paths(args)
    data = scan_dataset(args.data, caption_extensions=settings.caption_extensions)
    if args.dry_run:
        print(dry_run_text(data, settings))
        return 0
    # 2. Load the model, 3. train.
    _check_device(args.device)
    result = _train(args, data, settings)
    _print_result(result)
    return 0


def dry_run_text(data: Any, settings: Any) -> str:
    """``--dry-run``: the data, buckets, repeats and step count (no model loaded)."""
    from sdstack.train.batches import dry_run_report
    from sdstack.train.buckets import BucketManager, assign_buckets
    from sdstack.train.settings import DEFAULT_STEPS

    manager = BucketManager(
        settings.resolution, enable_bucket=settings.enable_bucket,
        min_size=settings.min_bucket_reso, max_size=settings.max_bucket_reso,
        steps=settings.bucket_reso_steps, no_upscale=settings.bucket_no_upscale,
    )  # fmt: skip
    steps = settings.steps if settings.epochs is not None or settings.steps else DEFAULT_STEPS
    return dry_run_report(
        data, assign_buckets(data, manager), settings.batch_size, epochs=settings.epochs,
        steps=None if settings.epochs is not None else steps,
        gradient_accumulation=settings.gradient_accumulation_steps,
    )  # fmt: skip


def _check_device(device: str) -> None:
    from sdstack.models.assemble import resolve_device
    from sdstack.validate import SettingError

    try:
        resolve_device(device)
    except SettingError as error:
        raise SettingError(f"--device: {error}") from None


class _TrainDisplay:
    """``train_lora(progress=...)`` -> the one stderr bar: step/total, step/s, time
    left (tqdm), the loss and its running mean."""

    def __init__(self, display: Any) -> None:
        self.display = display
        self.losses: list[float] = []

    def __call__(self, record: Any) -> None:
        display = self.display
        if record.phase != "training":
            display.bar.initial = 0
            display.bar.set_postfix_str("", refresh=False)
            display.phase(record.phase)
            return
        if display.label != "training":  # (again) after loading, saving or sampling
            display.phase("training", record.total, "step")
            display.bar.n = display.bar.initial = record.step - 1  # rate from here on
        self.losses = [*self.losses, record.loss][-50:]
        mean = sum(self.losses) / len(self.losses)
        display.bar.set_postfix_str(f"loss {record.loss:.4f} (avg {mean:.4f}), epoch "
                                    f"{record.epoch}", refresh=False)  # fmt: skip
        display.bar.update(record.step - display.bar.n)


def _train(args: argparse.Namespace, data: Any, settings: Any) -> Any:
    import signal
    import threading

    from sdstack.commands.progress import JobProgress
    from sdstack.models import load_model
    from sdstack.train.loop import train_lora

    stop = threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    with JobProgress(enabled=not args.quiet) as display:
        components = load_model(
            args.model, vae=args.vae, device=args.device, config_dir=args.config_dir,
            progress=display.loading,
        )  # fmt: skip
        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            return train_lora(components, data, settings, progress=_TrainDisplay(display),
                              cancel=stop)  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, previous)


def _print_result(result: Any) -> None:
    import sys

    if result.cancelled:
        state = result.states[-1] if result.states else None
        where = f"; resume with --resume {state}" if state is not None else ""
        print(f"sdstack: interrupted at step {result.steps}{where}", file=sys.stderr)
    for path in result.saved:
        print(path)
    for path in result.samples:
        print(path)
    if result.output is not None:
        last = result.losses[-10:]
        mean = sum(r.loss for r in last) / len(last) if last else float("nan")
        print(f"{result.output}: {result.steps} steps, {result.epochs} epochs, loss "
              f"{mean:.4f} (mean of the last {len(last)}); log {result.loss_csv}")  # fmt: skip
