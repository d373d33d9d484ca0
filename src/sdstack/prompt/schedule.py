"""Prompt editing ``[a:b:when]`` and alternation ``[a|b]`` (A1111 v1.10 behaviour).

The reference parses with a Lark Earley grammar (see the spec). This module reads the
same language with a small stack-based parser:

- Inside a bracket, every nested bracket must itself be a valid construct; a bracket
  whose content is not valid is plain text (a "raw" bracket), which the grammar only
  allows outside all valid brackets.
- A bracket is read as a construct whenever it can be. The reference resolves some
  ambiguous inputs (a construct directly followed by raw bracket characters, like
  ``[a:1]]``) differently from run to run, depending on Python's string-hash seed;
  we always take the structured reading, which is one of its outcomes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from sdstack.prompt.errors import PromptSyntaxError

# One lexical unit: plain text (escapes included), a special character, or a backslash
# that escapes nothing (end of text, or before a newline), which makes the text unparsable.
_UNIT = re.compile(r"(?P<plain>(?:[^\\\[\]():|]|\\.)+)|(?P<special>[\[\]():|])|(?P<bad>\\)")
# Lark's SIGNED_NUMBER (ASCII digits), with the optional whitespace the grammar allows.
_WHEN = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)"
    r"(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*"
)


class _Unparsable(Exception):
    """The text is outside the grammar: the reference then uses it unscheduled."""


@dataclass
class _Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    when_text: str
    position: int  # of when_text in the prompt, for error messages
    when: int = 0  # the step, set once the whole text parsed


@dataclass
class _Alternate:
    """``[a|b|...]``: option ``(step - 1) % n`` at each step."""

    options: list[list]


@dataclass
class _Frame:
    """A bracket opened and not yet closed: its segments, split by ``:`` or ``|``."""

    bracket: str
    segments: list[list] = field(default_factory=lambda: [[]])
    separators: list[str] = field(default_factory=list)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """The reference's prompt schedule: ``[(end_step, text_for_those_steps), ...]``.

    ``[a:b:when]`` is ``a`` while ``step <= when`` and ``b`` after; ``[b:when]`` is
    ``[:b:when]`` (empty, then b); ``[a::when]`` is a, then empty. ``when`` containing
    ``.`` is a fraction: ``int(when * steps)``; otherwise ``int(when)``; both are then
    capped at ``steps``, and the step is a boundary only if it is >= 1. ``[a|b|...]``
    takes option ``(step - 1) % n`` and makes every step 1..steps a boundary. Emphasis
    brackets, escapes and text that is not a construct pass through unchanged. Text
    outside the grammar (a ``|`` outside an alternation, a backslash at the very end or
    before a newline) is used unscheduled: ``[(steps, text)]``.

    Args:
        text: one AND-part of a prompt.
        steps: sampling steps, >= 1.

    Returns:
        ``[(end_step, text), ...]`` with ascending end steps, the last equal to ``steps``.

    Raises:
        ValueError: ``steps`` < 1.
        PromptSyntaxError: a ``when`` too large for an integer step (``[a:b:1e999]``),
            where the reference crashes.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"prompt_schedule: steps must be an integer >= 1, got {steps!r}")
    try:
        tree, scheduled, alternates = _parse(text)
    except _Unparsable:
        return [(steps, text)]
    boundaries = {steps}
    for node in scheduled:
        node.when = _when_step(node, text, steps)
        if node.when >= 1:
            boundaries.add(node.when)
    if alternates:
        boundaries.update(range(1, steps + 1))
    return [(step, _render(tree, step)) for step in sorted(boundaries)]


