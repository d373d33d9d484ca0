"""``sdstack deproject train|eval``: train a CLIP text deprojector, and score it.

``train`` runs the teacher CLIP of ``--model`` over the captions (pairs cached in
``OUT/pairs``), trains a deprojector with the reference's weighted loss, augmentation and
early stopping, and writes it to ``OUT`` (``model.safetensors``, ``config.json``,
``training.json``). It saves its state every ``--save-every`` steps: after an
interruption, the same command continues, and ends where an uninterrupted run would.
``eval`` scores deprojectors per position (cosine similarity, MSE) on the held-out
captions against two baselines, as a table, ``--json`` and a ``--plot`` PNG. torch is
imported inside the handlers, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sdstack.commands.arguments import add_command_group

DECODER_CHOICES = ("autoregressive", "parallel")

TRAIN_EPILOG = """\
examples:
  sdstack deproject train --model v1-5-pruned-emaonly.safetensors --captions laion.parquet \\
      --out deprojector-ar --epochs 20
  sdstack deproject train --model anime.safetensors --captions captions.txt --out dp-skip2 \\
      --clip-skip 2 --decoder parallel --device cuda

Interrupted? Run the same command again: it continues from OUT/training-state.pt (at most
--save-every steps are redone) and ends with the weights an uninterrupted run would have.
The caption file is .txt (one per line), .csv or .parquet (a column named caption, text or
prompt, else the first).
"""

EVAL_EPILOG = """\
examples:
  sdstack deproject eval --deprojector deprojector-ar --model v1-5.safetensors \\
      --captions laion.parquet --plot eval.png
  sdstack deproject eval --deprojector dp-ar --deprojector dp-parallel --model M \\
      --captions captions.txt --json

