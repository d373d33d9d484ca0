"""The one error type of the prompt language."""

from __future__ import annotations

from sdstack.errors import SdstackError

_WINDOW = 40  # characters of context shown on each side of the offending position


class PromptSyntaxError(SdstackError):
    """A prompt the reference (A1111 v1.10) cannot read, e.g. ``(a:1.2.3)``.

    The reference crashes on these inputs (a failed ``float()``); we raise this instead.
    The message names the problem, the position (0-based character index into ``text``)
    and shows the prompt with a caret under that position.

    Attributes:
        text: the full prompt text that was being parsed.
        position: 0-based index of the offending character in ``text``.
        reason: the problem alone, without position or excerpt.
    """

    def __init__(self, reason: str, text: str, position: int) -> None:
        self.reason = reason
        self.text = text
        self.position = position
        super().__init__(_format(reason, text, position))


def _format(reason: str, text: str, position: int) -> str:
    """``<reason> at position N: '<text>'`` and a caret line under the excerpt."""
    start = max(0, position - _WINDOW)
    end = min(len(text), position + _WINDOW)
    head = "..." if start > 0 else ""
    tail = "..." if end < len(text) else ""
    # Control characters (newline, tab...) are shown as spaces so the caret lines up.
    excerpt = "".join(c if c.isprintable() else " " for c in text[start:end])
    caret = " " * (len(head) + position - start) + "^"
    return (
        f"{reason} at position {position}: {text[start:end]!r}\n"
        f"    {head}{excerpt}{tail}\n"
        f"    {caret}"
    )
