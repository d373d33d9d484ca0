"""``sdstack train lora`` end to end on the tiny checkpoint and the drawn shapes: the dry
run (no model loaded), a run at clip skip 2 whose file ``sdstack lora inspect`` reads back,
a CLI resume equal to the uninterrupted run, and option errors that name the option."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.cli import main
from tests.train.conftest import draw_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return draw_shapes_dataset(tmp_path_factory.mktemp("cli-shapes") / "data").folder


def _args(checkpoint, shapes, out, *extra):
    model, config = checkpoint
    return [
        "train", "lora", "--model", str(model), "--config-dir", str(config),
        "--data", str(shapes), "--out", str(out), "--resolution", "64", "--rank", "4",
        "--alpha", "4", "--batch-size", "4", "--quiet", *extra,
    ]  # fmt: skip


def test_dry_run_prints_the_plan_without_loading(tiny_checkpoint, shapes, tmp_path, capsys,
                                                  monkeypatch):  # fmt: skip
    import sdstack.models

    def no_loading(*_args, **_kwargs):
        raise AssertionError("--dry-run loaded the model")

    monkeypatch.setattr(sdstack.models, "load_model", no_loading, raising=False)
    out = tmp_path / "x.safetensors"
    assert main(_args(tiny_checkpoint, shapes, out, "--epochs", "2", "--dry-run")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "  10_shapes  4 images x 10 repeats = 40" in lines
    assert "  2_extra    2 images x 2 repeats = 4" in lines
    assert "images: 6, with repeats: 44" in lines
    assert "  64x64: 44" in lines
    assert "steps per epoch: 11" in lines  # ceil(44 / 4)
    assert lines[-1] == "epochs: 2, steps: 22"
    assert captured.err.count("sdstack: warning:") == 2  # the broken image, the caption
    assert not out.exists()


def test_train_at_clip_skip_2_inspect_and_resume(tiny_checkpoint, shapes, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run" / "shapes.safetensors"
    extra = ("--clip-skip", "2", "--steps", "4", "--lr", "1e-2", "--save-every", "2",
             "--save-precision", "fp32")  # fmt: skip
    samples = ("--sample", "red circle", "--sample-steps", "2")
    assert main(_args(tiny_checkpoint, shapes, out, *extra, *samples)) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 4 steps" in printed
    state = out.parent / "shapes-step00000002.trainstate"
    for name in ("shapes-step00000002.safetensors", "shapes-step00000004.safetensors",
                 "shapes-loss.csv", "shapes-loss.png", state.name):  # fmt: skip
        assert (out.parent / name).is_file(), name
    assert len(list((out.parent / "shapes-samples").glob("shapes-step00000004-*.png"))) == 1
    # the file reads back with its clip skip and settings
    assert main(["lora", "inspect", str(out), "--json", "--config-dir",
                 str(tiny_checkpoint[1])]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    training = report["training"]
    assert training["clip_skip"] == 2 and training["network_dim"] == 4
    assert training["steps"] == "4" and training["train_images"] == "44"
    assert report["unmatched"] in ([], {}, None, 0)
    # resume from step 2 on the command line: the same LoRA as the uninterrupted run
    again = tmp_path / "again" / "shapes.safetensors"
    assert main(_args(tiny_checkpoint, shapes, again, *extra, "--resume", str(state))) == 0
    first, second = load_file(out), load_file(again)
    assert first.keys() == second.keys()
    assert all(first[key].equal(second[key]) for key in first)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--steps", "0"), "--steps must be between 1 and"),
        (("--network", "loco"), "--network: unknown network type 'loco'; did you mean 'locon'"),
        (("--clip-skip", "13"), "--clip-skip must be between 1 and 12"),
        (("--conv-rank", "4"), "--conv-rank / --conv-alpha set with --network lora"),
        (("--lr-scheduler", "cosin"), "did you mean 'cosine'"),
        (("--warmup-steps", "5"), "--lr-scheduler constant has no warm-up"),
        (("--resolution", "100"), "each side must be a multiple of --bucket-steps 64"),
        (("--resume", "missing.trainstate"), "--resume 'missing.trainstate': no such"),
        (("--unet-only", "--text-encoder-only"), "nothing to train"),
        (("--sample", "x", "--sample-sampler", "Eulr"), "--sample-sampler"),
        (("--mixed-precision", "fp8"), "--mixed-precision: unknown mixed precision"),
    ],
)
def test_bad_options_name_the_option(tiny_checkpoint, shapes, tmp_path, capsys, extra,
                                     message):  # fmt: skip
    out = tmp_path / "x.safetensors"
    assert main(_args(tiny_checkpoint, shapes, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdstack: error: ") and message in err, err
    assert not out.exists()


def test_bad_paths(tiny_checkpoint, shapes, tmp_path, capsys):
    _model, config = tiny_checkpoint
    out = tmp_path / "x.safetensors"
    assert main(_args((tmp_path / "none.safetensors", config), shapes, out)) == 2
    assert "--model" in capsys.readouterr().err
    assert main(_args(tiny_checkpoint, tmp_path / "nothing", out)) == 2
    assert "--data" in capsys.readouterr().err
    assert main(_args(tiny_checkpoint, shapes, tmp_path / "x.ckpt")) == 2
    assert "a LoRA is written as .safetensors" in capsys.readouterr().err


def test_steps_and_epochs_exclude_each_other(tiny_checkpoint, shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_checkpoint, shapes, tmp_path / "x.safetensors", "--steps", "2",
                   "--epochs", "1"))  # fmt: skip
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@given(width=st.integers(1, 100_000), height=st.integers(1, 100_000))
def test_resolution_option_parser(width, height):
    from sdstack.commands.train import _resolution

    assert _resolution(str(width)) == (width, width)
    assert _resolution(f"{width}x{height}") == (width, height)
    assert _resolution(f"{width},{height}") == (width, height)


@given(text=st.text(max_size=12))
def test_resolution_option_parser_never_crashes(text):
    import argparse

    from sdstack.commands.train import _resolution

    try:
        size = _resolution(text)
    except argparse.ArgumentTypeError as error:
        assert "expected S, W,H or WxH" in str(error)
    else:
        assert len(size) == 2 and all(isinstance(side, int) for side in size)
