"""The five-parameter trajectory fit (Gallego-Feliciano et al.): recovery of known parameters from a
seeded noisy synthetic trajectory, a non-converging fit that warns, bad input; measuring a series of
checkpoints (a folder in lenslab's save format, or loaded models) against direct measurements."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lenslab
from lenslab import LenslabError, zoo
from lenslab.probes import sinks
from lenslab.probes import trajectory as T
from lenslab.zoo import planted as P

pytestmark = pytest.mark.usefixtures("one_thread")

TRUE = {"A": 120.0, "lam": 0.15, "gamma": 0.004, "t0": -50.0, "K": 40.0}
# Pythia's checkpoint steps: log-spaced to 512, then every 1000 (here every 3000) to 143000
STEPS = np.concatenate([[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], np.arange(1000, 143001, 3000)]).astype(float)
NOISE = 0.5


def synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = T.trajectory_curve(STEPS, **TRUE)
    return clean, clean + rng.normal(0.0, NOISE, STEPS.size)


def test_the_curve_is_the_papers_function():
    t = np.array([0.0, 100.0, 1000.0, 1e6])
    x = TRUE["gamma"] * (t - TRUE["t0"])
    expected = TRUE["A"] * np.exp(-TRUE["lam"] * x) * np.log(x) + TRUE["K"]
    assert T.trajectory_curve(t, **TRUE) == pytest.approx(expected, rel=1e-12)
    assert T.trajectory_curve(1e9, **TRUE) == pytest.approx(TRUE["K"])  # the steady state
    assert T.trajectory_curve(-60.0, **TRUE) < -1e4  # t <= t0: x floored, log -> very negative, finite
    assert np.isfinite(T.trajectory_curve(-60.0, **TRUE))


def test_fit_recovers_known_parameters_from_a_noisy_trajectory():
    """60 Pythia-like steps, Gaussian noise sd 0.5 (seeded) on a curve spanning -147..132: every parameter
    within 3 standard errors of the truth and within 2 % of it (t0 within 2 steps)."""
    clean, noisy = synthetic()
    fit = T.fit_trajectory(STEPS, noisy, label="top |a|")
    assert fit.converged
    for p in T.PARAMS:
        assert abs(fit.params[p] - TRUE[p]) < 3 * fit.stderr[p], (p, fit.params[p], fit.stderr[p])
    for p in ("A", "lam", "gamma", "K"):
        assert fit.params[p] == pytest.approx(TRUE[p], rel=0.02), p
    assert fit.params["t0"] == pytest.approx(TRUE["t0"], abs=2.0)
    assert fit.r2 > 0.9999 and fit.rmse == pytest.approx(NOISE, rel=0.2)
    resid = noisy - fit.predict(STEPS)
    assert fit.rmse == pytest.approx(float(np.sqrt((resid**2).mean())), rel=1e-9)
    assert fit.r2 == pytest.approx(1 - (resid**2).sum() / ((noisy - noisy.mean()) ** 2).sum(), rel=1e-9)
    # the standard errors are those of curve_fit's covariance at this optimum
    from scipy.optimize import curve_fit

    _, pcov = curve_fit(T.trajectory_curve, STEPS, noisy, p0=[fit.params[p] for p in T.PARAMS])
    assert [fit.stderr[p] for p in T.PARAMS] == pytest.approx(np.sqrt(np.diag(pcov)).tolist(), rel=0.05)


def test_a_noise_free_trajectory_is_fitted_exactly():
    clean, _ = synthetic()
    fit = T.fit_trajectory(STEPS, clean)
    for p in T.PARAMS:
        assert fit.params[p] == pytest.approx(TRUE[p], rel=1e-5, abs=1e-4), p
    assert fit.rmse < 1e-4


def test_a_fit_that_does_not_converge_warns_and_returns_the_best_parameters():
    _, noisy = synthetic()
    with pytest.warns(T.FitWarning, match="did not converge within max_nfev=3 evaluations"):
        fit = T.fit_trajectory(STEPS, noisy, max_nfev=3)
    assert not fit.converged and all(np.isfinite(fit.params[p]) for p in T.PARAMS)
    assert 0 < fit.r2 < T.fit_trajectory(STEPS, noisy).r2
    assert "NOT CONVERGED" in fit.figure().layout.title.text
    # a converging fit is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.fit_trajectory(STEPS, noisy)


def test_bad_series_are_clear_errors():
    with pytest.raises(LenslabError, match="needs at least 6 points .* got 5"):
        T.fit_trajectory([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    with pytest.raises(LenslabError, match="differ in length"):
        T.fit_trajectory(range(8), range(7))
    with pytest.raises(LenslabError, match="finite"):
        T.fit_trajectory(range(8), [1, 2, 3, float("nan"), 5, 6, 7, 8])
    with pytest.raises(LenslabError, match="steps must be distinct"):
        T.fit_trajectory([0, 1, 1, 2, 3, 4, 5], range(7))
    with pytest.raises(LenslabError, match="must be numbers"):
        T.fit_trajectory(["a"] * 7, range(7))
    with pytest.raises(LenslabError, match="max_nfev must be a positive integer"):
        T.fit_trajectory(range(7), range(7), max_nfev=0)


def test_fit_json_table_and_figure():
    _, noisy = synthetic()
    fit = T.fit_trajectory(STEPS, noisy, label="top |a|", source="synthetic")
    back = T.TrajectoryFit.from_json(fit.to_json())
    assert json.loads(back.to_json()) == json.loads(fit.to_json())
    assert back.predict(1000.0) == pytest.approx(fit.predict(1000.0))
    df = fit.table()
    assert list(df["param"]) == list(T.PARAMS) and df["value"].tolist() == [fit.params[p] for p in T.PARAMS]
    fig = fit.figure()
    assert [t.name for t in fig.data] == ["top |a|", "fit"] and len(fig.data[1].x) > STEPS.size
    assert fit.provenance["source"] == "synthetic" and fit.provenance["method"] == "fit_trajectory"


# --- checkpoints ------------------------------------------------------------------------------------
CKPT_STEPS = [0, 100, 300, 1000, 3000, 10000]
CKPT_TRUE = {"A": 300.0, "lam": 0.3, "gamma": 0.002, "t0": -400.0, "K": 200.0}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Six checkpoints of the planted sink model in lenslab's save format (`zoo.save_hooked`), a word
    tokenizer whose BOS is token 0, the planted massive activation set to the curve's value at each step."""
    tok = zoo.word_tokenizer([f"w{i}" for i in range(4)])  # 4 specials + 4 words = the planted vocab of 8
    assert tok.convert_tokens_to_ids("<bos>") == P.PLANTED["bos"]
    out = tmp_path_factory.mktemp("ckpts")
    values = T.trajectory_curve(np.array(CKPT_STEPS, float), **CKPT_TRUE)
    for step, v in zip(CKPT_STEPS, values):
        model = P.planted_model()
        with torch.no_grad():
            model.embed.W_E[P.PLANTED["bos"], P.PLANTED["massive_dim"]] = float(v)
        zoo.save_hooked(model, tok, out / f"step{step}", summary="planted checkpoint", card="# checkpoint\n")
    return out, values


