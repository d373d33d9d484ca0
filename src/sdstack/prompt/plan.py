"""A whole prompt as the reference reads it: tags removed, AND parts, each part's schedule.

Reference order (A1111 v1.10, see the prompt-language spec): extra-network tags
``<kind:args>`` are removed, the text is split on ``AND`` into weighted parts, and each
part gets its own step schedule; a negative prompt skips the first two steps. The
limits of ``sdstack.prompt.limits`` are checked over the whole prompt before any
schedule is expanded.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdstack.prompt.composable import split_and
from sdstack.prompt.errors import PromptLimitError, PromptNotSupportedError, check_text
from sdstack.prompt.limits import MAX_SCHEDULE_STEPS, MAX_SCHEDULE_TEXTS
from sdstack.prompt.networks import NetworkTag, extract_networks
from sdstack.prompt.schedule import check_schedule_limits, schedule_outline
from sdstack.validate import check_int


@dataclass(frozen=True)
class PromptPart:
    """One AND part: its text, its AND weight and its ``[(end_step, text), ...]``."""

    text: str
    weight: float
    schedule: list[tuple[int, str]]


@dataclass(frozen=True)
class PromptPlan:
    """What a prompt means per step, before any tokenizing (``plan_prompt``)."""

    prompt: str
    steps: int
    networks: list[NetworkTag]
    parts: list[PromptPart]

    def texts(self) -> list[str]:
        """Every different scheduled text of every part, once, in order of appearance."""
        return list(dict.fromkeys(text for part in self.parts for _, text in part.schedule))


def plan_prompt(prompt: str, steps: int, *, negative: bool = False) -> PromptPlan:
    """The reference's reading of a whole prompt over ``steps`` steps.

    Positive prompts: network tags removed (``extract_networks``), AND split with
    weights (``split_and``), every part scheduled (``prompt_schedule``). ``negative=True``
    is the negative-prompt treatment: tags stay literal text, no AND split (a trailing
    ``:2`` stays text), the whole text is scheduled.

    Args:
        prompt: the prompt text.
        steps: steps the schedules are resolved over, 1..``MAX_SCHEDULE_STEPS``.
        negative: read it as a negative prompt.

    Raises:
        PromptEncodingError: the text is not valid UTF-8 (holds lone surrogates).
        SettingError: ``steps`` out of range.
        PromptSyntaxError: what the parsers refuse (a bad weight, too deep nesting...).
        PromptLimitError: more than ``MAX_SCHEDULE_TEXTS`` texts (AND parts count one
            each) or ``MAX_SCHEDULE_SIZE`` characters; checked before expanding.
    """
    check_text(prompt, "negative prompt" if negative else "prompt")
    check_int("steps", steps, 1, MAX_SCHEDULE_STEPS)
    if negative:
        tags: list[NetworkTag] = []
        pieces = [(prompt, 1.0)]
    else:
        text, tags = extract_networks(prompt)
        pieces = split_and(text)
    if len(pieces) > MAX_SCHEDULE_TEXTS:
        raise PromptLimitError(
            f"prompt has {len(pieces)} AND parts; at most {MAX_SCHEDULE_TEXTS} texts are "
            "allowed (MAX_SCHEDULE_TEXTS), and each part is one"
        )
    outlines = [schedule_outline(text, steps) for text, _ in pieces]
    check_schedule_limits(outlines)
    parts = [
        PromptPart(text, weight, outline.expand())
        for (text, weight), outline in zip(pieces, outlines, strict=True)
    ]
    return PromptPlan(prompt, steps, tags, parts)


APPLIED_NETWORK_KINDS = ("lora",)
"""Extra-network kinds generation applies (``lyco`` is read as ``lora``)."""


def check_network_tags(prompt: str) -> list[NetworkTag]:
    """The prompt's LoRA tags, in order; tags of other kinds are refused, naming them.

    Raises:
        PromptSyntaxError: a LoRA tag without a name or with a bad multiplier.
        PromptNotSupportedError: a tag of another kind (``<hypernet:...>``, extensions').
    """
    _text, tags = extract_networks(prompt)
    other = [tag for tag in tags if tag.kind not in APPLIED_NETWORK_KINDS]
    if other:
        names = ", ".join(f"<{tag.kind}:{tag.name}>" for tag in other)
        raise PromptNotSupportedError(
            f"prompt contains extra-network tag(s) {names}: only <lora:...> (and <lyco:...>) "
            "tags are applied; remove the others from the prompt"
        )
    return tags


def reject_network_tags(prompt: str, why: str) -> None:
    """Refuse every extra-network tag, naming them and ``why`` (``sdstack encode``).

    Raises:
        PromptNotSupportedError: the prompt holds a tag.
    """
    _text, tags = extract_networks(prompt)
    if tags:
        names = ", ".join(f"<{tag.kind}:{tag.name}>" for tag in tags)
        raise PromptNotSupportedError(f"prompt contains extra-network tag(s) {names}: {why}")
