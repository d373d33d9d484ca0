"""The CLI dispatcher: help for every command, version, error reporting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdstack import __version__
from sdstack.cli import CommandError, build_parser, main


def _subcommand_paths(parser, prefix=()):
    """Every (group, command) path of the parser tree, e.g. ("prompt", "inspect")."""
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            for name, sub in choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdstack {__version__}"


def test_every_command_has_help(capsys):
    paths = list(_subcommand_paths(build_parser()))
    expected = {("prompt", "inspect"), ("encode",), ("generate",), ("demo",), ("info",)}
    expected |= {("models", "list")}
    assert expected <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: sdstack " + " ".join(path))
        assert len(out.splitlines()) > 3


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_command_error_is_reported_without_traceback(monkeypatch, capsys):
    def failing(args):
        raise CommandError("the thing was wrong")

    parser = build_parser()
    monkeypatch.setattr("sdstack.cli.build_parser", lambda: parser)
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    sub.choices["demo"].set_defaults(handler=failing)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "sdstack: error: the thing was wrong\n"


def test_help_does_not_import_torch():
    code = (
        "import sys; from sdstack.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
