"""Which texts a prompt needs per step: extra networks, AND parts, schedules (reference order).

Reference processing of a positive prompt (see the prompt-language spec): network tags
``<kind:args>`` are removed, the text is split on ``AND`` into weighted parts, and each part
gets its own step schedule. A negative prompt skips the first two steps. At step ``s``
(0-based denoiser call), each part uses its first schedule entry with ``s <= end_step``.

``schedule_plan`` merges the parts' schedules onto the union of their boundaries, so every
interval names one text per part.
"""

from __future__ import annotations

from sdstack.validate import SettingError

SchedulePlan = list[tuple[int, list[tuple[str, float]]]]
"""``[(end_step, [(text, AND weight), ...]), ...]``, ascending, last end_step == steps."""


def check_steps(steps: int) -> int:
    """``steps`` after checking it is a positive integer.

    Raises:
        SettingError: not an integer (bools refused) or below 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SettingError(f"steps must be a positive integer, got {steps!r}")
    return steps


def part_schedules(
    prompt: str, steps: int, *, split_and: bool = True
) -> list[tuple[str, float, list[tuple[int, str]]]]:
    """Each AND part with its weight and its own reference schedule, in prompt order.

    ``[(part text, AND weight, [(end_step, text), ...]), ...]``. The reference encodes each
    distinct part text's schedule texts (every entry, repeats included) as one call of its
    text encoder; parts with the same text share that call.

    Raises:
        SettingError: ``steps`` not a positive integer.
        PromptSyntaxError: an invalid emphasis or AND weight in the prompt.
        PromptLimitError: the prompt expands past the limits of ``sdstack.prompt.limits``.
    """
    from sdstack.prompt.plan import plan_prompt

    check_steps(steps)
    plan = plan_prompt(prompt, steps, negative=not split_and)  # whole-prompt limits first
    return [(part.text, part.weight, part.schedule) for part in plan.parts]


def merge_schedules(parts: list[tuple[str, float, list[tuple[int, str]]]]) -> SchedulePlan:
    """``part_schedules`` merged onto the union of the parts' step boundaries.

    For each boundary ``e`` (ascending), each part contributes the text of its first
    schedule entry whose end step is ``>= e``, with the part's AND weight.
    """
    boundaries = sorted({end for _, _, schedule in parts for end, _ in schedule})
    plan: SchedulePlan = []
    for end in boundaries:
        texts = []
        for _, weight, schedule in parts:
            text = next(t for e, t in schedule if e >= end)
            texts.append((text, weight))
        plan.append((end, texts))
    return plan


def schedule_plan(prompt: str, steps: int, *, split_and: bool = True) -> SchedulePlan:
    """Per-interval texts of every AND part, on the union of the parts' step boundaries.

    ``merge_schedules(part_schedules(prompt, steps, split_and=split_and))``.

    Raises:
        ValueError: ``steps`` not a positive integer.
        PromptSyntaxError: an invalid emphasis or AND weight in the prompt.
    """
    return merge_schedules(part_schedules(prompt, steps, split_and=split_and))
