"""Attribution: linear estimates of activation patching from two forwards and one backward.

`attribute` returns an `AttributionResult`: a read-only mapping from each site to a `PatchResult`
on the same grid as `patch` whose scores estimate the *change* of the metric caused by the patch
(exact patching minus its unpatched baseline), so the two compare cell by cell
(`PatchResult.scores - baseline`). The result has one `table()` (every site's cells, with a
`site` column), one `figure()` (a heatmap per site) and one JSON.

- ``atp``: attribution patching (Nanda 2023; Kramar et al. 2024):
  (a_source - a_base) . dm/da at the base run.
- ``atp*``: AtP* (Kramar et al. 2024, arXiv 2403.00745): for query and key sites the attention
  probabilities are recomputed exactly for the patched q/k and only the step from probabilities
  to the metric is linearised (the QK fix); then GradDrop: for each layer l, the gradient through
  l's residual-branch outputs (attn_out, mlp_out) is zeroed, and the estimate is
  1/(L-1) * sum_l |AtP_GD_l| -- a *magnitude* (non-negative), as in the paper (`graddrop=False`
  gives the signed QK-fixed estimate).
- ``relp``: Relevance Patching (Rezaei Jafari et al. 2025, arXiv 2508.21258): AtP with the
  backward pass replaced by LRP propagation coefficients (rules below); forward values unchanged.
- ``ig``: integrated gradients on activations: the activation of one hook is interpolated from
  base to source in `steps` points (midpoint rule) and the mean gradient multiplies the difference.

RelP rules (as in the authors' TransformerLens fork, see docs/circuits.md for the comparison
with LXT): LayerNorm/RMSNorm with the normaliser detached (the mean subtraction stays); GELU/SiLU
pass gradient x act(x)/x (identity rule); a gated MLP's product gives half the gradient to each
factor (half rule); attention pattern detached only with `attn_rule="ah"` (off by default).
All rules are forward hooks on TransformerLens hook points that keep forward values and change
only the backward pass; user weights are never touched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from lenslab import figures, jobs
from lenslab._errors import LenslabError, did_you_mean
from lenslab.circuits.patching import task_fingerprint, validate_task
from lenslab.results import PatchResult, Result, provenance
from lenslab.sites import DIRECTIONS, Site, axis_labels, resolve_site
from lenslab.tasks import Metric, MetricLike, Task, check_metric, get_metric
from lenslab.toolbox import check_layers, model_device, model_name, progress_reporter

METHODS = ("atp", "atp*", "relp", "ig")
QK_KINDS = {"q", "k", "q_by_pos", "k_by_pos"}


@dataclass(frozen=True, eq=False)
class AttributionResult(Result, Mapping):
    """What `attribute` returns: one method's estimates at one or more sites.

    A read-only mapping from site name to `PatchResult` (`res["z"]`, `res.items()`, `len(res)`,
    iteration in the order the sites were asked for), with the contract of every result:
    `table()` (each site's long table, concatenated, with a `site` column), `figure()` (one
    heatmap per site) and JSON (the per-site `PatchResult`s inside).

    Attributes:
        results: `{site: PatchResult}`.
        method: "atp", "atp*", "relp" or "ig".
    """

    results: dict[str, PatchResult]
    method: str
    KIND = "AttributionResult"

    def __post_init__(self) -> None:
        if not self.results:
            raise LenslabError("an AttributionResult needs at least one site")
        object.__setattr__(self, "results", dict(self.results))  # a copy: the mapping stays read-only

    def __getitem__(self, site: str) -> PatchResult:
        try:
            return self.results[site]
        except KeyError:
            raise KeyError(f"no site {site!r} in this result; it has {', '.join(self.results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return f"AttributionResult(method={self.method!r}, sites={list(self.results)!r})"

    @property
    def sites(self) -> list[str]:
        """The site names, in the order they were asked for."""
        return list(self.results)

    @property
    def provenance(self) -> dict:
        """The first site's provenance (model, task, versions: the same for every site)."""
        return next(iter(self.results.values())).provenance

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "method": self.method,
            "sites": self.sites,
            "results": {s: r.to_dict() for s, r in self.results.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> AttributionResult:
        return cls(
            results={s: PatchResult.from_dict(d["results"][s]) for s in d["sites"]},
            method=d["method"],
        )

    def table(self):
        """Every site's long table (`PatchResult.table()`) one after the other, with a first column `site`."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        frames = [r.table().assign(site=s) for s, r in self.results.items()]
        df = pd.concat(frames, ignore_index=True)
        return df[["site", *[c for c in df.columns if c != "site"]]]

    def figure(self):
        """One site: its `PatchResult.figure()`. Several: one panel per site, one above the other
        (a 3-axis site, e.g. `z_by_pos`, summed over its last axis, which for linear estimates is
        the estimate of patching all of them at once)."""
        if len(self.results) == 1:
            return next(iter(self.results.values())).figure()
        from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

        n = len(self.results)
        titles = []
        panels = []
        for s, r in self.results.items():
            if r.scores.ndim == 3:
                r = PatchResult(
                    scores=r.scores.sum(-1),
                    axes=r.axes[:2],
                    labels={a: v for a, v in r.labels.items() if a in r.axes[:2]},
                    site=r.site,
                    method=r.method,
                    metric=r.metric,
                    direction=r.direction,
                    clean_value=r.clean_value,
                    corrupt_value=r.corrupt_value,
                    provenance=r.provenance,
                )
                titles.append(f"{s} (summed over {self.results[s].axes[2]})")
            else:
                titles.append(s)
            panels.append(r.figure())
        fig = make_subplots(rows=n, cols=1, subplot_titles=titles, vertical_spacing=min(0.3 / n, 0.08))
        for i, panel in enumerate(panels):
            for trace in panel.data:
                if trace.type == "heatmap":
                    trace.update(colorbar=dict(len=0.9 / n, y=1 - (i + 0.5) / n, yanchor="middle"))
                fig.add_trace(trace, row=i + 1, col=1)
            fig.update_xaxes(title_text=panel.layout.xaxis.title.text, row=i + 1, col=1)
            fig.update_yaxes(
                title_text=panel.layout.yaxis.title.text,
                autorange=panel.layout.yaxis.autorange,
                row=i + 1,
                col=1,
            )
        fig.update_layout(height=max(350, 300 * n))
        first = next(iter(self.results.values()))
        p = self.provenance
        return figures.style(
            fig,
            f"{self.method} attribution: {', '.join(self.results)} ({first.direction}) · model {p.get('model', '?')} · "
            f"task {p.get('task', '?')} · metric {first.metric}",
        )


def attribute(
    model,
    task: Task | Sequence[Task],
    method: str,
    sites: str | Sequence[str],
    *,
    metric: MetricLike = "logit_diff",
    direction: str = "denoise",
    layer: int | None = None,
    steps: int = 10,
    graddrop: bool = True,
    attn_rule: str | None = None,
    progress: bool | Callable[[int, int], None] = True,
    cluster: str | None = None,
    resume: str | Path | None = None,
) -> AttributionResult | list[AttributionResult]:
    """Attribution scores for one or more sites.

    Args:
        model, task: as for `lenslab.circuits.patch` (a list of tasks gives one result per task).
        method: "atp", "atp*", "relp" or "ig".
        sites: a site name or a list (see `lenslab.circuits.SITES`); `layer=` for "mlp_neuron".
        metric: name or callable (must be differentiable).
        direction: "denoise" (gradient at the corrupt run, clean activations patched in) or "noise".
        steps: interpolation points for "ig".
        graddrop: for "atp*", apply GradDrop (scores become magnitudes).
        attn_rule: for "relp", None (plain gradient through attention, the RelP default) or "ah"
            (attention pattern detached, the AH-rule).
        cluster: run as a `lenslab.jobs` job, one shard per task and site, on a Ray cluster
            ("local", "auto", "host:port"; docs/scaling.md); the model is shipped once through
            Ray's object store. None: this process.
        resume: a folder where finished shards are saved; a rerun with it runs only the rest.

    Returns:
        `AttributionResult`, a mapping `{site: PatchResult}` (also for one site); scores estimate
        `patched metric - unpatched metric`. A list of them for a list of tasks. Split into
        shards the scores are bit-identical to one process on the same number of torch threads
        (each site's passes do not depend on the other sites asked for).
    """
    if cluster is not None or resume is not None or not isinstance(task, Task):
        return _attribute_job(
            model,
            task,
            method,
            sites,
            cluster=cluster,
            resume=resume,
            progress=progress,
            options=dict(
                metric=metric, direction=direction, layer=layer, steps=steps, graddrop=graddrop, attn_rule=attn_rule
            ),
        )
    resolved = _check(model, task, method, sites, direction=direction, layer=layer, steps=steps, attn_rule=attn_rule)
    task = task.to(model_device(model))
    bound = get_metric(metric, model, task)
    base, source = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    n_layers = int(model.cfg.n_layers)
    hooks = sorted({_hook(st, l, layer) for st in resolved for l in _layers(st, n_layers, layer)})
    if method == "atp*" and any(st.name in QK_KINDS for st in resolved):
        if getattr(model.cfg, "n_key_value_heads", None) not in (None, model.cfg.n_heads):
            raise LenslabError("the AtP* QK fix is not implemented for grouped-query attention; use method='atp'")
        extra = {f"blocks.{l}.attn.hook_{n}" for l in range(n_layers) for n in ("pattern", "attn_scores")}
        extra |= {_qk_hook(model, l, r) for l in range(n_layers) for r in ("q", "k")}
        hooks = sorted(set(hooks) | extra)
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in set(hooks))
    report = progress_reporter(progress, _n_passes(method, n_layers, hooks, steps, graddrop), f"{method} attribution")
    if method in ("atp", "relp"):
        acts, grads = _forward_backward(model, base, bound, hooks, relp=method == "relp", attn_rule=attn_rule)
        report()
        deltas = {h: (src_cache[h] - acts[h]) * grads[h] for h in hooks}
        scores = {st.name: _reduce(st, deltas, n_layers, layer) for st in resolved}
    elif method == "ig":
        scores = {
            st.name: _reduce(
                st,
                _ig(
                    model,
                    base,
                    bound,
                    src_cache,
                    [_hook(st, l, layer) for l in _layers(st, n_layers, layer)],
                    steps,
                    report,
                ),
                n_layers,
                layer,
            )
            for st in resolved
        }
    else:
        scores = _atp_star(model, base, bound, src_cache, resolved, hooks, n_layers, layer, graddrop, report)
    report(close=True)
    out = {}
    for st in resolved:
        grid = [list(range(n)) for n in scores[st.name].shape]
        out[st.name] = PatchResult(
            scores=scores[st.name].detach().cpu().float(),
            axes=st.axes,
            labels=axis_labels(model, task, st, grid),
            site=st.name,
            method=method,
            metric=bound.name,
            direction=direction,
            clean_value=bound.clean_value,
            corrupt_value=bound.corrupt_value,
            provenance=provenance(
                model,
                task,
                layer=layer,
                steps=steps if method == "ig" else None,
                graddrop=graddrop if method == "atp*" else None,
                attn_rule=attn_rule if method == "relp" else None,
                estimate="magnitude" if (method == "atp*" and graddrop) else "signed change",
            ),
        )
    return AttributionResult(results=out, method=method)


def _check(model, task, method, sites, *, direction, layer, steps, attn_rule) -> list[Site]:
    """`attribute`'s arguments checked before any compute; the resolved sites."""
    if method not in METHODS:
        raise LenslabError(f"method {method!r} is not one of {', '.join(METHODS)}{did_you_mean(str(method), METHODS)}")
    if direction not in DIRECTIONS:
        raise LenslabError(f"direction {direction!r} must be 'denoise' or 'noise'")
    if attn_rule not in (None, "ah"):
        raise LenslabError(f"attn_rule {attn_rule!r} must be None or 'ah'")
    site_list = [sites] if isinstance(sites, str) else list(sites)
    if not site_list:
        raise LenslabError("give at least one site")
    resolved = [resolve_site(s) for s in site_list]
    validate_task(model, task)
    if any(st.kind == "neuron" for st in resolved):
        if layer is None:
            raise LenslabError("site 'mlp_neuron' needs layer=N (the MLP whose neurons are scored)")
        check_layers(model, [layer])
    for st in resolved:
        if st.name in ("mlp_out", "resid_mid", "mlp_neuron") and getattr(model.cfg, "attn_only", False):
            raise LenslabError(f"site {st.name!r} does not exist in an attention-only model")
    if steps < 1:
        raise LenslabError(f"steps must be >= 1, got {steps}")
    return resolved


# --- distributed: one shard per task and site --------------------------------------------------


def _attribute_shard(payload: dict) -> PatchResult:
    """A `lenslab.jobs` shard of `attribute`: one task and one site, on this worker's model copy."""
    model = jobs.worker_model(payload["model"])
    site = payload["site"]
    return attribute(model, payload["task"], payload["method"], [site], progress=False, **payload["options"])[site]


def _attribute_job(model, task, method, sites, *, cluster, resume, progress, options) -> AttributionResult | list:
    cluster = jobs.parse_cluster(cluster)
    tasks = [task] if isinstance(task, Task) else list(task) if isinstance(task, (list, tuple)) else [task]
    if not tasks:
        raise LenslabError("task is an empty list; give a Task or a non-empty list of Tasks")
    site_list = [sites] if isinstance(sites, str) else list(sites)
    if len(set(site_list)) != len(site_list):
        raise LenslabError(f"sites {site_list} name a site twice; name each once")
    check_metric(options["metric"])
    for t in tasks:  # every argument checked before any shard runs (no cluster work for a typo)
        resolved = _check(
            model,
            t,
            method,
            site_list,
            direction=options["direction"],
            layer=options["layer"],
            steps=options["steps"],
            attn_rule=options["attn_rule"],
        )
    names = [st.name for st in resolved]
    handle = jobs.share_model(model, cluster)
    cpu_tasks = [t.to("cpu") for t in tasks]
    shards = [
        jobs.Shard(
            key=f"task{i}/{name}",
            payload={"model": handle, "task": t, "method": method, "site": name, "options": options},
        )
        for i, t in enumerate(cpu_tasks)
        for name in names
    ]
    metric = options["metric"]
    fingerprint = json.dumps(
        {
            "model": model_name(model),
            "method": method,
            **{k: v for k, v in options.items() if k != "metric"},
            "metric": metric if isinstance(metric, str) else getattr(metric, "__qualname__", repr(metric)),
            "tasks": [task_fingerprint(t) for t in cpu_tasks],
        },
        sort_keys=True,
    )
    parts = jobs.run_job(
        _attribute_shard,
        shards,
        cluster=cluster,
        resume=resume,
        desc=f"{method} attribution",
        progress=progress,
        num_gpus=1 if model_device(model).type == "cuda" and cluster is not None else 0,
        fingerprint=fingerprint,
    )
    job = {"cluster": cluster or "this process", "shards": len(shards), "split": "site"}
    out = []
    for i in range(len(tasks)):
        per_site = parts[i * len(names) : (i + 1) * len(names)]
        results = {n: replace(r, provenance={**r.provenance, "job": job}) for n, r in zip(names, per_site)}
        out.append(AttributionResult(results=results, method=method))
    return out[0] if isinstance(task, Task) else out


# --- sites and hooks -------------------------------------------------------------------------


def _layers(st: Site, n_layers: int, layer: int | None) -> list[int]:
    return [layer] if st.kind == "neuron" else list(range(n_layers))


def _hook(st: Site, l: int, layer: int | None) -> str:
    return st.hook.format(layer=layer if st.kind == "neuron" else l)


def _qk_hook(model, l: int, which: str) -> str:
    rot = getattr(model.cfg, "positional_embedding_type", "") == "rotary"
    return f"blocks.{l}.attn.hook_{'rot_' if rot else ''}{which}"


def _reduce(st: Site, per_hook: dict[str, Tensor], n_layers: int, layer: int | None) -> Tensor:
    """Sum an elementwise attribution `[batch, ...]` into the site's grid (same cells as `patch`)."""
    rows = []
    for l in _layers(st, n_layers, layer):
        x = per_hook[_hook(st, l, layer)]
        if st.kind == "pos":  # [batch, pos, d]
            rows.append(x.sum(dim=(0, 2)))
        elif st.kind == "head":  # [batch, pos, head, d_head]
            rows.append(x.sum(dim=(0, 1, 3)))
        elif st.kind == "pos_head":
            rows.append(x.sum(dim=(0, 3)))
        elif st.kind == "pattern":  # [batch, head, dest, src]
            rows.append(x.sum(dim=(0, 2, 3)))
        elif st.kind == "pattern_dest":
            rows.append(x.sum(dim=(0, 3)))
        else:  # neuron: [batch, pos, d_mlp]
            return x.sum(dim=(0, 1))
    return torch.stack(rows)


def _n_passes(method, n_layers, hooks, steps, graddrop) -> int:
    if method in ("atp", "relp"):
        return 1
    if method == "ig":
        return steps * len(hooks)
    return 1 + (n_layers if graddrop else 0)


# --- forward/backward with hooks ----------------------------------------------------------------


class _ZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


def _forward_backward(
    model,
    tokens,
    bound: Metric,
    hooks: Sequence[str],
    *,
    relp: bool = False,
    attn_rule: str | None = None,
    replace: dict[str, Tensor] | None = None,
    drop_layer: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward + backward on `tokens`: activations and metric gradients at `hooks`.

    `replace` overwrites activations at some hooks (for IG); `drop_layer` applies GradDrop at that
    layer; `relp` installs the LRP rules.
    """
    acts: dict[str, Tensor] = {}
    first = [True]

    def store(act, hook, name):
        # keyed by the name asked for: a TransformerBridge's hook.name is its canonical name
        # (blocks.0.hook_in for blocks.0.hook_resid_pre)
        if replace is not None and name in replace:
            act = replace[name]
        if not act.requires_grad:  # parameters frozen by the user: make this the graph's leaf
            act = act.detach().requires_grad_(True)
        acts[name] = act
        return act

    fwd = [(h, functools.partial(store, name=h)) for h in hooks]

    # ensure a graph exists even when parameters do not require grad
    def leaf(act, hook):
        if first[0] and not act.requires_grad:
            first[0] = False
            return act.detach().requires_grad_(True)
        return act

    fwd = [("hook_embed", leaf)] + fwd
    if relp:
        fwd = _relp_hooks(model, attn_rule) + fwd
    if drop_layer is not None:
        fwd += [(f"blocks.{drop_layer}.hook_attn_out", lambda a, hook: _ZeroGrad.apply(a))]
        if not getattr(model.cfg, "attn_only", False):
            fwd += [(f"blocks.{drop_layer}.hook_mlp_out", lambda a, hook: _ZeroGrad.apply(a))]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        logits = model(tokens)
        value = bound(logits)
        grads = torch.autograd.grad(value, [acts[h] for h in hooks], allow_unused=True)
    return (
        {h: acts[h].detach() for h in hooks},
        {h: (g if g is not None else torch.zeros_like(acts[h])).detach() for h, g in zip(hooks, grads)},
    )


def _stabilize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """RelP's sign-aware stabiliser: x + ((x == 0) + sign(x)) * eps."""
    return x + ((x == 0).to(x.dtype) + torch.sign(x)) * eps


def _relp_hooks(model, attn_rule: str | None) -> list[tuple[str, Callable]]:
    """Forward hooks implementing the RelP LRP rules as modified backward passes."""
    hooks: list[tuple[str, Callable]] = []
    names = list(model.hook_dict)
    # LN-rule: the normaliser (hook_scale of every LayerNorm/RMSNorm) acts as a constant.
    hooks += [(n, lambda s, hook: s.detach()) for n in names if n.endswith("hook_scale")]
    if not getattr(model.cfg, "attn_only", False):
        gated = bool(getattr(model.cfg, "gated_mlp", False))
        for l in range(model.cfg.n_layers):
            stash: dict[str, Tensor] = {}
            mlp = model.blocks[l].mlp

            def keep(act, hook, stash=stash):
                stash[hook.name.rsplit(".", 1)[-1]] = act
                return act

            def post(act, hook, stash=stash, mlp=mlp):
                pre = stash["hook_pre"]
                ratio = (act / _stabilize(pre)).detach() if not gated else None
                if not gated:  # identity rule: d post / d pre := act(pre) / pre
                    return _stabilize(pre) * ratio
                lin = stash["hook_pre_linear"]
                a = mlp.act_fn(pre)
                a_id = _stabilize(pre) * (a / _stabilize(pre)).detach()  # identity rule on the gate
                # half rule: each factor of the product receives half of the gradient
                return 0.5 * (a_id * lin.detach()) + 0.5 * (a_id.detach() * lin)

            hooks.append((f"blocks.{l}.mlp.hook_pre", keep))
            if gated:
                hooks.append((f"blocks.{l}.mlp.hook_pre_linear", keep))
            hooks.append((f"blocks.{l}.mlp.hook_post", post))
    if attn_rule == "ah":
        hooks += [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: p.detach()) for l in range(model.cfg.n_layers)]
    return hooks


# --- integrated gradients ----------------------------------------------------------------------


def _ig(model, base_tokens, bound, src_cache, hooks, steps, report) -> dict[str, Tensor]:
    """IG per hook: mean gradient along base -> source (midpoint rule) times the difference."""
    with torch.no_grad():
        _, base_cache = model.run_with_cache(base_tokens, names_filter=lambda n: n in set(hooks))
    out = {}
    for h in hooks:
        diff = src_cache[h] - base_cache[h]
        total = torch.zeros_like(diff)
        for i in range(steps):
            alpha = (i + 0.5) / steps
            _, g = _forward_backward(model, base_tokens, bound, [h], replace={h: base_cache[h] + alpha * diff})
            total += g[h]
            report()
        out[h] = diff * total / steps
    return out


# --- AtP* -----------------------------------------------------------------------------------


def _atp_star(model, base_tokens, bound, src_cache, resolved, hooks, n_layers, layer, graddrop, report):
    acts, grads = _forward_backward(model, base_tokens, bound, hooks)
    report()
    elem = {h: (src_cache[h] - acts[h]) * grads[h] for h in hooks}
    signed = {}
    for st in resolved:
        if st.name in QK_KINDS:
            signed[st.name] = _qk_fix(model, st, acts, grads, src_cache, n_layers)
        else:
            signed[st.name] = _reduce(st, elem, n_layers, layer)
    if not graddrop:
        return signed
    site_hooks = sorted({_hook(st, l, layer) for st in resolved for l in _layers(st, n_layers, layer)})
    total = {st.name: torch.zeros_like(signed[st.name]) for st in resolved}
    for drop in range(n_layers):
        a_gd, g_gd = _forward_backward(model, base_tokens, bound, hooks, drop_layer=drop)
        report()
        elem_gd = {h: (src_cache[h] - a_gd[h]) * g_gd[h] for h in site_hooks}
        for st in resolved:
            if st.name in QK_KINDS:
                est = _qk_fix(model, st, a_gd, g_gd, src_cache, n_layers)
            else:
                est = _reduce(st, elem_gd, n_layers, layer)
            total[st.name] += est.abs()
    return {k: v / max(n_layers - 1, 1) for k, v in total.items()}


def _qk_fix(model, st: Site, acts, grads, src_cache, n_layers) -> Tensor:
    """QK fix: exact attention probabilities for the patched q/k, linear from the pattern on.

    Scores are linear in q (and in k), so the patched attention logits are
    S' = S + (q' - q) . k / scale (query patch) or S + q . (k' - k) / scale (key patch).
    """
    which = "q" if st.name.startswith("q") else "k"
    by_pos = st.name.endswith("_by_pos")
    rows = []
    for l in range(n_layers):
        scale = float(model.blocks[l].attn.attn_scale)
        S = acts[f"blocks.{l}.attn.hook_attn_scores"]  # [batch, head, q, k], masked with -inf
        A = acts[f"blocks.{l}.attn.hook_pattern"]
        G = grads[f"blocks.{l}.attn.hook_pattern"]
        q = acts[_qk_hook(model, l, "q")]  # [batch, pos, head, d]
        k = acts[_qk_hook(model, l, "k")]
        dq = src_cache[_qk_hook(model, l, "q")] - q
        dk = src_cache[_qk_hook(model, l, "k")] - k
        mask = torch.isfinite(S)
        T = S.shape[-1]
        if which == "q":
            dS = torch.einsum("bqhd,bkhd->bhqk", dq, k) / scale  # each query row changes with its own q
            if by_pos:
                # patch query position t alone: only row t changes
                Sp = torch.where(mask, S + dS, S)
                Ap = torch.softmax(Sp, dim=-1)
                est = ((Ap - A) * G).sum(dim=(0, 3))  # [head, q]
                rows.append(est.transpose(0, 1))  # [pos, head]
            else:
                Ap = torch.softmax(torch.where(mask, S + dS, S), dim=-1)
                rows.append(((Ap - A) * G).sum(dim=(0, 2, 3)))
        else:
            dS = torch.einsum("bqhd,bkhd->bhqk", q, dk) / scale  # column s changes with k_s
            if by_pos:
                est = torch.zeros(T, S.shape[1], device=S.device, dtype=S.dtype)
                for s in range(T):
                    Sp = S.clone()
                    Sp[..., s] = torch.where(mask[..., s], S[..., s] + dS[..., s], S[..., s])
                    Ap = torch.softmax(Sp, dim=-1)
                    est[s] = ((Ap - A) * G).sum(dim=(0, 2, 3))
                rows.append(est)
            else:
                Ap = torch.softmax(torch.where(mask, S + dS, S), dim=-1)
                rows.append(((Ap - A) * G).sum(dim=(0, 2, 3)))
    return torch.stack(rows)