PROMPTS = [" ".join(f"w{(3 * i + j) % 4}" for i in range(31)) for j in range(2)]  # 32 tokens with the BOS


def test_a_folder_of_checkpoints_is_measured_in_step_order(checkpoint_dir):
    folder, values = checkpoint_dir
    series = T.measure_checkpoints(str(folder), PROMPTS, device="cpu")
    assert series.steps == CKPT_STEPS and series.names == [f"step{s}" for s in CKPT_STEPS]
    # the planted entry (BOS, dim 7) is the largest residual activation, exactly the value set
    assert series.top_magnitude == pytest.approx(np.abs(values).tolist(), rel=1e-6)
    assert series.top_dim == [P.PLANTED["massive_dim"]] * len(CKPT_STEPS)
    for step, rate in zip(CKPT_STEPS, series.sink_rate):
        direct = sinks.attention_sinks(lenslab.load_model(str(folder / f"step{step}"), device="cpu"), PROMPTS)
        assert rate == direct.sink_rate
    assert series.sink_rate[-1] == pytest.approx(0.25)  # L1H0 of 4 heads, its key reading dim 7
    assert series.provenance["source"] == str(folder) and series.provenance["n_samples"] == 2
    fit = series.fit()
    assert fit.label == "top massive activation |a|" and fit.r2 > 0.999
    back = T.CheckpointSeries.from_json(series.to_json())
    assert json.loads(back.to_json()) == json.loads(series.to_json())
    assert len(series.table()) == 6 and len(series.figure().data) == 2


