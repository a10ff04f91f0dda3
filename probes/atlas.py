"""Activation-maxima atlas: the largest |a| at every hook of a model, where it sits, and what INT8 makes of it.

After "Measuring Maximum Activations in Open Large Language Models" (code: clx1415926/Max_act_llm,
`analyze_model.py` and `quant_sanity_check.py`), on the hooks every lenslab model shares, so that a
`HookedTransformer`, a `TransformerBridge` and a MoE model give the same atlas. The paper's hook
set, in TransformerLens's names (the kinds of `KINDS`):

| kind | hook | the paper's tensor |
|---|---|---|
| `embed` | `hook_embed` | `embedding_output` |
| `pos_embed` | `hook_pos_embed` (learned positions only) | (none: its models are rotary) |
| `resid_pre` | `blocks.{l}.hook_resid_pre` (site `resid_pre`) | `layer_{l-1}_hidden` |
| `resid_post` | `blocks.{n-1}.hook_resid_post`: the final residual stream | `layer_{n-1}_hidden` |
| `attn_out` | `blocks.{l}.hook_attn_out` (site `attn_out`) | `layer_{l}_attn_output` |
| `mlp_out` | `blocks.{l}.hook_mlp_out` (site `mlp_out`; a MoE block's whole output) | `layer_{l}_mlp_output` |
| `gate` | `blocks.{l}.mlp.hook_pre`: the gate projection of a gated (SwiGLU) MLP | `layer_{l}_mlp_gate` |
| `gate_linear` | `blocks.{l}.mlp.hook_pre_linear`: its linear (up) projection | (none) |
| `expert_gate` | `blocks.{l}.mlp.experts.{e}.hook_gate` (HookedTransformer MoE), on the routed tokens | (none) |
| `experts_out` | `blocks.{l}.mlp.experts.hook_out` (bridge MoE): the routed experts' summed output | (none) |
| `ln_final` | `unembed.hook_in`: the final norm's output, weight and bias included | `final_layernorm` |

The residual kinds are TransformerLens's accumulated residual stream (`0_pre` ... `final_post`):
every distinct residual state once. `ln_final` is read at the unembedding's input because
TransformerLens's `ln_final.hook_normalized` is taken before the norm's weight; the paper hooks
the norm module's output. A kind a model lacks (no learned positions, no gated MLP, a dense model's
expert kinds, a hook that never fires) is skipped and `AtlasResult.skipped` says why.

Per hook, over every prompt, position and channel: the largest |a| (`max_abs`, with its signed
`value`, sample, position, token and channel), the top `top_k` entries, the median |a| of all its
entries and `ratio = max_abs / median_abs`. The global maximum (`global_max`) is taken over the
stream kinds (`STREAM_KINDS`: embeddings, residual streams, attention and MLP outputs, final norm),
as the paper's "global max activation" excludes the gate and router tensors, whose scale differs.

**The INT8 check** (`quant_sanity_check.py`, policy `max_abs`): per hook, symmetric per-tensor
absmax INT8 quantisation with the hook's own maximum as the threshold, `scale = max_abs / 127`,
`q = clamp(round(a / scale), -127, 127)`, and the error `e = q * scale - a` over all its entries:
`int8_rel_rmse = sqrt(sum e^2 / sum a^2)` (the relative RMSE the paper reports), with
`int8_sqnr_db = 10 log10(sum a^2 / sum e^2)` and `int8_rel_mae = mean |e| / mean |a|` beside it.
The paper calibrates the threshold on 128 prompts and evaluates on 256 others; here calibration
and evaluation are the same prompts, so nothing is clipped. `correlation` is the Pearson and
Spearman correlation, across the measured hooks, of `max_abs` with `int8_rel_rmse`.

Massive activations in Sun et al.'s sense (a rule on the layer outputs) are
`lenslab.probes.sinks.massive_activations`; the atlas measures every hook and flags nothing.

>>> from lenslab.zoo import planted
>>> atlas = activation_atlas(planted.planted_atlas_model(), planted.planted_atlas_tokens())
>>> m = atlas.global_max()
>>> m["hook"], m["sample"], m["pos"], m["channel"], round(m["value"])
('hook_embed', 1, 5, 5, 500)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab import figures, labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes import routers, sinks
from lenslab.results import Result, provenance
from lenslab.sites import site_hook
from lenslab.toolbox import length_batches, model_device, progress_reporter

__all__ = [
    "INT8_QMAX",
    "KINDS",
    "STREAM_KINDS",
    "AtlasHook",
    "AtlasResult",
    "HookKind",
    "activation_atlas",
    "atlas_hooks",
    "check_kinds",
    "correlation",
    "int8_error",
]

INT8_QMAX = 127  # symmetric INT8: 2**(8-1) - 1 levels each side (the paper's `qmax`)


@dataclass(frozen=True)
class HookKind:
    """A kind of hook the atlas reads: its name, what it is, and whether it counts towards the
    global maximum (`stream`: a `d_model`-wide activation, as in the paper's global max)."""

    name: str
    description: str
    stream: bool


KINDS: dict[str, HookKind] = {
    k.name: k
    for k in [
        HookKind("embed", "token embedding (hook_embed)", True),
        HookKind("pos_embed", "learned positional embedding (hook_pos_embed)", True),
        HookKind("resid_pre", "residual stream before each block (blocks.{l}.hook_resid_pre)", True),
        HookKind("resid_post", "the final residual stream (blocks.{n-1}.hook_resid_post)", True),
        HookKind("attn_out", "attention output (blocks.{l}.hook_attn_out)", True),
        HookKind("mlp_out", "MLP or MoE block output (blocks.{l}.hook_mlp_out)", True),
        HookKind("gate", "gate projection of a gated MLP, before its activation (blocks.{l}.mlp.hook_pre)", False),
        HookKind("gate_linear", "linear (up) projection of a gated MLP (blocks.{l}.mlp.hook_pre_linear)", False),
        HookKind(
            "expert_gate", "a MoE expert's gate projection on its routed tokens (mlp.experts.{e}.hook_gate)", False
        ),
        HookKind("experts_out", "a bridge MoE block's summed routed-expert output (mlp.experts.hook_out)", False),
        HookKind("ln_final", "final norm output, weight and bias included (unembed.hook_in)", True),
    ]
}
STREAM_KINDS = tuple(k for k, v in KINDS.items() if v.stream)


def check_kinds(kinds) -> list[str]:
    """`kinds` (None: all of `KINDS`; a name or a list of names) as a list in `KINDS` order."""
    if kinds is None:
        return list(KINDS)
    ks = [kinds] if isinstance(kinds, str) else list(kinds)
    if not ks:
        raise LenslabError(f"kinds is empty; pass None (all) or some of {', '.join(KINDS)}")
    for k in ks:
        if k not in KINDS:
            raise LenslabError(f"hook kind {k!r} is not one of {', '.join(KINDS)}{did_you_mean(str(k), list(KINDS))}")
    return [k for k in KINDS if k in ks]


@dataclass(frozen=True)
class AtlasHook:
    """One hook the atlas reads. `layout` is how its activation is laid out: "bpd" (`[batch, pos,
    ...]`), "flat" (`[batch * pos, ...]`) or "routed" (one row per token routed to `expert`, in the
    order TransformerLens's MoE visits them, read from `index_hook`, `[batch * pos, k]`)."""

    hook: str
    kind: str
    layer: int | None = None
    expert: int | None = None
    layout: str = "bpd"
    index_hook: str | None = None


def _candidates(model, kinds: list[str]) -> tuple[list[AtlasHook], list[dict]]:
    """The hooks each kind names on this model (before checking that they fire), and the kinds or
    layers it lacks by construction."""
    n = int(model.cfg.n_layers)
    moe = {m.layer: m for m in routers.moe_layers(model)} if routers.has_moe(model) else {}
    dense = [l for l in range(n) if l not in moe]
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    attn_only = bool(getattr(model.cfg, "attn_only", False))
    out: list[AtlasHook] = []
    skipped: list[dict] = []
    skip = lambda kind, hook, why: skipped.append({"kind": kind, "hook": hook, "reason": why})
    for kind in kinds:
        if attn_only and kind in ("mlp_out", "gate", "gate_linear"):
            skip(
                kind,
                "blocks.{layer}.hook_mlp_out" if kind == "mlp_out" else "blocks.{layer}.mlp",
                "an attention-only model: no MLPs",
            )
        elif kind == "embed":
            out.append(AtlasHook("hook_embed", kind))
        elif kind == "pos_embed":
            out.append(AtlasHook("hook_pos_embed", kind))
        elif kind == "resid_pre":
            out += [AtlasHook(site_hook("resid_pre", l), kind, l) for l in range(n)]
        elif kind == "resid_post":
            out.append(AtlasHook(site_hook("resid_post", n - 1), kind, n - 1))
        elif kind in ("attn_out", "mlp_out"):
            out += [AtlasHook(site_hook(kind, l), kind, l) for l in range(n)]
        elif kind in ("gate", "gate_linear"):
            hook = "blocks.{layer}.mlp." + ("hook_pre" if kind == "gate" else "hook_pre_linear")
            if not dense:
                skip(kind, hook, "every layer is a MoE layer: its gates are the experts' (kind expert_gate)")
            elif not gated:
                skip(kind, hook, "the MLPs are not gated (one input projection, no gate): no gate activations")
            else:
                out += [AtlasHook(hook.format(layer=l), kind, l) for l in dense]
        elif kind == "expert_gate":
            hooked = [l for l, m in moe.items() if m.kind == "hooked"]
            if not moe:
                skip(kind, "blocks.{layer}.mlp.experts.{e}.hook_gate", "a dense model: no experts")
            elif len(hooked) < len(moe):
                skip(kind, "blocks.{layer}.mlp.experts.{e}.hook_gate", "the bridge exposes no per-expert activations")
            for l in hooked:
                out += [
                    AtlasHook(f"blocks.{l}.mlp.experts.{e}.hook_gate", kind, l, e, "routed", moe[l].indices_hook)
                    for e in range(moe[l].n_experts)
                ]
        elif kind == "experts_out":
            bridged = [l for l, m in moe.items() if m.kind != "hooked"]
            if not moe:
                skip(kind, "blocks.{layer}.mlp.experts.hook_out", "a dense model: no experts")
            elif len(bridged) < len(moe):
                skip(
                    kind,
                    "blocks.{layer}.mlp.experts.{e}",
                    "TransformerLens's MoE has no hook on the experts' outputs "
                    "(lenslab.probes.super_experts profiles their down-projections)",
                )
            out += [AtlasHook(f"blocks.{l}.mlp.experts.hook_out", kind, l, None, "flat") for l in bridged]
        elif kind == "ln_final":
            if "ln_final.hook_normalized" in (getattr(model, "hook_dict", {}) or {}):
                out.append(AtlasHook("unembed.hook_in", kind))
            else:
                skip(kind, "unembed.hook_in", "the model has no final norm (ln_final)")
    return out, skipped


def atlas_hooks(model, kinds=None) -> tuple[list[AtlasHook], list[dict]]:
    """The hooks `activation_atlas` reads on `model` and the ones it skips.

    Each kind of `kinds` (default all of `KINDS`) names its hooks; a hook the model lacks, one that
    does not fire on a 2-token forward pass, or one whose activation is not laid out as the kind
    expects is skipped. Returns `(hooks, skipped)`, `skipped` a list of `{"kind", "hook", "reason"}`.

    >>> from lenslab.zoo import planted
    >>> hooks, skipped = atlas_hooks(planted.planted_atlas_model())
    >>> len(hooks), sorted({s["kind"] for s in skipped})
    (14, ['expert_gate', 'experts_out'])
    """
    kinds = check_kinds(kinds)
    cands, skipped = _candidates(model, kinds)
    hd = getattr(model, "hook_dict", {}) or {}
    present = []
    for c in cands:
        missing = [h for h in (c.hook, c.index_hook) if h is not None and h not in hd]
        if missing:
            skipped.append({"kind": c.kind, "hook": c.hook, "reason": f"not a hook of this model ({missing[0]})"})
        else:
            present.append(c)
    names = {c.hook for c in present} | {c.index_hook for c in present if c.index_hook}
    toks = torch.zeros((1, 2), dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
    hooks = []
    for c in present:
        if c.hook not in cache or (c.index_hook and c.index_hook not in cache):
            skipped.append({"kind": c.kind, "hook": c.hook, "reason": "did not fire on a forward pass"})
            continue
        shape = tuple(cache[c.hook].shape)
        ok = {
            "bpd": len(shape) >= 3 and shape[:2] == (1, 2),
            "flat": len(shape) == 2 and shape[0] == 2,
            "routed": len(shape) == 2,
        }[c.layout]
        if not ok:
            want = {"bpd": "[batch, pos, channel]", "flat": "[batch * pos, channel]", "routed": "[tokens, channel]"}
            skipped.append(
                {"kind": c.kind, "hook": c.hook, "reason": f"shape {shape} on 2 tokens, not {want[c.layout]}"}
            )
            continue
        hooks.append(c)
    return hooks, skipped


# --- measuring ------------------------------------------------------------------------------------
def int8_error(abs_values: Tensor, threshold: float | None = None) -> dict:
    """The paper's INT8 check on a tensor's |a| (symmetric quantisation's error depends on |a| only).

    `scale = threshold / 127` (default threshold: `abs_values.max()`, per-tensor absmax),
    `q = clamp(round(a / scale), -127, 127)`, `e = q * scale - a`, in float64. Returns `rel_rmse`
    (sqrt(sum e^2 / sum a^2)), `sqnr_db` (10 log10(sum a^2 / sum e^2)), `rel_mae` (mean |e| / mean
    |a|) and `clip_rate` (share of |a| > threshold); None where undefined (all zeros, no error).

    >>> int8_error(torch.tensor([0.0, 1.0, 127.0]))["rel_rmse"]
    0.0
    """
    a = abs_values.detach().double().flatten()
    t = float(a.max()) if threshold is None else float(threshold)
    out = {"rel_rmse": None, "sqnr_db": None, "rel_mae": None, "clip_rate": 0.0}
    if a.numel() == 0 or t <= 0:
        return out
    scale = t / INT8_QMAX
    q = torch.round(a.clamp(max=t) / scale).clamp(max=INT8_QMAX)
    err = q * scale - a
    sum_sq, err_sq = float((a * a).sum()), float((err * err).sum())
    out["clip_rate"] = float((a > t).double().mean())
    if sum_sq > 0:
        out["rel_rmse"] = math.sqrt(err_sq / sum_sq)
        out["rel_mae"] = float(err.abs().mean() / a.mean())
        out["sqnr_db"] = 10 * math.log10(sum_sq / err_sq) if err_sq > 0 else None
    return out


def _median(a: Tensor) -> float:
    """The median of a flat tensor (the mean of the two middle values for an even count, as numpy)."""
    n = a.numel()
    if n % 2:
        return float(a.kthvalue((n + 1) // 2).values)
    return 0.5 * (float(a.kthvalue(n // 2).values) + float(a.kthvalue(n // 2 + 1).values))


class _Acc:
    """Running maxima of one hook: every |a| (for the median and the INT8 check) and the top k."""

    def __init__(self, k: int):
        self.k, self.chunks, self.top, self.width = k, [], [], 0  # top: (|a|, a, sample, pos, channel)

    def add(self, x: Tensor, sample: Tensor, pos: Tensor) -> None:
        """`x` `[rows, channel]`; `sample` / `pos` `[rows]`, the prompt and position of each row."""
        if x.numel() == 0:
            return
        self.width = x.shape[1]
        flat = x.flatten()
        a = flat.abs()
        self.chunks.append(a)
        vals, idx = a.topk(min(self.k, a.numel()))
        w = x.shape[1]
        for v, i in zip(vals.tolist(), idx.tolist()):
            r = i // w
            self.top.append((v, float(flat[i]), int(sample[r]), int(pos[r]), i % w))
        self.top = sorted(self.top, key=lambda e: -e[0])[: self.k]


def activation_atlas(
    model,
    prompts,
    *,
    kinds=None,
    top_k: int = 5,
    batch_size: int | None = None,
    prepend_bos: bool | None = None,
    progress=False,
) -> AtlasResult:
    """The activation-maxima atlas of `model` on `prompts` (see the module docstring).

    Args:
        model: a TransformerLens model (`HookedTransformer`, `TransformerBridge`, MoE or dense).
        prompts: a string, a list of strings, or token ids `[batch, pos]`.
        kinds: the hook kinds to read (default all of `KINDS`).
        top_k: how many of the largest |a| to keep per hook.
        batch_size: at most this many prompts per forward pass (prompts of one length share one).
        prepend_bos: passed to `model.to_tokens` for text prompts (default: the model's).
        progress: True for a progress bar, or a callable `(done, total)`.

    Every |a| of every hook is kept (on the CPU, float32) until the medians and INT8 errors are
    computed: memory is 4 bytes x the entries of all hooks, so calibrate on tens of prompts.

    Returns:
        `AtlasResult`: one row per hook (`hooks`), the skipped hooks and why, the INT8 correlation.
    """
    kinds = check_kinds(kinds)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise LenslabError(f"top_k must be a positive integer, got {top_k!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LenslabError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    batches = sinks.prompt_batches(model, prompts, prepend_bos)
    rows = [r for b in batches for r in b]
    hooks, skipped = atlas_hooks(model, kinds)
    if not hooks:
        raise LenslabError(
            f"none of the kinds {kinds} has a hook on this model: "
            + "; ".join(f"{s['hook']}: {s['reason']}" for s in skipped)
        )
    names = {h.hook for h in hooks} | {h.index_hook for h in hooks if h.index_hook}
    accs = {h.hook: _Acc(top_k) for h in hooks}
    chunks = list(length_batches(rows, batch_size))
    report = progress_reporter(progress, len(chunks), "activation atlas")
    for idx in chunks:
        toks = torch.stack([rows[i] for i in idx])
        b, p = toks.shape
        ids = torch.tensor(idx)
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        every = torch.arange(b * p)
        for h in hooks:
            x = cache[h.hook].detach().float().cpu()
            if h.layout == "routed":
                chosen = cache[h.index_hook].detach().cpu().reshape(b * p, -1)
                _, tok = torch.where((chosen == h.expert).T)  # TransformerLens's MoE visits them in this order
                x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
                if x.shape[0] != tok.numel():
                    raise LenslabError(
                        f"{h.hook}: {x.shape[0]} rows but {tok.numel()} tokens routed to expert {h.expert}"
                    )
            else:
                x, tok = x.reshape(b * p, math.prod(x.shape[2 if h.layout == "bpd" else 1 :])), every
            accs[h.hook].add(x, ids[tok // p], tok % p)
        report()
    report(close=True)
    token_of = lambda s, p: sinks.str_tokens(model, rows[s][p : p + 1])[0]
    measured = []
    for h in hooks:
        acc = accs[h.hook]
        if not acc.chunks:
            skipped.append(
                {"kind": h.kind, "hook": h.hook, "reason": "no entries on these prompts (expert never chosen)"}
            )
            continue
        a = torch.cat(acc.chunks)
        top = [
            {"abs": v, "value": val, "sample": s, "pos": p, "token": token_of(s, p), "channel": c}
            for v, val, s, p, c in acc.top
        ]
        med = _median(a)
        q = int8_error(a)
        measured.append(
            {
                "hook": h.hook,
                "kind": h.kind,
                "layer": h.layer,
                "expert": h.expert,
                "width": acc.width,
                "n": int(a.numel()),
                "max_abs": top[0]["abs"],
                "value": top[0]["value"],
                "sample": top[0]["sample"],
                "pos": top[0]["pos"],
                "token": top[0]["token"],
                "channel": top[0]["channel"],
                "median_abs": med,
                "ratio": top[0]["abs"] / med if med > 0 else None,
                "int8_rel_rmse": q["rel_rmse"],
                "int8_sqnr_db": q["sqnr_db"],
                "int8_rel_mae": q["rel_mae"],
                "top": top,
            }
        )
    return AtlasResult(
        hooks=measured,
        skipped=skipped,
        correlation=correlation(measured),
        n_layers=int(model.cfg.n_layers),
        kinds=kinds,
        top_k=top_k,
        provenance=provenance(model, method="activation_atlas", **sinks.prompt_record(model, batches)),
    )


def correlation(hooks: list[dict], x: str = "max_abs", y: str = "int8_rel_rmse") -> dict:
    """Pearson and Spearman correlation of field `x` with field `y` across `hooks` (atlas rows);
    None where undefined (fewer than 3 hooks with both, or a constant field)."""
    from scipy import stats  # deferred: scipy loads only when an atlas is finished

    pairs = [(h[x], h[y]) for h in hooks if h.get(x) is not None and h.get(y) is not None]
    out = {"x": x, "y": y, "n_hooks": len(pairs), "pearson": None, "spearman": None}
    if len(pairs) < 3:
        return out
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return out
    out["pearson"] = float(stats.pearsonr(xs, ys).statistic)
    out["spearman"] = float(stats.spearmanr(xs, ys).statistic)
    return out


# --- the result -----------------------------------------------------------------------------------
ROW_FIELDS = (
    "hook",
    "kind",
    "layer",
    "expert",
    "width",
    "n",
    "max_abs",
    "value",
    "sample",
    "pos",
    "token",
    "channel",
    "median_abs",
    "ratio",
    "int8_rel_rmse",
    "int8_sqnr_db",
    "int8_rel_mae",
)


@dataclass(frozen=True, kw_only=True, eq=False)
class AtlasResult(Result):
    """The activation-maxima atlas of one model (`activation_atlas`).

    Attributes:
        hooks: one dict per measured hook: `hook`, `kind`, `layer` (None for the embeddings and
            the final norm), `expert`, `width` (channels), `n` (entries), `max_abs` and its signed
            `value`, `sample`, `pos`, `token`, `channel`; `median_abs`, `ratio` (max / median);
            `int8_rel_rmse`, `int8_sqnr_db`, `int8_rel_mae`; `top` (the `top_k` largest entries).
            None where a value is undefined (a median of 0, an INT8 error of 0).
        skipped: `{"kind", "hook", "reason"}` for each hook the model lacks.
        correlation: Pearson and Spearman of `max_abs` with `int8_rel_rmse` across the hooks.
        n_layers: the model's layers. kinds: the kinds asked for. top_k: entries kept per hook.
        provenance: model, prompts, versions, time.
    """

    KIND = "AtlasResult"
    hooks: list[dict]
    skipped: list[dict] = field(default_factory=list)
    correlation: dict = field(default_factory=dict)
    n_layers: int = 0
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    top_k: int = 5
    provenance: dict = field(default_factory=dict)

    def hook(self, name: str) -> dict:
        """The row of hook `name`."""
        for h in self.hooks:
            if h["hook"] == name:
                return h
        raise LenslabError(f"hook {name!r} is not in this atlas{did_you_mean(name, [h['hook'] for h in self.hooks])}")

    def global_max(self, kinds=STREAM_KINDS) -> dict:
        """The row with the largest `max_abs` among the hooks of `kinds` (default the stream kinds,
        as the paper's global maximum)."""
        rows = [h for h in self.hooks if h["kind"] in set(check_kinds(kinds))]
        if not rows:
            raise LenslabError(f"this atlas measured no hook of the kinds {list(kinds)}")
        return max(rows, key=lambda h: h["max_abs"])

    def layer_max(self, kind: str) -> dict[int | None, float]:
        """`{layer: max_abs}` of one kind (the largest over a layer's experts for the expert kinds)."""
        check_kinds([kind])
        out: dict[int | None, float] = {}
        for h in self.hooks:
            if h["kind"] == kind:
                out[h["layer"]] = max(out.get(h["layer"], 0.0), h["max_abs"])
        return out

    def table(self):
        """One row per hook: the fields of `hooks` but `top`."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame([{k: h[k] for k in ROW_FIELDS} for h in self.hooks], columns=list(ROW_FIELDS))

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "hooks": self.hooks,
            "skipped": self.skipped,
            "correlation": self.correlation,
            "n_layers": self.n_layers,
            "kinds": list(self.kinds),
            "top_k": self.top_k,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AtlasResult:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        return cls(
            hooks=[dict(h) for h in d["hooks"]],
            skipped=[dict(s) for s in d.get("skipped", [])],
            correlation=dict(d.get("correlation") or {}),
            n_layers=int(d.get("n_layers", 0)),
            kinds=list(d.get("kinds", KINDS)),
            top_k=int(d.get("top_k", 5)),
            provenance=d.get("provenance") or {},
        )

    # figures
    def depth(self, h: dict) -> int:
        """Where a hook sits on the layer axis: -1 for the embeddings, its layer, `n_layers` for the
        final residual stream and the final norm (the residual state after the last block)."""
        if h["kind"] in ("embed", "pos_embed"):
            return -1
        if h["kind"] in ("resid_post", "ln_final"):
            return self.n_layers
        return int(h["layer"])

    def depth_labels(self) -> tuple[list[int], list[str]]:
        """Tick positions and labels of the layer axis: `input`, `L0` ... and `final`."""
        ticks = list(range(-1, self.n_layers + 1))
        return ticks, [labels.INPUT] + [labels.layer(l) for l in range(self.n_layers)] + ["final"]

    def series(self, kind: str) -> tuple[list[int], list[float], list[str]]:
        """`(depths, max_abs, hooks)` of one kind along the layer axis ("stream": at each depth the
        largest over the stream kinds), the experts of a layer merged by their maximum."""
        keep = set(STREAM_KINDS) if kind == "stream" else {check_kinds([kind])[0]}
        best: dict[int, tuple[float, str]] = {}
        for h in self.hooks:
            if h["kind"] in keep:
                d = self.depth(h)
                if d not in best or h["max_abs"] > best[d][0]:
                    best[d] = (h["max_abs"], h["hook"])
        ds = sorted(best)
        return ds, [best[d][0] for d in ds], [best[d][1] for d in ds]

    def figure(self, view: str = "layers", *, kinds=STREAM_KINDS, n: int = 24):
        """`view="layers"`: max |a| by layer, one line per hook kind (log scale); `"top"`: the `n`
        largest entries of the hooks of `kinds` (default the stream kinds, whose channels are the
        residual dimensions), token x channel; `"int8"`: each hook's INT8 relative RMSE against its
        max |a|."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        model = self.provenance.get("model", "?")
        if view == "layers":
            fig = go.Figure()
            present = [k for k in KINDS if any(h["kind"] == k for h in self.hooks)]
            for k in present:
                xs, ys, hs = self.series(k)
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        name=k,
                        mode="lines+markers",
                        text=hs,
                        hovertemplate="%{text}<br>max |a| %{y:.4g}<extra>" + k + "</extra>",
                        line=dict(dash="solid" if KINDS[k].stream else "dot"),
                    )
                )
            ticks, text = self.depth_labels()
            fig.update_layout(
                xaxis=dict(title="layer", tickvals=ticks, ticktext=text),
                yaxis=dict(title="max |a|", type="log"),
                height=420,
            )
            g = self.global_max() if any(h["kind"] in STREAM_KINDS for h in self.hooks) else None
            where = (
                f" · max |a| {g['max_abs']:.4g} at {g['hook']} ({g['token']!r}, channel {g['channel']})" if g else ""
            )
            return figures.style(fig, f"Activation atlas · model {model}{where}")
        if view == "top":
            return self._top_figure(set(check_kinds(kinds)), n)
        if view == "int8":
            fig = go.Figure()
            for k in KINDS:
                rows = [h for h in self.hooks if h["kind"] == k and h["int8_rel_rmse"] is not None]
                if rows:
                    fig.add_trace(
                        go.Scatter(
                            x=[h["max_abs"] for h in rows],
                            y=[h["int8_rel_rmse"] for h in rows],
                            text=[h["hook"] for h in rows],
                            name=k,
                            mode="markers",
                            hovertemplate="%{text}<br>max |a| %{x:.4g}<br>rel. RMSE %{y:.3g}<extra></extra>",
                        )
                    )
            fig.update_layout(xaxis=dict(title="max |a|", type="log"), yaxis_title="INT8 relative RMSE", height=420)
            c = self.correlation
            r = lambda v: "n/a" if v is None else f"{v:.3f}"
            return figures.style(
                fig,
                f"INT8 absmax error vs max |a| · model {model} · Pearson {r(c.get('pearson'))}, "
                f"Spearman {r(c.get('spearman'))} over {c.get('n_hooks', 0)} hooks",
            )
        raise LenslabError(f"view {view!r} is not one of 'layers', 'top', 'int8'")

    def top_entries(self, kinds=STREAM_KINDS, n: int = 24) -> list[dict]:
        """The `n` largest of the kept entries of the hooks of `kinds`, one per (sample, position,
        channel) (the hook where it is largest), largest first; each with its `hook`."""
        keep = set(check_kinds(kinds))
        best: dict[tuple, dict] = {}
        for h in self.hooks:
            if h["kind"] not in keep:
                continue
            for e in h["top"]:
                key = (e["sample"], e["pos"], e["channel"])
                if key not in best or e["abs"] > best[key]["abs"]:
                    best[key] = {**e, "hook": h["hook"]}
        return sorted(best.values(), key=lambda e: -e["abs"])[:n]

    def _top_figure(self, keep: set[str], n: int):
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        entries = self.top_entries(keep, n)
        if not entries:
            raise LenslabError(f"this atlas has no entries of the kinds {sorted(keep)}")
        rows = sorted({(e["sample"], e["pos"], e["token"]) for e in entries})
        cols = sorted({e["channel"] for e in entries})
        ri = {r: i for i, r in enumerate(rows)}
        ci = {c: i for i, c in enumerate(cols)}
        z = [[None] * len(cols) for _ in rows]
        text = [[""] * len(cols) for _ in rows]
        for e in entries:
            i, j = ri[(e["sample"], e["pos"], e["token"])], ci[e["channel"]]
            z[i][j], text[i][j] = e["abs"], f"{e['hook']}<br>a = {e['value']:.4g}"
        fig = go.Figure(
            go.Heatmap(
                z=z,
                x=[f"c{c}" for c in cols],
                y=[f"s{s} {p}:{t}" for s, p, t in rows],
                text=text,
                colorscale="Reds",
                colorbar=dict(title="|a|"),
                hovertemplate="%{y} · %{x}<br>%{text}<br>|a| %{z:.4g}<extra></extra>",
            )
        )
        fig.update_layout(
            xaxis=dict(title="channel", type="category"),
            yaxis=dict(title="sample, position: token", type="category", autorange="reversed"),
            height=max(320, 28 * len(rows) + 160),
        )
        return figures.style(
            fig,
            f"Largest activations, token x channel · model {self.provenance.get('model', '?')} · top {len(entries)}",
        )

    @classmethod
    def compare(cls, results, kind: str = "stream", *, relative_depth: bool = False):
        """Several atlases on one plot: max |a| by layer of `kind` ("stream": the largest over the
        stream kinds at each depth), one line per model; `relative_depth=True` puts depth / n_layers
        on the x axis, for models of different depths."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        results = list(results)
        if not results or not all(isinstance(r, cls) for r in results):
            raise LenslabError("compare needs a non-empty list of AtlasResult")
        fig = go.Figure()
        for r in results:
            xs, ys, hs = r.series(kind)
            if relative_depth:
                xs = [x / max(1, r.n_layers) for x in xs]
            name = r.provenance.get("model", "model")
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    name=name,
                    mode="lines+markers",
                    text=hs,
                    hovertemplate="%{text}<br>max |a| %{y:.4g}<extra>" + name + "</extra>",
                )
            )
        xaxis = dict(
            title="depth / n_layers (-1/n: embeddings, 1: final)" if relative_depth else "layer (-1: embeddings)"
        )
        fig.update_layout(xaxis=xaxis, yaxis=dict(title="max |a|", type="log"), height=420)
        return figures.style(fig, f"Activation atlas · max |a| by layer ({kind}) · {len(results)} models")
