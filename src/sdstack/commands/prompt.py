"""The ``sdstack prompt`` command group: ``inspect`` shows how the reference reads a prompt.

Importing this module imports neither torch nor transformers; the tokenizer is loaded
inside the handler.
"""

from __future__ import annotations

import argparse
import json

from sdstack.commands.arguments import add_command_group, read_prompt_argument
from sdstack.prompt.inspect_report import REPORT_SHAPE
from sdstack.prompt.limits import MAX_STEPS

INSPECT_DESCRIPTION = """\
Show how the reference (AUTOMATIC1111 web UI v1.10) reads a prompt, stage by stage:
the extra-network tags <kind:args> it removes, the AND parts and their weights, the
schedule of each part (end step -> text, for [from:to:when] and [a|b]), and for each
distinct scheduled text its 75-token chunks: every token with its id and emphasis
weight, and the token count as the web UI shows it (e.g. 80/150)."""

INSPECT_EPILOG = f"""\
example:
  sdstack prompt inspect "a (red:1.3) [cat:dog:0.5] <lora:film:0.6> AND sky :0.5" --steps 20
  echo "masterpiece, 1girl BREAK garden" | sdstack prompt inspect - --json

{REPORT_SHAPE}"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sdstack prompt inspect``."""
    commands = add_command_group(
        subparsers,
        "prompt",
        help="inspect prompts as the reference web UI reads them",
        description="Prompt tools (pure text: no model needed).",
    )
    inspect = commands.add_parser(
        "inspect",
        help="show network tags, AND parts, schedule and tokens of a prompt",
        description=INSPECT_DESCRIPTION,
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument(
        "prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin (UTF-8)"
    )
    inspect.add_argument(
        "--steps",
        type=int,
        default=20,
        metavar="N",
        help=f"sampling steps the schedules are resolved over, 1..{MAX_STEPS} (default: 20)",
    )
    inspect.add_argument(
        "--comma-backtrack",
        type=int,
        default=20,
        metavar="N",
        help="the reference 'comma padding backtrack' option, 0..74; 0 turns it off (default: 20)",
    )
    inspect.add_argument("--json", action="store_true", help="print a JSON object instead")
    inspect.set_defaults(handler=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    """Handler of ``sdstack prompt inspect``."""
    from sdstack.cli import CommandError
    from sdstack.prompt.inspect_report import format_report, inspect_prompt
    from sdstack.prompt.tokenizer import load_tokenizer
    from sdstack.validate import check_int

    check_int("--steps", args.steps, 1, MAX_STEPS)
    if not 0 <= args.comma_backtrack <= 74:
        raise CommandError(f"--comma-backtrack must be in 0..74, got {args.comma_backtrack}")
    prompt = read_prompt_argument(args.prompt)
    report = inspect_prompt(
        prompt, load_tokenizer(), steps=args.steps, comma_backtrack=args.comma_backtrack
    )
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report), end="")
    return 0