def schedule_for_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The reference's pick at sampling time: the first entry with ``step <= end_step``.

    ``step`` is the 0-based count of denoiser calls made so far (0 at the first call),
    as in the reference's CFG denoiser. Like the reference, a step past every end step
    falls back to the first entry.
    """
    for end_step, text in schedule:
        if step <= end_step:
            return text
    return schedule[0][1]


def _when_step(node: _Scheduled, text: str, steps: int) -> int:
    """``min(steps, int(v * steps if '.' in when else v))``, v = float(when)."""
    value = float(node.when_text)
    if "." in node.when_text:
        value *= steps
    if math.isinf(value):
        raise PromptSyntaxError(
            f"scheduling step {node.when_text!r} is too large (expected a step number "
            "or a fraction like 0.5)",
            text,
            node.position,
        )
    return min(steps, int(value))


def _parse(text: str) -> tuple[list, list[_Scheduled], list[_Alternate]]:
    """Parse to a list of str, _Scheduled and _Alternate (whose branches are such lists).

    Also returns every construct found, for the step boundaries. Raises _Unparsable.
    """
    top: list = []
    stack: list[_Frame] = []
    scheduled: list[_Scheduled] = []
    alternates: list[_Alternate] = []
    for unit in _UNIT.finditer(text):
        if unit.lastgroup == "bad":
            raise _Unparsable
        char = unit.group()
        if unit.lastgroup == "plain":
            (stack[-1].segments[-1] if stack else top).append(char)
        elif char in "[(":
            stack.append(_Frame(char))
        elif not stack:
            if char == "|":
                raise _Unparsable
            top.append(char)  # a raw ] ) or : outside any bracket
        elif char in ":|" and _can_separate(stack[-1], char):
            stack[-1].separators.append(char)
            stack[-1].segments.append([])
        else:
            node = _close(stack[-1], char, unit.start()) if char in ")]" else None
            if node is None:  # the innermost bracket, and so every open one, is raw
                for frame in stack:
                    top.extend(_flatten(frame))
                stack.clear()
                if char == "|":
                    raise _Unparsable
                top.append(char)
                continue
            stack.pop()
            _collect(node, scheduled, alternates)
            parent = stack[-1].segments[-1] if stack else top
            if isinstance(node, list):  # emphasis: its characters and contents, in place
                parent.extend(node)
            else:
                parent.append(node)
    for frame in stack:  # brackets still open at the end are raw
        top.extend(_flatten(frame))
    return top, scheduled, alternates


def _can_separate(frame: _Frame, char: str) -> bool:
    """Whether ``:`` or ``|`` may follow in this bracket (``(a:b)``, ``[a:b:1]``, ``[a|b]``)."""
    if frame.bracket == "(":
        return char == ":" and not frame.separators
    if char == "|":
        return ":" not in frame.separators
    return "|" not in frame.separators and len(frame.separators) < 2


def _close(frame: _Frame, char: str, position: int) -> list | _Scheduled | _Alternate | None:
    """The construct a closing bracket completes, or None if the bracket is raw text."""
    if char != {"(": ")", "[": "]"}[frame.bracket]:
        return None
    segments, separators = frame.segments, frame.separators
    if not separators or frame.bracket == "(":  # emphasis: kept verbatim
        return [*_joined(frame), char]
    if separators[0] == "|":
        return _Alternate(segments)
    when = segments[-1]
    match = _WHEN.fullmatch(when[0]) if len(when) == 1 and isinstance(when[0], str) else None
    if match is None:
        return None
    when_position = position - len(when[0]) + match.start(1)
    before = segments[0] if len(segments) == 3 else None
    return _Scheduled(before, segments[-2], match.group(1), when_position)


def _collect(node: object, scheduled: list[_Scheduled], alternates: list[_Alternate]) -> None:
    """Remember every construct: all of them count for the boundaries, wherever they are."""
    if isinstance(node, _Scheduled):
        scheduled.append(node)
    elif isinstance(node, _Alternate):
        alternates.append(node)


def _flatten(frame: _Frame) -> list:
    """A raw bracket's items for the top level; a ``|`` there makes the text unparsable."""
    if "|" in frame.separators:
        raise _Unparsable
    return _joined(frame)


def _joined(frame: _Frame) -> list:
    """The bracket character, then its segments joined by their separators."""
    items: list = [frame.bracket, *frame.segments[0]]
    for separator, segment in zip(frame.separators, frame.segments[1:], strict=True):
        items.append(separator)
        items.extend(segment)
    return items


def _render(tree: list, step: int) -> str:
    """The text at ``step``: each construct replaced by its choice (iterative, any depth)."""
    out: list[str] = []
    stack = [iter(tree)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            chosen = (item.before or []) if step <= item.when else item.after
            stack.append(iter(chosen))
        else:
            stack.append(iter(item.options[(step - 1) % len(item.options)]))
    return "".join(out)
