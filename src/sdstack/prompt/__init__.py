"""The reference (AUTOMATIC1111 v1.10) prompt language, as pure text.

Importing this package never imports torch or transformers; ``load_tokenizer`` imports
transformers when called.
"""

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.chunks import EmbeddingSlot, PromptChunk, PromptChunks, tokenize_prompt
from sdstack.prompt.composable import split_and
from sdstack.prompt.errors import PromptSyntaxError
from sdstack.prompt.networks import NetworkTag, extract_networks
from sdstack.prompt.schedule import prompt_schedule
from sdstack.prompt.tokenizer import load_tokenizer

__all__ = [
    "EmbeddingSlot",
    "NetworkTag",
    "PromptChunk",
    "PromptChunks",
    "PromptSyntaxError",
    "extract_networks",
    "load_tokenizer",
    "parse_attention",
    "prompt_schedule",
    "split_and",
    "tokenize_prompt",
]
