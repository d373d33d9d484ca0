"""``sdstack lora inspect|bake|extract`` in-process: help, output, pinned error messages."""

from __future__ import annotations

import json

import pytest

from sdstack.cli import main
from tests.lora import lora_files as lf


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    from sdstack.models import hash_cache

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


@pytest.fixture
def lora(tiny_components, tmp_path):
    metadata = {"ss_clip_skip": "2", "ss_tag_frequency": json.dumps({"1_x": {"ink": 2}})}
    return lf.write_kohya(tmp_path / "ink.safetensors", tiny_components, metadata, seed=4)


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [[], ["inspect"], ["bake"], ["extract"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(["lora", *command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sdstack lora {' '.join(command)}".rstrip())
    if not command:
        assert all(name in out for name in ("inspect", "bake", "extract"))


def test_lora_without_a_command_prints_help(capsys):
    assert main(["lora"]) == 2
    assert capsys.readouterr().out.startswith("usage: sdstack lora")


def test_inspect_text_and_json(lora, tiny_checkpoint, capsys):
    _, config = tiny_checkpoint
    assert main(["lora", "inspect", str(lora), "--config-dir", str(config)]) == 0
    text = capsys.readouterr().out
    assert "format: kohya" in text and "  clip skip: 2" in text
    assert main(["lora", "inspect", str(lora), "--config-dir", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["training"]["clip_skip"] == 2
    assert report["tags"]["top"] == [["ink", 2]]
    assert report["modules"] == len(lf.KOHYA_LAYERS)


def test_inspect_missing_file(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    assert main(["lora", "inspect", str(missing)]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: {missing}: no such file; expected a LoRA file (.safetensors, .pt)"
    )


def test_bake_writes_and_reports(lora, tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "baked.safetensors"
    args = ["lora", "bake", str(checkpoint), f"{lora}:0.5:0.8", "-o", str(out)]
    assert main([*args, "--config-dir", str(config), "--quiet"]) == 0
    assert capsys.readouterr().out == (
        f"{out}: ink baked into {len(lf.KOHYA_LAYERS)} layers (568 tensors written)\n"
    )
    assert out.is_file()


def test_bake_finds_a_lora_by_name(lora, tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "named.safetensors"
    args = ["lora", "bake", str(checkpoint), "ink", "-o", str(out), "--lora-dir", str(tmp_path)]
    assert main([*args, "--config-dir", str(config), "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("which", ["exists", "model", "lora"])
def test_bake_output_errors(which, lora, tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    model = tmp_path / "model.safetensors"
    model.write_bytes(checkpoint.read_bytes())
    out = {"exists": tmp_path / "old.safetensors", "model": model, "lora": lora}[which]
    if which == "exists":
        out.write_bytes(b"old")
    args = ["lora", "bake", str(model), str(lora), "-o", str(out), "--config-dir", str(config)]
    assert main([*args, "--quiet"]) == 2
    expected = {
        "exists": f"--out {out}: file exists; choose a new name (or allow overwriting it)",
        "model": f"--out {out}: is an input file ({model}); write to a new file name",
        "lora": f"--out {out}: is an input file ({lora}); write to a new file name",
    }[which]
    assert error_line(capsys) == f"sdstack: error: {expected}"


def test_bake_missing_model_and_lora(lora, tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    out = str(tmp_path / "o.safetensors")
    assert main(["lora", "bake", str(missing), str(lora), "-o", out, "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: {missing}: no such file; expected a single-file SD1.x checkpoint"
    )


def test_bake_refuses_an_sdxl_lora(tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    sdxl = lf.save(tmp_path / "xl.safetensors", lf.sdxl_like_state())
    out = tmp_path / "o.safetensors"
    args = ["lora", "bake", str(checkpoint), str(sdxl), "-o", str(out), "--config-dir"]
    assert main([*args, str(config), "--quiet"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"sdstack: error: {sdxl}: is an SDXL LoRA (")
    assert line.endswith("); this model is SD 1.x")
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--rank", "0"), ("--rank", "abc"), ("--conv-rank", "-2")]
)
def test_extract_bad_rank(option, value, tiny_checkpoint, tmp_path, capsys):
    checkpoint, _ = tiny_checkpoint
    args = ["lora", "extract", str(checkpoint), str(checkpoint), "-o", str(tmp_path / "o.st")]
    ranks = ["--rank", "4", option, value] if option != "--rank" else [option, value]
    assert main([*args, *ranks, "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: {option} {value!r}: expected a whole number >= 1, e.g. {option} 32"
    )


def test_extract_same_file_and_existing_output(tiny_checkpoint, tmp_path, capsys):
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "o.safetensors"
    args = ["lora", "extract", str(checkpoint), str(checkpoint), "--rank", "4", "-o", str(out)]
    assert main([*args, "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: {checkpoint}: TUNED and BASE are the same file; expected two "
        "checkpoints to subtract"
    )
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    out.write_bytes(b"old")
    args = ["lora", "extract", str(copy), str(checkpoint), "--rank", "4", "-o", str(out)]
    assert main([*args, "--config-dir", str(config), "--quiet"]) == 2
    assert error_line(capsys) == (
        f"sdstack: error: --out {out}: file exists; choose a new name (or allow overwriting it)"
    )


def test_extract_writes_and_notes_the_shared_text_encoder(tiny_checkpoint, tmp_path, capsys):
    """A copy of the model extracts to zeros; the text encoder is skipped, with a note."""
    checkpoint, config = tiny_checkpoint
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    out = tmp_path / "x.safetensors"
    args = ["lora", "extract", str(copy), str(checkpoint), "--rank", "4", "--conv-rank", "2"]
    assert main([*args, "-o", str(out), "--config-dir", str(config), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}: 117 UNet and 0 text-encoder modules, rank 4, conv rank 2\n"
    assert captured.err == (
        "sdstack: note: text encoder: max |tuned - base| is 0, not above 0.01; not extracted "
        "(the two models share it)\n"
    )
