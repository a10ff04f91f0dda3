"""Probe steering: a trained linear probe's direction as an `Intervention`.

A logistic probe (`lenslab.probes.linear`) reads a class from a hook's activations through a weight
vector `w`; its unit direction `u = w / |w|` is where the probe's evidence for the class grows
fastest. Two edits use it, at the probe's hook, at every position by default:

- **add** (`op="add"`): `x + s * c * u`, with `c` the length the strength-1 edit moves along `u`:
  `scale="means"` (default) is the distance between the training classes' means along `u`
  (`(mean_to - mean_from) . u`), so strength 1 carries an activation of the other class's mean to
  the target class's mean *along the probe direction*; `scale="std"` is the standard deviation of
  the training activations along `u` (Inference-Time Intervention, Li et al. 2023,
  arXiv:2306.03341, which adds `alpha * sigma * u`); a number sets `c` directly.
- **project out** (`op="project"`): `x - s * (x . u) u`, which removes what the probe reads
  (strength 1: the probe's logit no longer depends on the activation; for a probe over several
  classes, every class direction is removed).

`probe_intervention(probe, ...)` builds it from a `Probe`; `probe_steering(model, positive,
negative, layers, ...)` trains the probes on contrast prompts (as `mean_difference` takes them, so
it is one more method of `lenslab.steering.tradeoff`) and returns the intervention. The difference
from DiffMean is the direction alone: DiffMean adds the difference of the class means, `mean_to -
mean_from`; with `scale="means"` the probe edit adds that difference's component along `u`.

>>> import lenslab
>>> from lenslab import steering
>>> from lenslab.data import sentiment
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> pos, neg = sentiment.prompts(16, "positive"), sentiment.prompts(16, "negative")
>>> iv = probe_steering(model, pos, neg, layers=1, strength=2.0)
>>> [(e.hook, e.op, tuple(e.vector.shape), e.strength) for e in iv.edits]
[('blocks.1.hook_resid_post', 'add', (96,), 2.0)]
>>> steering.generate(model, "the day was awful . the movie was", iv, max_new_tokens=2)
' warm delightful'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.linear import Probe, train_probes
from lenslab.results import provenance
from lenslab.steering.intervention import Edit, Intervention, Positions
from lenslab.toolbox import check_layers, check_prompts

__all__ = ["PROBE_OPS", "PROBE_SCALES", "probe_intervention", "probe_steering", "probe_vector"]

PROBE_OPS = ("add", "project")
PROBE_SCALES = ("means", "std")


def probe_vector(probe: Probe, towards=None, *, away=None, scale: str | float = "means") -> Tensor:
    """The vector an `add` edit adds at strength 1: `c * u`, with `u = probe.direction(towards)`.

    `scale`: "means" (the training classes' mean separation along `u`: the mean of `towards` minus
    the mean of `away`, default every other class), "std" (the training activations' standard
    deviation along `u`, ITI's sigma) or a number (`c` itself). A linear (regression) probe takes
    "std" or a number.
    """
    u = probe.direction(towards).double()
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) or scale in PROBE_SCALES):
        raise LenslabError(
            f"scale {scale!r} must be one of {', '.join(PROBE_SCALES)} or a number"
            f"{did_you_mean(str(scale), PROBE_SCALES)}"
        )
    if isinstance(scale, (int, float)):
        c = float(scale)
    elif scale == "std":
        if not probe.spread:
            raise LenslabError("this probe has no recorded spread; pass a number as scale")
        dirs = probe.directions()
        i = 0 if dirs.shape[0] == 1 else probe.label_index(towards)
        c = probe.spread[i]
    else:
        if probe.kind != "logistic" or probe.class_means is None:
            raise LenslabError("scale='means' needs a logistic probe with its class means; use scale='std' or a number")
        means = probe.class_means.double()
        names = probe.label_names
        to = len(names) - 1 if towards is None else probe.label_index(towards)
        if away is None:
            frm = [i for i in range(len(names)) if i != to]
        else:
            frm = [probe.label_index(a) for a in ([away] if isinstance(away, (str, int, bool)) else away)]
            if to in frm:
                raise LenslabError(f"away= names the class steered towards ({names[to]!r}); pick the others")
        c = float((means[to] - means[frm].mean(0)) @ u)
    return (c * u).float()


def probe_intervention(
    probe: Probe,
    towards=None,
    *,
    op: str = "add",
    away=None,
    scale: str | float = "means",
    strength: float = 1.0,
    positions: Positions = "all",
    name: str = "",
) -> Intervention:
    """The probe's direction as an `Intervention` at its hook.

    Args:
        probe: a trained `Probe` (from `train_probes(...).probe(layer)`, or `Probe.load`).
        towards: the class to steer towards (default: the second of two classes; required for
            more); for `op="add"` only.
        op: "add" (`x + s * probe_vector(...)`) or "project" (remove the probe's direction(s):
            `x - s * (x . u) u` per orthonormalised class direction).
        away, scale: see `probe_vector`.
        strength: the edits' strength; positions: where they act ("all" by default).

    Returns:
        An `Intervention` with one `add` edit, or one `project` edit per direction removed.
    """
    if op not in PROBE_OPS:
        raise LenslabError(f"op {op!r} is not one of {', '.join(PROBE_OPS)}{did_you_mean(str(op), PROBE_OPS)}")
    if not isinstance(probe, Probe):
        raise LenslabError(f"expected a lenslab.probes.linear.Probe, got {type(probe).__name__}")
    if op == "add":
        vec = probe_vector(probe, towards, away=away, scale=scale)
        edits = (Edit(hook=probe.hook, op="add", vector=vec, positions=positions, strength=strength),)
        if probe.kind == "linear":
            what = "towards larger values"
        else:
            what = f"towards {probe.label_names[-1 if towards is None else probe.label_index(towards)]}"
    else:
        if towards is not None or away is not None:
            raise LenslabError("op='project' removes the probe's directions; it takes no towards= or away=")
        dirs = probe.directions().double()
        # an orthonormal basis of the directions' span (one vector for two classes): the projections commute
        u, sv, _ = torch.linalg.svd(dirs.T, full_matrices=False)
        basis = u[:, sv > 1e-6 * sv[0]].T
        edits = tuple(
            Edit(hook=probe.hook, op="project", vector=b.float(), positions=positions, strength=strength) for b in basis
        )
        what = "projected out"
    prov = {
        "method": "probe_steering",
        "op": op,
        "scale": scale if op == "add" else None,
        "towards": towards,
        "hook": probe.hook,
        "layer": probe.layer,
        "position": probe.position,
        "label_names": list(probe.label_names),
        "probe_metrics": probe.metrics,
        "model": probe.provenance.get("model"),
    }
    return Intervention(edits=edits, name=name or f"probe {probe.hook} {what}", provenance=prov)


def probe_steering(
    model,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: int | Sequence[int],
    *,
    site: str = "resid_post",
    position: str | int = "last",
    op: str = "add",
    scale: str | float = "means",
    C: float = 1.0,
    standardize: bool = False,
    strength: float = 1.0,
    positions: Positions = "all",
    name: str = "",
) -> Intervention:
    """Train a logistic probe (positive vs negative prompts, every prompt in training) at each layer
    and steer along its direction: the probe counterpart of `mean_difference`, same arguments.

    Args:
        positive, negative: prompts with and without the concept.
        layers: layer index or indices; one edit per layer (per direction for "project").
        site: a site of `lenslab.sites.SITES` or a hook template (default "resid_post").
        position: where each prompt is read ("last" token, "mean", or an index).
        op, scale: see `probe_intervention` ("add" towards positive, or "project").
        C, standardize: the logistic regression's settings (`train_probes`).

    Returns:
        An `Intervention`; its provenance keeps each probe's training accuracy.
    """
    pos = check_prompts(positive, "positive")
    neg = check_prompts(negative, "negative")
    layer_list = check_layers(model, layers)
    res = train_probes(
        model,
        pos + neg,
        ["positive"] * len(pos) + ["negative"] * len(neg),
        site=site,
        layers=layer_list,
        position=position,
        test_size=0.0,
        control=None,
        C=C,
        standardize=standardize,
    )
    towards = "positive" if op == "add" else None
    ivs = [
        probe_intervention(p, towards, op=op, scale=scale, strength=strength, positions=positions) for p in res.probes
    ]
    edits = tuple(e for iv in ivs for e in iv.edits)
    prov = provenance(
        model,
        method="probe_steering",
        timestamp=False,
        site=site,
        layers=layer_list,
        position=position,
        op=op,
        scale=scale,
        C=C,
        standardize=standardize,
        train_accuracy=[r["train"] for r in res.rows],
        positive=pos,
        negative=neg,
    )
    return Intervention(edits=edits, name=name or f"probe {op}", provenance=prov)
