"""`sdstack generate`: every setting and file checked before the model loads, in CLI terms.

The model loader is replaced by one that fails the test, so each error here provably
comes before any loading; the message and exit status are pinned.
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image

from sdstack.cli import main
from sdstack.generate import build_infotext, read_infotext, save_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("sdstack.models.load_model", refuse)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base(tiny_checkpoint, tmp_path) -> list[str]:
    checkpoint, config = tiny_checkpoint
    return [
        "generate", "a cat", "--model", str(checkpoint), "--config-dir", str(config),
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cfg", "-1"], "--cfg must be between 0 and 100, got -1.0"),
        (["--cfg-scale", "1e308"], "--cfg must be between 0 and 100, got 1e+308"),
        (
            ["--clip-skip", "13"],
            "--clip-skip must be between 1 and 12 (SD1 has 12 CLIP layers; 1 = last layer, "
            "2 = penultimate), got 13",
        ),
        (["--seed", "-5"], "--seed must be between 0 and 4294967295 (or -1 for a random seed)"),
        (["--steps", "1000000000"], "--steps must be between 1 and 1000, got 1000000000"),
        (
            ["--size", "4096x4096"],
            "--width x --height = 4096x4096 is 16,777,216 pixels; at most 4,194,304 (2048x2048)",
        ),
        (["--width", "100"], "--width must be a multiple of 8, got 100"),
        (["--batch-size", "65"], "--batch-size must be between 1 and 64, got 65"),
        (["--n-iter", "0"], "--batch-count must be between 1 and 10000, got 0"),
        (["--emphasis", "strong"], "unknown emphasis mode 'strong'"),
        (
            ["--denoising-strength", "0.5"],
            "--denoising-strength is the img2img strength: it needs --init-image IMAGE",
        ),
        (["--size", "64x64", "--width", "64"], "give either --size WxH or --width/--height"),
        (["--embeddings", "missing"], "--embeddings 'missing': not found; expected a folder"),
        (["--vae", "missing.safetensors"], "--vae 'missing.safetensors': not found; expected a"),
    ],
)
def test_bad_settings_are_refused_before_loading(
    tiny_checkpoint, tmp_path, capsys, no_loading, options, message
):
    code, out, err = run(capsys, *base(tiny_checkpoint, tmp_path), *options)
    assert (code, out) == (2, "")
    assert err.startswith("sdstack: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file_is_refused_before_loading(
    tiny_checkpoint, tmp_path, capsys, no_loading
):
    target = tmp_path / "out"
    target.write_text("not a folder")
    code, _, err = run(capsys, *base(tiny_checkpoint, tmp_path))
    assert code == 2
    assert f"sdstack: error: --out {str(target)!r}: is a file, expected a folder" in err


@pytest.mark.parametrize("kind", ["text", "folder", "truncated", "missing"])
def test_bad_init_image_is_a_clean_error(tiny_checkpoint, tmp_path, capsys, no_loading, kind):
    path = tmp_path / "init.png"
    if kind == "text":
        path.write_text("hello")
    elif kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        Image.new("RGB", (64, 64), "red").save(path)
        path.write_bytes(path.read_bytes()[:60])
    code, _, err = run(capsys, *base(tiny_checkpoint, tmp_path), "--init-image", str(path))
    assert code == 2 and f"sdstack: error: --init-image {str(path)!r}: " in err
    assert "Traceback" not in err


def test_infotext_limits_name_their_source(tiny_checkpoint, tmp_path, capsys, no_loading):
    image = tmp_path / "big.png"
    text = build_infotext("a cat", "", {"Steps": 5000, "Sampler": "Euler", "Size": "512x512"})
    save_image(Image.new("RGB", (8, 8)), text, tmp_path, seed=1)
    image = next(tmp_path.glob("*.png"))
    checkpoint, _config = tiny_checkpoint
    code, _, err = run(
        capsys, "generate", "--model", str(checkpoint), "--from-infotext", str(image),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2
    assert "--steps (from the --from-infotext image) must be between 1 and 1000, got 5000" in err


def test_web_ui_spellings_and_stdin_prompt(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a (red:1.1) cat\n")))
    checkpoint, config = tiny_checkpoint
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "generate", "-", "--model", str(checkpoint), "--config-dir", str(config),
        "--width", "64", "--height", "64", "--cfg-scale", "5", "--negative-prompt", "blurry",
        "--n-iter", "2", "--steps", "1", "--seed", "3", "--sampler", "Euler", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert stdout.splitlines() == [str(out / "00000-3.png"), str(out / "00001-4.png")]
    info = read_infotext(out / "00001-4.png")
    assert info.startswith("a (red:1.1) cat\nNegative prompt: blurry\nSteps: 1, Sampler: Euler")
    assert "CFG scale: 5, Seed: 4, Size: 64x64" in info
    for phase in ("loading", "encoding", "sampling 2/2", "decoding 2/2"):
        assert phase in err


def test_unhonoured_infotext_fields_are_listed(tiny_checkpoint, tmp_path, capsys):
    fields = {
        "Steps": 1, "Sampler": "Euler", "CFG scale": 7, "Seed": 5, "Size": "64x64",
        "Denoising strength": 0.4, "Hires upscale": 2, "Hires steps": 3, "VAE": "other.pt",
    }  # fmt: skip
    save_image(Image.new("RGB", (8, 8)), build_infotext("a cat", "", fields), tmp_path, seed=5)
    image = next(tmp_path.glob("*.png"))
    checkpoint, config = tiny_checkpoint
    code, _, err = run(
        capsys, "generate", "--model", str(checkpoint), "--config-dir", str(config),
        "--from-infotext", str(image), "--out", str(tmp_path / "out"), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    note = next(line for line in err.splitlines() if "not applied from the infotext" in line)
    assert "Denoising strength: 0.4 (used only with an init image" in note
    assert "Hires upscale: 2 (hires fix is not supported)" in note
    assert "Hires steps: 3 (hires fix is not supported)" in note
    assert "RNG: GPU (sdstack draws noise on the CPU" in note
    assert "VAE: other.pt (give --vae or --root to use it" in note


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    import sdstack.commands.info as info_command

    def broken(_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(info_command, "run_info", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main(["info", "x.png"])
    assert "this is a bug in sdstack" in capsys.readouterr().err


def test_library_warnings_print_as_sdstack_warnings(capsys, monkeypatch):
    import warnings

    import sdstack.commands.info as info_command
    from sdstack.errors import SdstackWarning

    def warn(_args):
        warnings.warn("embeddings/bad.pt: not an embedding; skipped", SdstackWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(info_command, "run_info", warn)
    assert main(["info", "x.png"]) == 0
    assert capsys.readouterr().err == (
        "sdstack: warning: embeddings/bad.pt: not an embedding; skipped\n"
    )


def test_python_dash_m_sdstack():
    done = subprocess.run(
        [sys.executable, "-m", "sdstack", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("sdstack ")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("(a:1" + "0" * 400 + ")", "is out of range: weights must be finite numbers in [-1000,"),
        ("a cat AND a dog :" + "9" * 400, "out of range"),
        ("<lora:film:0.8> a cat", "no LoRA named 'film' (no LoRA folder: give --root with"),
        ("<hypernet:film:0.8> a cat", "extra-network tag(s) <hypernet:film>: only <lora:"),
        ("<lora:film:1:lbw=MIDDLE> a cat", "<lora:film:1:lbw=MIDDLE>: lbw='MIDDLE': not a"),
        ("a \udcff cat", "prompt is not valid UTF-8"),
        ("(" * 101 + "a", "nested more than 100 deep"),
    ],
)
def test_bad_prompts_are_refused_before_loading(
    tiny_checkpoint, tmp_path, capsys, no_loading, prompt, message
):
    argv = base(tiny_checkpoint, tmp_path)
    argv[1] = prompt
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith("sdstack: error: ") and message in err, err


def test_unusable_device_is_refused_before_loading(tiny_checkpoint, tmp_path, capsys, no_loading):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, *base(tiny_checkpoint, tmp_path), "--device", "cuda")
    assert code == 2
    assert "sdstack: error: --device: got 'cuda' but CUDA is not available to this torch" in err


def test_unreadable_infotext_field_is_a_clean_error(tiny_checkpoint, tmp_path, capsys, no_loading):
    text = build_infotext("a cat", "", {"Steps": "many", "Sampler": "Euler", "Seed": 1})
    save_image(Image.new("RGB", (8, 8)), text, tmp_path, seed=1)
    image = next(tmp_path.glob("*.png"))
    argv = base(tiny_checkpoint, tmp_path)
    del argv[1]  # no prompt: it comes from the infotext
    code, _, err = run(capsys, *argv, "--from-infotext", str(image))
    assert code == 2
    assert "sdstack: error: infotext field 'Steps': cannot read 'many' as an integer" in err


@pytest.fixture
def webui_root(tiny_checkpoint, tmp_path):
    """A web UI install: the tiny model under models/Stable-diffusion, an embeddings/ folder."""
    import shutil

    import torch

    root = tmp_path / "webui"
    models = root / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    shutil.copy(tiny_checkpoint[0], models / "tiny-model.safetensors")
    (root / "embeddings").mkdir()
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    torch.save({"string_to_param": {"*": vectors}}, root / "embeddings" / "mystyle.pt")
    return root


def test_root_finds_the_model_by_name_and_the_embeddings(
    webui_root, tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    from sdstack.models.hashes import short_hash

    config = str(tiny_checkpoint[1])
    out = tmp_path / "out"
    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    code, stdout, err = run(
        capsys, "generate", "a cat in mystyle", "--root", str(webui_root), "--model",
        "tiny-model", "--config-dir", config, "--size", "64x64", "--steps", "1",
        "--seed", "9", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    first = stdout.splitlines()[0]
    info = read_infotext(first)
    model_hash = short_hash(webui_root / "models" / "Stable-diffusion" / "tiny-model.safetensors")
    assert f"Model hash: {model_hash}, Model: tiny-model" in info
    assert 'TI hashes: "mystyle: ' in info  # found in ROOT/embeddings without --embeddings
    # --from-infotext with $SDSTACK_ROOT: the infotext's model, found by its hash
    monkeypatch.setenv("SDSTACK_ROOT", str(webui_root))
    code, stdout, err = run(
        capsys, "generate", "--from-infotext", first, "--config-dir", config,
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert read_infotext(stdout.splitlines()[0]) == info


def test_root_names_what_it_cannot_find(webui_root, tmp_path, capsys, no_loading):
    code, _, err = run(
        capsys, "generate", "a cat", "--root", str(webui_root), "--model", "tiny-modle",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and "tiny-modle" in err and "did you mean" in err, err
    code, _, err = run(
        capsys, "generate", "a cat", "--root", str(tmp_path / "nowhere"), "--model", "x",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and f"--root {tmp_path / 'nowhere'}: folder not found" in err, err
