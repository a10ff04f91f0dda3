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


# --- --ray / --resume: patching and attribution as distributed jobs (lenslab.jobs) ----------------
def _circuits(tiny_zoo_dir, *args):
    return main(["circuits", *args, "--model", str(tiny_zoo_dir), "--task", "induction", "--n", "3"])


def test_patch_and_attribute_on_ray_with_resume(ray_cluster, tiny_zoo_dir, tmp_path, capsys):
    import torch

    from lenslab.results import PatchResult

    assert _circuits(tiny_zoo_dir, "patch", "--site", "z", "--out", str(tmp_path / "one.json")) == 0
    ray_args = ["--ray", ray_cluster, "--resume", str(tmp_path / "shards")]
    assert _circuits(tiny_zoo_dir, "patch", "--site", "z", *ray_args, "--out", str(tmp_path / "ray.json")) == 0
    one, got = PatchResult.from_json(tmp_path / "one.json"), PatchResult.from_json(tmp_path / "ray.json")
    assert got.labels == one.labels and got.provenance["job"]["shards"] == 2
    torch.testing.assert_close(got.scores, one.scores, rtol=1e-5, atol=1e-5)  # batched engine split by layer
    assert len(list((tmp_path / "shards").glob("task0_L*.pkl"))) == 2
    sites = ["--site", "z", "mlp_out", "--method", "atp"]
    assert _circuits(tiny_zoo_dir, "attribute", *sites, "--out", str(tmp_path / "a.json")) == 0
    assert _circuits(tiny_zoo_dir, "attribute", *sites, "--ray", ray_cluster, "--out", str(tmp_path / "b.json")) == 0
    for site in ("z", "mlp_out"):
        a = PatchResult.from_json(tmp_path / f"a_{site}.json")
        b = PatchResult.from_json(tmp_path / f"b_{site}.json")
        assert b.provenance["job"] == {"cluster": ray_cluster, "shards": 2, "split": "site"}
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-6)  # float32 sums on 1 vs N threads


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray", "nowhere"], "--ray 'nowhere' must be auto, local or an address HOST:PORT"),
        (["--ray", "127.0.0.1:1"], "the Ray cluster at 127.0.0.1:1 cannot be reached"),
    ],
)
def test_ray_option_errors_are_one_line(ray_cluster, tiny_zoo_dir, tmp_path, capsys, extra, message):
    assert _circuits(tiny_zoo_dir, "patch", "--site", "z", *extra, "--out", str(tmp_path / "x.json")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lenslab: error: {message}") and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_ray_fallback_runs_locally_with_a_warning(ray_cluster, tiny_zoo_dir, tmp_path):
    from lenslab.results import PatchResult

    args = ["patch", "--site", "resid_pre", "--ray", "127.0.0.1:1", "--ray-fallback", "--out", str(tmp_path / "x.json")]
    with pytest.warns(UserWarning, match="cannot be reached.*--ray-fallback: running on a local Ray"):
        assert _circuits(tiny_zoo_dir, *args) == 0
    assert PatchResult.from_json(tmp_path / "x.json").provenance["job"]["cluster"] == "local"
