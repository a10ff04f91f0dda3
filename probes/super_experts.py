"""Super experts: the few MoE experts whose down-projection outputs create the massive activations.

Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models" (arXiv
2507.23279; code ZunhaiSu/Super-Experts-Profilling, `eval_utils.py`), in four steps:

1. `profile_experts`: over calibration prompts, per (MoE layer, expert) the maximum |output| of
   the expert's down-projection (the authors' forward hook on every `down_proj` / `w2`, max over
   calls of max |output|), its residual channel, the token it came from, and the max |input|.
   Routed experts see only the tokens routed to them; the output is taken before the gate weight
   multiplies it. A shared expert (Qwen2-MoE) is a column of its own, expert id -1 (as in the
   authors' `--prune_experts "layer,-1"`).
2. `ExpertProfile.super_experts(rule="su")`: among the layers l < round(0.75 n_layers)
   (`include_layers`), the experts with output_max > P99.5 of all output_max and > floor(max / 10)
   (`_identify_super_experts`); the authors' other rules are "p99.5", "mean+3std" and "50xmean".
3. `prune_experts`: a context manager that zeroes the experts' down-projection weights and
   restores them on exit; the router is unchanged, so a pruned expert is still chosen and adds 0.
4. `ablate_super_experts`: loss, massive activations (`sinks.massive_activations`) and attention
   sinks (`sinks.attention_sinks`) before and after pruning the super experts, against pruning as
   many random non-super experts, several draws.

Models: `HookedTransformer` MoE (Mixtral, OLMoE; TransformerLens `MoE`): the hook
`blocks.{l}.mlp.experts.{e}.hook_post` is the down-projection input, the output is
`hook_post @ W_out.T`, and `blocks.{l}.mlp.hook_expert_indices` says which tokens the rows are.
`TransformerBridge` MoE (Qwen2-MoE, Qwen3-MoE): a torch forward hook on the Hugging Face experts
module (fused 3-D weights `gate_up_proj` / `down_proj`) recomputes each expert's down-projection
for the tokens routed to it; the shared expert's `down_proj` is hooked directly.

>>> from lenslab.zoo import planted
>>> model = planted.planted_moe_model()
>>> profile = profile_experts(model, planted.planted_tokens())
>>> profile.super_experts().experts
[(0, 2)]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lenslab import figures, labels
from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes import routers, sinks
from lenslab.results import JsonResult, provenance
from lenslab.toolbox import model_name

__all__ = [
    "RULES",
    "SHARED",
    "ExpertProfile",
    "SuperExpertAblation",
    "SuperExperts",
    "ablate_super_experts",
    "profile_experts",
    "prune_experts",
    "super_experts",
]

SHARED = labels.SHARED
"""Expert id of a layer's shared expert (Qwen2-MoE), as in Su et al.'s `--prune_experts`."""
RULES = ("su", "p99.5", "mean+3std", "50xmean")
"""Super-expert rules: "su" (> P99.5 and > floor(max / 10), the paper's), "p99.5" (> P99.5),
"mean+3std" (> mean + 3 std), "50xmean" (> 50 x mean); all over output_max of the included layers."""
DEFAULT_INCLUDE_LAYERS = 0.75


# --- where the experts are ---------------------------------------------------------------------
def _unwrap(module):
    """The module that owns the weights behind a TransformerBridge wrapper (or `module` itself)."""
    while isinstance(getattr(module, "original_component", None), nn.Module):
        module = module.original_component
    return module


@dataclass
class _Site:
    """One MoE layer: the module holding its experts and, if any, its shared expert's down_proj."""

    layer: int
    kind: str  # "hooked": a TransformerLens MoE; "fused": HF experts with 3-D gate_up_proj / down_proj
    n_experts: int
    experts: nn.Module
    shared: nn.Linear | None = None

    @property
    def ids(self) -> list[int]:
        return list(range(self.n_experts)) + ([SHARED] if self.shared is not None else [])

    def down(self, expert: int) -> list[Tensor]:
        """The tensors (views) holding `expert`'s down-projection: weight, and bias where there is one."""
        if expert == SHARED:
            return [self.shared.weight.data] + ([self.shared.bias.data] if self.shared.bias is not None else [])
        if self.kind == "hooked":
            lin = self.experts.experts[expert].W_out
            return [lin.weight.data] + ([lin.bias.data] if lin.bias is not None else [])
        out = [self.experts.down_proj.data[expert]]
        bias = getattr(self.experts, "down_proj_bias", None)
        return out + ([bias.data[expert]] if isinstance(bias, Tensor) else [])


def _sites(model) -> list[_Site]:
    """Every MoE layer of `model`; a `LenslabError` on a dense model."""
    if not routers.has_moe(model):
        raise LenslabError(
            f"super experts need an MoE model (routed experts, each with its own down-projection, such as "
            f"Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE); {model_name(model)!r} is dense. Load an MoE checkpoint, "
            "or use sinks.massive_activations / sinks.attention_sinks, which work on any model"
        )
    out = []
    for m in routers.moe_layers(model):
        if m.kind == "hooked":
            out.append(_Site(m.layer, "hooked", m.n_experts, model.blocks[m.layer].mlp))
            continue
        block = _unwrap(model.blocks[m.layer].mlp)
        experts = _unwrap(getattr(block, "experts", None))
        down, gate_up = getattr(experts, "down_proj", None), getattr(experts, "gate_up_proj", None)
        if (
            not (isinstance(down, Tensor) and down.ndim == 3 and isinstance(gate_up, Tensor) and gate_up.ndim == 3)
            or not getattr(experts, "has_gate", True)
            or getattr(experts, "has_post_expert_norm", False)
        ):
            raise LenslabError(
                f"layer {m.layer}: the experts are a {type(experts).__name__}; super-expert profiling reads fused "
                "expert weights (3-D gate_up_proj and down_proj, transformers >= 5, as in Qwen2-MoE / Qwen3-MoE)"
            )
        shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        shared_down = _unwrap(getattr(_unwrap(shared), "down_proj", None)) if shared is not None else None
        if shared is not None and not isinstance(shared_down, nn.Linear):
            raise LenslabError(f"layer {m.layer}: the shared expert has no nn.Linear down_proj to profile")
        out.append(_Site(m.layer, "fused", int(down.shape[0]), experts, shared_down))
    return out


def _select(model, sites: list[_Site], layers) -> list[_Site]:
    if layers is None:
        return sites
    layers = [layers] if isinstance(layers, int) else list(layers)
    n = model.cfg.n_layers
    bad = [l for l in layers if not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < n]
    if bad or not layers:
        raise LenslabError(f"layer(s) {bad or layers} out of range: this model has layers 0..{n - 1}")
    by = {s.layer: s for s in sites}
    for l in layers:
        if l not in by:
            raise LenslabError(f"layer {l} is not a MoE layer of this model; MoE layers: {sorted(by)}")
    return [by[l] for l in sorted(set(layers))]


def _include(include_layers) -> float:
    if (
        isinstance(include_layers, bool)
        or not isinstance(include_layers, (int, float))
        or not 0 < float(include_layers) <= 1
    ):
        raise LenslabError(
            f"include_layers {include_layers!r} must lie in (0, 1]: the share of layers, from the "
            "first, whose experts can be super experts (Su et al.: 0.75)"
        )
    return float(include_layers)


def _check_experts(sites: list[_Site], experts) -> list[tuple[int, int]]:
    """(layer, expert) pairs (or a `SuperExperts`, or "L:E, ..." text) -> validated int pairs, in
    order, unique (`routers.check_experts`, with the layers' shared experts as id -1)."""
    if isinstance(experts, SuperExperts):
        experts = experts.experts
    shared = [s.layer for s in sites if s.shared is not None]
    return routers.check_experts(None, experts, layers=sites, shared_layers=shared)


# --- profiling -------------------------------------------------------------------------------
class _Stats:
    """Running maxima per (profiled layer, expert column)."""

    def __init__(self, sites: list[_Site]):
        self.sites = sites
        self.cols = max(len(s.ids) for s in sites)
        shape = (len(sites), self.cols)
        self.out_max = torch.full(shape, -math.inf, dtype=torch.float64)
        self.in_max = torch.zeros(shape, dtype=torch.float64)
        self.channel = torch.full(shape, -1, dtype=torch.long)
        self.pos = torch.full(shape, -1, dtype=torch.long)
        self.sample = torch.full(shape, -1, dtype=torch.long)
        self.tokens = torch.zeros(shape, dtype=torch.long)
        self.offset, self.seq_len = 0, 1

    def record(self, row: int, expert: int, inp: Tensor, out: Tensor, tok: Tensor) -> None:
        """`inp` `[n, d_mlp]` / `out` `[n, d_model]` of one down-projection call on the flat tokens `tok` `[n]`."""
        if out.shape[0] == 0:
            return
        col = self.n_experts_of(row) if expert == SHARED else expert
        a = out.detach().abs().double().reshape(out.shape[0], -1)
        per_tok, chan = a.max(dim=1)
        j = int(per_tok.argmax())
        if float(per_tok[j]) > float(self.out_max[row, col]):
            self.out_max[row, col] = per_tok[j]
            self.channel[row, col] = chan[j]
            t = int(tok[j])
            self.sample[row, col] = self.offset + t // self.seq_len
            self.pos[row, col] = t % self.seq_len
        self.in_max[row, col] = max(float(self.in_max[row, col]), float(inp.detach().abs().max()))
        self.tokens[row, col] += out.shape[0]

    def n_experts_of(self, row: int) -> int:
        return self.sites[row].n_experts


def _expert_forward(experts: nn.Module, x: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """HF fused experts: expert `e` on tokens `x` `[n, d_model]` -> (down_proj input `[n, d_mlp]`, output `[n, d_model]`)."""
    transposed = bool(getattr(experts, "is_transposed", False))
    w = experts.gate_up_proj[e]
    gate_up = x @ w if transposed else F.linear(x, w)
    bias = getattr(experts, "gate_up_proj_bias", None)
    if isinstance(bias, Tensor):
        gate_up = gate_up + bias[e]
    h = (
        experts._apply_gate(gate_up)
        if hasattr(experts, "_apply_gate")
        else experts.act_fn(gate_up.chunk(2, dim=-1)[0]) * gate_up.chunk(2, dim=-1)[1]
    )
    w = experts.down_proj[e]
    out = h @ w if transposed else F.linear(h, w)
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, Tensor):
        out = out + bias[e]
    return h, out


def _arg(args: tuple, kwargs: dict, i: int, *names: str):
    if len(args) > i:
        return args[i]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    raise LenslabError(f"the experts module was called without its argument {names[0]!r}; cannot profile it")


def _profile_batch(model, sites: list[_Site], stats: _Stats, toks: Tensor) -> None:
    fwd_hooks, handles, idx_of = [], [], {}
    for row, site in enumerate(sites):
        if site.kind == "hooked":

            def grab(t, hook, row=row):
                idx_of[row] = t.detach()
                return t

            fwd_hooks.append((f"blocks.{site.layer}.mlp.hook_expert_indices", grab))
            for e in range(site.n_experts):
                w_out = site.experts.experts[e].W_out

                def post(t, hook, row=row, e=e, w_out=w_out):
                    if t.shape[0]:
                        _, tok = torch.where(idx_of[row].T == e)  # rows in the order MoE.forward gathers them
                        if tok.shape[0] != t.shape[0]:
                            raise LenslabError(
                                f"layer {sites[row].layer} expert {e}: {t.shape[0]} rows but "
                                f"{tok.shape[0]} routed tokens; cannot attribute the rows"
                            )
                        stats.record(row, e, t, F.linear(t, w_out.weight, w_out.bias), tok)
                    return t

                fwd_hooks.append((f"blocks.{site.layer}.mlp.experts.{e}.hook_post", post))
        else:

            def fused(module, args, kwargs, output, row=row, site=site):
                hidden = _arg(args, kwargs, 0, "hidden_states")
                index = _arg(args, kwargs, 1, "top_k_index", "router_indices", "selected_experts")
                hidden = hidden.reshape(-1, hidden.shape[-1])
                index = index.reshape(hidden.shape[0], -1)
                with torch.no_grad():
                    for e in range(site.n_experts):
                        tok, _ = torch.where(index == e)
                        if tok.numel():
                            h, out = _expert_forward(module, hidden[tok], e)
                            stats.record(row, e, h, out, tok)

            handles.append(site.experts.register_forward_hook(fused, with_kwargs=True))
            if site.shared is not None:

                def shared(module, args, output, row=row):
                    inp = args[0].reshape(-1, args[0].shape[-1])
                    out = output.reshape(-1, output.shape[-1])
                    stats.record(row, SHARED, inp, out, torch.arange(out.shape[0]))

                handles.append(site.shared.register_forward_hook(shared))
    stats.seq_len = toks.shape[1]
    try:
        with torch.no_grad():
            if fwd_hooks:
                model.run_with_hooks(toks, return_type=None, fwd_hooks=fwd_hooks)
            else:
                model(toks)
    finally:
        for h in handles:
            h.remove()
    stats.offset += toks.shape[0]


def profile_experts(
    model, prompts, *, layers=None, include_layers: float = DEFAULT_INCLUDE_LAYERS, prepend_bos: bool | None = None
) -> ExpertProfile:
    """Per (MoE layer, expert) the maximum |down-projection output| over the prompts (Su et al. 2025).

    Args:
        model: a lenslab MoE model: `HookedTransformer` (Mixtral, OLMoE) or `TransformerBridge`
            (Qwen2-MoE, Qwen3-MoE).
        prompts: a string, a list of strings, or token ids `[batch, pos]` (the calibration corpus;
            Su et al. use 256 windows of 2048 C4 tokens).
        layers: MoE layers (block indices) to profile (default all).
        include_layers: the share of layers, from the first, whose experts the rules consider:
            layers l < round(include_layers x n_layers) (Su et al.: 0.75). All `layers` are
            profiled and shown either way.
        prepend_bos: passed to `model.to_tokens` for text prompts.

    Returns:
        `ExpertProfile` with `output_max`, `input_max`, `channel`, `pos`, `sample`, `tokens`
        `[layer, expert]` (a last column for the shared expert, if any), `kurtosis()`, `table()`,
        `figure()` and `super_experts(rule)`.

    >>> from lenslab.zoo import planted
    >>> p = profile_experts(planted.planted_moe_model(), planted.planted_tokens())
    >>> round(float(p.output_max[0, 2]), 2), int(p.channel[0, 2]), int(p.pos[0, 2])
    (999.95, 7, 0)
    """
    sites = _select(model, _sites(model), layers)
    include_layers = _include(include_layers)
    batches = sinks.prompt_batches(model, prompts, prepend_bos)
    if len({s.n_experts for s in sites}) != 1:
        raise LenslabError(
            f"MoE layers differ in expert count {sorted({s.n_experts for s in sites})}; not supported yet"
        )
    stats = _Stats(sites)
    for toks in batches:
        _profile_batch(model, sites, stats, toks)
    seen = stats.tokens > 0
    out_max = torch.where(seen, stats.out_max, torch.zeros_like(stats.out_max)).float()
    tokens_of = [t for b in batches for t in b.cpu()]
    token_labels = [
        [sinks.str_tokens(model, tokens_of[s][p : p + 1])[0] if s >= 0 else "" for s, p in zip(srow, prow)]
        for srow, prow in zip(stats.sample.tolist(), stats.pos.tolist())
    ]
    return ExpertProfile(
        output_max=out_max,
        input_max=stats.in_max.float(),
        channel=stats.channel,
        pos=stats.pos,
        sample=stats.sample,
        tokens=stats.tokens,
        token_labels=token_labels,
        layers=[s.layer for s in sites],
        n_experts=sites[0].n_experts,
        shared=any(s.shared is not None for s in sites),
        n_layers=model.cfg.n_layers,
        include_layers=include_layers,
        provenance=provenance(
            model, method="profile_experts", include_layers=include_layers, **sinks.prompt_record(model, batches)
        ),
    )


# --- results ---------------------------------------------------------------------------------
def _t(x: Tensor) -> list:
    return x.detach().cpu().tolist()


def _kurtosis(x: Tensor) -> float:
    """Excess (Fisher) kurtosis with the biased moments, as scipy.stats.kurtosis's default; nan when flat."""
    x = x.double()
    if x.numel() < 2:
        return math.nan
    d = x - x.mean()
    m2, m4 = float((d**2).mean()), float((d**4).mean())
    return m4 / m2**2 - 3.0 if m2 > 0 else math.nan


def _nan_none(v: float):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


@dataclass(frozen=True, kw_only=True, eq=False)
class ExpertProfile(JsonResult):
    """Down-projection statistics per (MoE layer, expert) over a calibration corpus.

    Column e < n_experts is routed expert e; with `shared`, the last column is the layer's shared
    expert (expert id -1). An expert no token was routed to has `tokens` 0, output_max 0 and
    channel / pos / sample -1, and takes no part in the rules.

    Attributes:
        output_max: `[layer, expert]` max |down_proj output| over every token routed to it.
        input_max: `[layer, expert]` max |down_proj input|.
        channel: `[layer, expert]` the residual dimension of output_max.
        pos / sample: `[layer, expert]` the token position and sample index of output_max.
        tokens: `[layer, expert]` tokens routed to the expert.
        token_labels: the token string at (sample, pos) of each output_max.
        layers: block index of each row; n_experts: routed experts per layer; shared: whether
            there is a shared-expert column; n_layers: the model's layer count.
        include_layers: rows with layer < round(include_layers x n_layers) enter the rules.
        provenance: model, prompts, versions, time.
    """

    KIND = "ExpertProfile"
    output_max: Tensor
    input_max: Tensor
    channel: Tensor
    pos: Tensor
    sample: Tensor
    tokens: Tensor
    token_labels: list[list[str]]
    layers: list[int]
    n_experts: int
    shared: bool = False
    n_layers: int = 0
    include_layers: float = DEFAULT_INCLUDE_LAYERS
    provenance: dict = field(default_factory=dict)

    @property
    def expert_ids(self) -> list[int]:
        """Expert id of each column (-1: the shared expert)."""
        return list(range(self.n_experts)) + ([SHARED] if self.shared else [])

    @property
    def expert_labels(self) -> list[str]:
        return [f"e{e}" if e != SHARED else "shared" for e in self.expert_ids]

    @property
    def cutoff(self) -> int:
        """Layers below this block index enter the rules (Su et al.: round(0.75 n_layers))."""
        return round(self.n_layers * self.include_layers)

    @property
    def included(self) -> Tensor:
        """`[layer]` bool: the rows the rules consider."""
        return torch.tensor([l < self.cutoff for l in self.layers], dtype=torch.bool)

    def col(self, expert: int) -> int:
        """The column of expert id `expert` (-1: the shared expert)."""
        ids = self.expert_ids
        if expert not in ids:
            raise LenslabError(
                f"expert {expert} is not in this profile: experts 0..{self.n_experts - 1}"
                + (" and -1 (shared)" if self.shared else "")
            )
        return ids.index(expert)

    def value(self, layer: int, expert: int) -> float:
        """output_max of one (layer, expert)."""
        if layer not in self.layers:
            raise LenslabError(f"layer {layer} is not in this profile; profiled MoE layers: {self.layers}")
        return float(self.output_max[self.layers.index(layer), self.col(expert)])

    def kurtosis(self, by: str = "layer") -> Tensor:
        """Excess kurtosis of output_max: per row over its experts (`by="layer"`, `[layer]`), or per
        expert over the included layers (`by="expert"`, `[expert]`), as Su et al. report; nan where flat."""
        seen = self.tokens > 0
        if by == "layer":
            return torch.tensor(
                [_kurtosis(self.output_max[i][seen[i]]) for i in range(len(self.layers))], dtype=torch.float64
            )
        if by == "expert":
            inc = self.included
            return torch.tensor(
                [_kurtosis(self.output_max[inc & seen[:, c], c]) for c in range(len(self.expert_ids))],
                dtype=torch.float64,
            )
        raise LenslabError(f"by {by!r} is not one of 'layer', 'expert'")

    def population(self) -> Tensor:
        """The output_max values the rules rank: included layers, experts that saw a token."""
        mask = self.included[:, None] & (self.tokens > 0)
        return self.output_max[mask]

    def super_experts(
        self, rule: str = "su", *, quantile: float = 99.5, times: float | None = None, std_multiplier: float = 3.0
    ) -> SuperExperts:
        """The super experts under `rule`, over output_max of the included layers (experts that saw a token).

        Rules (Su et al.'s `_identify_super_experts*`):
            "su": output_max > P_quantile (99.5) and > floor(max / times) (times 10);
            "p99.5": output_max > P_quantile; "mean+3std": > mean + std_multiplier x std (population std);
            "50xmean": > times (50) x mean. Percentiles interpolate linearly (numpy's default).
        With fewer than 200 values P99.5 lies between the two largest, so "su" and "p99.5" flag at
        most the single largest expert on a small model.
        """
        if rule not in RULES:
            raise LenslabError(f"rule {rule!r} is not one of {', '.join(RULES)}{did_you_mean(rule, RULES)}")
        if not 0 < quantile < 100:
            raise LenslabError(f"quantile {quantile!r} must lie strictly between 0 and 100 (Su et al.: 99.5)")
        times = (10.0 if rule == "su" else 50.0) if times is None else float(times)
        if times <= 0 or std_multiplier < 0:
            raise LenslabError("times must be positive and std_multiplier non-negative")
        v = self.population().double()
        if v.numel() == 0:
            raise LenslabError(
                f"no profiled layer lies below the include_layers cutoff (layer < {self.cutoff}, include_layers "
                f"{self.include_layers:g} of {self.n_layers} layers; profiled {self.layers}): raise include_layers "
                "or profile earlier layers"
            )
        thresholds: dict = {}
        if rule in ("su", "p99.5"):
            thresholds["percentile"] = float(torch.quantile(v, quantile / 100))
        if rule == "su":
            thresholds["floor_max_over_times"] = float(math.floor(float(v.max()) / times))
        if rule == "mean+3std":
            thresholds["mean_plus_std"] = float(v.mean() + std_multiplier * v.std(unbiased=False))
        if rule == "50xmean":
            thresholds["times_mean"] = float(times * v.mean())
        inc, seen = self.included, self.tokens > 0
        found = []
        for i, l in enumerate(self.layers):
            for c, e in enumerate(self.expert_ids):
                x = float(self.output_max[i, c])
                if inc[i] and seen[i, c] and all(x > t for t in thresholds.values()):
                    found.append((x, l, e))
        found.sort(key=lambda r: -r[0])
        params = {"quantile": quantile} if rule in ("su", "p99.5") else {}
        if rule in ("su", "50xmean"):
            params["times"] = times
        if rule == "mean+3std":
            params["std_multiplier"] = std_multiplier
        return SuperExperts(
            experts=[(l, e) for _, l, e in found],
            values=[x for x, _, _ in found],
            rule=rule,
            params=params,
            thresholds=thresholds,
            population=int(v.numel()),
            profile=self,
            provenance={**self.provenance, "method": f"super_experts:{rule}"},
        )

    def table(self, rule: str | None = "su"):
        """One row per (layer, expert) as a pandas DataFrame, largest output_max first, with a
        `super` column under `rule` (None: no column)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        marked = set(self.super_experts(rule).experts) if rule and bool(self.included.any()) else set()
        rows = []
        for i, l in enumerate(self.layers):
            for c, e in enumerate(self.expert_ids):
                rows.append(
                    {
                        "layer": l,
                        "expert": e,
                        "label": f"L{l}{self.expert_labels[c]}",
                        "output_max": float(self.output_max[i, c]),
                        "channel": int(self.channel[i, c]),
                        "pos": int(self.pos[i, c]),
                        "token": self.token_labels[i][c],
                        "sample": int(self.sample[i, c]),
                        "input_max": float(self.input_max[i, c]),
                        "tokens": int(self.tokens[i, c]),
                        "included": bool(self.included[i]),
                    }
                    | ({"super": (l, e) in marked} if rule else {})
                )
        return pd.DataFrame(rows).sort_values("output_max", ascending=False, kind="stable").reset_index(drop=True)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "output_max": _t(self.output_max),
            "input_max": _t(self.input_max),
            "channel": _t(self.channel),
            "pos": _t(self.pos),
            "sample": _t(self.sample),
            "tokens": _t(self.tokens),
            "token_labels": self.token_labels,
            "layers": list(self.layers),
            "n_experts": self.n_experts,
            "shared": self.shared,
            "n_layers": self.n_layers,
            "include_layers": self.include_layers,
            "cutoff": self.cutoff,
            "kurtosis_by_layer": [_nan_none(float(k)) for k in self.kurtosis("layer")],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ExpertProfile:
        long = lambda x: torch.tensor(x, dtype=torch.long)
        return cls(
            output_max=torch.tensor(d["output_max"], dtype=torch.float32),
            input_max=torch.tensor(d["input_max"], dtype=torch.float32),
            channel=long(d["channel"]),
            pos=long(d["pos"]),
            sample=long(d["sample"]),
            tokens=long(d["tokens"]),
            token_labels=[list(r) for r in d["token_labels"]],
            layers=list(d["layers"]),
            n_experts=d["n_experts"],
            shared=bool(d.get("shared", False)),
            n_layers=d["n_layers"],
            include_layers=d.get("include_layers", DEFAULT_INCLUDE_LAYERS),
            provenance=d.get("provenance") or {},
        )

    def figure(self, marked: list[tuple[int, int]] | None = None, title: str | None = None):
        """Layer x expert heatmap of log10 output_max (hover: the value, channel, token); `marked`
        (default: the "su" super experts) are boxed; rows past the include cutoff say "excluded"."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        if marked is None:
            marked = self.super_experts("su").experts if bool(self.included.any()) else []
        z = torch.log10(self.output_max.clamp_min(1e-6))
        ylab = [f"L{l}" + ("" if inc else " (excluded)") for l, inc in zip(self.layers, self.included.tolist())]
        text = [
            [
                f"{float(self.output_max[i, c]):.4g}<br>dim {int(self.channel[i, c])} · pos {int(self.pos[i, c])} "
                f"({self.token_labels[i][c]!r}) · {int(self.tokens[i, c])} tokens"
                for c in range(len(self.expert_ids))
            ]
            for i in range(len(self.layers))
        ]
        fig = go.Figure(
            go.Heatmap(
                z=_t(z),
                x=self.expert_labels,
                y=ylab,
                text=text,
                colorscale="Viridis",
                colorbar=dict(title="log10 max |out|"),
                hovertemplate="%{y} %{x}<br>max |down_proj out| = %{text}<extra></extra>",
            )
        )
        for l, e in marked:
            if l in self.layers:
                fig.add_shape(
                    type="rect",
                    xref="x",
                    yref="y",
                    line=dict(color="#c0392b", width=3),
                    x0=self.col(e) - 0.5,
                    x1=self.col(e) + 0.5,
                    y0=self.layers.index(l) - 0.5,
                    y1=self.layers.index(l) + 0.5,
                )
                fig.add_annotation(
                    x=self.expert_labels[self.col(e)],
                    y=ylab[self.layers.index(l)],
                    text="SE",
                    showarrow=False,
                    font=dict(color="white", size=12),
                )
        fig.update_layout(
            xaxis_title="expert",
            yaxis_title="MoE layer",
            yaxis_autorange="reversed",
            height=max(320, 40 * len(self.layers) + 180),
        )
        se = ", ".join(labels.expert(l, e) for l, e in marked) or "none"
        return figures.style(
            fig,
            title or f"Expert down_proj max |output| · model {self.provenance.get('model', '?')} · super experts {se}",
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class SuperExperts(JsonResult):
    """The super experts of a profile under one rule.

    Attributes:
        experts: (layer, expert) pairs, largest output_max first (expert -1: a shared expert).
        values: their output_max.
        rule / params: the rule and its parameters (quantile, times, std_multiplier).
        thresholds: the bars an expert had to pass (e.g. percentile and floor_max_over_times).
        population: how many output_max values the rule ranked.
        profile: the `ExpertProfile`.
        provenance: model, prompts, versions, time.
    """

    KIND = "SuperExperts"
    experts: list[tuple[int, int]]
    values: list[float]
    rule: str
    params: dict
    thresholds: dict
    population: int
    profile: ExpertProfile
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def labels(self) -> list[str]:
        """ "L{layer}e{expert}" (or "L{layer}shared") per super expert."""
        return [labels.expert(l, e) for l, e in self.experts]

    def table(self):
        """The super experts as a pandas DataFrame (rank, layer, expert, output_max, channel, pos, token, input_max)."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        p = self.profile
        rows = []
        for r, ((l, e), v) in enumerate(zip(self.experts, self.values), 1):
            i, c = p.layers.index(l), p.col(e)
            rows.append(
                {
                    "rank": r,
                    "layer": l,
                    "expert": e,
                    "label": self.labels[r - 1],
                    "output_max": v,
                    "channel": int(p.channel[i, c]),
                    "pos": int(p.pos[i, c]),
                    "token": p.token_labels[i][c],
                    "input_max": float(p.input_max[i, c]),
                    "tokens": int(p.tokens[i, c]),
                }
            )
        cols = ["rank", "layer", "expert", "label", "output_max", "channel", "pos", "token", "input_max", "tokens"]
        return pd.DataFrame(rows, columns=cols)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "experts": [list(p) for p in self.experts],
            "labels": self.labels,
            "values": list(self.values),
            "rule": self.rule,
            "params": self.params,
            "thresholds": self.thresholds,
            "population": self.population,
            "profile": self.profile.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SuperExperts:
        return cls(
            experts=[tuple(p) for p in d["experts"]],
            values=list(d["values"]),
            rule=d["rule"],
            params=dict(d["params"]),
            thresholds=dict(d["thresholds"]),
            population=d["population"],
            profile=ExpertProfile.from_dict(d["profile"]),
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """The profile heatmap with these super experts boxed."""
        bars = ", ".join(f"{k} {v:.4g}" for k, v in self.thresholds.items())
        return self.profile.figure(
            marked=self.experts,
            title=(
                f"Super experts ({self.rule}: {', '.join(self.labels) or 'none'}) · model "
                f"{self.provenance.get('model', '?')} · bars {bars}"
            ),
        )


def super_experts(
    model,
    prompts,
    *,
    rule: str = "su",
    layers=None,
    include_layers: float = DEFAULT_INCLUDE_LAYERS,
    prepend_bos: bool | None = None,
    **rule_kwargs,
) -> SuperExperts:
    """Profile the experts on `prompts` and return the super experts under `rule`
    (`profile_experts(...).super_experts(rule, **rule_kwargs)`).

    >>> from lenslab.zoo import planted
    >>> super_experts(planted.planted_moe_model(), planted.planted_tokens()).labels
    ['L0e2']
    """
    if rule not in RULES:  # before any compute
        raise LenslabError(f"rule {rule!r} is not one of {', '.join(RULES)}{did_you_mean(rule, RULES)}")
    profile = profile_experts(model, prompts, layers=layers, include_layers=include_layers, prepend_bos=prepend_bos)
    return profile.super_experts(rule, **rule_kwargs)


# --- pruning -----------------------------------------------------------------------------------
@contextlib.contextmanager
def prune_experts(model, experts):
    """Zero the down-projection of each (layer, expert) inside the block; restore it on exit.

    The router is unchanged (Su et al.): a pruned expert is still chosen and adds 0 for the tokens
    routed to it. Expert -1 is a layer's shared expert. `experts` may also be a `SuperExperts`
    or text such as "0:2, 1:-1". Yields the validated pairs.

    >>> from lenslab.probes import sinks
    >>> from lenslab.zoo import planted
    >>> model = planted.planted_moe_model()
    >>> with prune_experts(model, [(0, 2)]):
    ...     sinks.massive_activations(model, planted.planted_tokens()).massive
    []
    """
    pairs = _check_experts(_sites(model), experts)
    by = {s.layer: s for s in _sites(model)}
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for l, e in pairs:
                for w in by[l].down(e):
                    saved.append((w, w.clone()))
                    w.zero_()
        yield pairs
    finally:
        with torch.no_grad():
            for w, old in reversed(saved):
                w.copy_(old)


# --- ablation ----------------------------------------------------------------------------------
def _loss(model, batches: list[Tensor]) -> float:
    total, n_tok = 0.0, 0
    with torch.no_grad():
        for toks in batches:
            n = toks.shape[0] * (toks.shape[1] - 1)
            total += float(model(toks, return_type="loss")) * n
            n_tok += n
    return total / n_tok


def _summary(massive: sinks.MassiveResult) -> dict:
    return {
        "max_abs": float(massive.top_values.abs().max()),
        "n_massive": len(massive.massive),
        "massive_dims": massive.massive_dims,
    }


@dataclass(frozen=True, kw_only=True, eq=False)
class SuperExpertAblation(JsonResult):
    """Loss, massive activations and attention sinks with and without the super experts, and with
    as many random non-super experts pruned instead.

    Attributes:
        experts: the pruned super experts.
        loss_clean / loss_pruned: mean next-token loss.
        sinks_clean / sinks_pruned: `SinkResult` of both runs.
        massive_clean / massive_pruned: `MassiveResult` of both runs.
        random: one dict per random draw: experts, loss, sink_rate, max_abs (largest |a| of any layer
            output), n_massive, massive_dims.
        rule: how the super experts were chosen ("given" when passed in).
        provenance: model, prompts, versions, time.
    """

    KIND = "SuperExpertAblation"
    experts: list[tuple[int, int]]
    loss_clean: float
    loss_pruned: float
    sinks_clean: sinks.SinkResult
    sinks_pruned: sinks.SinkResult
    massive_clean: sinks.MassiveResult
    massive_pruned: sinks.MassiveResult
    random: list[dict]
    rule: str = "su"
    provenance: dict = field(default_factory=dict)

    @property
    def random_loss(self) -> float | None:
        """Mean loss over the random draws (None without draws)."""
        return sum(r["loss"] for r in self.random) / len(self.random) if self.random else None

    @property
    def random_sink_rate(self) -> float | None:
        """Mean sink rate over the random draws."""
        return sum(r["sink_rate"] for r in self.random) / len(self.random) if self.random else None

    def summary(self) -> list[dict]:
        """One row per run (clean, super experts pruned, each random draw): loss, sink rate, largest
        |a|, massive entries."""
        rows = [
            {
                "run": "clean",
                "experts": [],
                "loss": self.loss_clean,
                "sink_rate": self.sinks_clean.sink_rate,
                **_summary(self.massive_clean),
            },
            {
                "run": "super experts pruned",
                "experts": [list(p) for p in self.experts],
                "loss": self.loss_pruned,
                "sink_rate": self.sinks_pruned.sink_rate,
                **_summary(self.massive_pruned),
            },
        ]
        rows += [{"run": f"random {i}", **r} for i, r in enumerate(self.random)]
        return rows

    def table(self):
        """`summary()` as a pandas DataFrame."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(self.summary())

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "experts": [list(p) for p in self.experts],
            "rule": self.rule,
            "loss_clean": self.loss_clean,
            "loss_pruned": self.loss_pruned,
            "sink_rate_clean": self.sinks_clean.sink_rate,
            "sink_rate_pruned": self.sinks_pruned.sink_rate,
            "random_loss": self.random_loss,
            "random_sink_rate": self.random_sink_rate,
            "random": self.random,
            "sinks_clean": self.sinks_clean.to_dict(),
            "sinks_pruned": self.sinks_pruned.to_dict(),
            "massive_clean": self.massive_clean.to_dict(),
            "massive_pruned": self.massive_pruned.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SuperExpertAblation:
        return cls(
            experts=[tuple(p) for p in d["experts"]],
            rule=d.get("rule", "su"),
            loss_clean=d["loss_clean"],
            loss_pruned=d["loss_pruned"],
            sinks_clean=sinks.SinkResult.from_dict(d["sinks_clean"]),
            sinks_pruned=sinks.SinkResult.from_dict(d["sinks_pruned"]),
            massive_clean=sinks.MassiveResult.from_dict(d["massive_clean"]),
            massive_pruned=sinks.MassiveResult.from_dict(d["massive_pruned"]),
            random=[dict(r) for r in d["random"]],
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Loss, sink rate and largest |a| for clean / super experts pruned / random draws (mean,
        draws as dots), and the per-head attention to token 0 before and after."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn
        from plotly.subplots import make_subplots  # deferred: plotly loads only when a figure is drawn

        fig = make_subplots(
            rows=1,
            cols=5,
            column_widths=[0.16, 0.16, 0.16, 0.26, 0.26],
            horizontal_spacing=0.06,
            subplot_titles=["loss", "sink rate (%)", "largest |a| (log)", "α₀ clean", "α₀ SE pruned"],
        )
        runs = ["clean", "SE pruned"] + (["random"] if self.random else [])
        colours = ["#3b6ea8", "#c0392b", "#7f8c8d"][: len(runs)]
        mc, mp = _summary(self.massive_clean), _summary(self.massive_pruned)
        mean = lambda k: sum(r[k] for r in self.random) / len(self.random)
        panels = [
            ("loss", self.loss_clean, self.loss_pruned, 1),
            ("sink_rate", self.sinks_clean.sink_rate, self.sinks_pruned.sink_rate, 100),
            ("max_abs", mc["max_abs"], mp["max_abs"], 1),
        ]
        for col, (key, clean, pruned, scale) in enumerate(panels, 1):
            ys = [scale * clean, scale * pruned] + ([scale * mean(key)] if self.random else [])
            fig.add_trace(
                go.Bar(x=runs, y=ys, marker_color=colours, showlegend=False, texttemplate="%{y:.3g}"), row=1, col=col
            )
            if self.random:
                fig.add_trace(
                    go.Scatter(
                        x=["random"] * len(self.random),
                        y=[scale * r[key] for r in self.random],
                        mode="markers",
                        marker=dict(color="black", size=6),
                        showlegend=False,
                        hovertext=[str(r["experts"]) for r in self.random],
                    ),
                    row=1,
                    col=col,
                )
        fig.update_yaxes(type="log", row=1, col=3)
        for j, s in enumerate((self.sinks_clean, self.sinks_pruned)):
            fig.add_trace(s.attention_heatmap(showscale=j == 1), row=1, col=4 + j)
            fig.update_yaxes(autorange="reversed", row=1, col=4 + j)
        fig.update_layout(height=400, width=1300)
        names = ", ".join(labels.expert(l, e) for l, e in self.experts)
        return figures.style(
            fig,
            f"Pruning super experts {names} vs {len(self.random)} random draws · "
            f"model {self.provenance.get('model', '?')}",
        )


def ablate_super_experts(
    model,
    prompts,
    experts=None,
    *,
    random_draws: int = 5,
    seed: int = 0,
    rule: str = "su",
    include_layers: float = DEFAULT_INCLUDE_LAYERS,
    threshold: float = sinks.DEFAULT_SINK_THRESHOLD,
    massive_rule: sinks.MassiveRule | None = None,
    prepend_bos: bool | None = None,
) -> SuperExpertAblation:
    """Prune the super experts (zero their down_proj) and measure loss, massive activations and
    sinks, against pruning as many random non-super experts (Su et al. Sec. 4).

    Args:
        model, prompts: as in `profile_experts` (at least 2 tokens per prompt for a loss).
        experts: the experts to prune (pairs, text "L:E, ..." or a `SuperExperts`); default: the
            super experts found on `prompts` under `rule`.
        random_draws: how many random control sets (each as many routed experts as `experts`, drawn
            from the other routed experts of the layers below the include cutoff that saw at least one
            token of `prompts`; no expert is drawn twice until every one has been drawn once); 0 for none.
        seed: seed of the random draws.
        threshold: epsilon of the sink rates; massive_rule: `MassiveRule` for the massive activations.

    Returns:
        `SuperExpertAblation` (loss, `SinkResult` and `MassiveResult` clean and pruned, the random
        draws, `summary()`, `figure()`).

    >>> from lenslab.zoo import planted
    >>> r = ablate_super_experts(planted.planted_moe_model(), planted.planted_tokens(), random_draws=2)
    >>> r.sinks_clean.sink_rate, r.sinks_pruned.sink_rate
    (0.25, 0.0)
    """
    sites = _sites(model)
    include_layers = _include(include_layers)
    threshold = sinks.check_threshold(threshold)
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 0:
        raise LenslabError(f"random_draws must be a non-negative integer, got {random_draws!r}")
    batches = sinks.prompt_batches(model, prompts, prepend_bos)
    if min(b.shape[1] for b in batches) < 2:
        raise LenslabError("each prompt needs at least 2 tokens to measure a next-token loss")
    profile = profile_experts(model, prompts, include_layers=include_layers, prepend_bos=prepend_bos)
    if experts is None:
        found = profile.super_experts(rule)
        if not found.experts:
            raise LenslabError(
                f"no super experts under rule {rule!r} on these prompts "
                f"(bars {found.thresholds}): pass experts=[(layer, expert), ...] or another rule"
            )
        pairs, how = found.experts, rule
    else:
        pairs, how = _check_experts(sites, experts), "given"
        if not pairs:
            raise LenslabError("experts is empty: pass at least one (layer, expert) pair to prune")
    massive_rule = massive_rule or sinks.MassiveRule()
    cutoff = profile.cutoff
    pool = [
        (l, e)
        for i, l in enumerate(profile.layers)
        if l < cutoff
        for e in range(profile.n_experts)
        if (l, e) not in pairs and int(profile.tokens[i, e]) > 0
    ]  # pruning an idle expert would be no control
    if random_draws and len(pool) < len(pairs):
        raise LenslabError(
            f"only {len(pool)} other experts below layer {cutoff} saw a token of these prompts, too few "
            f"to draw {len(pairs)} at random: lower random_draws to 0 or raise include_layers"
        )

    def measure():
        return (
            _loss(model, batches),
            sinks.attention_sinks(model, prompts, threshold=threshold, prepend_bos=prepend_bos),
            sinks.massive_activations(model, prompts, rule=massive_rule, prepend_bos=prepend_bos),
        )

    loss_c, sinks_c, massive_c = measure()
    with prune_experts(model, pairs):
        loss_p, sinks_p, massive_p = measure()
    g = torch.Generator().manual_seed(seed)
    random, used = [], set()
    for _ in range(random_draws):
        fresh = [p for p in pool if p not in used]
        if len(fresh) < len(pairs):  # every expert drawn once: start over
            fresh, used = pool, set()
        draw = sorted(fresh[i] for i in torch.randperm(len(fresh), generator=g)[: len(pairs)].tolist())
        used.update(draw)
        with prune_experts(model, draw):
            loss_r, sinks_r, massive_r = measure()
        random.append(
            {"experts": [list(p) for p in draw], "loss": loss_r, "sink_rate": sinks_r.sink_rate, **_summary(massive_r)}
        )
    return SuperExpertAblation(
        experts=list(pairs),
        loss_clean=loss_c,
        loss_pruned=loss_p,
        sinks_clean=sinks_c,
        sinks_pruned=sinks_p,
        massive_clean=massive_c,
        massive_pruned=massive_p,
        random=random,
        rule=how,
        provenance=provenance(
            model,
            method="ablate_super_experts",
            rule=how,
            random_draws=random_draws,
            seed=seed,
            include_layers=include_layers,
            **sinks.prompt_record(model, batches),
        ),
    )
