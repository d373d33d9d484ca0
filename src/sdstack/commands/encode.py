"""``sdstack encode``: a prompt and its negative -> ``prompt_embeds`` in a safetensors file.

The file holds exactly the two tensors a diffusers ``StableDiffusionPipeline`` takes as
``prompt_embeds=`` and ``negative_prompt_embeds=`` (same chunk count), plus metadata
(prompt, negative prompt, steps, clip skip, emphasis, model). The prompt is read as
``sdstack generate`` reads it (``encoded_texts``). torch and transformers are imported
inside the handler so that ``sdstack --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sdstack.prompt.errors import shorten
from sdstack.prompt.limits import MAX_STEPS

EMPHASIS_CHOICES = ("original", "no-norm", "ignore", "comfy")
"""Same as ``sdstack.text.EMPHASIS_MODES`` (not imported here: it would load torch)."""
FULL_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.")
"""Keys that mark a full single-file checkpoint (UNet or VAE inside)."""

EPILOG = """\
examples:
  sdstack encode --model ./sd15 "a (red:1.2) fox" --negative "blurry" --out fox.safetensors
  sdstack encode --model v1-5.safetensors "a fox" --clip-skip 2 --out fox2.safetensors
  echo "a fox, [forest|meadow]" | sdstack encode - --steps 1 --model ./sd15 --out fox3.safetensors

the prompt is read as `sdstack generate` reads it (with a first-order sampler):
  [from:to:when] edits and [a|b] alternations are resolved over --steps. A prompt that
  gives the same text at every step is encoded as that text; one that changes during
  sampling is refused (a prompt_embeds file holds one text). AND parts and AND weights
  ("text :2") are refused (they weigh several conditionings at sampling time); so are
  <lora:...> tags, as in generate. The negative prompt is read as generate reads it:
  scheduled, no AND split, tags kept as text. `sdstack prompt inspect PROMPT --steps N`
  shows the texts per step.

use in diffusers:
  pipe(**safetensors.torch.load_file("fox.safetensors"), num_inference_steps=20)

CLIP skip uses the reference web UI numbering (1 = last layer; diffusers clip_skip=k is N=k+1).
"""


def register(subparsers: Any) -> None:
    """Add the ``encode`` parser."""
    parser = subparsers.add_parser(
        "encode",
        help="encode a prompt (and negative) into SD1.x conditioning tensors",
        description="Encode a prompt and a negative prompt as the reference web UI does\n"
        "(emphasis, 75-token chunks, BREAK, CLIP skip, textual inversion) and save\n"
        "prompt_embeds / negative_prompt_embeds (same chunk count) to a safetensors file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prompt",
        help="the prompt text, or - to read it from stdin (UTF-8); one text at every step: "
        "no AND, no schedule that changes it (see below)",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="diffusers folder, text_encoder folder, text-encoder .safetensors or a "
        "full single-file SD1.x checkpoint",
    )
    parser.add_argument("--negative", default="", help="negative prompt (default: empty)")
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        metavar="N",
        help=f"sampling steps [from:to:when] and [a|b] are resolved over, 1..{MAX_STEPS} "
        "(default: 20, as generate)",
    )
    parser.add_argument(
        "--clip-skip",
        type=float,
        default=1,
        metavar="N",
        help="reference numbering: 1 = last layer (default), 2 = penultimate; fractions blend",
    )
    parser.add_argument(
        "--emphasis",
        default="original",
        metavar="MODE",
        help=f"emphasis mode: {', '.join(EMPHASIS_CHOICES)} (default: original)",
    )
    parser.add_argument(
        "--embeddings", metavar="DIR", help="folder of textual-inversion embeddings"
    )
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="diffusers-layout folder whose */config.json replace the packaged SD1.5 configs "
        "(single-file checkpoints only)",
    )
    add_text_dtype_option(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output .safetensors (must not exist)"
    )
    parser.set_defaults(handler=run_encode)


def add_text_dtype_option(parser: argparse.ArgumentParser) -> None:
    """``--dtype auto|fp32|fp16|bf16`` for the text encoder (default auto: what ``generate``
    would run it in on ``--device``)."""
    from sdstack.models.precision import DTYPE_CHOICES

    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="text-encoder dtype; auto (default) = what generate runs it in on --device: "
        "fp32 on CPUs, fp16 on CUDA and MPS",
    )


def _torch_dtype(name: str, device: str = "cpu") -> Any:
    """``--dtype`` -> the text encoder's torch dtype (``auto``: ``auto_dtypes(device)``)."""
    from sdstack.models.precision import resolve_dtypes

    return resolve_dtypes(name, device).text_encoder


