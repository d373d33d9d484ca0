"""The merge's input checks on key/shape sets, and the position_ids check and repair."""

from __future__ import annotations

import os

import pytest
import torch

from sdstack.merge import MergeError
from sdstack.merge.checks import (
    alternate_key,
    check_a,
    check_fits,
    find_key,
    mismatches,
    position_ids,
)
from sdstack.merge.repair import (
    check_position_ids,
    position_ids_problem,
    repair_position_ids,
)
from tests.merge import merge_files as mf

SD1 = {
    mf.CONV_IN: (320, 4, 3, 3),
    mf.UNET + "input_blocks.0.0.bias": (320,),
    mf.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    mf.TOKEN_EMBEDDING: (49408, 768),
    mf.POSITION_IDS: (1, 77),
    mf.VAE_CONV: (512, 4, 3, 3),
    "alphas_cumprod": (1000,),
}


def with_conv_in(shapes: dict, channels: int) -> dict:
    return {**shapes, mf.CONV_IN: (320, channels, 3, 3)}


def test_position_ids_are_int64_0_to_n_minus_1():
    ids = position_ids((1, 77))
    assert ids.dtype == torch.int64
    assert ids.flatten().tolist() == list(range(77))


def test_text_keys_have_two_spellings():
    short = "cond_stage_model.transformer.embeddings.token_embedding.weight"
    assert alternate_key(mf.TOKEN_EMBEDDING) == short
    assert alternate_key(short) == mf.TOKEN_EMBEDDING
    assert alternate_key(mf.CONV_IN) is None
    assert find_key({short: (1,)}, mf.TOKEN_EMBEDDING) == short
    assert find_key({}, mf.TOKEN_EMBEDDING) is None


def test_equal_shapes_fit_and_text_or_vae_tensors_may_be_missing():
    check_fits("a", SD1, "b", SD1)
    pruned = {k: v for k, v in SD1.items() if not k.startswith(("first_stage", "cond_stage"))}
    check_fits("a", SD1, "b", pruned)
    assert mismatches(SD1, pruned) == []


def test_a_missing_or_extra_unet_tensor_does_not_fit():
    bias = mf.UNET + "input_blocks.0.0.bias"
    extra = mf.UNET + "label_emb.0.0.weight"
    other = {**{k: v for k, v in SD1.items() if k != bias}, extra: (1280, 2816)}
    assert mismatches(SD1, other) == [f"{bias} missing", f"{extra} not in A"]
    with pytest.raises(MergeError) as error:
        check_fits("a.safetensors", SD1, "b.safetensors", other)
    assert str(error.value) == (
        "b.safetensors: cannot merge it with a.safetensors: its tensors have other shapes; "
        "expected an SD1.x checkpoint with the tensor names and shapes of A (2 differ: "
        f"{bias} missing, {extra} not in A)"
    )


def test_position_ids_and_keys_without_model_are_not_compared():
    other = {**SD1, mf.POSITION_IDS: (77,), "alphas_cumprod": (10,)}
    check_fits("a", SD1, "b", other)


@pytest.mark.parametrize("channels", [9, 8])
def test_a_9_or_8_channel_a_fits_a_4_channel_b(channels):
    check_fits("a", with_conv_in(SD1, channels), "b", SD1)


@pytest.mark.parametrize(("channels", "kind"), [(9, "an inpainting"), (8, "an instruct-pix2pix")])
def test_the_opposite_order_is_refused(channels, kind):
    with pytest.raises(MergeError) as error:
        check_fits("a.safetensors", SD1, "b.safetensors", with_conv_in(SD1, channels))
    assert str(error.value) == (
        f"b.safetensors: is {kind} checkpoint ({channels}-channel conv_in) and a.safetensors is "
        f"not: give the {kind.split()[-1]} model first, as A (its extra conv_in channels are "
        "kept and the first 4 merged)"
    )


def test_c_must_have_the_conv_in_of_b():
    inpainting = with_conv_in(SD1, 9)
    check_fits("a", inpainting, "c", SD1, reference=SD1)
    with pytest.raises(MergeError) as error:
        check_fits("a", inpainting, "c.safetensors", inpainting, reference=SD1)
    assert str(error.value) == (
        f"c.safetensors: its conv_in {mf.CONV_IN} is [320, 9, 3, 3]; expected B's "
        "[320, 4, 3, 3] (C is subtracted from B)"
    )


def test_an_a_that_is_not_sd1_is_refused():
    shapes = {k: tuple(v.shape) for k, v in mf.sdxl_like().items()}
    with pytest.raises(MergeError) as error:
        check_a("xl.safetensors", shapes)
    assert str(error.value) == (
        "xl.safetensors: cannot merge it: this looks like an SDXL checkpoint "
        "(conditioner.embedders.* keys); expected an SD1.x checkpoint (text-to-image, "
        "inpainting or instruct-pix2pix)"
    )
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
    with pytest.raises(MergeError, match="this looks like a LoRA/LyCORIS network"):
        check_a("lora.safetensors", lora)


