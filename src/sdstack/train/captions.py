"""Caption augmentation as kohya sd-scripts does it (``BaseDataset.process_caption``).

In order, drawing from one ``random.Random``:

1. ``prefix + " " + caption + " " + suffix`` (each only when given);
2. the whole caption becomes "" when ``dropout_rate > 0 and rng.random() < rate``, or
   when ``dropout_every_n_epochs > 0 and epoch % n == 0``;
3. otherwise, with ``wildcard``, a random line and one random choice per ``{a|b|c}``;
   without, the first line;
4. only if ``shuffle`` or ``tag_dropout_rate > 0``: split on ``separator`` and strip;
   the first ``keep_tokens`` tags are fixed (or, when ``keep_tokens_separator`` occurs,
   ``fixed | flex [| fixed suffix]``); ``rng.shuffle(flex)`` if shuffle; each flex tag
   kept if ``rng.random() >= tag_dropout_rate``; result
   ``", ".join(fixed + flex + suffix)``.

The calls on ``rng`` are the reference's calls on ``random``, in the same order, so a
seeded run draws the same captions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from sdstack.errors import SdstackError

_WILDCARD = re.compile(r"\{([^}]+)\}")


class CaptionError(SdstackError):
    """Caption options out of range: a rate outside [0, 1], negative keep tokens..."""


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of a run; :meth:`apply` is :func:`process_caption`."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    separator: str = ","
    keep_tokens_separator: str = ""
    prefix: str | None = None
    suffix: str | None = None
    dropout_every_n_epochs: int = 0
    wildcard: bool = False

    def __post_init__(self) -> None:
        check_caption_options(self)

    def apply(self, caption: str, rng: random.Random, *, epoch: int | None = None) -> str:
        """:func:`process_caption` with these options."""
        return _process(caption, rng, self, epoch)


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
    separator: str = ",",
    keep_tokens_separator: str = "",
    prefix: str | None = None,
    suffix: str | None = None,
    dropout_every_n_epochs: int = 0,
    epoch: int | None = None,
    wildcard: bool = False,
) -> str:
    """kohya ``process_caption``: prefix/suffix, caption dropout, wildcards, keep/shuffle/
    tag dropout (see the module docstring for the order and formulas).

    Args:
        caption: the raw caption (an image's first caption line).
        rng: the random source (seed it for reproducible runs).
        shuffle: shuffle the tags after the first ``keep_tokens`` (``--shuffle_caption``).
        keep_tokens: tags kept in place at the start (``--keep_tokens``).
        dropout_rate: probability of training on "" (``--caption_dropout_rate``).
        tag_dropout_rate: probability of dropping each flexible tag.
        separator: the tag separator (``--caption_separator``).
        keep_tokens_separator: marks ``fixed | flex | suffix`` inside a caption.
        prefix, suffix: joined with a space before/after the caption.
        dropout_every_n_epochs: "" on every epoch divisible by it (needs ``epoch``).
        epoch: the current epoch (from 1, as kohya counts) for the rule above.
        wildcard: choose among ``{a|b}`` alternatives and among lines.

    Raises:
        CaptionError: a rate outside [0, 1], keep tokens or n epochs negative, an empty
            separator, a caption that is not a string.
    """
    options = CaptionOptions(
        shuffle=shuffle, keep_tokens=keep_tokens, dropout_rate=dropout_rate,
        tag_dropout_rate=tag_dropout_rate, separator=separator,
        keep_tokens_separator=keep_tokens_separator, prefix=prefix, suffix=suffix,
        dropout_every_n_epochs=dropout_every_n_epochs, wildcard=wildcard,
    )  # fmt: skip
    return _process(caption, rng, options, epoch)


def _process(caption: str, rng: random.Random, options: CaptionOptions, epoch: int | None) -> str:
    if not isinstance(caption, str):
        raise CaptionError(f"caption: got {type(caption).__name__}, expected a string")
    if options.prefix:
        caption = options.prefix + " " + caption
    if options.suffix:
        caption = caption + " " + options.suffix
    if _dropped(rng, options, epoch):
        return ""
    if options.wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    elif "\n" in caption:
        caption = caption.split("\n")[0]
    if options.shuffle or options.tag_dropout_rate > 0:
        return _shuffle_and_drop(caption, rng, options)
    if options.keep_tokens_separator:
        caption = caption.replace(options.keep_tokens_separator, "")
    return caption


def _dropped(rng: random.Random, options: CaptionOptions, epoch: int | None) -> bool:
    """The whole-caption dropout rule (``rng.random()`` drawn only when rate > 0)."""
    if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return True
    every = options.dropout_every_n_epochs
    return every > 0 and epoch is not None and epoch % every == 0


def _shuffle_and_drop(caption: str, rng: random.Random, options: CaptionOptions) -> str:
    """Fixed tags, flexible tags shuffled and dropped, fixed suffix tags; ", "-joined."""
    separator, marker = options.separator, options.keep_tokens_separator
    suffix: list[str] = []
    if marker and marker in caption:
        fixed_part, flex_part = caption.split(marker, 1)
        if marker in flex_part:
            flex_part, suffix_part = flex_part.split(marker, 1)
            suffix = _tags(suffix_part, separator)
        fixed, flex = _tags(fixed_part, separator), _tags(flex_part, separator)
    else:
        tokens = [token.strip() for token in caption.strip().split(separator)]
        keep = options.keep_tokens
        fixed, flex = (tokens[:keep], tokens[keep:]) if keep > 0 else ([], tokens)
    if options.shuffle:
        rng.shuffle(flex)
    if options.tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= options.tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def _tags(text: str, separator: str) -> list[str]:
    """The non-empty stripped tags of ``text`` (the keep-tokens-separator form)."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def check_caption_options(options: CaptionOptions) -> None:
    """CaptionError naming the first option out of range."""
    for name in ("dropout_rate", "tag_dropout_rate"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.0 <= value <= 1.0:  # fmt: skip
            raise CaptionError(f"caption {name}: got {value!r}, expected 0 to 1")
    for name in ("keep_tokens", "dropout_every_n_epochs"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CaptionError(f"caption {name}: got {value!r}, expected an integer >= 0")
    if not isinstance(options.separator, str) or not options.separator:
        raise CaptionError(f"caption separator: got {options.separator!r}, expected a "
                           "non-empty string such as ','")  # fmt: skip
    if not isinstance(options.keep_tokens_separator, str):
        raise CaptionError(f"keep tokens separator: got {options.keep_tokens_separator!r}, "
                           "expected a string")  # fmt: skip
