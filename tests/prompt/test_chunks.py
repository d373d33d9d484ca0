"""Reference (A1111 v1.10) chunking: expected ids built from first principles.

Expected values come from the tokenizer on plain text pieces (each piece tokenized alone),
the spec's worked emphasis examples, and counting tokens by hand.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstack.prompt.attention import parse_attention
from sdstack.prompt.chunks import (
    EmbeddingSlot,
    PromptChunk,
    PromptChunks,
    chunk_fragments,
    embedding_matcher,
    tokenize_prompt,
)
from sdstack.prompt.tokenizer import BOS_ID, COMMA_ID, EOS_ID

A, B = 320, 321  # "a", "b"


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def body(chunk: PromptChunk) -> list[int]:
    """The chunk's 75 body ids with the EOS padding removed."""
    ids = list(chunk.ids[1:76])
    while ids and ids[-1] == EOS_ID:
        ids.pop()
    return ids


def wrap(tokens: list[int]) -> tuple[int, ...]:
    return (BOS_ID, *tokens, *[EOS_ID] * (75 - len(tokens)), EOS_ID)


def check_shape(result: PromptChunks) -> None:
    assert result.chunks
    for chunk in result.chunks:
        assert len(chunk.ids) == 77 and len(chunk.weights) == 77
        assert chunk.ids[0] == BOS_ID and chunk.ids[76] == EOS_ID
        assert chunk.weights[0] == 1.0 and chunk.weights[76] == 1.0


# ---- plain text and emphasis -------------------------------------------------------------


def test_plain_prompt_is_one_chunk_with_eos_padding(tokenizer):
    result = tokenize_prompt("a photo of a cat", tokenizer)
    assert result.chunks == (PromptChunk(wrap([320, 1125, 539, 320, 2368]), (1.0,) * 77, ()),)
    assert (result.token_count, result.target) == (5, 75)


