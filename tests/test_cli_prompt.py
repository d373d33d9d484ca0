"""``sdstack prompt inspect``, run in-process: table, JSON, stdin and errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest

from sdstack.cli import main
from sdstack.prompt.inspect_report import format_report, inspect_prompt

PROMPT = "a (red:1.3) [cat:dog:0.5] <lora:film:0.6> AND sky :0.5"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["prompt", "inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, *args: str) -> dict:
    code, out, _ = run(capsys, *args, "--json")
    assert code == 0
    return json.loads(out)


def test_table_shows_every_stage(capsys):
    code, out, err = run(capsys, PROMPT, "--steps", "20")
    assert (code, err) == (0, "")
    assert re.search(r"^  lora\s+film\s+0\.6\s+0\.6\s*$", out, re.M)
    assert re.search(r"^  part 1  weight 1\.0  text 'a \(red:1\.3\) \[cat:dog:0\.5\]", out, re.M)
    assert re.search(r"^  part 2  weight 0\.5  text ' sky'$", out, re.M)
    # spec: [cat:dog:0.5] at 20 steps -> cat up to step 10, dog up to 20
    assert re.search(r"^\s+10  Text 1  'a \(red:1\.3\) cat'$", out, re.M)
    assert re.search(r"^\s+20  Text 2  'a \(red:1\.3\) dog'$", out, re.M)
    assert re.search(r"^Text 1: 'a \(red:1\.3\) cat\s*'  tokens 3/75$", out, re.M)
    assert re.search(r"^\s+2  red</w>\s+736\s+1\.3$", out, re.M)
    assert re.search(r"^\s+1  sky</w>\s+2390\s+1\.0$", out, re.M)


def test_json_has_the_same_content(capsys):
    report = run_json(capsys, PROMPT, "--steps", "20")
    (tag,) = report["networks"]
    assert (tag["kind"], tag["name"], tag["te"], tag["unet"]) == ("lora", "film", 0.6, 0.6)
    assert [part["weight"] for part in report["parts"]] == [1.0, 0.5]
    assert [e["end_step"] for e in report["parts"][0]["schedule"]] == [10, 20]
    assert [e["end_step"] for e in report["parts"][1]["schedule"]] == [20]
    texts = report["texts"]
    assert len(texts) == 3  # cat text, dog text, sky text: each once
    cat = texts[0]
    assert (cat["token_count"], cat["target"]) == (3, 75)
    (chunk,) = cat["chunks"]
    assert len(chunk["ids"]) == len(chunk["weights"]) == 77
    assert [(t["position"], t["id"], t["token"]) for t in chunk["tokens"]] == [
        (1, 320, "a</w>"),
        (2, 736, "red</w>"),
        (3, 2368, "cat</w>"),
    ]
    assert [t["weight"] for t in chunk["tokens"]] == [1.0, 1.3, 1.0]
    assert chunk["embeddings"] == [] and chunk["tokens"][0]["embedding"] is None


def test_token_count_over_one_chunk_and_break(capsys):
    _, out, _ = run(capsys, "a " * 80)
    assert "tokens 80/150" in out
    assert "  chunk 1 (75 tokens)" in out and "  chunk 2 (5 tokens)" in out
    _, out, _ = run(capsys, "a BREAK b")
    assert "tokens 76/150" in out and "  chunk 1 (1 token)" in out


def test_comma_backtrack_option(capsys):
    prompt = "a " * 60 + ", " + "b " * 20
    lengths = [len(c["tokens"]) for c in run_json(capsys, prompt)["texts"][0]["chunks"]]
    assert lengths == [61, 20]
    report = run_json(capsys, prompt, "--comma-backtrack", "0")
    assert [len(c["tokens"]) for c in report["texts"][0]["chunks"]] == [75, 6]


def test_prompt_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("masterpiece, (cat:1.2)\n"))
    report = run_json(capsys, "-")
    assert report["prompt"] == "masterpiece, (cat:1.2)"
    assert report["texts"][0]["token_count"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["(a:1.2.3)"], "sdstack: error: emphasis weight '1.2.3' is not a number"),
        (["a", "--steps", "0"], "sdstack: error: --steps must be between 1 and 1000, got 0\n"),
        (
            ["a", "--steps", "1000000000"],
            "sdstack: error: --steps must be between 1 and 1000, got 1000000000\n",
        ),
        (["a", "--comma-backtrack", "75"], "sdstack: error: --comma-backtrack must be in 0..74"),
    ],
)
def test_errors_exit_2_with_a_message(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith(message)


@pytest.mark.timeout(10)
def test_hostile_prompts_are_refused_with_the_limit(capsys):
    code, out, err = run(capsys, "a AND " * 300)
    assert (code, out) == (2, "")
    assert err == (
        "sdstack: error: prompt has 301 AND parts; at most 256 texts are allowed "
        "(MAX_SCHEDULE_TEXTS), and each part is one\n"
    )
    code, _, err = run(capsys, "[" + "|".join(map(str, range(300))) + "]", "--steps", "1000")
    assert code == 2
    assert err.startswith("sdstack: error: prompt resolves to up to 300 different texts")
    code, _, err = run(capsys, "(" * 200 + "a")
    assert code == 2
    assert err.startswith("sdstack: error: emphasis brackets nested more than 100 deep")
    # (a:1e400) is text with weight 1.1 (no exponent in the weight token); 400 digits
    # overflow a float to inf, which made a black image
    code, _, err = run(capsys, "(a:1e400) (b:1" + "0" * 400 + ")")
    assert code == 2
    assert err.startswith("sdstack: error: emphasis weight '10000000000")


INVALID_UTF8 = (
    "sdstack: error: prompt is not valid UTF-8 (pass or save it as UTF-8): undecodable "
    "byte 0xff at position 2: 'x \\udcff y'\n    x   y\n      ^\n"
)


def test_invalid_utf8_argument_is_refused(capsys):
    # argv arrives decoded with surrogateescape: the byte 0xff becomes U+DCFF
    code, out, err = run(capsys, "x \udcff y")
    assert (code, out, err) == (2, "", INVALID_UTF8)


def test_invalid_utf8_on_stdin_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x \xff y\n")))
    code, out, err = run(capsys, "-")
    assert (code, out, err) == (2, "", INVALID_UTF8)


def test_stdin_bytes_are_read_as_utf8(capsys, monkeypatch):
    data = "ünï (cat:1.2)\r\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="latin-1"))
    assert run_json(capsys, "-")["prompt"] == "ünï (cat:1.2)"


def test_help_has_description_example_and_json_shape(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prompt", "inspect", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "AUTOMATIC1111" in out and "example:" in out and "JSON shape:" in out


def test_command_imports_neither_torch_nor_diffusers():
    code = (
        "import sys\n"
        "import sdstack.commands.prompt\n"
        "assert 'transformers' not in sys.modules\n"
        "from sdstack.cli import main\n"
        "main(['prompt', 'inspect', 'a cat'])\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"


def test_embedding_slots_show_the_embedding_name(tokenizer):
    report = inspect_prompt("a (mycat:1.2)", tokenizer, embeddings={"mycat": 2})
    (chunk,) = report["texts"][0]["chunks"]
    assert chunk["embeddings"] == [{"position": 2, "name": "mycat", "vectors": 2}]
    assert [(t["token"], t["id"], t["weight"], t["embedding"]) for t in chunk["tokens"]] == [
        ("a</w>", 320, 1.0, None),
        ("mycat[0]", 0, 1.2, "mycat"),
        ("mycat[1]", 0, 1.2, "mycat"),
    ]
    table = format_report(report)
    assert re.search(r"^\s+3  mycat\[1\]\s+0\s+1\.2$", table, re.M)
    assert "tokens 3/75" in table
