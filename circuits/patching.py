"""Exact activation patching: the reference every approximation is measured against.

Activation patching (Vig et al. 2020; Meng et al. 2022; Wang et al. 2022) runs the model on one
input while overwriting one activation with its value from another input, and records the metric.
Denoising (the default, as in TransformerLens `patching`) runs the *corrupt* prompt with a *clean*
activation patched in: a high score means the activation carries what the clean answer needs.
Noising runs the clean prompt with a corrupt activation patched in.

The reference engine does one forward pass of the whole batch per patch, exactly as
`transformer_lens.patching.generic_activation_patch` does, so its scores equal
`get_act_patch_resid_pre` & co. The `engine` argument is where the fast batched engine of
`lenslab.kernels` plugs in; the default, "auto", uses it wherever it covers the site (its scores
equal the reference engine's within 1e-4 in float32) and the reference engine elsewhere.

>>> import lenslab
>>> from lenslab import circuits, tasks
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = tasks.induction(model, n=4, seq_len=8, seed=0)
>>> res = circuits.patch(model, task, "resid_pre")
>>> res.axes
('layer', 'pos')
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lenslab import jobs, kernels, labels, sites
from lenslab._errors import LenslabError, did_you_mean
from lenslab.kernels import ENGINES
from lenslab.results import PatchResult, provenance
from lenslab.sites import DIRECTIONS, SITE_ALIASES, SITES, Site, patch_result, position_labels, resolve_site
from lenslab.tasks import MetricLike, Task, check_metric, get_metric
from lenslab.toolbox import check_layers, model_device, model_name, progress_reporter

exact_result = patch_result  # the name engines used before lenslab.sites
__all__ = [
    "DIRECTIONS",
    "SITES",
    "SITE_ALIASES",
    "Site",
    "batched_patch",
    "exact_result",
    "patch",
    "path_patch",
    "position_labels",
    "resolve_site",
    "validate_task",
]


def patch(
    model,
    task: Task | Sequence[Task],
    site: str,
    *,
    direction: str = "denoise",
    metric: MetricLike = "logit_diff",
    engine: str = "auto",
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    progress: bool | Callable[[int, int], None] = True,
    cluster: str | None = None,
    resume: str | Path | None = None,
) -> PatchResult | list[PatchResult]:
    """Exact activation patching of one site over its whole grid.

    Args:
        model: a TransformerLens model from `lenslab.load_model`.
        task: the clean/corrupt prompts and answers; a list of tasks patches each (one
            `PatchResult` per task, in order).
        site: one of `SITES` ("resid_pre", "attn_out", "z", "z_by_pos", "q", "pattern", "mlp_neuron", ...).
        direction: "denoise" (run corrupt, patch in clean; TransformerLens's convention) or "noise".
        metric: a metric name from `lenslab.tasks.METRICS` or a callable on logits `[batch, pos, vocab]`.
        engine: "auto" (the batched engine of `lenslab.kernels` where it covers the site and model,
            else the reference engine, saying so once), "batched", or "reference" (one forward per patch).
        layer: for "mlp_neuron", the MLP layer whose neurons are patched.
        layers: restrict the layer axis to these layers (default: all).
        progress: show a tqdm bar (True), none (False), or call `progress(done, total)`.
        cluster: run as a `lenslab.jobs` job on a Ray cluster ("local", "auto", "host:port";
            docs/scaling.md): one shard per task for a list of tasks, one per layer for one task
            (per task for "mlp_neuron"). The model is shipped once through Ray's object store and
            each worker process keeps one copy (a model on a GPU asks one GPU per shard). None:
            this process.
        resume: a folder where finished shards are saved; a rerun with it runs only the rest
            (with `cluster=None` too: the same shards, one after another).

    Returns:
        `PatchResult` whose scores (axes per site, e.g. `[layer, pos]`) are the metric of each patched run
        (a list of them for a list of tasks). On a cluster the scores are bit-identical to one
        process on the same number of torch threads (a Ray worker runs one), except for one task
        split by layer under the batched engine, which batches a layer's patches differently
        alone than with other layers: those agree within float32 rounding (tested: 1e-5).
    """
    tasks = [task] if isinstance(task, Task) else list(task) if isinstance(task, (list, tuple)) else [task]
    if not tasks:
        raise LenslabError("task is an empty list; give a Task or a non-empty list of Tasks")
    cluster = jobs.parse_cluster(cluster)
    st = resolve_site(site)
    if direction not in DIRECTIONS:
        raise LenslabError(
            f"direction {direction!r} must be 'denoise' or 'noise'{did_you_mean(str(direction), DIRECTIONS)}"
        )
    for t in tasks:
        validate_task(model, t)
    n_layers = int(model.cfg.n_layers)
    if st.kind == "neuron":
        if layer is None:
            raise LenslabError("site 'mlp_neuron' needs layer=N (the MLP whose neurons are patched)")
        check_layers(model, [layer])
        if getattr(model.cfg, "attn_only", False):
            raise LenslabError("site 'mlp_neuron' needs a model with MLPs; this model is attention-only")
    elif layer is not None:
        raise LenslabError(f"layer= is only for site 'mlp_neuron'; for {st.name!r} use layers=[...] to restrict layers")
    layer_list = list(range(n_layers)) if layers is None else check_layers(model, layers)
    if st.name in ("mlp_out", "resid_mid") and getattr(model.cfg, "attn_only", False):
        raise LenslabError(
            f"site {st.name!r} does not exist in an attention-only model; use attn_out or resid_pre/resid_post"
        )

    check_metric(metric)
    if engine != "reference" and engine not in ENGINES:
        raise LenslabError(
            f"engine {engine!r} is not available; use one of {', '.join(['reference', *ENGINES])}"
            f"{did_you_mean(str(engine), ['reference', *ENGINES])}"
        )
    args = dict(site=st.name, direction=direction, metric=metric, engine=engine, layer=layer)
    if cluster is not None or resume is not None or not isinstance(task, Task):
        results = _patch_job(model, tasks, st, layer_list, args, cluster=cluster, resume=resume, progress=progress)
        return results[0] if isinstance(task, Task) else results
    return _patch_one(model, task, layers=layer_list, progress=progress, **args)


def _patch_one(
    model, task: Task, *, site: str, direction: str, metric, engine: str, layer, layers, progress
) -> PatchResult:
    """`patch` of one checked task over `layers` (the arguments checked by `patch`)."""
    st = resolve_site(site)
    layer_list = list(layers)
    task = task.to(model_device(model))
    if engine != "reference":
        result = ENGINES[engine](  # binds a metric name from its own unpatched runs
            model, task, st, direction=direction, metric=metric, layers=layer_list, layer=layer, progress=progress
        )
        if result is not None:  # None: the engine does not cover this site or model (it said why, once)
            return result
    bound = get_metric(metric, model, task)
    base_tokens, source_tokens = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    hooks = [
        st.hook.format(layer=layer if st.kind == "neuron" else l)
        for l in (layer_list if st.kind != "neuron" else [layer])
    ]
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source_tokens, names_filter=lambda n: n in set(hooks))
    grid = sites.grid(model, st, task, layer_list, source_cache, layer)
    shape = [len(values) for values in grid]
    scores = torch.zeros(shape)
    cells = list(itertools.product(*[range(n) for n in shape]))
    report = progress_reporter(progress, len(cells), f"patching {st.name}")
    with torch.no_grad():
        for cell in cells:
            index = tuple(grid[a][i] for a, i in enumerate(cell))
            hook_name = st.hook.format(layer=layer if st.kind == "neuron" else index[0])
            src = source_cache[hook_name]
            logits = model.run_with_hooks(base_tokens, fwd_hooks=[(hook_name, _setter(st.kind, index, src))])
            if logits.dtype in (torch.float16, torch.bfloat16):  # metrics read float32 logits (as the batched engine)
                logits = logits.float()
            scores[cell] = float(bound(logits))
            report()
    report(close=True)
    return patch_result(model, task, st, grid, scores, bound, direction, engine="reference", layer=layer)


# --- distributed: one shard per task, or per layer of one task -----------------------------------


def _patch_shard(payload: dict) -> PatchResult:
    """A `lenslab.jobs` shard of `patch`: one task over some layers, on this worker's model copy."""
    model = jobs.worker_model(payload["model"])
    return _patch_one(model, payload["task"], progress=False, **payload["args"], layers=payload["layers"])


def _cells(model, st: Site, task: Task) -> int:
    """Patches in one layer of the site's grid (the size of a layer shard, for the progress bar)."""
    heads = int(model.cfg.n_heads)
    if st.name in ("k", "v", "k_by_pos", "v_by_pos"):
        heads = int(getattr(model.cfg, "n_key_value_heads", None) or heads)
    pos = task.seq_len
    return {"pos": pos, "head": heads, "pos_head": pos * heads, "pattern": heads, "pattern_dest": heads * pos}.get(
        st.kind, 1
    )


def task_fingerprint(task: Task) -> str:
    """A short hash of a task's tokens and answers (resume folders refuse another task's shards)."""
    h = hashlib.sha1()
    for t in (task.clean_tokens, task.corrupt_tokens, task.answer_tokens):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]


