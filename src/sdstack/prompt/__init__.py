"""The reference (AUTOMATIC1111 v1.10) prompt language, as pure text.

Importing this package never imports torch or transformers; ``load_tokenizer`` imports
transformers when called. Every parser is linear in its input; the limits that keep it
so are in ``sdstack.prompt.limits``.
"""

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.chunks import EmbeddingSlot, PromptChunk, PromptChunks, tokenize_prompt
from sdstack.prompt.composable import split_and
from sdstack.prompt.errors import (
    PromptEncodingError,
    PromptLimitError,
    PromptNotSupportedError,
    PromptSyntaxError,
    check_text,
)
from sdstack.prompt.networks import NetworkTag, extract_networks
from sdstack.prompt.plan import PromptPart, PromptPlan, plan_prompt
from sdstack.prompt.schedule import prompt_schedule
from sdstack.prompt.tokenizer import load_tokenizer

__all__ = [
    "EmbeddingSlot",
    "NetworkTag",
    "PromptChunk",
    "PromptChunks",
    "PromptEncodingError",
    "PromptLimitError",
    "PromptNotSupportedError",
    "PromptPart",
    "PromptPlan",
    "PromptSyntaxError",
    "check_text",
    "extract_networks",
    "load_tokenizer",
    "parse_attention",
    "plan_prompt",
    "prompt_schedule",
    "split_and",
    "tokenize_prompt",
]