def test_loaded_models_steps_and_errors(checkpoint_dir):
    folder, values = checkpoint_dir
    a, b = P.planted_model(), P.planted_model(seed=1)
    series = T.measure_checkpoints([b, a], P.planted_tokens(4, 32), steps=[500, 20])
    assert series.steps == [20, 500] and series.top_magnitude == pytest.approx([1000.0, 1000.0])
    named = T.measure_checkpoints([str(folder / "step3000"), str(folder / "step100")], PROMPTS, device="cpu")
    assert named.steps == [100, 3000]
    with pytest.raises(LenslabError, match="at least 2 checkpoints; got 1 \\(planted-sink-2l\\)"):
        T.measure_checkpoints([a], P.planted_tokens())
    with pytest.raises(LenslabError, match="cannot tell the training step of checkpoint 'planted-sink-2l'"):
        T.measure_checkpoints([a, b], P.planted_tokens())
    with pytest.raises(LenslabError, match="steps must be 2 integers"):
        T.measure_checkpoints([a, b], P.planted_tokens(), steps=[1])
    with pytest.raises(LenslabError, match="two checkpoints share a step"):
        T.measure_checkpoints([a, b], P.planted_tokens(), steps=[1, 1])
    with pytest.raises(LenslabError, match="does not exist"):
        T.measure_checkpoints(str(folder / "nowhere"), PROMPTS)
    with pytest.raises(LenslabError, match="metric 'loss' is not one of"):
        series.fit("loss")


def test_checkpoint_steps_from_names_and_config(checkpoint_dir, tmp_path):
    assert [
        T.checkpoint_step(n) for n in ("step1000", "checkpoint-500", "ckpt_20", "iter300", "7", "x/global_step9")
    ] == [
        1000,
        500,
        20,
        300,
        7,
        9,
    ]
    assert T.checkpoint_step("final") is None and T.checkpoint_step("planted-sink-2l") is None
    folder, _ = checkpoint_dir
    one = tmp_path / "series"
    shutil.copytree(folder / "step0", one / "first")
    with pytest.raises(LenslabError, match="at least 2 checkpoints; got 1 \\(first\\)"):
        T.measure_checkpoints(one, PROMPTS)
    shutil.copytree(folder / "step100", one / "second")
    cfg = json.loads((one / "second" / "config.json").read_text())
    (one / "second" / "config.json").write_text(json.dumps({**cfg, "step": 42}))
    with pytest.raises(LenslabError, match="cannot tell the training step of checkpoint 'first'"):
        T.measure_checkpoints(one, PROMPTS)
    (one / "first" / "config.json").write_text(json.dumps({**cfg, "step": 7}))
    assert T.measure_checkpoints(one, PROMPTS, device="cpu").steps == [7, 42]


def test_documented_fit_numbers(doc_numbers):
    """docs/norms.md's recovery table, fitted again on the same seeded trajectory."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "norms.md").read_text()
    rows = doc_numbers.table(text, "| parameter | true | fitted | standard error |")
    names = {"A": "A", "λ": "lam", "γ": "gamma", "t0": "t0", "K": "K"}
    _, noisy = synthetic()
    fit = T.fit_trajectory(STEPS, noisy)
    assert [names[r[0]] for r in rows] == list(T.PARAMS)
    for sym, true, fitted, se in rows:
        p = names[sym]
        assert float(true.replace("−", "-")) == TRUE[p]
        assert doc_numbers.close(fit.params[p], fitted.replace("−", "-")), (p, fit.params[p])
        assert doc_numbers.close(fit.stderr[p], se), (p, fit.stderr[p])
    assert f"with R² {fit.r2:.5f} and RMSE {fit.rmse:.3f}" in text
