"""Fixtures of the text-conditioning tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder, tokenizer):
    """A PromptEncoder over the shared tiny CLIP (no embeddings)."""
    from sdstack.text import PromptEncoder

    return PromptEncoder(tiny_text_encoder, tokenizer)