The captions are split as training split them (the deprojector's training.json gives the
held-out fraction and seed), so with the training caption file the scores are on
captions training never saw. Methods: teacher-forced and free-running (autoregressive),
parallel, and the baselines "pooled repeated" and "linear map" (least squares, fitted on
the other captions).
"""


def register(subparsers: Any) -> None:
    """Add the ``deproject`` command group (``train``, ``eval``)."""
    commands = add_command_group(
        subparsers,
        "deproject",
        help="train and evaluate CLIP text deprojectors (sentence embedding -> 77 states)",
        description="CLIP text deprojectors: rebuild the UNet conditioning from one "
        "sentence embedding.",
    )
    _register_train(commands)
    _register_eval(commands)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="the teacher CLIP: diffusers folder, text_encoder folder or file, or a full "
        "single-file SD1.x checkpoint",
    )
    parser.add_argument(
        "--captions", required=True, metavar="FILE", help="captions: .txt, .csv or .parquet"
    )
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="diffusers-layout folder whose configs replace the packaged SD1.5 ones "
        "(single-file checkpoints of non-standard sizes)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda")
    parser.add_argument(
        "--pairs-cache", metavar="DIR", help="folder of cached teacher pairs (train: OUT/pairs)"
    )


def _register_train(commands: Any) -> None:
    parser = commands.add_parser(
        "train",
        help="train a deprojector on a caption file",
        description="Train a CLIP text deprojector with the teacher CLIP of --model.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--clip-skip",
        type=int,
        default=1,
        metavar="N",
        help="rebuild the layer clip skip N uses (default: 1, the last)",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODER_CHOICES,
        default="autoregressive",
        help="autoregressive (KV cache) or parallel (default: autoregressive)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        metavar="N",
        help="CLIP encoder layers, initialised from CLIP's last (default: 1)",
    )
    parser.add_argument("--input-mlp", action="store_true", help="an MLP on the input vector")
    parser.add_argument(
        "--ensemble", type=int, default=1, metavar="N", help="layer stacks averaged (default: 1)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=10, metavar="N", help="default: 10")
    length.add_argument(
        "--steps", type=int, metavar="N", help="optimiser steps (instead of epochs)"
    )
    parser.add_argument("--batch-size", type=int, default=100, metavar="N", help="default: 100")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="split, augmentation, batches (0)")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of captions held out (default: 0.1)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="steps between held-out measurements (default: one epoch)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=5,
        metavar="N",
        help="stop after N measurements without a new best (default: 5)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=100,
        metavar="N",
        help="steps between saved states (default: 100)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(handler=run_train)


def _register_eval(commands: Any) -> None:
    parser = commands.add_parser(
        "eval",
        help="score deprojectors per position against two baselines",
        description="Per-position cosine similarity and MSE of deprojectors on held-out "
        "captions, against the pooled-repeated and linear-map baselines.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--deprojector",
        required=True,
        action="append",
        metavar="DIR",
        help="a deprojector folder (repeat to compare several)",
    )
    _common(parser)
    parser.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        help="held-out fraction (default: the training's, else 0.1)",
    )
    parser.add_argument("--seed", type=int, help="split seed (default: the training's, else 0)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a plot (cosine, MSE per position)")
    parser.set_defaults(handler=run_eval)


def _checked_device(device: str) -> Any:
    from sdstack.models.assemble import resolve_device
    from sdstack.validate import SettingError

    try:
        return resolve_device(device)
    except SettingError as error:
        raise SettingError(f"--{error}") from None


def _train_settings(args: argparse.Namespace) -> Any:
    from sdstack.text.deprojector.training import TrainSettings
    from sdstack.validate import SettingError

    settings = TrainSettings(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        holdout=args.holdout,
        eval_every=args.eval_every,
        patience=args.patience,
        save_every=args.save_every,
    )
    try:
        return settings.check()
    except SettingError as error:
        raise SettingError(f"--{str(error).replace('_', '-')}") from None


def run_train(args: argparse.Namespace) -> int:
    """Handler: check the options and captions, load CLIP, train, report."""
    from sdstack.cli import CommandError
    from sdstack.commands.encode import load_text_side
    from sdstack.prompt import load_tokenizer
    from sdstack.text.deprojector.captions import read_captions
    from sdstack.text.deprojector.training import train_deprojector
    from sdstack.validate import check_int

    # 1. Check everything before loading the model.
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} exists and is not a folder")
    settings = _train_settings(args)
    check_int("--clip-skip", args.clip_skip, 1, 64)
    check_int("--layers", args.layers, 1, 64)
    check_int("--ensemble", args.ensemble, 1, 16)
    device = _checked_device(args.device)
    captions = read_captions(args.captions)
    options = {
        "clip_skip": args.clip_skip,
        "decoder": args.decoder,
        "layers": args.layers,
        "input_mlp": args.input_mlp,
        "ensemble": args.ensemble,
    }
    # 2. Load the teacher, train with a progress line.
    progress = TrainingLine(enabled=not args.quiet)
    with progress:
        progress.phase("loading")
        import torch

        text_encoder = load_text_side(Path(args.model), torch.float32, str(device), args.config_dir)
        result = train_deprojector(
            text_encoder,
            load_tokenizer(),
            captions,
            out,
            settings=settings,
            model_options=options,
            device=device,
            cache_dir=args.pairs_cache,
            on_progress=progress.update,
            on_phase=progress.phase,
        )
    # 3. Report.
    why = "stopped early (no new best held-out loss)" if result.stopped_early else "done"
    print(
        f"wrote {out}: {args.decoder} deprojector, {len(captions)} captions, "
        f"{result.steps}/{result.total} steps ({why}); best held-out loss "
        f"{result.best_loss:.4g} at step {result.best_step}"
    )
    return 0


class TrainingLine:
    """One tqdm line on stderr: the phase, then steps with loss and held-out loss."""

    def __init__(self, *, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=None,
            desc="starting",
            file=sys.stderr,
            disable=not enabled,
            unit="step",
            leave=True,
            dynamic_ncols=True,
        )
        self.heldout: float | None = None

    def __enter__(self) -> TrainingLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def phase(self, name: str) -> None:
        """Show the phase name (loading, encoding captions, training, saving)."""
        self.bar.set_description_str(name, refresh=True)

    def update(self, record: Any) -> None:
        """``on_progress``: a :class:`~sdstack.text.deprojector.training.TrainProgress`."""
        if self.bar.total != record.total:
            self.bar.reset(total=record.total)
            self.bar.update(record.step - 1)  # a resumed run starts past 0
            self.bar.set_description_str("training")
        if record.heldout is not None:
            self.heldout = record.heldout
        postfix = {"loss": f"{record.loss:.4g}"}
        if self.heldout is not None:
            postfix.update(heldout=f"{self.heldout:.4g}", best=f"{record.best:.4g}")
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(record.step - self.bar.n)


def _training_split(folders: list[str]) -> dict[str, Any]:
    """``holdout`` and ``seed`` from the first deprojector's ``training.json`` (if any)."""
    from sdstack.text.deprojector.training import RECORD_FILE

    record = Path(folders[0]) / RECORD_FILE
    try:
        settings = json.loads(record.read_text(encoding="utf-8")).get("settings", {})
        holdout, seed = settings.get("holdout"), settings.get("seed")
    except (OSError, ValueError, AttributeError):
        return {"holdout": 0.1, "seed": 0}
    ok = isinstance(holdout, float) and isinstance(seed, int) and not isinstance(seed, bool)
    return {"holdout": holdout, "seed": seed} if ok else {"holdout": 0.1, "seed": 0}