# position_ids: check and repair


def test_float_ids_that_truncate_elsewhere_are_reported():
    problem = position_ids_problem(mf.POSITION_IDS, mf.broken_position_ids())
    assert problem is not None
    assert problem.wrong == ((38, pytest.approx(37.99998)), (76, pytest.approx(75.9995)))
    assert problem.inexact == 3
    assert problem.describe() == (
        f"{mf.POSITION_IDS}: float32 [1, 77]; 2 of 77 ids point at the wrong position "
        "(37.99998 at 38, 75.9995 at 76); expected int64 0..76"
    )


@pytest.mark.parametrize(
    ("ids", "described"),
    [
        (torch.arange(77.0).reshape(1, 77), "float32 [1, 77]; the ids are right but not stored "
         "as int64"),
        (torch.arange(77.0).reshape(1, 77) + 0.25, "float32 [1, 77]; 77 ids are not whole "
         "numbers (they still truncate right)"),
        (torch.arange(77).flip(0).reshape(1, 77), "int64 [1, 77]; 76 of 77 ids point at the "
         "wrong position (76 at 0, 75 at 1, 74 at 2 and 73 more)"),
    ],
)  # fmt: skip
def test_other_broken_ids(ids, described):
    problem = position_ids_problem("k", ids)
    assert problem is not None and problem.describe() == f"k: {described}; expected int64 0..76"


def test_good_ids_are_no_problem():
    assert position_ids_problem("k", torch.arange(77).reshape(1, 77)) is None


@pytest.fixture(scope="module")
def tiny_state():
    return mf.tiny_state(0)


@pytest.fixture
def broken(tiny_state, tmp_path):
    state = {**tiny_state, mf.POSITION_IDS: mf.broken_position_ids()}
    return mf.save(state, tmp_path / "broken.safetensors", {"format": "pt", "note": "kept"})


def test_check_reports_the_file(broken):
    report = check_position_ids(broken)
    assert report.keys == (mf.POSITION_IDS,) and not report.ok
    assert [p.key for p in report.problems] == [mf.POSITION_IDS]


def test_a_file_without_position_ids_has_nothing_to_check(tiny_state, tmp_path):
    report = check_position_ids(mf.save(tiny_state, tmp_path / "none.safetensors"))
    assert report.ok and report.keys == ()


def test_repair_writes_a_copy_with_int64_ids_and_everything_else_unchanged(
    broken, tmp_path, monkeypatch
):
    from sdstack.merge import repair

    monkeypatch.setattr(repair, "COPY_ELEMENTS", 5000)  # copy in row ranges
    fixed = tmp_path / "fixed.safetensors"
    report, written = repair_position_ids(broken, fixed)
    assert written == fixed and not report.ok
    before, after = mf.load(broken), mf.load(fixed)
    assert set(before) == set(after)
    assert torch.equal(after[mf.POSITION_IDS], torch.arange(77).reshape(1, 77))
    for key, tensor in before.items():
        if key != mf.POSITION_IDS:
            assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    assert mf.metadata(fixed) == {"format": "pt", "note": "kept"}
    assert check_position_ids(fixed).ok


def test_repair_of_a_good_file_writes_nothing(tiny_state, tmp_path):
    good = {**tiny_state, mf.POSITION_IDS: torch.arange(77).reshape(1, 77)}
    path = mf.save(good, tmp_path / "good.safetensors")
    report, written = repair_position_ids(path, tmp_path / "fixed.safetensors")
    assert report.ok and written is None
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]


def test_repair_never_overwrites_its_input(broken):
    before = broken.read_bytes()
    with pytest.raises(MergeError) as error:
        repair_position_ids(broken, broken, overwrite=True)
    assert str(error.value) == (
        f"output {broken}: is an input file ({broken}); write to a new file name"
    )
    assert broken.read_bytes() == before


def test_a_pickle_checkpoint_is_repaired_into_safetensors(tiny_state, tmp_path):
    ckpt = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {**tiny_state, mf.POSITION_IDS: mf.broken_position_ids()}}, ckpt)
    fixed = tmp_path / "fixed.safetensors"
    _, written = repair_position_ids(ckpt, fixed)
    assert written == fixed
    after = mf.load(fixed)
    assert torch.equal(after[mf.POSITION_IDS], torch.arange(77).reshape(1, 77))
    assert torch.equal(after[mf.CONV_IN], tiny_state[mf.CONV_IN])
