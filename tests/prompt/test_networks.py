"""extract_networks against the spec ("Extra-network tags") and the reference LoRA rules."""

from __future__ import annotations

import re

import pytest

from sdstack.prompt.errors import PromptSyntaxError
from sdstack.prompt.networks import NetworkTag, extract_networks


def test_tag_is_removed_without_whitespace_cleanup():
    text, tags = extract_networks("a cat, <lora:film:0.8>, best")
    assert text == "a cat, , best"
    assert tags == [
        NetworkTag(
            kind="lora",
            items=("film", "0.8"),
            name="film",
            te=0.8,
            unet=0.8,
            written_kind="lora",
            span=(7, 22),
        )
    ]


@pytest.mark.parametrize(
    ("tag", "name", "te", "unet", "dyn"),
    [
        ("<lora:x>", "x", 1.0, 1.0, None),
        ("<lora:x:0.5>", "x", 0.5, 0.5, None),  # unet defaults to te
        ("<lora:x:0.5:0.25>", "x", 0.5, 0.25, None),
        ("<lora:x:0.5:0.25:8>", "x", 0.5, 0.25, 8),
        ("<lora:x:te=0.3>", "x", 0.3, 0.3, None),  # named te also sets the unet default
        ("<lora:x:0.5:unet=0>", "x", 0.5, 0.0, None),
        ("<lora:x:0.5:0.6:te=2>", "x", 2.0, 0.6, None),  # named wins over positional
        ("<lora:x:dyn=4>", "x", 1.0, 1.0, 4),
        ("<lora:x:te=0.2:0.9>", "x", 0.2, 0.2, None),  # positional '0.9' is the te slot
        ("<lora:x: 1.5 >", "x", 1.5, 1.5, None),  # float() accepts surrounding spaces
        ("<lora:my lora v2:-1>", "my lora v2", -1.0, -1.0, None),
    ],
)
def test_lora_arguments(tag, name, te, unet, dyn):
    _, (result,) = extract_networks(tag)
    assert (result.kind, result.name, result.te, result.unet, result.dyn) == (
        "lora",
        name,
        te,
        unet,
        dyn,
    )


def test_named_items_and_lyco_alias():
    _, (tag,) = extract_networks("<lyco:style:0.7:lbw=MIDD>")
    assert tag.kind == "lora"
    assert tag.written_kind == "lyco"
    assert tag.items == ("style", "0.7", "lbw=MIDD")
    assert tag.named == {"lbw": "MIDD"}
    assert (tag.name, tag.te, tag.unet) == ("style", 0.7, 0.7)


def test_only_items_with_exactly_one_equals_sign_are_named():
    _, (tag,) = extract_networks("<ext:a:x=1=2:k=v:=>")
    assert tag.named == {"k": "v", "": ""}
    assert tag.items == ("a", "x=1=2", "k=v", "=")


def test_other_kinds_keep_items_and_read_numbers_leniently():
    text, tags = extract_networks("<hypernet:anime:0.6> <ext:a:b:c>")
    assert text == " "
    assert tags[0].kind == "hypernet"
    assert (tags[0].name, tags[0].te, tags[0].unet) == ("anime", 0.6, 0.6)
    assert tags[1].items == ("a", "b", "c")
    assert (tags[1].name, tags[1].te, tags[1].unet) == ("a", 1.0, 1.0)


def test_what_is_not_a_tag_stays_text():
    for text in ["<lora:>", "< lora:x>", "<lora x>", "<:x>", "lora:x>", "<lo-ra:x>"]:
        assert extract_networks(text) == (text, [])


def test_several_tags_in_order_with_spans():
    text = "<lora:a><lora:b:2>x<hypernet:h>"
    stripped, tags = extract_networks(text)
    assert stripped == "x"
    assert [t.name for t in tags] == ["a", "b", "h"]
    assert [text[slice(*t.span)] for t in tags] == ["<lora:a>", "<lora:b:2>", "<hypernet:h>"]


def test_args_run_to_the_first_closing_angle_bracket():
    stripped, (tag,) = extract_networks("<lora:a<b:1>>")
    assert stripped == ">"
    assert tag.name == "a<b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "x <lora:film:abc>",
            "LoRA tag '<lora:film:abc>': te multiplier 'abc' is not a finite number "
            "(expected <lora:name[:te[:unet[:dyn]]]>, e.g. <lora:name:0.8>) at position 13",
        ),
        (
            "<lora:film:1:x>",
            "LoRA tag '<lora:film:1:x>': unet multiplier 'x' is not a finite number",
        ),
        (
            "<lora:film:unet=inf>",
            "LoRA tag '<lora:film:unet=inf>': unet= 'inf' is not a finite number",
        ),
        (
            "<lora:film:1:1:4.5>",
            "LoRA tag '<lora:film:1:1:4.5>': dyn '4.5' is not an integer "
            "(expected <lora:name[:te[:unet[:dyn]]]>) at position 15",
        ),
        (
            "<lyco:te=1>",
            "LoRA tag '<lyco:te=1>' has no name (expected <lora:name[:te[:unet[:dyn]]]>) "
            "at position 0",
        ),
        (  # the positional value is checked even when te= overrides it, as in the reference
            "<lora:film:abc:te=1>",
            "LoRA tag '<lora:film:abc:te=1>': te multiplier 'abc' is not a finite number",
        ),
    ],
)
def test_bad_lora_arguments(text, message):
    with pytest.raises(PromptSyntaxError, match=re.escape(message)) as info:
        extract_networks(text)
    assert info.value.text == text
