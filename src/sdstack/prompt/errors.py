"""The errors of the prompt language, and the check that a prompt is valid text."""

from __future__ import annotations

import re

from sdstack.errors import SdstackError

_WINDOW = 40  # characters of context shown on each side of the offending position
_SURROGATE = re.compile("[\ud800-\udfff]")


class PromptSyntaxError(SdstackError):
    """A prompt the reference (A1111 v1.10) cannot read, e.g. ``(a:1.2.3)``.

    The reference crashes on these inputs (a failed ``float()``); we raise this instead.
    Prompts beyond a documented limit (``sdstack.prompt.limits``: nesting depth, weight
    range) and text that is not valid UTF-8 raise it too. The message names the problem,
    the position (0-based character index into ``text``) and shows the prompt with a
    caret under that position.

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


class PromptEncodingError(PromptSyntaxError):
    """A prompt holding lone surrogates, i.e. bytes that were not valid UTF-8.

    Command-line arguments and files read with ``errors="surrogateescape"`` turn each
    undecodable byte ``0xNN`` into the code point ``U+DCNN``, which no tokenizer accepts.
    """


class PromptLimitError(SdstackError):
    """A prompt that would expand past a documented limit (``sdstack.prompt.limits``),
    e.g. a schedule resolving to more different texts than ``MAX_SCHEDULE_TEXTS``."""


class PromptNotSupportedError(SdstackError):
    """A valid prompt using something the caller cannot apply: extra-network tags before
    LoRA support, or a schedule or AND in a single ``prompt_embeds`` file."""


def check_text(text: str, what: str = "prompt") -> str:
    """``text`` itself, once it is known to be valid Unicode (encodable as UTF-8).

    Raises:
        PromptEncodingError: the first lone surrogate, e.g. ``'\\udcff'`` (the byte 0xff
            of a command-line argument that was not UTF-8), with its position.
    """
    if text.isascii():
        return text
    bad = _SURROGATE.search(text)
    if bad is None:
        return text
    code = ord(bad.group())
    if 0xDC80 <= code <= 0xDCFF:
        detail = f"undecodable byte 0x{code - 0xDC00:02x}"
    else:
        detail = f"lone surrogate U+{code:04X}, which is not a character"
    raise PromptEncodingError(
        f"{what} is not valid UTF-8 (pass or save it as UTF-8): {detail}",
        text,
        bad.start(),
    )


def shorten(text: str, limit: int = 40) -> str:
    """``text``, or its first ``limit`` characters and ``...``: for values in messages."""
    return text if len(text) <= limit else text[:limit] + "..."


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
