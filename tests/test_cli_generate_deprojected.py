"""`sdstack generate --encoding deprojected --deprojector DIR`: infotext, --from-infotext
byte for byte (with --deprojector, or by name under --root), clip skip, errors before
loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sdstack.cli import main
from sdstack.generate import read_infotext
from sdstack.generate.infotext import parse_infotext
from sdstack.lora.tiny import write_tiny_lora
from sdstack.text.deprojector import Deprojector, save_deprojector

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = '{"a cat" + 0.5*"a hat" - "blurry"} <lora:film:0.8>'


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def webui(tmp_path, tiny_components, monkeypatch):
    """A web-UI root with a tiny LoRA and a deprojector (made from the tiny CLIP)."""
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    root = tmp_path / "webui"
    write_tiny_lora(tiny_components, root / "models/Lora/film.safetensors", seed=1)
    model = Deprojector.from_clip(tiny_components.text_encoder, tiny_components.tokenizer)
    save_deprojector(model, root / "models/deprojectors/tiny-dp")
    return root, root / "models/deprojectors/tiny-dp"


def generate(capsys, tiny_checkpoint, out, *options: str) -> tuple[int, str, str]:
    checkpoint, config = tiny_checkpoint
    return cli(
        capsys, "generate", "--model", str(checkpoint), "--config-dir", str(config),
        "--steps", "3", "--size", "64x64", "--seed", "5", "--out", str(out), "--quiet",
        *options,
    )  # fmt: skip


def test_infotext_records_it_and_from_infotext_reproduces_it(
    capsys, tiny_checkpoint, webui, tmp_path
):
    root, folder = webui
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "a", PROMPT, "--negative", "ugly",
        "--deprojector", str(folder), "--root", str(root),
    )  # fmt: skip
    assert code == 0, err
    assert "warning" not in err  # same CLIP; the LoRA's patch is not a CLIP mismatch
    first = out.strip()
    info = parse_infotext(read_infotext(first))
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:10]
    assert info["Prompt"] == PROMPT and info["Negative prompt"] == "ugly"
    assert info["Encoding"] == "deprojected"
    assert info["Deprojector"] == f"tiny-dp [{digest}]"
    assert info["Lora hashes"].startswith("film: ")
    # the folder given, or found by name under the root: the same PNG, byte for byte
    for index, options in enumerate(
        [("--deprojector", str(folder), "--root", str(root)), ("--root", str(root))]
    ):
        code, out, err = generate(
            capsys, tiny_checkpoint, tmp_path / f"b{index}", "--from-infotext", first, *options
        )
        assert code == 0, err
        assert "note" not in err and "warning" not in err
        assert Path(out.strip()).read_bytes() == Path(first).read_bytes()
    code, _out, err = generate(capsys, tiny_checkpoint, tmp_path / "c", "--from-infotext", first)
    assert code == 2
    assert err == (
        f"sdstack: error: the infotext uses the deprojected encoding with deprojector tiny-dp "
        f"[{digest}]; the folder is not part of an infotext: pass --deprojector DIR (or --root "
        "with it as models/deprojectors/tiny-dp)\n"
    )
    code, _out, err = cli(capsys, "grid", "--from-infotext", first, "--x", "seed=1,2")
    assert code == 2 and "sdstack grid does not support the deprojected encoding" in err


def test_clip_skip_is_the_deprojector_s_unless_given(
    capsys, tiny_checkpoint, tiny_components, tmp_path
):
    folder = save_deprojector(
        Deprojector.from_clip(tiny_components.text_encoder, tiny_components.tokenizer, clip_skip=2),
        tmp_path / "skip2",
    )
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "a", "a cat", "--deprojector", str(folder)
    )
    assert code == 0 and "warning" not in err, err
    first = out.strip()
    info = parse_infotext(read_infotext(first))
    assert info["Clip skip"] == "2" and info["Encoding"] == "deprojected"
    other = save_deprojector(
        Deprojector.from_clip(
            tiny_components.text_encoder, tiny_components.tokenizer, clip_skip=2, input_mlp=True
        ),
        tmp_path / "other",
    )
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "c", "--from-infotext", first, "--deprojector",
        str(other),
    )  # fmt: skip
    assert code == 0
    assert f"sdstack: note: the infotext names deprojector {info['Deprojector']}; " in err
    assert "generating with other [" in err and "warning" not in err
    assert parse_infotext(read_infotext(out.strip()))["Clip skip"] == "2"
    code, out, err = generate(
        capsys, tiny_checkpoint, tmp_path / "b", "a cat", "--deprojector", str(folder),
        "--clip-skip", "1",
    )  # fmt: skip
    assert code == 0
    assert "sdstack: warning: deprojector " in err
    assert "was trained for clip skip 2, used at clip skip 1; train one with --clip-skip 1" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (('{"a cat" +}', "--deprojector", "DP"), "expected a quoted text, a number"),
        (("a cat", "--deprojector", "MISSING"), "does not exist; expected a deprojector folder"),
        (("a cat", "--deprojector", "EMPTY"), "no deprojector config"),
        (("a cat", "--encoding", "deprojected"), "--encoding deprojected needs --deprojector DIR"),
        (("a cat", "--encoding", "standard", "--deprojector", "DP"), "is for --encoding"),
        (("a cat", "--encoding", "deprojectd"), "did you mean 'deprojected'"),
        (('{"a" + "b"} <hypernet:h>', "--deprojector", "DP"), "<hypernet:h>"),
    ],
)
def test_bad_input_fails_before_loading(capsys, webui, tmp_path, options, message):
    _root, folder = webui
    (tmp_path / "empty").mkdir()
    names = {"DP": folder, "MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}
    options = tuple(str(names.get(option, option)) for option in options)
    code, _out, err = cli(
        capsys, "generate", "--model", str(tmp_path / "no-model.safetensors"), *options,
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 2
    assert err.startswith("sdstack: error: ") and message in err
    assert "Traceback" not in err and "no-model" not in err


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--encoding standard|deprojected" in text
    assert "--deprojector DIR" in text and '{"a cat" ~0.3~ "a dog"}' in text