def _patch_job(model, tasks: list[Task], st: Site, layer_list: list[int], args: dict, *, cluster, resume, progress):
    """`patch` as a `lenslab.jobs` job: a shard per task, or per layer of one task (merged along the layer axis)."""
    # many tasks: a shard per task (whole grids, as one process computes them); one task: per layer
    split = len(tasks) == 1 and st.kind != "neuron" and (cluster is not None or resume is not None)
    chunks = [[l] for l in layer_list] if split else [layer_list]
    handle = jobs.share_model(model, cluster)
    cpu_tasks = [t.to("cpu") for t in tasks]
    shards = []
    for i, t in enumerate(cpu_tasks):
        for chunk in chunks:
            key = f"task{i}" + (f"/L{chunk[0]}" if split else "")
            payload = {"model": handle, "task": t, "args": args, "layers": chunk}
            size = int(model.cfg.d_mlp) if st.kind == "neuron" else _cells(model, st, t) * len(chunk)
            shards.append(jobs.Shard(key=key, payload=payload, size=size))
    metric = args["metric"]
    fingerprint = json.dumps(
        {
            "model": model_name(model),
            **{k: v for k, v in args.items() if k != "metric"},
            "metric": metric if isinstance(metric, str) else getattr(metric, "__qualname__", repr(metric)),
            "layers": layer_list,
            "tasks": [task_fingerprint(t) for t in cpu_tasks],
        },
        sort_keys=True,
    )
    on_gpu = model_device(model).type == "cuda"
    parts = jobs.run_job(
        _patch_shard,
        shards,
        cluster=cluster,
        resume=resume,
        desc=f"patching {st.name}",
        progress=progress,
        num_gpus=1 if on_gpu and cluster is not None else 0,
        fingerprint=fingerprint,
    )
    per_task = len(chunks)
    return [_merge_layers(parts[i * per_task : (i + 1) * per_task], cluster) for i in range(len(tasks))]


