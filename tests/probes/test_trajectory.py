"""The five-parameter trajectory fit (Gallego-Feliciano et al., Eq. 9, x = gamma * t + t0) by the
authors' procedure: the starting point and bounds it uses, exact recovery of known parameters,
recovery of a seeded noisy trajectory within its standard errors (and the standard errors'
calibration over 100 noise draws), a non-converging fit that warns, bad input; measuring a series
of checkpoints (a folder in lenslab's save format, or loaded models) against direct measurements."""

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

# Pythia's checkpoint steps: log-spaced to 512, then every 1000 (here every 3000) to 143000
STEPS = np.concatenate([[0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], np.arange(1000, 143001, 3000)]).astype(float)
# two shapes the paper describes, in its form and within its one bound (lam >= 0):
# "early peak" (rises to 634 near step 12,600, decays to K) and "log increase" (peak past the data)
TRUE = {"A": 300.0, "lam": 0.3, "gamma": 2e-4, "t0": 0.5, "K": 500.0}
LOG_RISE = {"A": 150.0, "lam": 0.02, "gamma": 5e-4, "t0": 1.0, "K": 20.0}
NOISE = 2.0


def synthetic(seed: int = 0, true=TRUE):
    rng = np.random.default_rng(seed)
    clean = T.trajectory_curve(STEPS, **true)
    return clean, clean + rng.normal(0.0, NOISE, STEPS.size)


def test_the_curve_is_the_papers_function():
    t = np.array([0.0, 100.0, 1000.0, 1e6])
    x = TRUE["gamma"] * t + TRUE["t0"]
    expected = TRUE["A"] * np.exp(-TRUE["lam"] * x) * np.log(x) + TRUE["K"]
    assert T.trajectory_curve(t, **TRUE) == pytest.approx(expected, rel=1e-12)
    assert T.trajectory_curve(1e9, **TRUE) == pytest.approx(TRUE["K"])  # the steady state
    assert np.isnan(T.trajectory_curve(-2500.0, **TRUE))  # x = 0: log undefined
    assert np.isnan(T.trajectory_curve(-1e4, **TRUE)) and np.isfinite(T.trajectory_curve(-2400.0, **TRUE))
    # the peak (Eq. 13) is the maximum of the curve on a fine grid
    grid = np.linspace(0, 60000, 600001)
    assert T.peak_step(TRUE) == pytest.approx(grid[np.argmax(T.trajectory_curve(grid, **TRUE))], abs=0.2)
    assert T.peak_step({**TRUE, "lam": 0.0}) is None  # a pure logarithm has no peak
    # the analytic Jacobian against central differences
    p = np.array([TRUE[k] for k in T.PARAMS])
    jac = T._jacobian(STEPS, *p)
    for i in range(len(p)):
        h = np.zeros_like(p)
        h[i] = 1e-6 * abs(p[i])
        num = (T.trajectory_curve(STEPS, *(p + h)) - T.trajectory_curve(STEPS, *(p - h))) / (2 * h[i])
        assert jac[:, i] == pytest.approx(num, rel=1e-5, abs=1e-6), T.PARAMS[i]


def test_the_fit_starts_where_the_authors_start(monkeypatch):
    """One start, in the min-max normalised space: A = range y, K = min y + A/2, lam = 1/std(t),
    gamma = 1/range(t), t0 = 1; trust-region reflective; lam >= 0 the only bound; SciPy's defaults."""
    import scipy.optimize

    calls = []
    real = scipy.optimize.least_squares

    def spy(fun, x0, **kw):
        calls.append((np.array(x0, dtype=float), kw))
        return real(fun, x0, **kw)

    monkeypatch.setattr(scipy.optimize, "least_squares", spy)
    _, noisy = synthetic()
    T.fit_trajectory(STEPS, noisy)
    assert len(calls) == 1
    x0, kw = calls[0]
    u = (STEPS - STEPS.min()) / np.ptp(STEPS)
    assert x0 == pytest.approx([1.0, 1.0 / u.std(), 1.0, 1.0, 0.5], rel=1e-12)
    assert kw["method"] == "trf" and kw["max_nfev"] == 500 and callable(kw["jac"])
    assert kw["bounds"][0].tolist() == [-np.inf, 0.0, -np.inf, -np.inf, -np.inf]
    assert kw["bounds"][1].tolist() == [np.inf] * 5
    assert not {"x_scale", "ftol", "xtol", "gtol", "loss"} & set(kw)  # SciPy's defaults, as in curve_fit