def run_eval(args: argparse.Namespace) -> int:
    """Handler: load the deprojectors and CLIP, score them, print/plot."""
    from sdstack.cli import CommandError
    from sdstack.commands.encode import load_text_side
    from sdstack.prompt import load_tokenizer
    from sdstack.text.deprojector.captions import read_captions
    from sdstack.validate import check_int, check_number

    # 1. Check everything before loading.
    for folder in args.deprojector:
        if not Path(folder).is_dir():
            raise CommandError(f"--deprojector {folder!r} is not a folder")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise CommandError(f"--plot {args.plot!r}: expected a .png file name")
    split = _training_split(args.deprojector)
    if args.holdout is not None:
        split["holdout"] = check_number("--holdout", args.holdout, 0.0, 0.9)
    if args.seed is not None:
        split["seed"] = check_int("--seed", args.seed, 0, 2**62)
    device = _checked_device(args.device)
    captions = read_captions(args.captions)
    # 2. Load, score.
    evaluation = _evaluate(args, split, device, captions, load_text_side, load_tokenizer)
    # 3. Report.
    if args.plot is not None:
        from sdstack.text.deprojector.plots import plot_evaluation

        plot_evaluation(evaluation, args.plot)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=2))
    else:
        from sdstack.text.deprojector.evaluation import format_table

        print(format_table(evaluation))
        if args.plot is not None:
            print(f"wrote {args.plot}")
    return 0


def _evaluate(args, split, device, captions, load_text_side, load_tokenizer) -> Any:
    import torch

    from sdstack.text.deprojector.evaluation import evaluate
    from sdstack.text.deprojector.files import clip_fingerprint, load_deprojector

    text_encoder = load_text_side(Path(args.model), torch.float32, str(device), args.config_dir)
    models = {}
    for folder in args.deprojector:
        label = Path(folder).resolve().name or folder
        if label in models:
            label = folder
        models[label] = load_deprojector(folder, text_encoder=text_encoder, device=device)
    return evaluate(
        models,
        text_encoder,
        load_tokenizer(),
        captions,
        holdout=split["holdout"],
        seed=split["seed"],
        cache_dir=args.pairs_cache,
        fingerprint=clip_fingerprint(text_encoder),
    )