def _is_full_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return path.suffix in (".ckpt", ".pt", ".pth")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith(FULL_CHECKPOINT_PREFIXES) for key in handle.keys())  # noqa: SIM118


def load_text_side(path: Path, dtype: Any, device: str, config_dir: str | None = None) -> Any:
    """The CLIP text model of ``path``; full single-file checkpoints go through ``load_model``.

    Raises:
        FileNotFoundError: ``path`` or ``config_dir``'s text-encoder config does not exist.
    """
    from sdstack.models.text_encoder import load_text_encoder

    if not path.exists():
        raise FileNotFoundError(f"--model {str(path)!r} does not exist")
    if path.is_file() and _is_full_checkpoint(path):
        import sdstack.models

        load_model = getattr(sdstack.models, "load_model", None)
        if load_model is not None:
            return load_model(path, dtype=dtype, device=device, config_dir=config_dir).text_encoder
    config = None
    if config_dir is not None and path.is_file():
        config_file = Path(config_dir) / "text_encoder" / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--config-dir: {str(config_file)!r} does not exist")
        config = json.loads(config_file.read_text(encoding="utf-8"))
    return load_text_encoder(path, dtype=dtype, device=device, config=config)


def write_conditioning(out: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Save to a temporary file beside ``out``, then ``os.replace`` it into place.

    Raises:
        CommandError: ``out`` already exists (never overwritten).
    """
    from safetensors.torch import save_file

    from sdstack.atomic_files import publish_new, temporary_file
    from sdstack.cli import CommandError

    exists = CommandError(f"--out {str(out)!r} already exists; choose a new file name")
    if out.exists():
        raise exists
    with temporary_file(out.parent, suffix=".safetensors") as temporary:
        contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(contiguous, str(temporary), metadata=metadata)
        try:
            publish_new(temporary, out)  # claimed atomically: a racing writer loses
        except FileExistsError:
            raise exists from None


def encoded_texts(prompt: str, negative: str, steps: int) -> tuple[str, str]:
    """The one text ``sdstack generate`` would encode at every step, for prompt and negative.

    Same reading as generate (``sdstack.prompt.plan.plan_prompt``), except that network
    tags are refused (encode applies no LoRA): the prompt is split on AND, and each text
    is scheduled over ``steps``. A ``prompt_embeds`` file holds one text with no AND
    weight, so anything else is refused, naming what was found and what to do instead.

    Raises:
        PromptNotSupportedError: network tags; several AND parts or an AND weight other
            than 1; a schedule giving different texts at different steps.
        PromptSyntaxError, PromptLimitError, SettingError: as ``plan_prompt``.
    """
    from sdstack.prompt.errors import PromptNotSupportedError
    from sdstack.prompt.plan import plan_prompt, reject_network_tags

    plan = plan_prompt(prompt, steps)
    if plan.networks:
        reject_network_tags(
            prompt,
            "a prompt_embeds file is made without LoRAs; remove the tag(s), or use "
            "`sdstack generate`, which applies them",
        )
    if len(plan.parts) > 1:
        shown = ", ".join(repr(shorten(part.text)) for part in plan.parts[:3])
        more = ", ..." if len(plan.parts) > 3 else ""
        raise PromptNotSupportedError(
            f"prompt has {len(plan.parts)} AND parts ({shown}{more}): AND weighs several "
            "conditionings at each sampling step and a prompt_embeds file holds one; encode "
            "each part on its own, or use `sdstack generate`, which applies AND"
        )
    part = plan.parts[0]
    if part.weight != 1.0:
        raise PromptNotSupportedError(
            f"prompt ends in the AND weight :{part.weight:g} (the reference reads "
            f"'text :{part.weight:g}' as a weight on the guidance); a prompt_embeds file "
            "holds no weight: remove it, or use `sdstack generate`, which applies it"
        )
    negative_plan = plan_prompt(negative, steps, negative=True)
    return (
        _one_text(part.schedule, "prompt", steps),
        _one_text(negative_plan.parts[0].schedule, "--negative", steps),
    )


def _one_text(schedule: list[tuple[int, str]], what: str, steps: int) -> str:
    """The text of a schedule that gives the same text at every step, else refuse."""
    from sdstack.prompt.errors import PromptNotSupportedError

    texts = {text for _, text in schedule}
    if len(texts) == 1:
        return schedule[0][1]
    shown = ", ".join(f"{shorten(text)!r} up to step {end}" for end, text in schedule[:3])
    more = ", ..." if len(schedule) > 3 else ""
    raise PromptNotSupportedError(
        f"{what} changes during sampling at --steps {steps}: {shown}{more} ({len(texts)} "
        "different texts); a prompt_embeds file holds one text: encode each text on its "
        "own, or use `sdstack generate`, which applies [from:to:when] and [a|b] "
        "(`sdstack prompt inspect` shows the texts per step)"
    )


def run_encode(args: argparse.Namespace) -> int:
    """Handler: check arguments, load the text encoder, encode both prompts, save."""
    from tqdm import tqdm

    from sdstack.cli import CommandError
    from sdstack.commands.arguments import read_prompt_argument
    from sdstack.prompt import load_tokenizer
    from sdstack.text import EmbeddingLibrary, PromptEncoder
    from sdstack.text.emphasis import check_emphasis
    from sdstack.validate import check_int

    # 1. Check inputs before any loading; the texts generate would encode.
    out = Path(args.out)
    if out.exists():
        raise CommandError(f"--out {str(out)!r} already exists; choose a new file name")
    emphasis = check_emphasis(args.emphasis)
    clip_skip = int(args.clip_skip) if float(args.clip_skip).is_integer() else args.clip_skip
    check_int("--steps", args.steps, 1, MAX_STEPS)
    prompt = read_prompt_argument(args.prompt)
    text, negative_text = encoded_texts(prompt, args.negative, args.steps)
    with tqdm(total=3, desc="encode", unit="step", file=sys.stderr) as progress:
        # 2. Load the text encoder (and embeddings).
        model = load_text_side(
            Path(args.model), _torch_dtype(args.dtype, args.device), args.device, args.config_dir
        )
        width = model.config.hidden_size
        library = (
            EmbeddingLibrary.from_dir(args.embeddings, width=width) if args.embeddings else None
        )
        encoder = PromptEncoder(model, load_tokenizer(), library)
        progress.update()
        # 3. Encode prompt and negative to the same chunk count.
        cond, uncond = encoder.encode_pair(
            text, negative_text, clip_skip=clip_skip, emphasis=emphasis
        )
        progress.update()
        # 4. Save atomically.
        metadata = {
            "format": "sdstack.encode/1",
            "prompt": prompt,
            "negative_prompt": args.negative,
            "steps": str(args.steps),
            "clip_skip": str(clip_skip),
            "emphasis": emphasis,
            "model": str(args.model),
            "chunks": str(cond.chunks),
            "embeddings_used": json.dumps(
                sorted(set(cond.embeddings_used + uncond.embeddings_used))
            ),
        }
        tensors = {"prompt_embeds": cond.tensor, "negative_prompt_embeds": uncond.tensor}
        write_conditioning(out, tensors, metadata)
        progress.update()
    shape = tuple(cond.tensor.shape)
    print(f"wrote {out}: prompt_embeds and negative_prompt_embeds {shape}, {cond.chunks} chunk(s)")
    return 0