@pytest.mark.parametrize("true", [TRUE, LOG_RISE], ids=["early-peak", "log-increase"])
def test_a_noise_free_trajectory_is_fitted_exactly(true):
    clean = T.trajectory_curve(STEPS, **true)
    fit = T.fit_trajectory(STEPS, clean)
    assert fit.converged
    for p in T.PARAMS:
        assert fit.params[p] == pytest.approx(true[p], rel=1e-6), p
    assert fit.rmse < 1e-6 * np.ptp(clean) and fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_recovers_known_parameters_from_a_noisy_trajectory():
    """60 Pythia-like steps, Gaussian noise of sd 2 (seeded) on the early-peak curve (321..634):
    every parameter within 3 standard errors of the truth, the errors those of curve_fit."""
    _, noisy = synthetic()
    fit = T.fit_trajectory(STEPS, noisy, label="top |a| / median")
    assert fit.converged
    for p in T.PARAMS:
        assert abs(fit.params[p] - TRUE[p]) < 3 * fit.stderr[p], (p, fit.params[p], fit.stderr[p])
    assert fit.r2 > 0.999 and fit.rmse == pytest.approx(NOISE, rel=0.25)
    resid = noisy - fit.predict(STEPS)
    sse, n = float((resid**2).sum()), STEPS.size
    assert fit.rmse == pytest.approx(np.sqrt(sse / n), rel=1e-9)
    assert fit.r2 == pytest.approx(1 - sse / ((noisy - noisy.mean()) ** 2).sum(), rel=1e-9)
    assert fit.aic == pytest.approx(n * np.log(sse / n) + 10, rel=1e-9)
    # the covariance is curve_fit's (same model, Jacobian and bound) at this optimum, in the data's units
    from scipy.optimize import curve_fit

    popt, pcov = curve_fit(
        T.trajectory_curve,
        STEPS,
        noisy,
        p0=[fit.params[p] for p in T.PARAMS],
        jac=lambda t, *p: T._jacobian(t, *p),
        bounds=(T.LOWER, T.UPPER),
        method="trf",
    )
    assert popt == pytest.approx([fit.params[p] for p in T.PARAMS], rel=1e-6)
    assert np.array(fit.covariance) == pytest.approx(pcov, rel=1e-4)
    assert [fit.stderr[p] for p in T.PARAMS] == pytest.approx(np.sqrt(np.diag(pcov)).tolist(), rel=1e-4)


def test_the_standard_errors_are_calibrated():
    """Over 100 seeded noise draws the truth lies within 2 standard errors of the fit 88-100 % of
    the time and within 3 at least 97 % (Gaussian: 95.4 % and 99.7 %), for every parameter."""
    clean = T.trajectory_curve(STEPS, **TRUE)
    z = {p: [] for p in T.PARAMS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every one of these fits converges with a covariance
        for seed in range(100):
            noisy = clean + np.random.default_rng(seed).normal(0.0, NOISE, STEPS.size)
            fit = T.fit_trajectory(STEPS, noisy)
            for p in T.PARAMS:
                z[p].append((fit.params[p] - TRUE[p]) / fit.stderr[p])
    for p in T.PARAMS:
        a = np.abs(np.array(z[p]))
        assert 0.88 <= (a < 2).mean() <= 1.0 and (a < 3).mean() >= 0.97, (p, (a < 2).mean(), (a < 3).mean())
        assert 0.85 < np.std(z[p]) < 1.2, (p, np.std(z[p]))


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


def test_a_peak_between_the_first_checkpoints_defeats_the_single_start():
    """A curve that peaks near step 1,350 and sits at K for 140,000 steps: from the authors' one
    start the fit runs out of evaluations far from the truth, and says so."""
    true = {"A": 120.0, "lam": 0.15, "gamma": 0.004, "t0": 0.2, "K": 40.0}
    with pytest.warns(T.FitWarning, match="did not converge"):
        fit = T.fit_trajectory(STEPS, T.trajectory_curve(STEPS, **true))
    assert not fit.converged and fit.r2 < 0.99


def test_a_covariance_that_cannot_be_estimated_warns():
    with pytest.warns(T.FitWarning, match="covariance of the trajectory fit could not be estimated"):
        fit = T.fit_trajectory(STEPS, np.full(STEPS.size, 3.0))  # flat: A = 0 leaves lam, gamma, t0 free
    assert fit.stderr == dict.fromkeys(T.PARAMS) and fit.covariance is None
    assert fit.predict(1000.0) == pytest.approx(3.0)


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
    assert back.predict(1000.0) == pytest.approx(fit.predict(1000.0)) and back.peak == pytest.approx(fit.peak)
    df = fit.table()
    assert list(df["param"]) == list(T.PARAMS) and df["value"].tolist() == [fit.params[p] for p in T.PARAMS]
    assert df["aic"].tolist() == [fit.aic] * 5
    fig = fit.figure()
    assert [t.name for t in fig.data] == ["top |a|", "fit"] and len(fig.data[1].x) > STEPS.size
    assert fit.provenance["source"] == "synthetic" and fit.provenance["method"] == "fit_trajectory"


# --- checkpoints ------------------------------------------------------------------------------------
CKPT_STEPS = [0, 100, 300, 1000, 3000, 10000]
CKPT_TRUE = {"A": 300.0, "lam": 0.3, "gamma": 0.002, "t0": 0.8, "K": 200.0}


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
    assert f"R² {fit.r2:.5f}, RMSE {fit.rmse:.3f}, AIC {fit.aic:.1f}" in text
    assert f"peak at step {fit.peak:,.0f} (true {T.peak_step(TRUE):,.0f})" in text