def test_emphasis_weights_follow_the_spec_worked_example(tokenizer):
    # spec: a (red:1.3) [cat] \(x\)
    pieces = [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cat", 0.9090909090909091), (" (x)", 1.0)]
    expected_ids, expected_weights = [], []
    for text, weight in pieces:
        ids = ids_of(tokenizer, text)
        expected_ids += ids
        expected_weights += [weight] * len(ids)
    result = tokenize_prompt(r"a (red:1.3) [cat] \(x\)", tokenizer)
    (chunk,) = result.chunks
    n = len(expected_ids)
    assert chunk.ids == wrap(expected_ids)
    assert chunk.weights == (1.0, *expected_weights, *[1.0] * (76 - n))
    assert result.token_count == n


def test_each_fragment_is_tokenized_alone(tokenizer):
    assert ids_of(tokenizer, "photograph") == [8853]
    result = tokenize_prompt("photo(graph:1.5)", tokenizer)
    assert body(result.chunks[0]) == ids_of(tokenizer, "photo") + ids_of(tokenizer, "graph")
    assert result.chunks[0].weights[1:3] == (1.0, 1.5)


def test_all_fragments_are_tokenized_in_one_call(tokenizer):
    calls = []

    class Counting:
        def __call__(self, texts, **kwargs):
            calls.append(list(texts))
            return tokenizer(texts, **kwargs)

    tokenize_prompt("a (b:1.2) [c] BREAK d, (e)", Counting())
    assert len(calls) == 1 and "BREAK" not in calls[0]


def test_without_emphasis_parsing_the_text_is_one_fragment(tokenizer):
    # reference "Emphasis: None": brackets are tokens, BREAK is a word, weights all 1.0
    text = "(red:1.3) BREAK cat"
    result = tokenize_prompt(text, tokenizer, parse_emphasis=False)
    assert [body(c) for c in result.chunks] == [ids_of(tokenizer, text)]
    assert set(result.chunks[0].weights) == {1.0}


# ---- chunk boundaries and token count ----------------------------------------------------


def test_empty_prompt_is_one_empty_chunk(tokenizer):
    result = tokenize_prompt("", tokenizer)
    assert result.chunks == (PromptChunks.empty_chunk(),)
    assert PromptChunks.empty_chunk().ids == (BOS_ID,) + (EOS_ID,) * 76
    assert PromptChunks.empty_chunk().weights == (1.0,) * 77
    assert (result.token_count, result.target) == (0, 75)


@pytest.mark.parametrize(
    ("n", "chunk_bodies", "count", "target"),
    [
        (74, [74], 74, 75),
        (75, [75], 75, 75),  # closed only before adding a 76th token
        (76, [75, 1], 76, 150),
        (150, [75, 75], 150, 150),
        (151, [75, 75, 1], 151, 225),
    ],
)
def test_chunks_hold_75_tokens(tokenizer, n, chunk_bodies, count, target):
    assert len(ids_of(tokenizer, "a " * n)) == n
    result = tokenize_prompt("a " * n, tokenizer)
    check_shape(result)
    assert [body(c) for c in result.chunks] == [[A] * k for k in chunk_bodies]
    assert (result.token_count, result.target) == (count, target)


@pytest.mark.parametrize(
    ("prompt", "bodies", "count"),
    [
        ("a BREAK b", [[A], [B]], 76),
        ("BREAK a", [[], [A]], 76),  # BREAK first: an empty chunk
        ("a BREAK", [[A]], 75),  # nothing after BREAK: no final chunk, count 75
        ("BREAK", [[]], 75),
        ("a BREAK BREAK b", [[A], [], [B]], 151),
    ],
)
def test_break_closes_the_chunk_even_when_empty(tokenizer, prompt, bodies, count):
    result = tokenize_prompt(prompt, tokenizer)
    check_shape(result)
    assert [body(c) for c in result.chunks] == bodies
    assert result.token_count == count
    assert result.target == -(-count // 75) * 75


def test_break_closes_a_full_chunk_only_once(tokenizer):
    result = tokenize_prompt("a " * 75 + "BREAK b", tokenizer)
    assert [body(c) for c in result.chunks] == [[A] * 75, [B]]
    assert result.token_count == 76


def test_break_inside_brackets_is_a_plain_word(tokenizer):
    # spec: (a BREAK b) -> [a, 1.1], [BREAK, -1.1], [b, 1.1]; the word keeps weight -1.1
    result = tokenize_prompt("(a BREAK b)", tokenizer)
    assert len(result.chunks) == 1
    assert body(result.chunks[0]) == [A, *ids_of(tokenizer, "BREAK"), B]
    assert result.chunks[0].weights[1:4] == (1.1, -1.1, 1.1)


# ---- comma back-tracking -----------------------------------------------------------------


def comma_prompt(before: int, after: int) -> str:
    """``before`` a's, a comma (at body index ``before``), ``after`` b's."""
    return "a " * before + ", " + "b " * after


@pytest.mark.parametrize(
    ("before", "backtrack", "moves"),
    [(55, 20, True), (54, 20, False), (60, 15, True), (59, 15, False), (74, 1, True)],
)
def test_comma_backtracking_boundary(tokenizer, before, backtrack, moves):
    after = 30
    prompt = comma_prompt(before, after)
    assert ids_of(tokenizer, prompt) == [A] * before + [COMMA_ID] + [B] * after
    result = tokenize_prompt(prompt, tokenizer, comma_backtrack=backtrack)
    first, second = (body(c) for c in result.chunks)
    total = before + 1 + after
    if moves:  # 75 - comma index <= backtrack: everything after the comma moves
        assert first == [A] * before + [COMMA_ID]
        assert second == [B] * after
        assert result.token_count == 75 + after
    else:
        assert first == [A] * before + [COMMA_ID] + [B] * (74 - before)
        assert second == [B] * (total - 75)
        assert result.token_count == total


def test_comma_backtracking_off_with_zero(tokenizer):
    result = tokenize_prompt(comma_prompt(60, 20), tokenizer, comma_backtrack=0)
    assert [len(body(c)) for c in result.chunks] == [75, 6]


def test_no_backtracking_when_the_next_token_is_a_comma(tokenizer):
    # 60 a, comma, 14 b fill the chunk; the 76th token is a comma, so nothing moves
    prompt = comma_prompt(60, 14) + ", c"
    result = tokenize_prompt(prompt, tokenizer)
    assert [body(c) for c in result.chunks] == [
        [A] * 60 + [COMMA_ID] + [B] * 14,
        [COMMA_ID, *ids_of(tokenizer, "c")],
    ]
    assert result.token_count == 77


def test_moved_tokens_keep_their_weights(tokenizer):
    result = tokenize_prompt("a " * 60 + ", (" + "b " * 20 + ":1.5)", tokenizer)
    first, second = result.chunks
    assert first.weights == (1.0,) * 77
    assert body(second) == [B] * 20
    assert second.weights == (1.0, *[1.5] * 20, *[1.0] * 56)


@pytest.mark.parametrize("bad", [-1, 75, 100, 1.5, True])
def test_comma_backtrack_out_of_range(tokenizer, bad):
    with pytest.raises(ValueError, match=r"comma_backtrack must be an integer in 0\.\.74, got "):
        tokenize_prompt("a", tokenizer, comma_backtrack=bad)


# ---- textual inversion -------------------------------------------------------------------


def test_embedding_takes_its_vector_count_in_slots(tokenizer):
    result = tokenize_prompt("a photo of (mycat:1.2)", tokenizer, {"mycat": 3})
    prefix = ids_of(tokenizer, "a photo of ")
    (chunk,) = result.chunks
    assert body(chunk) == [*prefix, 0, 0, 0]
    assert chunk.embeddings == (EmbeddingSlot(position=1 + len(prefix), name="mycat", vectors=3),)
    assert chunk.weights[1 + len(prefix) : 4 + len(prefix)] == (1.2, 1.2, 1.2)
    assert result.token_count == len(prefix) + 3


@pytest.mark.parametrize(
    "embeddings", [{"bad-hands": 1, "bad-hands-5": 2}, {"bad-hands-5": 2, "bad-hands": 1}]
)
def test_longest_embedding_name_matches_first(tokenizer, embeddings):
    # "bad-hands" tokens are a prefix of "bad-hands-5" tokens
    assert ids_of(tokenizer, "bad-hands-5")[:3] == ids_of(tokenizer, "bad-hands")
    result = tokenize_prompt("bad-hands-5, Bad-Hands", tokenizer, embeddings)
    (chunk,) = result.chunks
    assert body(chunk) == [0, 0, COMMA_ID, 0]
    assert chunk.embeddings == (
        EmbeddingSlot(1, "bad-hands-5", 2),
        EmbeddingSlot(4, "bad-hands", 1),
    )


def test_embedding_names_match_within_one_fragment_only(tokenizer):
    result = tokenize_prompt("bad-(hands:1.5)", tokenizer, {"bad-hands": 1})
    assert result.chunks[0].embeddings == ()
    assert body(result.chunks[0]) == ids_of(tokenizer, "bad-") + ids_of(tokenizer, "hands")


@pytest.mark.parametrize(("vectors", "bodies"), [(2, [75]), (3, [73, 3])])
def test_embedding_that_does_not_fit_moves_whole(tokenizer, vectors, bodies):
    result = tokenize_prompt("a " * 73 + "mycat", tokenizer, {"mycat": vectors})
    assert [len(body(c)) for c in result.chunks] == bodies
    if vectors == 3:
        assert body(result.chunks[1]) == [0, 0, 0]
        assert result.chunks[1].embeddings == (EmbeddingSlot(1, "mycat", 3),)
        assert result.token_count == 78
    else:
        assert result.chunks[0].embeddings == (EmbeddingSlot(74, "mycat", 2),)
        assert result.token_count == 75


def test_embedding_moved_by_comma_backtracking_keeps_its_slot(tokenizer):
    # 60 a, comma at 60, mycat at 61-62, then b: the 76th token moves mycat and the b's
    result = tokenize_prompt("a " * 60 + ", mycat " + "b " * 20, tokenizer, {"mycat": 2})
    first, second = result.chunks
    assert body(first) == [A] * 60 + [COMMA_ID] and first.embeddings == ()
    assert body(second) == [0, 0] + [B] * 20
    assert second.embeddings == (EmbeddingSlot(1, "mycat", 2),)
    assert result.token_count == 75 + 22


def test_embedding_errors_name_the_embedding(tokenizer):
    with pytest.raises(
        ValueError, match=r"embedding 'huge' has 80 vectors; a chunk holds at most 75"
    ):
        tokenize_prompt("a huge cat", tokenizer, {"huge": 80})
    assert tokenize_prompt("a cat", tokenizer, {"huge": 80}).token_count == 2  # unused: fine
    with pytest.raises(
        ValueError, match=r"embedding 'z': vector count must be a positive integer, got 0"
    ):
        tokenize_prompt("a", tokenizer, {"z": 0})
    with pytest.raises(ValueError, match=r"embedding name ' ' has no tokens"):
        tokenize_prompt("a", tokenizer, {" ": 1})


def test_embedding_matcher_is_cached_per_tokenizer_and_mapping(tokenizer):
    first = embedding_matcher(tokenizer, {"mycat": 2, "bad-hands": 1})
    assert embedding_matcher(tokenizer, {"mycat": 2, "bad-hands": 1}) is first
    assert embedding_matcher(tokenizer, {"mycat": 3, "bad-hands": 1}) is not first


# ---- padded(), invariants, speed ---------------------------------------------------------


def test_padded_appends_empty_chunks(tokenizer):
    result = tokenize_prompt("a cat", tokenizer)
    padded = result.padded(3)
    assert padded.chunks == (
        result.chunks[0],
        PromptChunks.empty_chunk(),
        PromptChunks.empty_chunk(),
    )
    assert padded.token_count == result.token_count
    assert result.padded(1) == result
    with pytest.raises(
        ValueError, match=r"n_chunks must be at least the 1 chunks already held, got 0"
    ):
        result.padded(0)


WORDS = ["a", "b", "cat", ",", "red", "photograph", "of", "1girl", ", ,"]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), max_size=200), backtrack=st.integers(0, 74))
def test_chunks_concatenate_to_the_flat_tokens(tokenizer, words, backtrack):
    text = " ".join(words)
    flat = ids_of(tokenizer, text)
    result = tokenize_prompt(text, tokenizer, comma_backtrack=backtrack)
    check_shape(result)
    assert [t for c in result.chunks for t in body(c)] == flat
    assert all(w == 1.0 for c in result.chunks for w in c.weights)
    assert result.token_count == 75 * (len(result.chunks) - 1) + len(body(result.chunks[-1]))
    if backtrack == 0:  # no back-tracking: plain 75-token slices
        slices = [flat[i : i + 75] for i in range(0, len(flat), 75)] or [[]]
        assert [body(c) for c in result.chunks] == slices


