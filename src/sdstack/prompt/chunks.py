"""Tokens and chunks as the reference (AUTOMATIC1111 v1.10) builds them for SD1.x CLIP.

A prompt becomes chunks of 75 tokens, each wrapped as BOS + 75 + EOS = 77 ids, with one
emphasis multiplier per id. ``tokenize_prompt`` parses emphasis itself; the chunking core
(``chunk_fragments``) takes already-tokenized fragments, so it needs no tokenizer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.errors import check_text
from sdstack.prompt.tokenizer import BOS_ID, COMMA_ID, EOS_ID

CHUNK_LENGTH = 75
"""Body tokens per chunk; with BOS and EOS a chunk is 77 ids."""

BREAK_WEIGHT = -1.0
"""``parse_attention`` marks a top-level ``BREAK`` as the fragment ``("BREAK", -1.0)``."""

EMBEDDING_PLACEHOLDER_ID = 0
"""Token id held by every slot of a textual-inversion embedding."""


@dataclass(frozen=True)
class EmbeddingSlot:
    """A textual-inversion embedding placed in a chunk.

    ``position`` is the index in the chunk's 77 ids of its first vector (BOS is index 0);
    it occupies ``vectors`` consecutive ids.
    """

    position: int
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """77 ids (BOS, 75 body tokens then EOS padding, EOS) and their 77 weights.

    BOS, EOS and padding have weight 1.0; embedding slots hold id 0.
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[EmbeddingSlot, ...] = ()


_EMPTY_CHUNK = PromptChunk(
    ids=(BOS_ID,) + (EOS_ID,) * (CHUNK_LENGTH + 1),
    weights=(1.0,) * (CHUNK_LENGTH + 2),
)


