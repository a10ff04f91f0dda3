"""`lenslab norms atlas|fit`: each writes what the library computes; bad input is one readable line,
exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lenslab
from lenslab.cli import build_parser, main
from lenslab.probes import atlas as A
from lenslab.probes import trajectory as T

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_norms_commands_are_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    norms = sub.choices["norms"]
    cmds = next(a for a in norms._actions if a.dest == "norms_command").choices
    assert {"atlas", "fit", "remove"} <= set(cmds)


def test_atlas_writes_the_librarys_atlas(tmp_path, capsys, zoo_models):
    out = tmp_path / "atlas.json"
    assert (
        main(["norms", "atlas", "--model", "zoo/ioi-4l", "--prompts", PROMPT, "--device", "cpu", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["kind"] == "AtlasResult"
    lib = A.activation_atlas(zoo_models("zoo/ioi-4l"), [PROMPT])
    assert [h["max_abs"] for h in d["hooks"]] == pytest.approx([h["max_abs"] for h in lib.hooks], abs=1e-6)
    g = lib.global_max()
    assert f"max |a| {g['max_abs']:.4g} at {g['hook']}" in printed and "16 hooks (4 skipped)" in printed
    html = tmp_path / "atlas.html"
    assert (
        main(
            [
                "norms",
                "atlas",
                "--model",
                "zoo/ioi-4l",
                "--prompts",
                PROMPT,
                "--kinds",
                "resid_pre",
                "--device",
                "cpu",
                "--out",
                str(html),
            ]
        )
        == 0
    )
    assert "plotly" in html.read_text()


def test_fit_reads_a_csv_and_writes_the_fit(tmp_path, capsys):
    t = np.arange(0, 20000, 500.0)
    y = T.trajectory_curve(t, A=30, lam=0.2, gamma=0.001, t0=0.1, K=12) + np.random.default_rng(1).normal(
        0, 0.1, t.size
    )
    csv = tmp_path / "series.csv"
    csv.write_text("step,top_massive\n" + "".join(f"{a},{b}\n" for a, b in zip(t, y)))
    out = tmp_path / "fit.json"
    assert main(["norms", "fit", "--csv", str(csv), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    lib = T.fit_trajectory(t, y)
    assert d["kind"] == "TrajectoryFit" and d["label"] == "top_massive"
    assert [d["params"][p] for p in T.PARAMS] == pytest.approx([lib.params[p] for p in T.PARAMS], rel=1e-9)
    assert d["params"]["A"] == pytest.approx(30, rel=0.02) and d["params"]["K"] == pytest.approx(12, rel=0.02)
    assert "R² 1.0000" in capsys.readouterr().out
    assert lenslab.__version__ == d["provenance"]["lenslab_version"] and d["provenance"]["source"] == str(csv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["norms", "atlas", "--kinds", "resid", "--device", "cpu", "--out", "x.json"],
            "hook kind 'resid' is not one of",
        ),
        (["norms", "atlas", "--device", "cpu", "--out", "x.txt"], "--out 'x.txt': the extension picks the format"),
        (["norms", "fit", "--csv", "nowhere.csv", "--out", "x.json"], "--csv 'nowhere.csv' does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: ") and message in err and "Traceback" not in err


def test_fit_rejects_bad_csv_rows(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("step,value\n0,1\n1,x\n")
    assert main(["norms", "fit", "--csv", str(csv), "--out", str(tmp_path / "f.json")]) == 2
    assert "bad.csv row 3 is not two numbers" in capsys.readouterr().err
    csv.write_text("0,1\n1,2\n2,3\n")
    assert main(["norms", "fit", "--csv", str(csv), "--out", str(tmp_path / "f.json")]) == 2
    assert "needs at least 6 points" in capsys.readouterr().err


def test_compare_stored_prints_and_writes_the_twins_table(tmp_path, capsys):
    from lenslab.zoo import noln

    out = tmp_path / "claims.json"
    assert main(["norms", "compare", "--model", "zoo/ioi-4l", "--stored", "--out", str(out)]) == 0
    stored = noln.stored_claims("zoo/ioi-4l")
    assert capsys.readouterr().out.startswith(stored.to_markdown())
    assert noln.NormClaims.from_dict(json.loads(out.read_text())).rows == stored.rows


def test_compare_measures_a_model_against_a_given_free_model(tmp_path, capsys):
    """--free names the norm-free model; the printed DLA gap is the library's (exact without norms)."""
    from lenslab.zoo import noln

    out = tmp_path / "claims.json"
    argv = ["norms", "compare", "--model", "zoo/ioi-4l", "--free", "zoo/ioi-4l-noln", "--out", str(out)]
    assert main(argv) == 0
    got = noln.NormClaims.from_dict(json.loads(out.read_text()))
    stored = noln.stored_claims("zoo/ioi-4l")
    for label, cells in stored.rows.items():
        assert got.value(label, "free") == pytest.approx(cells["free"], abs=1e-3), label
    assert got.value("max abs(DLA − exact direct effect)", "free") < 1e-4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "zoo/induction-2l"], "has no norm-free twin in the zoo"),
        (["--model", "zoo/ioi-4l", "--free", "zoo/ioi-4l"], "pass a model without norms"),
        (["--model", "zoo/ioi-4l", "--free", "zoo/ioi-4l-noln", "--stored"], "no stored table"),
    ],
)
def test_compare_bad_input_is_one_line(argv, message, capsys):
    assert main(["norms", "compare", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