def _merge_layers(parts: Sequence[PatchResult], cluster: str | None) -> PatchResult:
    """One `PatchResult` from the shards of one task over consecutive layers (in order): scores
    and layer labels concatenated along the layer axis; the first shard's metric values and
    provenance, with every shard's engine details and the job recorded."""
    first = parts[0]
    if len(parts) == 1:
        if cluster is None:
            return first
        prov = {**first.provenance, "job": {"cluster": cluster, "shards": 1, "split": "task"}}
        return dataclasses.replace(first, provenance=prov)
    labels = dict(first.labels)
    labels["layer"] = [lab for p in parts for lab in p.labels["layer"]]
    prov = dict(first.provenance)
    if "engine_details" in prov:
        prov["engine_details"] = [p.provenance.get("engine_details") for p in parts]
    prov["job"] = {"cluster": cluster or "this process", "shards": len(parts), "split": "layer"}
    return dataclasses.replace(first, scores=torch.cat([p.scores for p in parts]), labels=labels, provenance=prov)


def batched_patch(
    model,
    task: Task,
    site: str,
    *,
    direction: str = "denoise",
    metric: MetricLike = "logit_diff",
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    progress: bool | Callable[[int, int], None] = True,
    **engine_options,
) -> PatchResult:
    """`patch(..., engine="batched")` with engine options for this call only.

    Args:
        engine_options: fields of `lenslab.kernels.EngineOptions` (memory_budget="512MB", max_rows=...,
            position_skip=..., fused_metric=..., triton=..., compile=...).

    Returns:
        The same `PatchResult` as the reference engine (provenance says engine="batched").
    """
    with kernels.options(**engine_options):
        return patch(
            model,
            task,
            site,
            direction=direction,
            metric=metric,
            engine="batched",
            layer=layer,
            layers=layers,
            progress=progress,
        )


