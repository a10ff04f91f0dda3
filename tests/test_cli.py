"""The `lenslab` CLI: every subcommand has --help; errors are one readable line, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lenslab.cli import build_parser, main


def _all_subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _all_subcommands(sub, (*prefix, name))


def test_every_subcommand_has_help(capsys):
    found = list(_all_subcommands(build_parser()))
    assert {("app",), ("models",), ("zoo",), ("zoo", "list"), ("zoo", "train")} <= set(found)
    for cmd in found:
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: lenslab" in capsys.readouterr().out


def test_zoo_train_unknown_name_is_a_clear_error(capsys):
    assert main(["zoo", "train", "nonexistent-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: no training script for 'nonexistent-model'")
    assert "Traceback" not in err


def test_models_lists_zoo(capsys):
    from lenslab import zoo

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in zoo.zoo_names():
        assert name in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lenslab", "--help"], capture_output=True, text=True, check=True).stdout
    assert "app" in out and "models" in out and "zoo" in out


def test_app_never_prompts_and_headless_keeps_its_meaning(monkeypatch, capsys):
    """Streamlit always runs headless with stdin closed (its first run otherwise asks for an email on
    the terminal); without --headless lenslab opens the browser itself once the server answers."""
    import subprocess as sp

    from lenslab import cli
    from lenslab.cli import app as cli_app

    started, opened = [], []

    class FakeProc:
        def __init__(self, cmd, env, stdin):
            started.append((cmd, env, stdin))

        def wait(self):
            return 0

        def poll(self):
            return None

    monkeypatch.setattr(cli_app.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(cli_app, "_open_browser_when_up", lambda proc, url: opened.append(url))
    for headless in (True, False):
        args = cli.build_parser().parse_args(["app", "--port", "8765", *(["--headless"] if headless else [])])
        assert args.func(args) == 0
    assert [s[0][s[0].index("--server.headless") + 1] for s in started] == ["true", "true"]
    assert all(s[2] is sp.DEVNULL and s[1]["PYTHONSAFEPATH"] == "1" for s in started)
    assert opened == ["http://127.0.0.1:8765"]  # only the run without --headless opens a browser
    assert "http://127.0.0.1:8765" in capsys.readouterr().out
