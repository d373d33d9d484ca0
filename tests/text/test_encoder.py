"""PromptEncoder: parity with diffusers, long prompts, prompt pairs, schedules, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch

from sdstack.text import Conditioning, PromptEncoder
from sdstack.text.clip_skip import token_embedding
from tests.text import direct_layer, direct_original

LONG = ", ".join(f"(word{i}:1.1) thing" for i in range(40))


@pytest.fixture(scope="module")
def encoder(tiny_text_encoder, tokenizer):
    return PromptEncoder(tiny_text_encoder, tokenizer)


@pytest.fixture(scope="module")
def pipeline(tiny_components):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    c = tiny_components
    return StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=DDIMScheduler(**c.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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
    torch.testing.assert_close(cond.tensor, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond.tensor, want_negative, rtol=1e-5, atol=1e-6)


def test_each_chunk_equals_that_chunk_encoded_alone(encoder):
    chunks = encoder.tokenize(LONG).chunks
    assert len(chunks) == 3
    got = encoder.encode(LONG, clip_skip=2)
    assert got.tensor.shape == (1, 3 * 77, 32)
    assert got.chunks == 3
    for index, chunk in enumerate(chunks):
        want = direct_original(direct_layer(encoder.text_model, chunk.ids, 2), chunk.weights)
        torch.testing.assert_close(got.tensor[0, 77 * index : 77 * (index + 1)], want)


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
    assert batches == [(3, 77), (6, 77)]


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_encode_pair_pads_the_shorter_side_with_the_empty_prompt(encoder, long_side):
    short = "(a cat:1.3)"
    prompt, negative = (LONG, short) if long_side == "prompt" else (short, LONG)
    cond, uncond = encoder.encode_pair(prompt, negative, clip_skip=2)
    assert cond.tensor.shape == uncond.tensor.shape == (1, 3 * 77, 32)
    padded, full = (uncond, cond) if long_side == "prompt" else (cond, uncond)
    empty = encoder.empty(clip_skip=2)
    torch.testing.assert_close(padded.tensor[:, :77], encoder.encode(short, clip_skip=2).tensor)
    for index in (1, 2):
        torch.testing.assert_close(padded.tensor[:, 77 * index : 77 * (index + 1)], empty.tensor)
    torch.testing.assert_close(full.tensor, encoder.encode(LONG, clip_skip=2).tensor)


def test_padded_to_appends_empty_chunks(encoder):
    cond = encoder.encode("a cat")
    empty = encoder.empty()
    padded = cond.padded_to(3, empty)
    assert padded.chunks == 3
    assert torch.equal(padded.tensor[:, 154:], empty.tensor)
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
    assert sum(rows) == 3  # three distinct texts of one chunk each, in one forward
    assert len(rows) == 1
    assert [end for end, _ in plan] == [10, 20]
    assert [w for _, parts in plan for _, w in parts] == [1.0, 0.5, 1.0] * 2
    (cat, _), (spaced, _), (spaced_again, _) = plan[0][1]
    (dog, _), (spaced_late, _), _ = plan[1][1]
    assert spaced is spaced_again is spaced_late
    torch.testing.assert_close(cat.tensor, encoder.encode("a cat x", clip_skip=2).tensor)
    torch.testing.assert_close(dog.tensor, encoder.encode("a dog x", clip_skip=2).tensor)
    torch.testing.assert_close(spaced.tensor, encoder.encode(" a cat x", clip_skip=2).tensor)


def test_encode_schedule_positive_strips_networks_negative_keeps_text(encoder):
    positive = encoder.encode_schedule("<lora:foo:0.7>a cat :2", 10)
    assert [(end, [w for _, w in parts]) for end, parts in positive] == [(10, [2.0])]
    torch.testing.assert_close(positive[0][1][0][0].tensor, encoder.encode("a cat").tensor)
    negative = encoder.encode_schedule("a cat AND dog :2", 10, split_and=False)
    assert [w for _, w in negative[0][1]] == [1.0]
    torch.testing.assert_close(
        negative[0][1][0][0].tensor, encoder.encode("a cat AND dog :2").tensor
    )


def test_encode_schedule_rejects_bad_steps(encoder):
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        encoder.encode_schedule("a cat", 0)


def test_model_dtype_is_respected(tiny_text_encoder, tokenizer):
    model = copy.deepcopy(tiny_text_encoder).to(torch.bfloat16)
    cond = PromptEncoder(model, tokenizer).encode("a (cat:1.2)", clip_skip=1.5)
    assert cond.tensor.dtype == cond.pooled.dtype == torch.bfloat16
    reference = PromptEncoder(tiny_text_encoder, tokenizer).encode("a (cat:1.2)", clip_skip=1.5)
    torch.testing.assert_close(cond.tensor.float(), reference.tensor, atol=0.1, rtol=0.05)


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
