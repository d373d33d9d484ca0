"""Prompt editing ``[a:b:when]`` and alternation ``[a|b]`` (A1111 v1.10 behaviour).

The reference parses with a Lark Earley grammar (see the spec). This module reads the
same language with a small stack-based parser, in time linear in the text:

- Inside a bracket, every nested bracket must itself be a valid construct; a bracket
  whose content is not valid is plain text (a "raw" bracket), which the grammar only
  allows outside all valid brackets.
- A bracket is read as a construct whenever it can be. The reference resolves some
  ambiguous inputs (a construct directly followed by raw bracket characters, like
  ``[a:1]]``) differently from run to run, depending on Python's string-hash seed;
  we always take the structured reading, which is one of its outcomes.

Resolving renders one text per different combination of choices, once the combinations
have been counted and checked against ``sdstack.prompt.limits`` (``schedule_outline``).
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from sdstack.prompt.errors import PromptLimitError, PromptSyntaxError
from sdstack.prompt.limits import MAX_SCHEDULE_SIZE, MAX_SCHEDULE_STEPS, MAX_SCHEDULE_TEXTS
from sdstack.validate import check_int

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


class _Frame:
    """A bracket opened and not yet closed: its segments, split by ``:`` or ``|``."""

    __slots__ = ("bracket", "segments", "separators")

    def __init__(self, bracket: str) -> None:
        self.bracket = bracket
        self.segments: list[list] = [[]]
        self.separators: list[str] = []


@dataclass
class ScheduleOutline:
    """One AND part parsed and counted, not yet expanded (``expand`` renders it).

    Attributes:
        text: the part's text.
        steps: the steps it is resolved over.
        ends: the end step of each schedule entry, ascending.
        keys: per entry, the combination of choices its constructs make (equal keys give
            equal texts): ``(scheduled edits past their step, alternation phase)``.
        tree: the parsed text, or None when it has no construct or is outside the
            grammar (the schedule is then the text itself).
        longest: an upper bound of one rendered text's size: the text's length if there
            is one text, else characters plus 1 per item of the parsed text.
    """

    text: str
    steps: int
    ends: list[int]
    keys: list[tuple[int, int]]
    tree: list | None
    longest: int

    @property
    def texts(self) -> int:
        """How many different texts the entries can have (an upper bound: ``[a|a]`` is 2)."""
        return len(set(self.keys))

    @property
    def size(self) -> int:
        """Upper bound of the characters all those texts add up to."""
        return self.texts * self.longest

    def expand(self) -> list[tuple[int, str]]:
        """``[(end_step, text), ...]``; each different text is rendered once."""
        if self.tree is None:
            return [(self.steps, self.text)]
        rendered: dict[tuple[int, int], str] = {}
        entries = []
        for end, key in zip(self.ends, self.keys, strict=True):
            text = rendered.get(key)
            if text is None:
                text = rendered[key] = _render(self.tree, end)
            entries.append((end, text))
        return entries


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
        steps: sampling steps, 1..``MAX_SCHEDULE_STEPS`` (2000).

    Returns:
        ``[(end_step, text), ...]`` with ascending end steps, the last equal to ``steps``.

    Raises:
        SettingError: ``steps`` not an integer in 1..``MAX_SCHEDULE_STEPS``.
        PromptSyntaxError: a ``when`` too large for an integer step (``[a:b:1e999]``),
            where the reference crashes.
        PromptLimitError: more than ``MAX_SCHEDULE_TEXTS`` different texts, or more
            than ``MAX_SCHEDULE_SIZE`` characters of them (checked before expanding).
    """
    outline = schedule_outline(text, steps)
    check_schedule_limits([outline])
    return outline.expand()


def schedule_outline(text: str, steps: int) -> ScheduleOutline:
    """Parse one AND part and count what ``prompt_schedule`` would build, building nothing.

    Raises:
        SettingError, PromptSyntaxError: as ``prompt_schedule``.
    """
    check_int("steps", steps, 1, MAX_SCHEDULE_STEPS)
    unscheduled = ScheduleOutline(text, steps, [steps], [(0, 0)], None, len(text))
    if "[" not in text:  # no construct can start; rendering would give the text itself
        return unscheduled
    try:
        tree, scheduled, alternates = _parse(text)
    except _Unparsable:
        return unscheduled
    if not scheduled and not alternates:
        return unscheduled
    boundaries = {steps}
    for node in scheduled:
        node.when = _when_step(node, text, steps)
        if node.when >= 1:
            boundaries.add(node.when)
    if alternates:
        boundaries.update(range(1, steps + 1))
    ends = sorted(boundaries)
    # A step's texts depend only on which edits are past their step and on the phase
    # (step - 1) mod lcm(alternation lengths); once that lcm reaches steps, the phase
    # is step - 1 itself.
    whens = sorted(node.when for node in scheduled)
    period = 1
    for length in {len(node.options) for node in alternates}:
        period = math.lcm(period, length)
        if period >= steps:
            break
    keys = [(bisect_left(whens, end), (end - 1) % period) for end in ends]
    longest = _longest(tree) if len(set(keys)) > 1 else len(text)
    return ScheduleOutline(text, steps, ends, keys, tree, longest)