# --- validation ----------------------------------------------------------------------------


def validate_task(model, task: Task) -> None:
    """Check that `task` fits `model` (vocabulary, context length) before any compute."""
    if not isinstance(task, Task):
        raise LenslabError(
            f"task must be a lenslab.tasks.Task, got {type(task).__name__}; build one with lenslab.tasks"
        )
    d_vocab = int(model.cfg.d_vocab)
    for name in ("clean_tokens", "corrupt_tokens", "answer_tokens"):
        t = getattr(task, name)
        if int(t.max()) >= d_vocab:
            raise LenslabError(
                f"task {name} holds token id {int(t.max())} but the model's vocabulary has {d_vocab} tokens: "
                "was the task built for another model?"
            )
    n_ctx = int(model.cfg.n_ctx)
    if task.seq_len > n_ctx:
        raise LenslabError(
            f"task prompts are {task.seq_len} tokens but the model's context is {n_ctx}: use shorter prompts"
        )


# --- grid, setters, labels -----------------------------------------------------------------


def _setter(kind: str, index: tuple[int, ...], source: Tensor):
    """A forward hook writing `source` into the activation at `index` (TransformerLens's setters)."""

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        if kind == "pos":
            act[:, index[1]] = source[:, index[1]]
        elif kind == "head":
            act[:, :, index[1]] = source[:, :, index[1]]
        elif kind == "pos_head":
            act[:, index[1], index[2]] = source[:, index[1], index[2]]
        elif kind == "pattern":
            act[:, index[1]] = source[:, index[1]]
        elif kind == "pattern_dest":
            act[:, index[1], index[2]] = source[:, index[1], index[2]]
        elif kind == "neuron":
            act[..., index[0]] = source[..., index[0]]
        return act

    return hook


# --- path patching ----------------------------------------------------------------------------

RECEIVER_INPUTS = ("q", "k", "v")


def _parse_heads(model, heads, what: str) -> list[tuple[int, int]]:
    """[(layer, head), ...] from tuples or 'L3H1' strings, range-checked."""
    out = []
    for h in heads:
        if isinstance(h, str):
            try:
                node = labels.parse(h)
            except LenslabError:
                node = None
            if node is None or node.kind != "head":
                raise LenslabError(f"{what} head {h!r} must look like 'L3H1' or (3, 1)") from None
            h = (node.layer, node.index)
        if not (isinstance(h, (tuple, list)) and len(h) == 2):
            raise LenslabError(f"{what} head {h!r} must be a (layer, head) pair or 'L3H1'")
        layer, head = int(h[0]), int(h[1])
        check_layers(model, [layer])
        if not 0 <= head < model.cfg.n_heads:
            raise LenslabError(
                f"{what} head {head} in layer {layer} is out of range: the model has {model.cfg.n_heads} heads"
            )
        out.append((layer, head))
    if not out:
        raise LenslabError(f"give at least one {what} head")
    return out


