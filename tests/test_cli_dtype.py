"""``--dtype``: auto by default for the generation commands (generate, grid, encode), the
file-writing tools keep theirs; the help says what auto picks on this machine."""

from __future__ import annotations

import argparse

import pytest

from sdstack.cli import build_parser, main
from sdstack.models.precision import auto_help, cpu_bf16_for_auto

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def subparser(name: str, *path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for part in (name, *path):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[part]
    return parser


def dtype_action(parser: argparse.ArgumentParser) -> argparse.Action:
    return next(a for a in parser._actions if "--dtype" in a.option_strings)


@pytest.mark.parametrize("command", [("generate",), ("grid",), ("encode",)])
def test_generation_commands_default_to_auto(command):
    action = dtype_action(subparser(*command))
    assert action.default == "auto"
    assert tuple(action.choices) == ("auto", "fp32", "fp16", "bf16")


@pytest.mark.parametrize(
    ("command", "default"),
    [(("merge",), "fp16"), (("lora", "bake"), None), (("lora", "extract"), "fp32")],
)
def test_file_writing_tools_keep_their_default(command, default):
    assert dtype_action(subparser(*command)).default == default


def test_help_says_what_auto_picks_here():
    """The help follows what auto uses: the probe, or $SDSTACK_CPU_BF16 (the suite pins 0)."""
    text = dtype_action(subparser("generate")).help
    assert text == auto_help()
    here = "has native bf16" if cpu_bf16_for_auto() else "has no native bf16"
    assert f"this CPU {here}" in text


def test_help_for_both_kinds_of_cpu():
    assert "this CPU has native bf16, so on --device cpu: UNet and VAE bf16, text encoder fp32" in (
        auto_help(cpu_bf16=True)
    )
    without = auto_help(cpu_bf16=False)
    assert "this CPU has no native bf16, so on --device cpu: fp32;" in without
    assert "avx512_bf16/amx_bf16" in without and "CUDA and MPS" in without


def test_unknown_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--dtype", "fp8"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_generate_runs_with_the_dtype(tiny_checkpoint, tmp_path, capsys, dtype):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / dtype
    argv = ["generate", "a cat", "--model", str(checkpoint), "--config-dir", str(config)]
    argv += ["--steps", "1", "--size", "64x64", "--seed", "5", "--out", str(out), "--quiet"]
    assert main([*argv, "--dtype", dtype]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / "00000-5.png")]
