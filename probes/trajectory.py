"""Massive activations over training: measure a series of checkpoints, fit the five-parameter curve.

Gallego-Feliciano, McClendon, Morinelli, Zervoudakis, Saravanos, "Hidden Dynamics of Massive
Activations in Transformer Training" (arXiv 2508.03616 v2) follow, per layer of every Pythia model,
the ratio of the largest |activation| of the layer output to its median (their Eq. 8, averaged
over 10 RedPajama sequences) over the training checkpoints, and model each layer's trajectory
with an exponentially-modulated logarithmic function of five parameters (their Eq. 9):

    f(t) = A * exp(-lam * x) * log(x) + K,    x = gamma * t + t0

`A` the amplitude, `lam` the decay rate, `gamma` the time scaling, `t0` the (dimensionless) time
offset, `K` the asymptotic baseline (f -> K as t -> infinity when lam > 0; lam = 0 is a pure
logarithm). The peak, where lam * x * log(x) = 1, is at t = (exp(W(1/lam)) - t0) / gamma (their
Eq. 13, W the Lambert function).

Where this comes from. The authors' code (github.com/Aimpoint-Digital/massive-activations-fork)
could not be fetched: no snapshot of it is reachable from here, under that or any related name.
What follows is the paper's Methods section ("Experimental setup"), checked against the fits the
authors released (huggingface.co/datasets/Aimpoint-Digital/pythia-massive-activations,
`pythia_*/params/layer_fit_params_*.json`: per layer an "original" entry with `param_names`
[A, λ, γ, t0, K], `popt`, `pcov`, `r2`, `aic`, `residuals`; the popt are in Eq. 9's units, e.g.
pythia_410m's first median fit has γ 1.1e-4 and t0 0.62 for steps up to 143000):

- `scipy.optimize.curve_fit` (SciPy 1.15.2), trust-region reflective, analytic Jacobian, bounds
  on lam only (lam >= 0; A, gamma, t0, K free);
- the data are normalised, fitted there and the parameters scaled back;
- one starting point: A = max y - min y, K = min y + A / 2, lam = 1 / std(t),
  gamma = 1 / range(t), t0 = 1 (lenslab computes them on the normalised data);
- uncertainty: curve_fit's covariance `pcov` (released per fit); fit quality: R^2 and AIC.

`fit_trajectory` does that. Where the paper is silent, lenslab chose (marked "lenslab:"):

- lenslab: min-max normalisation, u = (t - min t) / range t and v = (y - min y) / range y. Any
  affine normalisation is an exact reparametrisation of Eq. 9 that keeps lam's bound, so the
  optimum, the covariance and R^2 do not depend on it; only the starting point does (with
  min-max it is gamma = 1, x = u + 1 in [1, 2]);
- `scipy.optimize.least_squares` with the arguments `curve_fit` passes it (method "trf", the
  analytic Jacobian, SciPy's default tolerances and x_scale) instead of `curve_fit` itself, so
  that a fit that runs out of evaluations returns its best point with a `FitWarning` (curve_fit
  raises RuntimeError);
- lenslab: the evaluation budget `max_nfev` defaults to 500, SciPy's default for five parameters
  (what curve_fit uses when given no `maxfev`);
- standard errors: the square roots of the diagonal of curve_fit's `pcov` (s^2 (J^T J)^-1 from
  the SVD of J, s^2 = SSE / (n - 5)), mapped back to the data's units; where J is
  rank-deficient curve_fit returns a pseudo-inverse, lenslab returns None and warns;
- lenslab: AIC = n log(SSE / n) + 2 * 5, the least-squares form (the paper cites Akaike 1974
  without its formula); R^2 = 1 - SSE / SST; RMSE = sqrt(SSE / n) as well;
- log(x) is undefined where x <= 0: `trajectory_curve` returns NaN there, and the solver rejects
  any step that makes a residual non-finite.

No extra starting points: a second start could only find a different local optimum, which is not
the authors' fit.

The paper also fits a reparametrised form (its Eq. 14, the same curve) and reports both; lenslab
fits Eq. 9. The paper fits at least 27 checkpoints per layer; lenslab needs 6.

`measure_checkpoints` measures a series: per checkpoint the largest residual-stream activation
(`lenslab.probes.sinks.massive_activations`: the largest |a| over the layer outputs, all layers
together, not divided by a median) and the attention-sink rate (`lenslab.probes.sinks.attention_sinks`);
`CheckpointSeries.fit` fits either. The paper's quantity (per layer, top-1 / median) is any step,value
series given to `fit_trajectory`.

>>> import numpy as np
>>> t = np.linspace(0, 10000, 40)
>>> fit = fit_trajectory(t, trajectory_curve(t, A=50, lam=0.1, gamma=0.002, t0=0.5, K=10))
>>> round(fit.params["A"], 3), round(fit.params["K"], 3), fit.r2 > 0.999999
(50.0, 10.0, True)
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import lenslab
from lenslab import figures, models
from lenslab._errors import LenslabError
from lenslab.probes import sinks
from lenslab.results import Result
from lenslab.toolbox import model_name

__all__ = [
    "PARAMS",
    "CheckpointSeries",
    "FitWarning",
    "TrajectoryFit",
    "checkpoint_revisions",
    "checkpoint_step",
    "fit_trajectory",
    "peak_step",
    "measure_checkpoints",
    "trajectory_curve",
    "read_series",
]

PARAMS = ("A", "lam", "gamma", "t0", "K")
"""The five parameters of `trajectory_curve`, in order (the paper's A, λ, γ, t0, K)."""
MIN_POINTS = len(PARAMS) + 1  # one degree of freedom left for the residual variance
DEFAULT_NFEV = 100 * len(PARAMS)  # SciPy's default budget for trust-region reflective (curve_fit, no maxfev)
LOWER = np.array([-np.inf, 0.0, -np.inf, -np.inf, -np.inf])  # the paper's one bound: lam >= 0
UPPER = np.full(len(PARAMS), np.inf)


class FitWarning(UserWarning):
    """A trajectory fit that did not converge, or whose covariance could not be estimated."""


def trajectory_curve(t, A: float, lam: float, gamma: float, t0: float, K: float):
    """`A * exp(-lam * x) * log(x) + K` with `x = gamma * t + t0` (the paper's Eq. 9), elementwise
    over `t` (a number or a numpy array); NaN where `x <= 0`, where the logarithm is undefined."""
    x = gamma * np.asarray(t, dtype=np.float64) + t0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return A * np.exp(-lam * x) * np.log(np.where(x > 0, x, np.nan)) + K


def _jacobian(t: np.ndarray, A: float, lam: float, gamma: float, t0: float, K: float) -> np.ndarray:
    """d trajectory_curve / d (A, lam, gamma, t0, K) at each step, `[n, 5]` (analytic, as the authors')."""
    x = gamma * t + t0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e, lx = np.exp(-lam * x), np.log(np.where(x > 0, x, np.nan))
        dx = A * e * (1.0 / x - lam * lx)  # d f / d x
        return np.stack([e * lx, -A * x * e * lx, dx * t, dx, np.ones_like(x)], axis=1)


def peak_step(params: dict[str, float]) -> float | None:
    """The step of the curve's extremum, `(exp(W(1/lam)) - t0) / gamma` (the paper's Eq. 13, W the
    Lambert function); None for lam <= 0 (no extremum: a pure logarithm) or gamma = 0."""
    from scipy.special import lambertw  # deferred: scipy loads only when a curve is analysed

    lam, gamma = params["lam"], params["gamma"]
    if not lam > 0 or gamma == 0:
        return None
    return float((math.exp(float(lambertw(1.0 / lam).real)) - params["t0"]) / gamma)


# --- the fit --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class TrajectoryFit(Result):
    """A fit of `trajectory_curve` to a trajectory (`fit_trajectory`).

    Attributes:
        steps, values: the data, sorted by step.
        params: `{name: value}` for `PARAMS`, in the units of the data (x = gamma * t + t0).
        stderr: `{name: standard error}`, the square roots of curve_fit's covariance (None where it
            could not be estimated).
        covariance: that covariance, `[5][5]` in `PARAMS` order (None where not estimated).
        r2, rmse, aic: goodness of fit on the data (AIC = n log(SSE / n) + 10; None if SSE is 0).
        converged: False when the optimiser stopped on its evaluation budget.
        message: the optimiser's last word.
        label: what the values are (e.g. "top massive activation").
        provenance: method, versions, time, and where the data came from.
    """

    KIND = "TrajectoryFit"
    steps: list[float]
    values: list[float]
    params: dict[str, float]
    stderr: dict[str, float | None]
    r2: float
    rmse: float
    aic: float | None = None
    covariance: list[list[float]] | None = None
    converged: bool = True
    message: str = ""
    label: str = "value"
    provenance: dict = field(default_factory=dict)

    def predict(self, t):
        """The fitted curve at steps `t` (a number or an array)."""
        return trajectory_curve(t, **self.params)

    @property
    def peak(self) -> float | None:
        """The step of the fitted curve's extremum (`peak_step`); it may lie outside the data."""
        return peak_step(self.params)

    def table(self):
        """One row per parameter: value, standard error, and the fit's R^2, RMSE and AIC."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [
                {
                    "param": p,
                    "value": self.params[p],
                    "stderr": self.stderr.get(p),
                    "r2": self.r2,
                    "rmse": self.rmse,
                    "aic": self.aic,
                }
                for p in PARAMS
            ]
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "steps": list(self.steps),
            "values": list(self.values),
            "params": dict(self.params),
            "stderr": dict(self.stderr),
            "covariance": None if self.covariance is None else [list(r) for r in self.covariance],
            "r2": self.r2,
            "rmse": self.rmse,
            "aic": self.aic,
            "converged": self.converged,
            "message": self.message,
            "label": self.label,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrajectoryFit:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        cov = d.get("covariance")
        return cls(
            steps=[float(s) for s in d["steps"]],
            values=[float(v) for v in d["values"]],
            params={p: float(d["params"][p]) for p in PARAMS},
            stderr={p: d["stderr"].get(p) for p in PARAMS},
            covariance=None if cov is None else [[float(c) for c in row] for row in cov],
            r2=float(d["r2"]),
            rmse=float(d["rmse"]),
            aic=None if d.get("aic") is None else float(d["aic"]),
            converged=bool(d.get("converged", True)),
            message=str(d.get("message", "")),
            label=str(d.get("label", "value")),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """The data and the fitted curve (on a fine grid of steps)."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        lo, hi = min(self.steps), max(self.steps)
        grid = np.unique(np.concatenate([np.linspace(lo, hi, 400), np.asarray(self.steps)]))
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.steps, y=self.values, mode="markers", name=self.label))
        fig.add_trace(go.Scatter(x=grid.tolist(), y=self.predict(grid).tolist(), mode="lines", name="fit"))
        fig.update_layout(xaxis_title="step", yaxis_title=self.label, height=420)
        p = self.params
        return figures.style(
            fig,
            f"A·exp(-λx)·log(x) + K, x = γt + t0: A {p['A']:.4g}, λ {p['lam']:.4g}, γ {p['gamma']:.4g}, "
            f"t0 {p['t0']:.4g}, K {p['K']:.4g} · R² {self.r2:.4f}" + ("" if self.converged else " · NOT CONVERGED"),
        )


