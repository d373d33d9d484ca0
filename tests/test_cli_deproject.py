"""``sdstack deproject train|eval`` end to end on the tiny CLIP and the test captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdstack.cli import main

CAPTIONS = Path(__file__).resolve().parent / "data" / "captions.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_text_encoder):
    root = tmp_path_factory.mktemp("deproject") / "tiny-model"
    tiny_text_encoder.save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def few_captions(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "few.txt"
    path.write_text("\n".join(CAPTIONS.read_text(encoding="utf-8").splitlines()[:40]) + "\n")
    return path


def _run(capsys, *argv):
    code = main(["deproject", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train_args(model_dir, captions, out, *extra):
    return (
        "train",
        "--model",
        str(model_dir),
        "--captions",
        str(captions),
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--quiet",
        *extra,
    )


@pytest.mark.parametrize("decoder", ["autoregressive", "parallel"])
def test_train_then_eval(decoder, capsys, tmp_path, model_dir, few_captions, tiny_text_encoder):
    from sdstack.text.deprojector.files import load_deprojector

    out = tmp_path / decoder
    code, stdout, stderr = _run(
        capsys, *_train_args(model_dir, few_captions, out, "--decoder", decoder)
    )
    assert code == 0, stderr
    assert f"wrote {out}: {decoder} deprojector, 40 captions, 6/6 steps" in stdout
    for name in ("model.safetensors", "config.json", "training.json", "training-state.pt"):
        assert (out / name).is_file(), name
    assert list((out / "pairs").glob("pairs-*.safetensors"))
    record = json.loads((out / "training.json").read_text())
    assert (record["captions"], record["heldout_captions"], record["steps"]) == (40, 4, 6)
    model = load_deprojector(out, text_encoder=tiny_text_encoder)
    assert model.config.decoder == decoder

    plot = tmp_path / "eval.png"
    code, stdout, stderr = _run(
        capsys,
        "eval",
        "--deprojector",
        str(out),
        "--model",
        str(model_dir),
        "--captions",
        str(few_captions),
        "--plot",
        str(plot),
    )
    assert code == 0, stderr
    assert "held-out captions: 4 (linear map fitted on 36), clip skip 1" in stdout
    methods = ["parallel"] if decoder == "parallel" else ["teacher-forced", "free-running"]
    for name in [*methods, "pooled repeated", "linear map"]:
        assert name in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, stdout, _ = _run(
        capsys,
        "eval",
        "--deprojector",
        str(out),
        "--model",
        str(model_dir),
        "--captions",
        str(few_captions),
        "--json",
    )
    scores = json.loads(stdout)
    assert [m["name"] for m in scores["methods"]] == [*methods, "pooled repeated", "linear map"]
    assert len(scores["methods"][0]["cosine"]) == 77


def test_interrupted_train_continues_to_the_same_result(
    capsys, tmp_path, model_dir, few_captions, monkeypatch
):
    from safetensors.torch import load_file

    from sdstack.text.deprojector import training

    reference = tmp_path / "reference"
    assert _run(capsys, *_train_args(model_dir, few_captions, reference))[0] == 0

    real_fit = training.fit

    def fit_killed_at_step_5(*args, on_progress=None, **kwargs):
        def progress(record):
            if record.step == 5:
                raise KeyboardInterrupt
            on_progress(record)

        return real_fit(*args, on_progress=progress, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(training, "fit", fit_killed_at_step_5)
    code, _, stderr = _run(capsys, *_train_args(model_dir, few_captions, out))
    assert code == 130 and "interrupted" in stderr
    assert not (out / "model.safetensors").exists()
    monkeypatch.undo()
    code, stdout, _ = _run(capsys, *_train_args(model_dir, few_captions, out))
    assert code == 0 and "6/6 steps" in stdout
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # the same folder with other settings: refused, naming the fix
    code, _, stderr = _run(capsys, *_train_args(model_dir, few_captions, out, "--lr", "0.01"))
    assert code == 2 and "holds a training run with other settings" in stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--holdout", "0.95"), "--holdout must be between 0 and 0.9, got 0.95"),
        (("--batch-size", "0"), "--batch-size must be between 1 and 65536, got 0"),
        (("--clip-skip", "0"), "--clip-skip must be between 1 and 64, got 0"),
        (("--device", "tpu"), "--device"),
    ],
)
def test_train_option_errors(capsys, tmp_path, model_dir, few_captions, extra, message):
    code, _, stderr = _run(capsys, *_train_args(model_dir, few_captions, tmp_path / "o", *extra))
    assert code == 2
    assert stderr.startswith("sdstack: error: ") and message in stderr
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_file_errors(capsys, tmp_path, model_dir, few_captions):
    code, _, stderr = _run(capsys, *_train_args(model_dir, tmp_path / "none.txt", tmp_path / "o"))
    assert code == 2 and "none.txt" in stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a\x00b")
    code, _, stderr = _run(capsys, *_train_args(model_dir, bad, tmp_path / "o"))
    assert code == 2 and "NUL byte" in stderr
    (tmp_path / "file").write_text("x")
    code, _, stderr = _run(capsys, *_train_args(model_dir, few_captions, tmp_path / "file"))
    assert code == 2 and "exists and is not a folder" in stderr
    code, _, stderr = _run(
        capsys,
        "eval",
        "--deprojector",
        str(tmp_path / "missing"),
        "--model",
        str(model_dir),
        "--captions",
        str(few_captions),
    )
    assert code == 2 and "is not a folder" in stderr
    code, _, stderr = _run(
        capsys,
        "eval",
        "--deprojector",
        str(tmp_path),
        "--model",
        str(model_dir),
        "--captions",
        str(few_captions),
        "--plot",
        "x.jpg",
    )
    assert code == 2 and "expected a .png file name" in stderr


def test_help_and_bare_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["deproject", "train", "--help"])
    assert exit_info.value.code == 0
    assert "--decoder" in capsys.readouterr().out
    assert main(["deproject"]) == 2


def test_progress_line(capsys, tmp_path, model_dir, few_captions):
    args = [a for a in _train_args(model_dir, few_captions, tmp_path / "o") if a != "--quiet"]
    code, _, stderr = _run(capsys, *args)
    assert code == 0
    assert "training" in stderr and "loss=" in stderr and "heldout=" in stderr
    assert "6/6" in stderr
