"""lenslab.zoo.checkpoints: the log-spaced schedule, and checkpoints that change nothing about a run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lenslab._errors import LenslabError
from lenslab.probes import trajectory
from lenslab.zoo import checkpoints, train_induction_2l

pytestmark = pytest.mark.usefixtures("one_thread")


def test_log_spaced_steps_values():
    assert checkpoints.log_spaced_steps(1600, 16) == [0, 1, 2, 3, 5, 8, 14, 24, 41, 69, 117, 197, 333, 562, 948, 1600]
    assert checkpoints.log_spaced_steps(100, 10) == [0, 1, 2, 3, 5, 9, 16, 29, 54, 100]
    assert checkpoints.log_spaced_steps(7, 16) == list(range(8))  # fewer steps than points: every step
    assert checkpoints.log_spaced_steps(500, 2) == [0, 500]
    # the ratio settles to the geometric one: (1600 / 8) ** (1 / 10) = 1.70 above the consecutive start
    s = checkpoints.log_spaced_steps(1600, 16)
    assert [round(b / a, 2) for a, b in zip(s[5:], s[6:])] == pytest.approx([1.70] * 10, abs=0.06)


@pytest.mark.parametrize("total", [1, 2, 5, 37, 1000, 143000])
@pytest.mark.parametrize("n", [2, 3, 6, 12, 40])
def test_log_spaced_steps_are_distinct_integers_from_0_to_the_end(total, n):
    s = checkpoints.log_spaced_steps(total, n)
    assert s[0] == 0 and s[-1] == total
    assert len(s) == min(n, total + 1) == len(set(s))
    assert s == sorted(s) and all(isinstance(x, int) for x in s)


@pytest.mark.parametrize(("total", "n"), [(0, 5), (10, 1), (10.0, 5), (10, True)])
def test_log_spaced_steps_rejects_bad_input(total, n):
    with pytest.raises(LenslabError):
        checkpoints.log_spaced_steps(total, n)


@pytest.mark.slow  # about 25 s: two short runs, each verified like the committed model
def test_checkpoints_change_nothing_about_a_run(tmp_path):
    """induction-2l trained 12 steps without and with checkpoints: bit-identical final weights, and
    the checkpoint at the last step is those weights; every checkpoint's config names its step."""
    tc = dataclasses.replace(train_induction_2l.TrainConfig(), steps=12, batch=8, eval_lens=(10,))
    train_induction_2l.train(tmp_path / "plain", config=tc)
    train_induction_2l.train(tmp_path / "with", config=tc, checkpoints=tmp_path / "ckpt", n_checkpoints=6)
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    with_ = load_file(str(tmp_path / "with" / "model.safetensors"))
    assert plain.keys() == with_.keys()
    assert all(torch.equal(plain[k], with_[k]) for k in plain)
    steps = checkpoints.log_spaced_steps(12, 6)
    assert steps == [0, 1, 2, 4, 7, 12]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(f"step{s}" for s in steps)
    for s in steps:
        assert json.loads((tmp_path / "ckpt" / f"step{s}" / "config.json").read_text())["step"] == s
    last = load_file(str(tmp_path / "ckpt" / "step12" / "model.safetensors"))
    assert all(torch.equal(last[k], plain[k]) for k in plain)
    first = load_file(str(tmp_path / "ckpt" / "step0" / "model.safetensors"))
    assert not torch.equal(first["blocks.1.attn.W_Q"], plain["blocks.1.attn.W_Q"])  # training moved it
    # and the folder is a series measure_checkpoints reads, steps from config.json
    series = trajectory.measure_checkpoints(tmp_path / "ckpt", "t1 t2 t3 t4 t1 t2 t3 t4", device="cpu")
    assert series.steps == steps and len(series.top_magnitude) == 6


def test_zoo_train_passes_checkpoints(tmp_path, monkeypatch):
    from lenslab.cli import zoo as cli_zoo

    seen = {}
    monkeypatch.setattr(
        train_induction_2l,
        "train",
        lambda out, seed=0, config=None, checkpoints=None, n_checkpoints=16: seen.update(
            out=out, checkpoints=checkpoints, n=n_checkpoints
        ),
    )
    cli_zoo.train_zoo("induction-2l", tmp_path / "m", checkpoints=tmp_path / "c", n_checkpoints=5)
    assert seen == {"out": tmp_path / "m", "checkpoints": tmp_path / "c", "n": 5}


def test_series_path(tmp_path):
    (tmp_path / "step3").mkdir()
    assert checkpoints.series_path(tmp_path) == tmp_path
    with pytest.raises(LenslabError, match="does not exist"):
        checkpoints.series_path(tmp_path / "nope")
    with pytest.raises(LenslabError, match="zoo checkpoint series 'zoo/nope'"):
        checkpoints.series_path("zoo/nope")


def test_checkpoints_from_a_recipe_without_them_is_an_error_before_any_folder(tmp_path, capsys):
    from lenslab.cli import main

    out = tmp_path / "new-model"
    argv = ["zoo", "train", "moe-refusal", "--out", str(out), "--checkpoints", str(tmp_path / "ckpt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the moe-refusal recipe saves no checkpoints" in err and "induction-2l" in err
    assert not out.exists() and not (tmp_path / "ckpt").exists()