def _check_series(steps, values) -> tuple[np.ndarray, np.ndarray]:
    try:
        t = np.asarray(steps, dtype=np.float64).reshape(-1)
        y = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise LenslabError(f"steps and values must be numbers: {exc}") from None
    if t.shape != y.shape:
        raise LenslabError(f"steps and values differ in length ({t.size} vs {y.size})")
    if t.size < MIN_POINTS:
        raise LenslabError(
            f"a five-parameter fit needs at least {MIN_POINTS} points (one left for the error estimate); got {t.size}"
        )
    if not (np.isfinite(t).all() and np.isfinite(y).all()):
        raise LenslabError("steps and values must be finite numbers (no NaN or inf)")
    if np.unique(t).size != t.size:
        raise LenslabError("steps must be distinct: one value per step")
    order = np.argsort(t)
    return t[order], y[order]


def read_series(text: str, name: str = "the CSV") -> tuple[list[float], list[float], str | None]:
    """`(steps, values, value header or None)` from CSV text of step,value rows; a first row that is
    not two numbers is a header. `name` names the source in errors."""
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    header = None
    steps, values = [], []
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise LenslabError(f"{name} row {i + 1} has {len(row)} column(s); each row needs step,value")
        try:
            steps.append(float(row[0]))
            values.append(float(row[1]))
        except ValueError:
            if i == 0:
                header = row[1].strip() or None
                continue
            raise LenslabError(f"{name} row {i + 1} is not two numbers: {row[:2]}") from None
    return steps, values, header


