"""The SD1.x CLIP tokenizer, loaded offline from the files shipped in this package."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

BOS_ID = 49406
EOS_ID = 49407
COMMA_ID = 267


def tokenizer_dir() -> str:
    """Folder holding the packaged ``vocab.json`` and ``merges.txt``."""
    from importlib import resources

    return str(resources.files("sdstack.prompt") / "data" / "clip-tokenizer")


@lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The SD1.x ``transformers.CLIPTokenizer``, from package data, never from a hub.

    ``model_max_length`` is 77, as in every SD1.x pipeline. transformers 5's
    ``CLIPTokenizer(vocab, merges)`` constructor takes data, not paths, so the
    tokenizer is read with ``from_pretrained`` on the packaged folder, which both
    transformers 4.x and 5.x understand.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        tokenizer_dir(), model_max_length=77, local_files_only=True
    )
