"""PromptEncoder: parity with diffusers, long prompts, prompt pairs, schedules, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch

from sdstack.prompt import prompt_schedule
from sdstack.text import Conditioning, PromptEncoder
from sdstack.text.clip_skip import token_embedding
from tests.text import (
    assert_differs,
    assert_forward_close,
    assert_matches,
    original_truth,
)

LONG = ", ".join(f"(word{i}:1.1) thing" for i in range(40))


@pytest.fixture(scope="module")
def pipeline(tiny_components):
    return tiny_components.diffusers_pipeline()


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a photo of a cat", ""),
        ("masterpiece, best quality, 1girl, looking at viewer", "lowres, bad anatomy"),
        ("", "blurry"),
    ],
)
def test_unweighted_prompts_equal_diffusers_encode_prompt(
    pipeline, tiny_components, prompt, negative
):
    # diffusers 0.42.1 + transformers 5 cannot run clip_skip; clip_skip=None is N = 1.
    want, want_negative = pipeline.encode_prompt(
        prompt, "cpu", 1, True, negative_prompt=negative, clip_skip=None
    )
    ours = PromptEncoder(tiny_components.text_encoder, tiny_components.tokenizer)
    cond, uncond = ours.encode_pair(prompt, negative)
    # Not the same batched computation: diffusers runs prompt and negative one at a time, we
    # run both in one forward. With all weights 1 "original" emphasis is exactly the identity
    # (s = mean / mean = 1), so only the two forwards' rounding differs.
    assert_forward_close(cond.tensor, want)
    assert_forward_close(uncond.tensor, want_negative)


def test_each_chunk_equals_that_chunk_encoded_alone(encoder):
    chunks = encoder.tokenize(LONG).chunks
    assert len(chunks) == 3
    got = encoder.encode(LONG, clip_skip=2)
    assert got.tensor.shape == (1, 3 * 77, 32)
    assert got.chunks == 3
    # Truth in float64, each chunk through the model alone (a call of one, chunk by chunk).
    (want,) = original_truth(encoder.text_model, [chunks], 2)
    for index in range(len(chunks)):
        rows = (77 * index, 77 * (index + 1))
        assert_matches(got.tensor[0, rows[0] : rows[1]], want.rows(*rows))


def test_whole_prompt_is_one_forward(encoder):
    batches = []
    hook = token_embedding(encoder.text_model).register_forward_hook(
        lambda _m, args, _out: batches.append(tuple(args[0].shape))
    )
    try:
        encoder.encode(LONG)
        encoder.encode_pair(LONG, "a cat")
    finally:
        hook.remove()
    # The pair is 2 x 3 chunks, but the short side's two padding chunks are the same empty
    # chunk: identical chunks run once, so the forward sees 5 rows.
    assert batches == [(3, 77), (5, 77)]


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_encode_pair_pads_the_shorter_side_with_the_empty_prompt(encoder, long_side):
    short = "(a cat:1.3)"
    prompt, negative = (LONG, short) if long_side == "prompt" else (short, LONG)
    cond, uncond = encoder.encode_pair(prompt, negative, clip_skip=2)
    assert cond.tensor.shape == uncond.tensor.shape == (1, 3 * 77, 32)
    padded, full = (uncond, cond) if long_side == "prompt" else (cond, uncond)
    empty = encoder.empty(clip_skip=2)
    # Each side is a call of its own: it equals that text encoded alone (float64 truth).
    (want_short,) = original_truth(encoder.text_model, [encoder.tokenize(short).chunks], 2)
    assert_matches(padded.tensor[0, :77], want_short)
    for index in (1, 2):  # all-1 weights: exactly the forward output, batched differently
        assert_forward_close(padded.tensor[:, 77 * index : 77 * (index + 1)], empty.tensor)
    (want_long,) = original_truth(encoder.text_model, [encoder.tokenize(LONG).chunks], 2)
    assert_matches(full.tensor[0], want_long)


def test_padded_to_appends_empty_chunks(encoder):
    cond = encoder.encode("a cat")
    empty = encoder.empty()
    padded = cond.padded_to(3, empty)
    assert padded.chunks == 3
    assert torch.equal(padded.tensor[:, 154:], empty.tensor)  # a copy: exact
    assert cond.padded_to(1, empty) is cond
    with pytest.raises(
        ValueError, match="n_chunks must be at least the 3 chunks already held, got 2"
    ):
        padded.padded_to(2, empty)
    with pytest.raises(ValueError, match="empty must be one 77-token chunk, got 3 chunks"):
        cond.padded_to(4, padded)


def _count_rows(model):
    rows = []
    handle = token_embedding(model).register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[0])
    )
    return rows, handle


def test_encode_schedule_encodes_each_distinct_text_once(encoder):
    # AND parts keep their leading space (reference): texts "a cat x", " a cat x", "a dog x".
    prompt = "a [cat:dog:0.5] x AND a cat x :0.5 AND a cat x"
    rows, handle = _count_rows(encoder.text_model)
    try:
        plan = encoder.encode_schedule(prompt, 20, clip_skip=2)
    finally:
        handle.remove()
    # "a cat x" and " a cat x" tokenize to the same ids, and identical chunks run once:
    # two distinct chunks, in one forward.
    assert sum(rows) == 2
    assert len(rows) == 1
    assert [end for end, _ in plan] == [10, 20]
    assert [w for _, parts in plan for _, w in parts] == [1.0, 0.5, 1.0] * 2
    (cat, _), (spaced, _), (spaced_again, _) = plan[0][1]
    (dog, _), (spaced_late, _), _ = plan[1][1]
    assert spaced is spaced_again is spaced_late
    # All weights 1: the call's emphasis is exactly the identity, only batching differs.
    assert_forward_close(cat.tensor, encoder.encode("a cat x", clip_skip=2).tensor)
    assert_forward_close(dog.tensor, encoder.encode("a dog x", clip_skip=2).tensor)
    assert_forward_close(spaced.tensor, encoder.encode(" a cat x", clip_skip=2).tensor)


def test_encode_schedule_positive_strips_networks_negative_keeps_text(encoder):
    positive = encoder.encode_schedule("<lora:foo:0.7>a cat :2", 10)
    assert [(end, [w for _, w in parts]) for end, parts in positive] == [(10, [2.0])]
    # All weights 1 (below too): emphasis is exactly the identity, only batching may differ.
    assert_forward_close(positive[0][1][0][0].tensor, encoder.encode("a cat").tensor)
    negative = encoder.encode_schedule("a cat AND dog :2", 10, split_and=False)
    assert [w for _, w in negative[0][1]] == [1.0]
    assert_forward_close(negative[0][1][0][0].tensor, encoder.encode("a cat AND dog :2").tensor)


def test_encode_schedule_rejects_bad_steps(encoder):
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        encoder.encode_schedule("a cat", 0)


def test_model_dtype_is_respected(tiny_text_encoder, tokenizer):
    model = copy.deepcopy(tiny_text_encoder).to(torch.bfloat16)
    cond = PromptEncoder(model, tokenizer).encode("a (cat:1.2)", clip_skip=1.5)
    assert cond.tensor.dtype == cond.pooled.dtype == torch.bfloat16
    # Truth: the same bfloat16 weights run in float64; the bound is original_tolerance with
    # the bfloat16 roundoff 2^-8 as the unit of the forward error and of the final cast.
    chunks = PromptEncoder(model, tokenizer).tokenize("a (cat:1.2)").chunks
    (want,) = original_truth(model, [chunks], 1.5, unit=2.0**-8)
    assert_matches(cond.tensor[0], want)


def test_conditioning_summary(encoder):
    cond = encoder.encode("a cat")
    assert isinstance(cond, Conditioning)
    assert repr(cond) == (
        "Conditioning(tensor=(1, 77, 32) torch.float32, chunks=1, embeddings_used=())"
    )
    assert encoder.encode_chunks([]) == []


def test_bad_comma_backtrack():
    with pytest.raises(ValueError, match=r"comma_backtrack must be an integer in 0\.\.74, got 75"):
        PromptEncoder(None, None, comma_backtrack=75)


# Reference call semantics ("original" emphasis): the texts of one call (one AND part's
# schedule entries) share one mean per chunk index. Truth: direct_call_original, which runs
# the model per chunk index on the stacked texts and applies the formula by hand.
SCHEDULED = "a (red:1.3) [cat:dog:0.5]"
LONG_TEXT = ", ".join(f"(word{i}:1.2) thing" for i in range(25))


def _chunks(encoder, *texts):
    return [encoder.tokenize(text).chunks for text in texts]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_schedule_texts_share_one_mean_per_chunk_index(encoder, clip_skip):
    plan = encoder.encode_schedule(SCHEDULED, 20, clip_skip=clip_skip)
    assert [end for end, _ in plan] == [10, 20]
    texts = ("a (red:1.3) cat", "a (red:1.3) dog")
    # Truths in float64; the bound (original_tolerance) covers the amplification by the
    # small means, and is tight enough that the per-text reading fails it.
    want = original_truth(encoder.text_model, _chunks(encoder, *texts), clip_skip)
    for (_, [(cond, weight)]), expected, text in zip(plan, want, texts, strict=True):
        assert weight == 1.0
        assert_matches(cond.tensor[0], expected)
        # Not the old per-text result (each text's own mean): the call's mean is shared.
        assert_differs(encoder.encode(text, clip_skip=clip_skip).tensor[0], expected)
    called = encoder.encode_call(list(texts), clip_skip=clip_skip)
    for cond, expected in zip(called, want, strict=True):
        assert_matches(cond.tensor[0], expected)


def test_schedule_pads_the_shorter_text_and_scales_its_padding(encoder):
    prompt = f"[{LONG_TEXT}:(short:0.8) cat:0.5]"
    long_text, short_text = (text for _, text in prompt_schedule(prompt, 20))
    chunked = _chunks(encoder, long_text, short_text)
    assert [len(chunks) for chunks in chunked] == [2, 1]
    plan = encoder.encode_schedule(prompt, 20)
    (_, [(long_cond, _)]), (_, [(short_cond, _)]) = plan
    assert long_cond.chunks == short_cond.chunks == 2
    want_long, want_short = original_truth(encoder.text_model, chunked)
    assert_matches(long_cond.tensor[0], want_long)
    assert_matches(short_cond.tensor[0], want_short)
    # The short text's padding chunk is the empty chunk scaled by chunk 1's call factor.
    assert_differs(encoder.empty().tensor[0], want_short.rows(77, 154))


def test_repeated_schedule_entries_weigh_in_the_call_mean(encoder):
    # Alternation over 3 steps: entries "(cat:1.3) x", "dog x", "(cat:1.3) x"; the
    # reference batch holds all three, so "cat" counts twice in the mean.
    plan = encoder.encode_schedule("[(cat:1.3)|dog] x", 3)
    assert [end for end, _ in plan] == [1, 2, 3]
    cat, dog = "(cat:1.3) x", "dog x"
    want = original_truth(encoder.text_model, _chunks(encoder, cat, dog, cat))
    got = [parts[0][0].tensor[0] for _, parts in plan]
    for tensor, expected in zip(got, want, strict=True):
        assert_matches(tensor, expected)
    distinct_only = original_truth(encoder.text_model, _chunks(encoder, cat, dog))
    assert_differs(distinct_only[0].value, want[0])


def test_and_parts_are_separate_calls_in_one_forward(encoder):
    # Part 2's text "(cat:1.3)" is also part 1's first schedule entry, but part 1 is a
    # call of {cat, dog} and part 2 a call of one: different results, as in the reference.
    prompt = "[(cat:1.3):(dog:1.2):0.5] AND (cat:1.3)"
    rows, handle = _count_rows(encoder.text_model)
    try:
        plan = encoder.encode_schedule(prompt, 10)
    finally:
        handle.remove()
    assert rows == [2]  # cat and dog chunks once each; part 2's chunk equals part 1's cat
    (_, [(cat1, _), (cat2, _)]), (_, [(dog1, _), (cat2_late, _)]) = plan
    assert cat2 is cat2_late
    want_cat, want_dog = original_truth(
        encoder.text_model, _chunks(encoder, "(cat:1.3)", "(dog:1.2)")
    )
    assert_matches(cat1.tensor[0], want_cat)
    assert_matches(dog1.tensor[0], want_dog)
    (alone,) = original_truth(encoder.text_model, _chunks(encoder, "(cat:1.3)"))
    assert_matches(cat2.tensor[0], alone)
    assert_differs(cat2.tensor[0], want_cat)


def test_negative_schedule_is_one_call(encoder):
    plan = encoder.encode_schedule(f"(blur:1.2) [x:{LONG_TEXT}:0.5] AND y", 10, split_and=False)
    texts = [text for _, text in prompt_schedule(f"(blur:1.2) [x:{LONG_TEXT}:0.5] AND y", 10)]
    # Float64 truth: this call's means are 1/400 of its largest values, which amplifies
    # float32 rounding to ~1.6e-5 on some kernels; original_tolerance bounds it.
    want = original_truth(encoder.text_model, _chunks(encoder, *texts))
    for (_, [(cond, weight)]), expected in zip(plan, want, strict=True):
        assert weight == 1.0
        assert cond.chunks == 2
        assert_matches(cond.tensor[0], expected)


def test_encode_is_a_call_of_one_and_encode_many_keeps_texts_apart(encoder):
    texts = ["a (red:1.3) cat", LONG_TEXT]
    many = encoder.encode_many(texts, clip_skip=2)
    for cond, text in zip(many, texts, strict=True):
        (want,) = original_truth(encoder.text_model, _chunks(encoder, text), 2)
        assert_matches(cond.tensor[0], want)
        # encode batches differently: both match the same truth within its bound.
        assert_matches(encoder.encode(text, clip_skip=2).tensor[0], want)
    assert [cond.chunks for cond in many] == [1, 2]