def check_schedule_limits(outlines: Sequence[ScheduleOutline]) -> None:
    """The schedule limits over a whole prompt (all its AND parts), before expanding.

    Raises:
        PromptLimitError: more than ``MAX_SCHEDULE_TEXTS`` different texts, or more than
            ``MAX_SCHEDULE_SIZE`` characters of them in all.
    """
    texts = sum(outline.texts for outline in outlines)
    size = sum(outline.size for outline in outlines)
    steps = max((outline.steps for outline in outlines), default=1)
    if texts > MAX_SCHEDULE_TEXTS:
        parts = f" in {len(outlines)} AND parts" if len(outlines) > 1 else ""
        raise PromptLimitError(
            f"prompt resolves to up to {texts} different texts{parts} over {steps} steps; "
            f"at most {MAX_SCHEDULE_TEXTS} are allowed (MAX_SCHEDULE_TEXTS): use fewer "
            "steps, [a|b] alternations, [a:b:when] edits or AND parts"
        )
    if size > MAX_SCHEDULE_SIZE:
        what = f"{texts} different texts of up to" if texts > 1 else "a text of"
        longest = max(outline.longest for outline in outlines)
        raise PromptLimitError(
            f"prompt too large: it resolves to {what} {longest} characters, {size} in all; "
            f"at most {MAX_SCHEDULE_SIZE} are allowed (MAX_SCHEDULE_SIZE): shorten the "
            "prompt or use fewer scheduled texts"
        )


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
    """Parse to a list of str, list (an emphasis group, kept verbatim), _Scheduled and
    _Alternate (whose branches are such lists).

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
            # An emphasis group goes in as one item (a list), never copied, so that deep
            # nesting stays linear.
            (stack[-1].segments[-1] if stack else top).append(node)
    for frame in stack:  # brackets still open at the end are raw
        top.extend(_flatten(frame))
    return top, scheduled, alternates


def _can_separate(frame: _Frame, char: str) -> bool:
    """Whether ``:`` or ``|`` may follow in this bracket (``(a:b)``, ``[a:b:1]``, ``[a|b]``).

    A bracket's separators are all the same character, so the first one tells which.
    """
    separators = frame.separators
    if frame.bracket == "(":
        return char == ":" and not separators
    if char == "|":
        return not separators or separators[0] == "|"
    return not separators or (separators[0] == ":" and len(separators) < 2)


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
    if frame.separators and frame.separators[0] == "|":
        raise _Unparsable
    return _joined(frame)


def _joined(frame: _Frame) -> list:
    """The bracket character, then its segments joined by their separators."""
    items: list = [frame.bracket, *frame.segments[0]]
    for separator, segment in zip(frame.separators, frame.segments[1:], strict=True):
        items.append(separator)
        items.extend(segment)
    return items


def _branches(item: object) -> list[list]:
    """The item lists inside a tree item: an emphasis group is one, a construct its branches."""
    if isinstance(item, list):
        return [item]
    if isinstance(item, _Scheduled):  # ``[after:when]`` renders nothing before its step
        return [item.after] if item.before is None else [item.before, item.after]
    return item.options  # _Alternate


def _longest(tree: list) -> int:
    """Upper bound of a rendered text's size: characters plus 1 per item, where a construct
    counts its largest branch (iterative: nesting may be deep)."""
    sizes: dict[int, int] = {}  # id(list) -> size; every list of the tree is distinct
    stack: list[tuple[list, bool]] = [(tree, False)]
    while stack:
        items, done = stack.pop()
        if not done:
            stack.append((items, True))
            for item in items:
                if not isinstance(item, str):
                    stack.extend((branch, False) for branch in _branches(item))
            continue
        total = 0
        for item in items:
            if isinstance(item, str):
                total += len(item) + 1
            else:
                total += 1 + max(sizes[id(branch)] for branch in _branches(item))
        sizes[id(items)] = total
    return sizes[id(tree)]


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
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, _Scheduled):
            chosen = (item.before or []) if step <= item.when else item.after
            stack.append(iter(chosen))
        else:
            stack.append(iter(item.options[(step - 1) % len(item.options)]))
    return "".join(out)
