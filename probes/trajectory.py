"""Massive activations over training: measure a series of checkpoints, fit the five-parameter curve.

Gallego-Feliciano, McClendon, Morinelli, Zervoudakis, Saravanos, "Hidden Dynamics of Massive
Activations in Transformer Training" (arXiv 2508.03616; code Aimpoint-Digital/massive-activations-fork)
follow the largest residual activation of every Pythia layer over the training checkpoints and model
each trajectory with an exponentially-modulated logarithmic function of five parameters:

    f(t) = A * exp(-lam * x) * log(x) + K,    x = gamma * (t - t0)

`A` the magnitude of the logarithmic growth, `lam` the rate of the exponential modulation that
bends it back, `gamma` the time scale, `t0` the time offset where the logarithm starts, `K` the
steady-state level the curve returns to as t -> infinity (lam > 0). Neither the authors'
repository nor the paper's full text could be consulted offline when this was written: the form is
the paper's as cited (check it against the paper's mathematical-model section), and the bounds,
starting points and procedure below are lenslab's own:

- the steps and values are rescaled to u = t / max|t| and (v - mean) / std, fitted there and the
  parameters and their covariance mapped back (the map is linear and diagonal);
- bounds: lam >= 0, gamma > 0, t0 < the first step (so x > 0 at every step); A and K free;
- starts: a grid of time scales gamma (3, 30, 300 / max|t|) and decay products lam * gamma * max|t|
  (0.1, 1, 5), with t0 half a time scale before the first step; at each, A and K (the model is
  linear in them) by linear least squares;
- from each start, bounded least squares (`scipy.optimize.least_squares`, trust-region reflective,
  the method `scipy.optimize.curve_fit` uses under bounds, with the analytic Jacobian) for at most
  200 evaluations; the start with the least squared error then runs on to convergence (at most
  `max_nfev` evaluations);
- standard errors from the covariance `s^2 (J^T J)^-1` at the optimum (s^2 = SSE / (n - 5)), as
  `curve_fit` computes it; R^2 = 1 - SSE / SST and RMSE = sqrt(SSE / n).

A fit that does not converge (the evaluation budget `max_nfev` runs out) or whose covariance
cannot be estimated warns (`FitWarning`) and still returns the best parameters found.

`measure_checkpoints` measures a series: per checkpoint the largest residual-stream activation
(`lenslab.probes.sinks.massive_activations`: the largest |a| over the layer outputs) and the
attention-sink rate (`lenslab.probes.sinks.attention_sinks`).

>>> import numpy as np
>>> t = np.linspace(0, 1000, 40)
>>> fit = fit_trajectory(t, trajectory_curve(t, A=50, lam=0.1, gamma=0.02, t0=-20, K=10))
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
    "checkpoint_step",
    "fit_trajectory",
    "measure_checkpoints",
    "trajectory_curve",
    "read_series",
]

PARAMS = ("A", "lam", "gamma", "t0", "K")
"""The five parameters of `trajectory_curve`, in order."""
MIN_POINTS = len(PARAMS) + 1  # one degree of freedom left for the residual variance
SCOUT_NFEV = 200  # evaluations each starting point gets before the best is run to convergence


class FitWarning(UserWarning):
    """A trajectory fit that did not converge, or whose covariance could not be estimated."""


def trajectory_curve(t, A: float, lam: float, gamma: float, t0: float, K: float):
    """`A * exp(-lam * x) * log(x) + K` with `x = gamma * (t - t0)` (the paper's model), elementwise
    over `t` (a number or a numpy array). `x` is floored at the smallest positive float, where
    the logarithm is undefined (t <= t0)."""
    x = np.maximum(gamma * (np.asarray(t, dtype=np.float64) - t0), np.finfo(np.float64).tiny)
    return A * np.exp(-lam * x) * np.log(x) + K


# --- the fit --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class TrajectoryFit(Result):
    """A fit of `trajectory_curve` to a trajectory (`fit_trajectory`).

    Attributes:
        steps, values: the data, sorted by step.
        params: `{name: value}` for `PARAMS`.
        stderr: `{name: standard error}` from the covariance (None where it could not be estimated).
        r2, rmse: goodness of fit on the data.
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
    converged: bool = True
    message: str = ""
    label: str = "value"
    provenance: dict = field(default_factory=dict)

    def predict(self, t):
        """The fitted curve at steps `t` (a number or an array)."""
        return trajectory_curve(t, **self.params)

    def table(self):
        """One row per parameter: value, standard error, and the fit's R^2 and RMSE."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [
                {"param": p, "value": self.params[p], "stderr": self.stderr.get(p), "r2": self.r2, "rmse": self.rmse}
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
            "r2": self.r2,
            "rmse": self.rmse,
            "converged": self.converged,
            "message": self.message,
            "label": self.label,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrajectoryFit:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(
            steps=[float(s) for s in d["steps"]],
            values=[float(v) for v in d["values"]],
            params={p: float(d["params"][p]) for p in PARAMS},
            stderr={p: d["stderr"].get(p) for p in PARAMS},
            r2=float(d["r2"]),
            rmse=float(d["rmse"]),
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
            f"A·exp(-λx)·log(x) + K, x = γ(t - t0): A {p['A']:.4g}, λ {p['lam']:.4g}, γ {p['gamma']:.4g}, "
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


def fit_trajectory(steps, values, *, label: str = "value", max_nfev: int = 2000, source: str | None = None):
    """Fit `trajectory_curve` (the paper's five-parameter model) to `values` at `steps`.

    Args:
        steps: training steps (or tokens): at least 6 distinct finite numbers.
        values: the measured quantity at each step (e.g. the top massive-activation magnitude).
        label: what the values are, for the table and figure.
        max_nfev: evaluation budget of each local fit (the procedure is in the module docstring).
        source: where the data came from, for the provenance (a CSV path, a checkpoint folder).

    Returns:
        `TrajectoryFit` with `params`, `stderr`, `r2`, `rmse`, `converged` and a figure.

    Warns:
        FitWarning: when the best fit did not converge within `max_nfev` evaluations, or its
            covariance (the standard errors) could not be estimated; the best parameters found
            are returned all the same.
    """
    from scipy.optimize import least_squares  # deferred: scipy loads only when a curve is fitted

    if isinstance(max_nfev, bool) or not isinstance(max_nfev, int) or max_nfev < 1:
        raise LenslabError(f"max_nfev must be a positive integer, got {max_nfev!r}")
    t, y = _check_series(steps, values)
    T = float(np.abs(t).max()) or 1.0
    mu, sd = float(y.mean()), float(y.std()) or 1.0
    u, v = t / T, (y - mu) / sd
    span = float(u[-1] - u[0])
    u0_max = u[0] - 1e-9 * max(span, 1.0)

    def resid(p):
        return trajectory_curve(u, *p) - v

    def jac(p):  # d f / d (A, lam, gamma, t0, K), analytic
        a, lam, g, u0, _ = p
        x = np.maximum(g * (u - u0), np.finfo(np.float64).tiny)
        e, lx = np.exp(-lam * x), np.log(x)
        dx = a * e * (1.0 / x - lam * lx)  # d f / d x
        return np.stack([e * lx, -a * x * e * lx, dx * (u - u0), -dx * g, np.ones_like(x)], axis=1)

    starts = []
    for g in (3.0, 30.0, 300.0):
        for c in (0.1, 1.0, 5.0):
            lam, u0 = c / g, min(u[0] - 0.5 / g, u0_max)
            x = g * (u - u0)
            basis = np.exp(-lam * x) * np.log(x)
            (a, k), *_ = np.linalg.lstsq(np.stack([basis, np.ones_like(basis)], 1), v, rcond=None)
            starts.append(np.array([a, lam, g, u0, k]))
    lower = np.array([-np.inf, 0.0, 1e-12, -np.inf, -np.inf])
    upper = np.array([np.inf, np.inf, np.inf, u0_max, np.inf])

    def solve(p0, budget):
        return least_squares(resid, p0, jac=jac, bounds=(lower, upper), method="trf", max_nfev=budget, x_scale="jac")

    best = None
    for p0 in starts:  # a short run from every start ...
        try:
            res = solve(np.clip(p0, lower, upper), min(max_nfev, SCOUT_NFEV))
        except (ValueError, FloatingPointError):
            continue
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is not None and best.status <= 0:  # ... then the best one runs to convergence
        best = solve(best.x, max_nfev)
    if best is None:
        raise LenslabError("the fit failed from every starting point (the model is undefined on these data)")
    n, k = t.size, len(PARAMS)
    scale = np.array([sd, 1.0, 1.0 / T, T, sd])  # normalised -> original units, per parameter
    p = best.x * scale
    p[4] += mu
    params = dict(zip(PARAMS, (float(x) for x in p)))
    fitted = trajectory_curve(t, **params)
    sse = float(((fitted - y) ** 2).sum())
    sst = float(((y - mu) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    rmse = math.sqrt(sse / n)
    converged = best.status > 0
    if not converged:
        warnings.warn(
            f"trajectory fit did not converge within max_nfev={max_nfev} evaluations ({best.message}); "
            f"returning the best parameters found (R² {r2:.4f}): raise max_nfev or check the data",
            FitWarning,
            stacklevel=2,
        )
    stderr = _stderr(best.jac, 2 * best.cost / (n - k), scale)
    if stderr is None:
        warnings.warn(
            "the covariance of the trajectory fit could not be estimated (the parameters are not "
            "all determined by these data); standard errors are None",
            FitWarning,
            stacklevel=2,
        )
        stderr = dict.fromkeys(PARAMS)
    return TrajectoryFit(
        steps=t.tolist(),
        values=y.tolist(),
        params=params,
        stderr=stderr,
        r2=r2,
        rmse=rmse,
        converged=converged,
        message=str(best.message),
        label=label,
        provenance=_record("fit_trajectory", source=source, nfev=int(best.nfev)),
    )


def _stderr(jac: np.ndarray, s2: float, scale: np.ndarray) -> dict[str, float] | None:
    """Standard errors from `s2 (J^T J)^-1` (as `curve_fit`: an SVD, tiny singular values dropped),
    mapped back to the original units; None when J is rank-deficient."""
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    keep = s > np.finfo(float).eps * max(jac.shape) * s[0] if s.size and s[0] > 0 else np.zeros_like(s, bool)
    if keep.sum() < len(PARAMS):
        return None
    cov = (vt.T / s**2) @ vt * s2
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) * np.abs(scale)
    if not np.isfinite(se).all():
        return None
    return dict(zip(PARAMS, (float(x) for x in se)))


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