def fit_trajectory(
    steps, values, *, label: str = "value", max_nfev: int = DEFAULT_NFEV, source: str | None = None
) -> TrajectoryFit:
    """Fit `trajectory_curve` (the paper's Eq. 9) to `values` at `steps` by the authors' procedure
    (module docstring): min-max normalisation, their one starting point, trust-region reflective
    least squares with lam >= 0, the parameters and curve_fit's covariance mapped back.

    Args:
        steps: training steps (or tokens): at least 6 distinct finite numbers.
        values: the measured quantity at each step (the paper: top-1 / median |activation| of a layer).
        label: what the values are, for the table and figure.
        max_nfev: evaluation budget of the solver (default 500, SciPy's for five parameters).
        source: where the data came from, for the provenance (a CSV path, a checkpoint folder).

    Returns:
        `TrajectoryFit` with `params`, `stderr`, `covariance`, `r2`, `rmse`, `aic`, `converged`.

    Warns:
        FitWarning: when the fit did not converge within `max_nfev` evaluations, or its covariance
            (the standard errors) could not be estimated; the best parameters found are returned
            all the same.
    """
    from scipy.optimize import least_squares  # deferred: scipy loads only when a curve is fitted

    if isinstance(max_nfev, bool) or not isinstance(max_nfev, int) or max_nfev < 1:
        raise LenslabError(f"max_nfev must be a positive integer, got {max_nfev!r}")
    t, y = _check_series(steps, values)
    t_min, t_range = float(t[0]), float(t[-1] - t[0])
    y_min, y_range = float(y.min()), float(y.max() - y.min()) or 1.0
    u, v = (t - t_min) / t_range, (y - y_min) / y_range
    a0 = float(v.max() - v.min())
    # the authors' starting point, in the normalised space
    p0 = np.array([a0, 1.0 / float(u.std()), 1.0 / float(u.max() - u.min()), 1.0, float(v.min()) + a0 / 2])
    res = least_squares(
        lambda p: trajectory_curve(u, *p) - v,
        p0,
        jac=lambda p: _jacobian(u, *p),
        bounds=(LOWER, UPPER),
        method="trf",
        max_nfev=max_nfev,
    )
    # normalised -> original units, p = M p' + c: A, K scale with the values; gamma with 1/t_range;
    # t0 = t0' - gamma' t_min / t_range (exact: a reparametrisation of the same curve)
    M = np.diag([y_range, 1.0, 1.0 / t_range, 1.0, y_range])
    M[3, 2] = -t_min / t_range
    p = M @ res.x + np.array([0.0, 0.0, 0.0, 0.0, y_min])
    params = dict(zip(PARAMS, (float(x) for x in p)))
    n, k = t.size, len(PARAMS)
    fitted = trajectory_curve(t, **params)
    sse = float(((fitted - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    rmse = math.sqrt(sse / n)
    aic = n * math.log(sse / n) + 2 * k if sse > 0 else None
    converged = res.status > 0
    if not converged:
        warnings.warn(
            f"trajectory fit did not converge within max_nfev={max_nfev} evaluations ({res.message}); "
            f"returning the best parameters found (R² {r2:.4f}): raise max_nfev or check the data",
            FitWarning,
            stacklevel=2,
        )
    cov = _covariance(res.jac, 2 * res.cost / (n - k))
    if cov is not None:
        cov = M @ cov @ M.T
    if cov is None or not np.isfinite(cov).all():
        warnings.warn(
            "the covariance of the trajectory fit could not be estimated (the parameters are not "
            "all determined by these data); standard errors are None",
            FitWarning,
            stacklevel=2,
        )
        cov = None
    stderr = (
        dict.fromkeys(PARAMS)
        if cov is None
        else {q: float(math.sqrt(max(cov[i, i], 0.0))) for i, q in enumerate(PARAMS)}
    )
    return TrajectoryFit(
        steps=t.tolist(),
        values=y.tolist(),
        params=params,
        stderr=stderr,
        covariance=None if cov is None else cov.tolist(),
        r2=r2,
        rmse=rmse,
        aic=aic,
        converged=converged,
        message=str(res.message),
        label=label,
        provenance=_record("fit_trajectory", source=source, nfev=int(res.nfev)),
    )


def _covariance(jac: np.ndarray, s2: float) -> np.ndarray | None:
    """`s2 (J^T J)^-1` as `curve_fit` computes it (an SVD, singular values below eps * max(J.shape)
    * s_max dropped); None when any is dropped (curve_fit would return the pseudo-inverse)."""
    if not np.isfinite(jac).all():
        return None
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    if not s.size or s[0] <= 0 or (s <= np.finfo(float).eps * max(jac.shape) * s[0]).any():
        return None
    return (vt.T / s**2) @ vt * s2


def _record(method: str, **extra) -> dict:
    """What a trajectory result records of itself (no model: the fit sees numbers only)."""
    out = {
        "method": method,
        "lenslab_version": lenslab.__version__,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


# --- checkpoints ----------------------------------------------------------------------------------
_STEP = re.compile(r"(?:^|[^a-z])(?:step|checkpoint|ckpt|iter|global_step)[-_]?(\d+)$|^(\d+)$", re.IGNORECASE)


def checkpoint_step(name: str) -> int | None:
    """The training step a checkpoint's name states (`step1000`, `checkpoint-500`, `ckpt_20`,
    `iter300`, `1000`; the last path part), else None.

    >>> checkpoint_step("runs/pythia/step143000"), checkpoint_step("checkpoint-500"), checkpoint_step("final")
    (143000, 500, None)
    """
    m = _STEP.search(Path(str(name)).name)
    return None if m is None else int(m.group(1) or m.group(2))


def _folder_step(folder: Path) -> int | None:
    """A checkpoint folder's step: config.json's "step" (or "training_step"), else its name."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        meta = {}
    for key in ("step", "training_step"):
        if isinstance(meta.get(key), int) and not isinstance(meta.get(key), bool):
            return int(meta[key])
    return checkpoint_step(folder.name)


@dataclass(frozen=True, kw_only=True, eq=False)
class CheckpointSeries(Result):
    """Massive activations and attention sinks over a series of checkpoints (`measure_checkpoints`).

    Attributes:
        steps: the training step of each checkpoint, ascending.
        names: each checkpoint's name (its folder, or the model's name).
        top_magnitude: the largest |a| over the layer outputs (`blocks.{l}.hook_resid_post`).
        top_layer, top_dim: where it is.
        sink_rate: the attention-sink rate (share of (sample, layer, head) with alpha_0 > threshold).
        threshold: epsilon of the sink rate.
        provenance: method, prompts, versions, time.
    """

    KIND = "CheckpointSeries"
    steps: list[int]
    names: list[str]
    top_magnitude: list[float]
    top_layer: list[int]
    top_dim: list[int]
    sink_rate: list[float]
    threshold: float = sinks.DEFAULT_SINK_THRESHOLD
    provenance: dict = field(default_factory=dict)

    METRICS = {"top_magnitude": "top massive activation |a|", "sink_rate": "attention-sink rate"}

    def fit(self, metric: str = "top_magnitude", **kwargs) -> TrajectoryFit:
        """`fit_trajectory` of one measured series ("top_magnitude" or "sink_rate") over the steps."""
        if metric not in self.METRICS:
            raise LenslabError(f"metric {metric!r} is not one of {', '.join(self.METRICS)}")
        kwargs.setdefault("label", self.METRICS[metric])
        kwargs.setdefault("source", self.provenance.get("source"))
        return fit_trajectory(self.steps, getattr(self, metric), **kwargs)

    def table(self):
        """One row per checkpoint: step, name, top magnitude (layer, dim), sink rate."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            {
                "step": self.steps,
                "name": self.names,
                "top_magnitude": self.top_magnitude,
                "top_layer": self.top_layer,
                "top_dim": self.top_dim,
                "sink_rate": self.sink_rate,
            }
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "steps": list(self.steps),
            "names": list(self.names),
            "top_magnitude": list(self.top_magnitude),
            "top_layer": list(self.top_layer),
            "top_dim": list(self.top_dim),
            "sink_rate": list(self.sink_rate),
            "threshold": self.threshold,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointSeries:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(
            steps=[int(s) for s in d["steps"]],
            names=list(d["names"]),
            top_magnitude=[float(x) for x in d["top_magnitude"]],
            top_layer=[int(x) for x in d["top_layer"]],
            top_dim=[int(x) for x in d["top_dim"]],
            sink_rate=[float(x) for x in d["sink_rate"]],
            threshold=float(d.get("threshold", sinks.DEFAULT_SINK_THRESHOLD)),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """The top magnitude and the sink rate against the step, side by side."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

        fig = make_subplots(rows=1, cols=2, subplot_titles=["top massive activation |a|", "attention-sink rate (%)"])
        fig.add_trace(
            go.Scatter(x=self.steps, y=self.top_magnitude, mode="lines+markers", text=self.names, showlegend=False),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=self.steps,
                y=[100 * r for r in self.sink_rate],
                mode="lines+markers",
                text=self.names,
                showlegend=False,
            ),
            row=1,
            col=2,
        )
        fig.update_xaxes(title_text="step")
        fig.update_layout(height=380, width=1000)
        return figures.style(fig, f"Massive activations and sinks over {len(self.steps)} checkpoints")


def measure_checkpoints(
    models_or_paths,
    prompts,
    *,
    steps=None,
    threshold: float = sinks.DEFAULT_SINK_THRESHOLD,
    device: str = "auto",
    prepend_bos: bool | None = None,
) -> CheckpointSeries:
    """The top massive-activation magnitude and the sink rate at each checkpoint of a series.

    Args:
        models_or_paths: a folder whose sub-folders are checkpoints (each a folder `load_model`
            opens: lenslab's zoo format, `zoo.save_hooked`, or a Hugging Face `save_pretrained`
            folder), or a list of loaded models and/or names `load_model` accepts.
        prompts: the prompts (or token ids `[batch, pos]`) every checkpoint is measured on.
        steps: the training step of each checkpoint, in the order given; default: a folder's
            config.json "step", else the step its name states (`step1000`, `checkpoint-500`, ...;
            `checkpoint_step`), for loaded models their name.
        threshold: epsilon of the sink rate.
        device: where checkpoints given by name are loaded.

    Returns:
        `CheckpointSeries`, sorted by step; `.fit()` fits the top magnitude over the steps.

    Raises:
        LenslabError: for fewer than 2 checkpoints, a checkpoint without a step, repeated steps.
    """
    source = None
    if isinstance(models_or_paths, (str, Path)):
        folder = Path(models_or_paths).expanduser()
        if not folder.is_dir():
            raise LenslabError(f"checkpoint folder {str(models_or_paths)!r} does not exist")
        items = sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
        source = str(folder)
        if not items:
            raise LenslabError(f"{folder} holds no checkpoint folders (sub-folders with a config.json, e.g. step1000/)")
    else:
        items = list(models_or_paths)
    if len(items) < 2:
        raise LenslabError(
            f"a trajectory needs at least 2 checkpoints; got {len(items)}"
            + (f" ({_name(items[0])})" if items else "")
            + ": pass a folder of checkpoints or a list of models"
        )
    if steps is not None:
        steps = list(steps)
        if len(steps) != len(items) or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
            raise LenslabError(f"steps must be {len(items)} integers, one per checkpoint; got {steps!r}")
    else:
        steps = []
        for it in items:
            s = _folder_step(it) if isinstance(it, Path) else checkpoint_step(_name(it))
            if s is None:
                raise LenslabError(
                    f"cannot tell the training step of checkpoint {_name(it)!r}: name it with its step "
                    "(step1000, checkpoint-500) or pass steps=[...]"
                )
            steps.append(s)
    if len(set(steps)) != len(steps):
        raise LenslabError(f"two checkpoints share a step: {sorted(steps)}")
    threshold = sinks.check_threshold(threshold)
    rows = []
    record = None
    for step, it in sorted(zip(steps, items), key=lambda r: r[0]):
        model = models.load_model(str(it), device=device) if isinstance(it, (str, Path)) else it
        m = sinks.massive_activations(model, prompts, top_k=1, prepend_bos=prepend_bos)
        top = m.top_values[:, 0].abs()
        i = int(torch.argmax(top))
        rate = sinks.attention_sinks(model, prompts, threshold=threshold, prepend_bos=prepend_bos).sink_rate
        rows.append((step, _name(it), float(top[i]), m.layers[i], int(m.top_dims[i, 0]), rate))
        record = record or sinks.prompt_record(model, sinks.prompt_batches(model, prompts, prepend_bos))
        del model
    return CheckpointSeries(
        steps=[r[0] for r in rows],
        names=[r[1] for r in rows],
        top_magnitude=[r[2] for r in rows],
        top_layer=[r[3] for r in rows],
        top_dim=[r[4] for r in rows],
        sink_rate=[r[5] for r in rows],
        threshold=threshold,
        provenance=_record("measure_checkpoints", source=source, **(record or {})),
    )


def _name(item) -> str:
    """A checkpoint's name: its folder name, the name it was given, or the loaded model's name."""
    if isinstance(item, Path):
        return item.name
    if isinstance(item, str):
        return item
    return model_name(item)


def checkpoint_revisions(name: str, steps=None, *, revisions=None) -> list[str]:
    """Names `load_model` opens for the training checkpoints of a Hugging Face hub model that are
    stored as revisions of its repo (Pythia: branches `step0` ... `step143000`), for
    `measure_checkpoints`: `["EleutherAI/pythia-70m@step1000", ...]`; the steps are read from them.

    Each is downloaded once when online and read from the Hugging Face cache afterwards.

    Args:
        name: a hub id (or a TransformerLens alias such as "pythia-70m").
        steps: training steps, each one of the model's checkpoints (Pythia: 0, 1, 2, 4, ..., 512,
            1000, 2000, ..., 143000; `models.checkpoint_revision`).
        revisions: instead of steps, the repo's revision names as they are (branches or tags).

    >>> checkpoint_revisions("EleutherAI/pythia-70m", [0, 1000])
    ['EleutherAI/pythia-70m@step0', 'EleutherAI/pythia-70m@step1000']
    """
    if not isinstance(name, str) or not name.strip() or "@" in name:
        raise LenslabError(f"name must be a Hugging Face hub id without a revision, got {name!r}")
    if (steps is None) == (revisions is None):
        raise LenslabError("pass steps=[...] (training steps) or revisions=[...] (revision names), one of the two")
    if steps is not None:
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
        if bad:
            raise LenslabError(f"steps must be integers, got {bad!r}")
        revs = [models.checkpoint_revision(name, value=int(s)) for s in steps]
    else:
        revs = [str(r).strip() for r in revisions]
        if not all(revs):
            raise LenslabError(f"revisions must be non-empty names, got {list(revisions)!r}")
    return [f"{name.strip()}@{r}" for r in revs]
