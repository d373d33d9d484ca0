"""``sdstack merge`` and ``sdstack models check`` in-process: help, output, pinned errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdstack.cli import main
from tests.merge import merge_files as mf


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-merge")
    a, _ = tiny_checkpoint
    b = mf.save(mf.tiny_state(1), folder / "b.safetensors")
    c = mf.save(mf.tiny_state(2), folder / "c.safetensors")
    return a, b, c


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [["merge"], ["models", "check"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sdstack {' '.join(command)}")


def test_help_lists_every_merge_method():
    from sdstack.commands.merge import METHODS
    from sdstack.merge.methods import MERGE_METHODS

    assert tuple(name for name, _ in METHODS) == MERGE_METHODS.names()


def test_merge_writes_the_file_and_says_what_it_did(inputs, tmp_path, capsys):
    a, b, _ = inputs
    out = tmp_path / "mix.safetensors"
    args = ["merge", str(a), str(b), "-o", str(out), "--alpha", "0.3", "--dtype", "fp32"]
    assert main(args) == 0
    captured = capsys.readouterr()
    count = len(mf.load(a))
    assert captured.out == (
        f"{out}: Weighted sum of {a.name}, b.safetensors (alpha 0.3): {count} tensors, "
        f"{count} merged, 0 copied\n"
    )
    assert "merging" in captured.err or "hashing" in captured.err  # the progress bar
    recipe = json.loads(mf.metadata(out)["sd_merge_recipe"])
    assert recipe["multiplier"] == 0.3 and recipe["dtype"] == "fp32"


def test_three_models_options_blocks_and_discard(inputs, tmp_path, capsys):
    a, b, c = inputs
    out = tmp_path / "dare.safetensors"
    args = [
        "merge", str(a), str(b), str(c), "-o", str(out), "--method", "dare", "--dare-drop",
        "0.5", "--seed", "7", "--dare-ties", "--ties-density", "0.5", "--alpha-blocks",
        "GRAD_V", "--discard", "^first_stage_model", "--text-encoder", "a", "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    merged = mf.load(out)
    assert not any(key.startswith("first_stage_model") for key in merged)
    token = mf.load(a)[mf.TOKEN_EMBEDDING].half()
    assert torch.equal(merged[mf.TOKEN_EMBEDDING], token)
    recipe = json.loads(mf.metadata(out)["sd_merge_recipe"])
    assert recipe["options"] == {"drop": 0.5, "seed": 7, "ties": True, "density": 0.5}
    assert recipe["interp_method"] == "DARE" and len(recipe["blocks"]["alpha"]) == 26


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "add-difference"],
         "sdstack: error: merge method 'add-difference' (A + a(B-C)) needs three models A, B, "
         "C; got two: give C"),
        (["--method", "weighted-summ"],
         "sdstack: error: unknown merge method 'weighted-summ'; did you mean 'weighted-sum'? "
         "Expected one of: weighted-sum, add-difference, sum-twice, triple-sum, "
         "train-difference, ties, dare, slerp"),
        (["--ties-density", "0.5"],
         "sdstack: error: --ties-density: merge method 'weighted-sum' has no such option; "
         "expected none of the method options"),
        (["--method", "ties", "--dare-drop", "0.5"],
         "sdstack: error: --dare-drop: merge method 'ties' has no such option; expected "
         "--ties-density"),
        (["--alpha-blocks", "1,2,3"],
         "sdstack: error: --alpha-blocks: merge blocks '1,2,3': 3 values; expected 26 (BASE, "
         "IN00..IN11, M00, OUT00..OUT11)"),
        (["--beta", "0.5"],
         "sdstack: error: beta 0.5: merge method 'weighted-sum' has no beta"),
        (["--discard", "["],
         "sdstack: error: discard '[': not a regular expression (unterminated character set "
         "at position 0)"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_errors(inputs, tmp_path, capsys, extra, message):
    a, b, _ = inputs
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(a), str(b), "-o", str(out), "--quiet", *extra]) == 2
    assert error_line(capsys) == message
    assert not out.exists()


def test_an_option_out_of_range(inputs, tmp_path, capsys):
    a, b, c = inputs
    out = tmp_path / "x.safetensors"
    args = ["merge", str(a), str(b), str(c), "-o", str(out), "--method", "ties"]
    assert main([*args, "--ties-density", "0", "--quiet"]) == 2
    assert error_line(capsys) == (
        "sdstack: error: merge method 'ties': option density=0.0; expected a fraction, "
        "0 < density <= 1 (kept)"
    )
    assert not out.exists()


def test_a_non_finite_alpha_is_an_argument_error(inputs, capsys):
    a, b, _ = inputs
    with pytest.raises(SystemExit) as done:
        main(["merge", str(a), str(b), "-o", "x.safetensors", "--alpha", "nan"])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sdstack merge: error: argument --alpha: 'nan': expected a finite number, e.g. 0.3"
    )


def test_outputs_that_exist_or_are_inputs_are_refused(inputs, tmp_path, capsys):
    a, b, _ = inputs
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"old")
    assert main(["merge", str(a), str(b), "-o", str(existing), "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: output {existing}: file exists; choose a new name (or allow "
        "overwriting it)"
    )
    assert main(["merge", str(a), str(b), "-o", str(b), "--overwrite", "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: output {b}: is an input file ({b}); write to a new file name"
    )
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "x.ckpt"), "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: output {tmp_path / 'x.ckpt'}: expected a .safetensors file name"
    )
    assert existing.read_bytes() == b"old"


def test_a_foreign_input_is_refused_and_nothing_written(inputs, tmp_path, capsys):
    a, _, _ = inputs
    xl = mf.save(mf.sdxl_like(), tmp_path / "xl.safetensors")
    assert main(["merge", str(a), str(xl), "-o", str(tmp_path / "o.safetensors"), "--quiet"]) == 2
    assert error_line(capsys).startswith(
        f"sdstack: error: {xl}: cannot merge it with {a}: this looks like an SDXL checkpoint"
    )
    assert sorted(os.listdir(tmp_path)) == ["xl.safetensors"]


def test_a_missing_input_names_the_file(inputs, tmp_path, capsys):
    a, _, _ = inputs
    missing = tmp_path / "nope.safetensors"
    assert main(["merge", str(a), str(missing), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert error_line(capsys) == f"sdstack: error: {missing}: No such file or directory"


# sdstack models check


@pytest.fixture
def broken(inputs, tmp_path):
    a, _, _ = inputs
    state = {**mf.load(a), mf.POSITION_IDS: mf.broken_position_ids()}
    return mf.save(state, tmp_path / "broken.safetensors")


def test_check_reports_broken_ids_with_status_1(broken, capsys):
    assert main(["models", "check", str(broken)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{broken}: {mf.POSITION_IDS}: float32 [1, 77]; 2 of 77 ids point at the wrong "
        "position (37.99998 at 38, 75.9995 at 76); expected int64 0..76",
        f"repair with: sdstack models check {broken} --fix -o FIXED.safetensors",
    ]


def test_check_fix_writes_a_repaired_copy(broken, tmp_path, capsys):
    fixed = tmp_path / "fixed.safetensors"
    assert main(["models", "check", str(broken), "--fix", "-o", str(fixed)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"{fixed}: repaired copy written (position_ids int64 0..n-1)"
    assert main(["models", "check", str(fixed)]) == 0
    assert capsys.readouterr().out == (
        f"{fixed}: position_ids are fine ({mf.POSITION_IDS}: int64 0..76)\n"
    )


def test_check_of_a_file_without_ids(inputs, capsys):
    a, _, _ = inputs
    assert main(["models", "check", str(a)]) == 0
    assert capsys.readouterr().out == f"{a}: no position_ids tensor; nothing to check\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fix"], "sdstack: error: --fix: give the repaired file's name with -o OUT"),
        (["-o", "x.safetensors"], "sdstack: error: -o x.safetensors: writing a copy needs --fix"),
    ],
)
def test_check_argument_errors(broken, capsys, extra, message):
    assert main(["models", "check", str(broken), *extra]) == 2
    assert error_line(capsys) == message
