"""How the positive prompt becomes conditioning: the ``standard`` or ``deprojected`` encoding.

- ``standard``: the reference prompt language (emphasis, schedules, AND, BREAK,
  embeddings), encoded by CLIP (``sdstack.text.PromptEncoder``).
- ``deprojected`` (spec ``shared/spec/deprojector.md``, "Use in generation"): the prompt
  is an embedding expression (``sdstack.prompt.arithmetic``: ``{"a cat" + 0.5*"a hat" -
  "blurry"}``, ``{"a cat" ~0.3~ "a dog"}``, ``{pooled("a cat, red hat")}``; a prompt
  without braces is one text), evaluated on sentence embeddings and deprojected to the
  77 x W conditioning (``sdstack.generate.deprojected``). The negative prompt is encoded
  the standard way.

Reading a deprojected prompt: as the reference does before anything else reads a
prompt, the extra-network tags are taken out first (anywhere, even inside a quoted
text): ``<lora:name:w>`` tags apply their LoRA as in a standard prompt, other kinds are
refused. What is left, stripped of surrounding whitespace, is the expression. Its texts
are encoded as they are: emphasis ``(a:1.2)``, ``[a:b:when]`` schedules, ``AND`` and
``BREAK`` are not read inside a deprojected prompt (they are literal text there).

The infotext writes the prompt in canonical form, ``format_expression(expression)`` and
then the prompt's tags, space-separated, so that reading it back gives the same
expression and the same LoRAs; ``Encoding: deprojected`` and ``Deprojector: <folder name>
[<10-hex sha256 of its weights file>]`` record the rest. Pure text: no torch.
"""

from __future__ import annotations

import re
from typing import Any

from sdstack.errors import UnknownNameError
from sdstack.prompt.arithmetic import Expression, format_expression, parse_embedding_expression
from sdstack.registry import Registry
from sdstack.validate import SettingError

STANDARD = "standard"
DEPROJECTED = "deprojected"


class UnknownEncodingError(UnknownNameError, SettingError):
    """A prompt encoding that is not ``standard`` or ``deprojected``."""


ENCODINGS = Registry[str]("prompt encoding", UnknownEncodingError)
ENCODINGS.register(STANDARD, STANDARD)
ENCODINGS.register(DEPROJECTED, DEPROJECTED)

ENCODING_FIELD = "Encoding"
DEPROJECTOR_FIELD = "Deprojector"
_DEPROJECTOR_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{10})\]$")


def check_encoding(value: Any, name: str = "encoding") -> str:
    """The canonical encoding name of ``value`` (``standard`` or ``deprojected``).

    Raises:
        UnknownEncodingError: not a string, or another name (the message lists both
            names and the nearest).
    """
    return ENCODINGS.checked(value, name)


def is_deprojected(params: Any) -> bool:
    """Whether ``params`` (a ``GenerationParams``) asks for the deprojected encoding."""
    return check_encoding(getattr(params, "encoding", STANDARD)) == DEPROJECTED


def read_deprojected_prompt(prompt: str) -> tuple[Expression, list[str]]:
    """A deprojected prompt: its expression and its extra-network tags as written.

    The tags are taken out first (the reference's ``<(\\w+):([^>]+)>``, anywhere in
    the prompt); the rest, stripped, is read by ``parse_embedding_expression``.

    Returns:
        ``(expression, ["<lora:a:0.5>", ...])``, tags in order.

    Raises:
        EmbeddingExpressionError: the expression does not parse (the message shows the
            prompt without its tags, with a caret at the problem).
        PromptSyntaxError, PromptNotSupportedError: a bad LoRA tag, a tag of another kind.
    """
    from sdstack.prompt.networks import extract_networks
    from sdstack.prompt.plan import check_network_tags

    check_network_tags(prompt)
    text, tags = extract_networks(prompt)
    written = [prompt[tag.span[0] : tag.span[1]] for tag in tags]
    return parse_embedding_expression(text.strip()), written


def canonical_deprojected_prompt(prompt: str) -> str:
    """The prompt the infotext writes for a deprojected prompt:
    ``format_expression(expression)``, then its tags, each after one space."""
    expression, tags = read_deprojected_prompt(prompt)
    text = format_expression(expression)
    return " ".join([text, *tags]) if text else " ".join(tags)


def infotext_prompt_text(params: Any) -> str:
    """``params.prompt`` as the infotext writes it: canonical when deprojected."""
    if is_deprojected(params):
        return canonical_deprojected_prompt(params.prompt)
    return params.prompt


def deprojector_title(name: str, short_hash: str | None) -> str:
    """The ``Deprojector`` infotext value: ``name [hash]``, or the name alone."""
    return f"{name} [{short_hash}]" if short_hash else name


def parse_deprojector_title(value: str) -> tuple[str, str | None]:
    """``"name [0123456789]"`` -> ``("name", "0123456789")``; without a hash ``(value, None)``."""
    match = _DEPROJECTOR_TITLE.match(value.strip())
    if match is None:
        return value.strip(), None
    return match.group("name"), match.group("hash").lower()