def path_patch(
    model,
    task: Task,
    receivers: Sequence[tuple[int, int] | str] | str,
    *,
    receiver_input: str | Sequence[str] = "q",
    senders: Sequence[tuple[int, int] | str] | None = None,
    direction: str = "denoise",
    metric: MetricLike = "logit_diff",
    progress: bool | Callable[[int, int], None] = True,
) -> PatchResult:
    """Path patching (Wang et al. 2022, "Interpretability in the Wild"): the effect of a sender
    head that flows *only* through the receivers' query/key/value inputs (or directly to the logits).

    For each sender head: (1) run the base prompt with the sender's output (`hook_z`) taken from
    the source prompt and every other head frozen at its base value, MLPs recomputed, and record
    the receivers' `q`/`k`/`v`; (2) run the base prompt again with only those receiver inputs
    overwritten, and score the metric. With `receivers="logits"`, step (1) also freezes every MLP
    and is scored directly: the sender's direct effect on the logits.

    Args:
        receivers: heads as (layer, head) pairs or "L3H1" strings, or "logits".
        receiver_input: "q", "k", "v" or several of them (under grouped-query attention, k/v
            receivers are key/value heads).
        senders: heads to test; default: every head in a layer below the earliest receiver
            (every head for "logits"). Scores have axes `[layer, head]` over that grid (cells that
            are not senders are NaN).

    Returns:
        `PatchResult` with site "path" and the receivers recorded in its provenance.
    """
    if direction not in DIRECTIONS:
        raise LenslabError(f"direction {direction!r} must be 'denoise' or 'noise'")
    validate_task(model, task)
    to_logits = isinstance(receivers, str) and receivers == "logits"
    inputs = [receiver_input] if isinstance(receiver_input, str) else list(receiver_input)
    for r in inputs:
        if r not in RECEIVER_INPUTS:
            raise LenslabError(f"receiver_input {r!r} must be one of q, k, v{did_you_mean(str(r), RECEIVER_INPUTS)}")
    recv = (
        [] if to_logits else _parse_heads(model, [receivers] if isinstance(receivers, str) else receivers, "receiver")
    )
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    top = n_layers if to_logits else min(l for l, _ in recv)
    if senders is None:
        send = [(l, h) for l in range(top) for h in range(n_heads)]
        if not send:
            raise LenslabError("the receivers are in layer 0: no head can send to them; choose later receivers")
    else:
        send = _parse_heads(model, senders, "sender")
        bad = [labels.head(l, h) for l, h in send if l >= top]
        if bad:
            raise LenslabError(
                f"sender heads {bad} are not below the earliest receiver layer {top}: a path must go forward"
            )
    task = task.to(model_device(model))
    bound = get_metric(metric, model, task)
    base_tokens, source_tokens = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    mlp_names = [] if getattr(model.cfg, "attn_only", False) else [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    with torch.no_grad():
        _, base_cache = model.run_with_cache(base_tokens, names_filter=lambda n: n in set(z_names + mlp_names))
        _, src_cache = model.run_with_cache(source_tokens, names_filter=lambda n: n in set(z_names))
    recv_hooks: dict[str, list[int]] = {}
    for l, h in recv:
        for r in inputs:
            recv_hooks.setdefault(f"blocks.{l}.attn.hook_{r}", []).append(h)
    n_layers_grid = list(range(top))  # rows: every layer that can send; non-sender cells stay NaN
    scores = torch.full((len(n_layers_grid), n_heads), float("nan"))
    report = progress_reporter(progress, len(send), "path patching")
    with torch.no_grad():
        for l_s, h_s in send:

            def freeze(act, hook, l_s=l_s, h_s=h_s):
                layer = int(hook.name.split(".")[1])
                out = base_cache[hook.name].clone()
                if layer == l_s:
                    out[:, :, h_s] = src_cache[hook.name][:, :, h_s]
                return out

            hooks = [(n, freeze) for n in z_names]
            if to_logits:
                hooks += [(n, lambda act, hook: base_cache[hook.name]) for n in mlp_names]
                logits = model.run_with_hooks(base_tokens, fwd_hooks=hooks)
            else:
                stored: dict[str, Tensor] = {}

                def keep(act, hook, stored=stored):
                    stored[hook.name] = act.detach().clone()

                model.run_with_hooks(base_tokens, fwd_hooks=hooks + [(n, keep) for n in recv_hooks])

                def put(act, hook, stored=stored):
                    act = act.clone()
                    for h in recv_hooks[hook.name]:
                        act[:, :, h] = stored[hook.name][:, :, h]
                    return act

                logits = model.run_with_hooks(base_tokens, fwd_hooks=[(n, put) for n in recv_hooks])
            scores[n_layers_grid.index(l_s), h_s] = float(bound(logits))
            report()
    report(close=True)
    recv_desc = "logits" if to_logits else [labels.head(l, h) for l, h in recv]
    return PatchResult(
        scores=scores,
        axes=("layer", "head"),
        labels={"layer": [f"L{l}" for l in n_layers_grid], "head": [f"H{h}" for h in range(n_heads)]},
        site="path",
        method="exact",
        metric=bound.name,
        direction=direction,
        clean_value=bound.clean_value,
        corrupt_value=bound.corrupt_value,
        provenance=provenance(model, task, receivers=recv_desc, receiver_input=inputs),
    )
