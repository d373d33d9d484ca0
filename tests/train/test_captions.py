"""process_caption against kohya's process_caption, the rng calls spelled out."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.train.captions import CaptionError, CaptionOptions, process_caption

CAPTION = "sks, red circle, shape , white background,simple"
TAGS = ["sks", "red circle", "shape", "white background", "simple"]


def test_no_options_keeps_the_first_line_and_draws_nothing():
    rng = random.Random(3)
    before = rng.getstate()
    assert process_caption(CAPTION + "\nsecond", rng) == CAPTION
    assert rng.getstate() == before


def test_shuffle_keeps_the_first_k_tags_and_shuffles_the_rest_like_random_shuffle():
    for keep in (0, 1, 2):
        reference = random.Random(7)
        flex = TAGS[keep:]
        reference.shuffle(flex)
        got = process_caption(CAPTION, random.Random(7), shuffle=True, keep_tokens=keep)
        assert got == ", ".join(TAGS[:keep] + flex)


def test_tag_dropout_draws_one_random_per_flexible_tag_after_the_shuffle():
    reference = random.Random(11)
    flex = TAGS[1:]
    reference.shuffle(flex)
    kept = [tag for tag in flex if reference.random() >= 0.5]
    got = process_caption(
        CAPTION, random.Random(11), shuffle=True, keep_tokens=1, tag_dropout_rate=0.5
    )
    assert got == ", ".join(["sks", *kept])


def test_caption_dropout_draws_first_and_gives_the_empty_caption():
    assert process_caption(CAPTION, random.Random(0), dropout_rate=1.0) == ""
    # rate 0.5: drop exactly when the first random() < 0.5
    for seed in range(20):
        dropped = random.Random(seed).random() < 0.5
        got = process_caption(CAPTION, random.Random(seed), dropout_rate=0.5)
        assert got == ("" if dropped else CAPTION)


def test_dropout_every_n_epochs_counts_from_one():
    rng = random.Random(0)
    got = [process_caption("a", rng, dropout_every_n_epochs=3, epoch=e) for e in range(1, 7)]
    assert got == ["a", "a", "", "a", "a", ""]


def test_prefix_and_suffix_join_with_a_space_before_the_split():
    got = process_caption("b, c", random.Random(0), prefix="pre", suffix="post", shuffle=True,
                          keep_tokens=1)  # fmt: skip
    assert got == "pre b, c post"  # fixed ["pre b"], flex ["c post"]


def test_keep_tokens_separator_fixes_the_head_and_the_tail():
    caption = "a, b ||| c, d, e ||| f"
    reference = random.Random(5)
    flex = ["c", "d", "e"]
    reference.shuffle(flex)
    got = process_caption(caption, random.Random(5), shuffle=True, keep_tokens_separator="|||")
    assert got == ", ".join(["a", "b", *flex, "f"])
    # without shuffling the marker is removed and nothing else changes
    assert process_caption("a |||b", random.Random(0), keep_tokens_separator="|||") == "a b"


def test_wildcards_choose_one_alternative_with_rng_choice():
    reference = random.Random(2)
    first = reference.choice(["red", "blue"])
    second = reference.choice(["x", "y", "z"])
    got = process_caption("{red|blue} circle, {x|y|z}", random.Random(2), wildcard=True)
    assert got == f"{first} circle, {second}"


def test_other_separators_and_empty_tags_are_kept_as_kohya_does():
    assert process_caption("a; b;;c", random.Random(0), separator=";", tag_dropout_rate=0.0,
                           shuffle=True, keep_tokens=4) == "a, b, , c"  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout_rate": 1.5}, "caption dropout_rate: got 1.5, expected 0 to 1"),
        ({"tag_dropout_rate": -0.1}, "caption tag_dropout_rate: got -0.1, expected 0 to 1"),
        ({"dropout_rate": float("nan")}, "caption dropout_rate: got nan, expected 0 to 1"),
        ({"keep_tokens": -1}, "caption keep_tokens: got -1, expected an integer >= 0"),
        ({"separator": ""}, "caption separator: got '', expected a non-empty string such as ','"),
    ],
)
def test_bad_options_are_errors(options, message):
    with pytest.raises(CaptionError) as info:
        process_caption("a", random.Random(0), **options)
    assert str(info.value) == message


def test_caption_options_apply_is_process_caption():
    options = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout_rate=0.25)
    assert options.apply(CAPTION, random.Random(9)) == process_caption(
        CAPTION, random.Random(9), shuffle=True, keep_tokens=1, tag_dropout_rate=0.25
    )


_tag = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=6).map(str.strip).filter(bool)


@given(st.lists(_tag, min_size=1, max_size=8), st.integers(0, 9), st.integers(0, 2**32),
       st.floats(0, 1))  # fmt: skip
def test_shuffled_captions_keep_the_head_and_only_drop_flexible_tags(tags, keep, seed, rate):
    out = process_caption(", ".join(tags), random.Random(seed), shuffle=True, keep_tokens=keep,
                          tag_dropout_rate=rate)  # fmt: skip
    got = out.split(", ") if out else []
    head = tags[:keep]
    assert got[: len(head)] == head
    rest = got[len(head) :]
    remaining = list(tags[keep:])
    for tag in rest:  # a sub-multiset of the flexible tags
        remaining.remove(tag)
    if rate == 0:
        assert remaining == []