PIECES = ["a", "cat", ",", "(", ")", "[", "]", ":1.5)", "BREAK", " ", "photograph", "\\("]


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=120))
def test_tokens_and_weights_follow_the_emphasis_fragments(tokenizer, pieces):
    text = "".join(pieces)
    expected_ids, expected_weights = [], []
    for piece, weight in parse_attention(text):
        if (piece, weight) != ("BREAK", -1.0):
            ids = ids_of(tokenizer, piece)
            expected_ids += ids
            expected_weights += [weight] * len(ids)
    result = tokenize_prompt(text, tokenizer)
    check_shape(result)
    lengths = [len(body(c)) for c in result.chunks]
    assert [t for c in result.chunks for t in body(c)] == expected_ids
    weights = [w for c, n in zip(result.chunks, lengths, strict=True) for w in c.weights[1 : n + 1]]
    assert weights == expected_weights
    assert result.token_count >= len(expected_ids)


def test_chunk_fragments_without_a_tokenizer():
    result = chunk_fragments([([A, B], 1.0), ([], -1.0), ([A], 1.5)], is_break=[False, True, False])
    assert [body(c) for c in result.chunks] == [[A, B], [A]]
    assert result.chunks[1].weights[1] == 1.5
    assert result.token_count == 76


class CountingTokenizer:
    """Forwards to a tokenizer and counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.timeout(30)  # a hang guard, not a timing: 20 runs take ~20 ms
def test_three_chunk_prompt_is_one_tokenizer_call(tokenizer):
    """What keeps it fast without asserting wall-clock time: every emphasis fragment goes
    through ONE batched tokenizer call, however many fragments and chunks."""
    prompt = "masterpiece, best quality, (a photo:1.2) of a [cat] on a red chair, " * 12
    counting = CountingTokenizer(tokenizer)
    result = tokenize_prompt(prompt, counting)
    assert len(result.chunks) == 3
    assert counting.calls == 1
    for _ in range(20):
        assert tokenize_prompt(prompt, tokenizer) == result