@dataclass(frozen=True)
class PromptChunks:
    """The chunks of one prompt and the reference token count.

    ``token_count`` is what the reference shows users: every chunk but the last counts 75,
    the last one its real tokens (embedding vectors included).
    """

    chunks: tuple[PromptChunk, ...]
    token_count: int

    @property
    def target(self) -> int:
        """The reference's displayed limit: ``ceil(max(token_count, 1) / 75) * 75``."""
        return math.ceil(max(self.token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

    @staticmethod
    def empty_chunk() -> PromptChunk:
        """The chunk of an empty prompt: BOS + 76 x EOS, all weights 1.0."""
        return _EMPTY_CHUNK

    def padded(self, n_chunks: int) -> PromptChunks:
        """These chunks followed by empty chunks up to ``n_chunks`` in all.

        The reference pads the prompt with fewer chunks this way when a prompt and its
        negative differ in length. ``token_count`` is unchanged.

        Raises:
            ValueError: ``n_chunks`` is smaller than the number of chunks already held.
        """
        if n_chunks < len(self.chunks):
            raise ValueError(
                f"n_chunks must be at least the {len(self.chunks)} chunks already held, "
                f"got {n_chunks}"
            )
        extra = (_EMPTY_CHUNK,) * (n_chunks - len(self.chunks))
        return PromptChunks(chunks=self.chunks + extra, token_count=self.token_count)


class _Candidate:
    """One embedding name as token ids (a plain class: cheaper to import than a dataclass)."""

    __slots__ = ("ids", "name", "vectors")

    def __init__(self, ids: tuple[int, ...], name: str, vectors: int):
        self.ids = ids
        self.name = name
        self.vectors = vectors


class EmbeddingMatcher:
    """Finds textual-inversion names in token ids, longest match first (reference rule).

    Names are tokenized like prompt text (no BOS/EOS); candidates are indexed by their
    first id and tried longest first. Names with identical ids: the first in the mapping wins.
    """

    def __init__(self, name_ids: Mapping[str, tuple[int, ...]], vectors: Mapping[str, int]):
        by_first: dict[int, list[_Candidate]] = {}
        for name, ids in name_ids.items():
            by_first.setdefault(ids[0], []).append(_Candidate(ids, name, int(vectors[name])))
        for candidates in by_first.values():
            candidates.sort(key=lambda c: len(c.ids), reverse=True)  # stable: ties keep order
        self._by_first = by_first

    def match(self, tokens: Sequence[int], position: int) -> _Candidate | None:
        """The longest embedding whose ids start at ``tokens[position]``, or None."""
        for candidate in self._by_first.get(tokens[position], ()):
            end = position + len(candidate.ids)
            if tuple(tokens[position:end]) == candidate.ids:
                return candidate
        return None


class _ChunkBuilder:
    """Mutable state of the reference chunking loop: the open chunk and the closed ones."""

    def __init__(self, comma_backtrack: int):
        self.comma_backtrack = comma_backtrack
        self.chunks: list[PromptChunk] = []
        self.token_count = 0
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.slots: list[tuple[int, str, int]] = []  # (body offset, name, vectors)
        self.last_comma = -1

    def close(self, *, is_last: bool = False) -> None:
        """Pad the open chunk with EOS to 75, wrap it in BOS/EOS and start a new one."""
        self.token_count += len(self.ids) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(self.ids)
        ids = (BOS_ID, *self.ids, *(EOS_ID,) * padding, EOS_ID)
        weights = (1.0, *self.weights, *(1.0,) * padding, 1.0)
        slots = tuple(EmbeddingSlot(offset + 1, name, n) for offset, name, n in self.slots)
        self.chunks.append(PromptChunk(ids=ids, weights=weights, embeddings=slots))
        self._reset()

    def _carry_after_last_comma(self) -> None:
        """Close the chunk after its last comma; what followed the comma opens the next."""
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        moved_slots = [(offset - cut, name, n) for offset, name, n in self.slots if offset >= cut]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.slots = [slot for slot in self.slots if slot[0] < cut]
        self.close()
        self.ids, self.weights, self.slots = moved_ids, moved_weights, moved_slots

    def before_token(self, token: int) -> None:
        """The reference's checks before each token: comma memory, back-tracking, full chunk."""
        full = len(self.ids) == CHUNK_LENGTH
        if token == COMMA_ID:
            self.last_comma = len(self.ids)
        elif (
            full
            and self.last_comma != -1
            and CHUNK_LENGTH - self.last_comma <= self.comma_backtrack
        ):
            self._carry_after_last_comma()
        if len(self.ids) == CHUNK_LENGTH:
            self.close()

    def add_token(self, token: int, weight: float) -> None:
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, name: str, vectors: int, weight: float) -> None:
        """``vectors`` placeholder slots; a chunk too full for all of them is closed first."""
        if len(self.ids) + vectors > CHUNK_LENGTH:
            self.close()
        self.slots.append((len(self.ids), name, vectors))
        self.ids.extend([EMBEDDING_PLACEHOLDER_ID] * vectors)
        self.weights.extend([weight] * vectors)


def chunk_fragments(
    fragments: Sequence[tuple[Sequence[int], float]],
    *,
    is_break: Sequence[bool] | None = None,
    matcher: EmbeddingMatcher | None = None,
    comma_backtrack: int = 20,
) -> PromptChunks:
    """The reference chunking loop (A1111 ``tokenize_line``) over tokenized fragments.

    For each token of each fragment, in order: a comma (id 267) records its index in the
    chunk body; otherwise, if the chunk is full (75), a comma was seen and
    ``75 - comma_index <= comma_backtrack``, the tokens after that comma (and the embedding
    slots among them) move to a new chunk; then a chunk that is still full is closed. A chunk
    is therefore closed only *before* adding a token: a prompt of exactly 75 tokens is one
    chunk. A ``BREAK`` fragment closes the open chunk even when it is empty. At the end the
    open chunk is closed when it holds tokens or when no chunk exists yet.

    Token count: each chunk closed by fullness, back-tracking, ``BREAK`` or an embedding that
    did not fit counts 75; the final chunk counts its real tokens. A prompt ending in
    ``BREAK`` has no final chunk, so its count is a multiple of 75 (``"a BREAK"`` -> one
    chunk, 75 tokens).

    Divergence from the reference: the reference leaves the record of an embedding that
    back-tracking moved in the old chunk (its vectors then land on padding and the moved
    slots read as token id 0); here the slot moves with its placeholder ids. Ids and weights
    are the same as the reference's.

    Args:
        fragments: ``(token ids, weight)`` per emphasis fragment, without BOS/EOS.
        is_break: per fragment, whether it is a ``BREAK`` (its ids are ignored).
        matcher: finds textual-inversion names in each fragment's ids.
        comma_backtrack: the reference ``comma_padding_backtrack`` option, 0..74.
    """
    check_comma_backtrack(comma_backtrack)
    builder = _ChunkBuilder(comma_backtrack)
    for index, (tokens, weight) in enumerate(fragments):
        if is_break is not None and is_break[index]:
            builder.close()
            continue
        position = 0
        while position < len(tokens):
            builder.before_token(tokens[position])
            found = matcher.match(tokens, position) if matcher is not None else None
            if found is None:
                builder.add_token(tokens[position], weight)
                position += 1
                continue
            if found.vectors > CHUNK_LENGTH:
                raise ValueError(
                    f"embedding {found.name!r} has {found.vectors} vectors; "
                    f"a chunk holds at most {CHUNK_LENGTH}"
                )
            builder.add_embedding(found.name, found.vectors, weight)
            position += len(found.ids)
    if builder.ids or not builder.chunks:
        builder.close(is_last=True)
    return PromptChunks(chunks=tuple(builder.chunks), token_count=builder.token_count)


def check_comma_backtrack(comma_backtrack: int) -> int:
    """The reference ``comma_padding_backtrack`` option, checked: an integer in 0..74.

    Raises:
        ValueError: anything else, naming the argument, range and value.
    """
    if (
        not isinstance(comma_backtrack, int)
        or isinstance(comma_backtrack, bool)
        or not 0 <= comma_backtrack < CHUNK_LENGTH
    ):
        raise ValueError(
            f"comma_backtrack must be an integer in 0..{CHUNK_LENGTH - 1}, got {comma_backtrack!r}"
        )
    return comma_backtrack


def _tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without BOS/EOS and without truncation, in one tokenizer call."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), truncation=False, add_special_tokens=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


_NAME_IDS: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_MATCHERS: weakref.WeakKeyDictionary[Any, dict[tuple, EmbeddingMatcher]] = (
    weakref.WeakKeyDictionary()
)
_MATCHERS_PER_TOKENIZER = 8


def _check_embeddings(embeddings: Mapping[str, int]) -> None:
    for name, vectors in embeddings.items():
        if type(vectors) is int and vectors >= 1:  # fast path for the usual case
            continue
        if not isinstance(vectors, Integral) or isinstance(vectors, bool) or vectors < 1:
            raise ValueError(
                f"embedding {name!r}: vector count must be a positive integer, got {vectors!r}"
            )


def embedding_matcher(tokenizer: Any, embeddings: Mapping[str, int]) -> EmbeddingMatcher:
    """An ``EmbeddingMatcher`` for ``embeddings`` (name -> vector count), cached per tokenizer.

    Each name is tokenized once per tokenizer; the matcher for a given set of
    ``(name, vectors)`` pairs is reused across calls.

    Raises:
        ValueError: a vector count that is not a positive integer, or a name with no tokens.
        PromptEncodingError: a name that is not valid UTF-8 (a file name's stray bytes).
    """
    _check_embeddings(embeddings)
    for name in embeddings:
        check_text(name, "embedding name")
    key = tuple(embeddings.items())
    try:
        matchers = _MATCHERS.setdefault(tokenizer, {})
        name_ids = _NAME_IDS.setdefault(tokenizer, {})
    except TypeError:  # tokenizer not weak-referenceable: no caching
        matchers, name_ids = {}, {}
    cached = matchers.get(key)
    if cached is not None:
        return cached
    missing = [name for name in embeddings if name not in name_ids]
    for name, ids in zip(missing, _tokenize_texts(tokenizer, missing), strict=True):
        name_ids[name] = tuple(ids)
    empty = [name for name in embeddings if not name_ids[name]]
    if empty:
        raise ValueError(f"embedding name {empty[0]!r} has no tokens; it cannot be matched")
    matcher = EmbeddingMatcher({name: name_ids[name] for name in embeddings}, embeddings)
    if len(matchers) >= _MATCHERS_PER_TOKENIZER:
        matchers.pop(next(iter(matchers)))
    matchers[key] = matcher
    return matcher


def tokenize_prompt(
    text: str,
    tokenizer: Any,
    embeddings: Mapping[str, int] | None = None,
    *,
    comma_backtrack: int = 20,
    parse_emphasis: bool = True,
) -> PromptChunks:
    """Reference (A1111 v1.10) chunks of one prompt part: emphasis, tokens, 75-token chunks.

    ``text`` is one AND-part, already resolved for a step (no scheduling here). It is split
    by ``parse_attention``; each fragment is tokenized separately without BOS/EOS (all in one
    tokenizer call), then chunked by ``chunk_fragments``: 75 tokens a chunk, EOS padding,
    ``BREAK`` closes a chunk, comma back-tracking, textual-inversion names replaced by
    id-0 slots carrying the fragment's weight. ``chunk_fragments`` states the exact rules
    (when a chunk closes, ``BREAK`` at either end, the token count).

    Args:
        text: the prompt text.
        tokenizer: the SD1.x ``CLIPTokenizer`` (``sdstack.prompt.load_tokenizer()``).
        embeddings: textual-inversion name -> vector count; names match on token ids,
            longest first, within one emphasis fragment.
        comma_backtrack: the reference ``comma_padding_backtrack`` option, 0..74 (0 = off).
        parse_emphasis: False reads the whole text as one fragment of weight 1.0, as the
            reference does with its "Emphasis: None" option: brackets stay literal text
            and ``BREAK`` is an ordinary word.

    Returns:
        ``PromptChunks`` with at least one chunk; an empty prompt gives BOS + 76 x EOS.

    Raises:
        PromptSyntaxError: the emphasis syntax is invalid (e.g. ``(a:1.2.3)``).
        PromptEncodingError: the text is not valid UTF-8 (holds lone surrogates, which
            the tokenizer cannot take).
        ValueError: ``comma_backtrack`` out of range; an embedding used in the prompt has
            more than 75 vectors; a vector count is not a positive integer.
    """
    # 1. Check inputs.
    check_text(text)
    check_comma_backtrack(comma_backtrack)
    # 2. Emphasis fragments; BREAK markers are not tokenized.
    parsed = parse_attention(text) if parse_emphasis else [(text, 1.0)]
    is_break = [piece == "BREAK" and weight == BREAK_WEIGHT for piece, weight in parsed]
    # 3. Tokenize every other fragment in one call.
    texts = [piece for (piece, _), brk in zip(parsed, is_break, strict=True) if not brk]
    ids_iter = iter(_tokenize_texts(tokenizer, texts))
    fragments = [
        ([] if brk else next(ids_iter), weight)
        for (_, weight), brk in zip(parsed, is_break, strict=True)
    ]
    # 4. Chunk.
    matcher = embedding_matcher(tokenizer, embeddings) if embeddings else None
    return chunk_fragments(
        fragments, is_break=is_break, matcher=matcher, comma_backtrack=comma_backtrack
    )
