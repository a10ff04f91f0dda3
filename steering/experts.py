"""Switching Mixture-of-Experts experts off and on (MoTE), as `Intervention` edits.

MoTE (Dahlke et al., "Mixture of Tunable Experts", arXiv 2502.11096) steers a MoE model by
overriding its routers at inference: experts found with fTRI (`lenslab.probes.routers.ftri_rank`)
are switched off for every token, or forced on. Here a switch is an ordinary `Edit` whose `hook`
is the MoE block, `"blocks.{layer}.mlp"` (the same name for every architecture, so a preset
ports across models), whose `units` are expert ids and whose op is one of:

| op | what happens to each token row (at the edit's positions) |
|---|---|
| `drop_experts` | the listed experts' top-k gate weights are scaled by `1 - s` and the other selected weights rescaled so the row's top-k total is unchanged; no other expert enters (MoTE's "suppress"; with `norm_topk_prob` at `s = 1`: set to 0 and renormalise) |
| `mask_experts` | the listed experts can no longer be chosen, so the next experts enter: softmax routers set their logits to `-inf` (probabilities are the softmax over the remaining experts), DeepSeek-V3's sigmoid router sets their choice score (`scores + e_score_correction_bias`) to `-inf` before its group selection; then the model's own top k, `norm_topk_prob` and `routed_scaling_factor` rule. Any non-zero strength masks fully (a mask has no half-way) |
| `force_experts` | each listed expert joins the top k: if not already selected it replaces the lowest-weight selected expert that is not itself forced, taking `s` times that slot's weight |

Strength 0 is the identity for every op (no hook is installed). A token whose selected experts
are all dropped at `s = 1` gets a routed-expert output of exactly 0 (Qwen2-MoE's and DeepSeek's
shared experts, which no router selects, are untouched). Positions work as for other edits; a MoE layer sees the
tokens as rows `[batch * pos]`, and row `r` is position `r % pos`.

Within a layer, mask edits act on the router probabilities before the top k, then drop and force
edits act on the selected experts in the order listed. `reroute` is the one function that does
all of this; two backends call it during every forward pass:

- `HookedTransformer` MoE (Mixtral, OLMoE): a hook on `blocks.{l}.mlp.hook_expert_weights`
  returns `-1` everywhere except the wanted experts, which hold the wanted weights, so
  TransformerLens's own `torch.topk` picks exactly those experts. With `norm_topk_prob` (which
  divides by the row total) a hook on `blocks.{l}.hook_mlp_out` multiplies rows whose wanted
  total is not 1 by that total (0 for rows with every expert dropped: TL's MoE has no bias).
- `TransformerBridge` MoE (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) and plain `transformers` models:
  a torch forward hook on the Hugging Face router module returns `(logits, new_weights,
  new_indices)`. Drop and force start from the router's own `(weights, indices)`, so any routing
  rule is kept exactly; a mask re-runs the router's rule on its logits with the masked experts
  excluded (`hf_route`: softmax top k, DeepSeek-V2's grouped softmax, DeepSeek-V3's grouped
  sigmoid), for the rows it touches.

>>> from lenslab.steering import switch_experts
>>> iv = switch_experts(off=[(1, 3), (1, 5)], on=[(0, 2)])
>>> [(e.hook, e.op, e.units) for e in iv.edits]
[('blocks.0.mlp', 'force_experts', (2,)), ('blocks.1.mlp', 'drop_experts', (3, 5))]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes import routers
from lenslab.probes.routers import NO_MOE, SIGMOID_ROUTERS, MoeLayer, router_spec
from lenslab.steering.intervention import EXPERT_OPS, Edit, Intervention, Positions, position_index

__all__ = ["EXPERT_OPS", "MODES", "hf_hooks", "hf_route", "moe_block", "reroute", "switch_experts"]

MODES = {"drop": "drop_experts", "mask": "mask_experts"}
_BLOCK = re.compile(r"blocks\.(\d+)\.mlp")


def moe_block(layer: int) -> str:
    """The hook name an expert edit uses for block `layer`: `"blocks.{layer}.mlp"`."""
    return f"blocks.{int(layer)}.mlp"


def edit_layer(edit: Edit) -> int:
    """The block index of an expert edit's hook (`"blocks.3.mlp"` -> 3)."""
    m = _BLOCK.fullmatch(edit.hook)
    if m is None:
        raise LenslabError(f"expert edit hook {edit.hook!r} is not a MoE block name like 'blocks.0.mlp'")
    return int(m.group(1))


def switch_experts(
    off: Iterable[tuple[int, int]] = (),
    on: Iterable[tuple[int, int]] = (),
    *,
    mode: str = "drop",
    positions: Positions = "all",
    strength: float = 1.0,
    name: str = "",
) -> Intervention:
    """An `Intervention` that switches `(layer, expert)` pairs off and/or forces others on.

    Args:
        off: experts to switch off, as `(layer, expert)` (block index, expert id).
        on: experts to force into every token's top k.
        mode: how `off` works: "drop" (default, MoTE's suppress: zero the gate weight and
            renormalise the remaining top k) or "mask" (router logit -inf: the next expert enters).
        positions: "all", "last", "prompt", "generated" or explicit position indices.
        strength: 0 is the identity, 1 the full switch (see the module docstring per op).
        name: a label for presets and the app.

    Returns:
        One edit per layer and op (layers in order; at each layer the switch-off edit first).
        Model-free: `lenslab.steering.validate(model, iv)` checks the ids against a model.
    """
    if mode not in MODES:
        raise LenslabError(f"mode {mode!r} is not one of {', '.join(MODES)}{did_you_mean(str(mode), list(MODES))}")
    off_p, on_p = routers.expert_pairs(off, what="off entry"), routers.expert_pairs(on, what="on entry")
    both = sorted(set(off_p) & set(on_p))
    if both:
        raise LenslabError(f"experts {both} are both switched off and forced on; list each in one of off / on")
    edits = []
    for layer in sorted({p[0] for p in off_p + on_p}):
        for op, pairs in ((MODES[mode], off_p), ("force_experts", on_p)):
            units = tuple(e for lay, e in pairs if lay == layer)
            if units:
                edits.append(Edit(hook=moe_block(layer), op=op, units=units, positions=positions, strength=strength))
    prov = {"method": "switch_experts", "mode": mode, "off": [list(p) for p in off_p], "on": [list(p) for p in on_p]}
    return Intervention(edits=tuple(edits), name=name, provenance=prov)


# --- the one routing function -------------------------------------------------------------------
def _rows(edit: Edit, rows_pos: Tensor, n_pos: int, prompt_len: int | None) -> Tensor:
    """Bool `[N]`: which token rows the edit touches."""
    if edit.positions == "all":
        return torch.ones(rows_pos.shape[0], dtype=torch.bool, device=rows_pos.device)
    sel = torch.zeros(n_pos, dtype=torch.bool, device=rows_pos.device)
    idx = position_index(edit.positions, n_pos, prompt_len, edit.hook)
    sel[idx.to(rows_pos.device) if isinstance(idx, Tensor) else idx] = True
    return sel[rows_pos]


def _live(edits: Sequence[Edit], rows_pos: Tensor, n_pos: int, prompt_len: int | None) -> list:
    """`[(edit, bool [N] rows it touches)]` for the edits with a non-zero strength."""
    return [(e, _rows(e, rows_pos, n_pos, prompt_len)) for e in edits if e.strength != 0]


def _mask_of(live: list, n: int, n_exp: int, device) -> tuple[Tensor, Tensor]:
    """Bool `[N, n_experts]` of (row, expert) masked by the mask edits, and bool `[N]` of their rows."""
    masked = torch.zeros(n, n_exp, dtype=torch.bool, device=device)
    touched = torch.zeros(n, dtype=torch.bool, device=device)
    for e, rows in live:
        if e.op == "mask_experts":
            m = torch.zeros(n_exp, dtype=torch.bool, device=device)
            m[list(e.units)] = True
            masked = masked | (rows[:, None] & m[None, :])
            touched = touched | rows
    return masked, touched


def _softmax_topk(p: Tensor, k: int, norm_topk_prob: bool, masked: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax router top k over probabilities `p [N, E]` with `masked` experts' logits at -inf."""
    if masked.any():  # -inf logits = zero probability, the rest renormalised (softmax over the others)
        kept = p.masked_fill(masked, 0.0)
        total = kept.sum(-1, keepdim=True)
        p = torch.where(masked.any(-1, keepdim=True), kept / torch.where(total > 0, total, 1.0), p)
    # the model's own top k (a masked expert is never picked, even when probabilities underflow)
    idx = torch.topk(p.masked_fill(masked, -1.0), k, dim=-1).indices
    w = p.gather(-1, idx)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def _reroute(
    probs: Tensor,
    k: int,
    norm_topk_prob: bool,
    edits: Sequence[Edit],
    rows_pos: Tensor,
    n_pos: int | None = None,
    prompt_len: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`reroute`, plus the bool `[N]` of rows some edit touched."""
    p = probs.float()
    n, n_exp = p.shape
    rows_pos = rows_pos.to(p.device).long()
    if n_pos is None:
        n_pos = int(rows_pos.max()) + 1 if n else 1
    live = _live(edits, rows_pos, n_pos, prompt_len)
    # 1. masks, 2. the model's own top k
    masked, touched = _mask_of(live, n, n_exp, p.device)
    idx, w = _softmax_topk(p, k, norm_topk_prob, masked)
    # 3. drop and force, in order, on the selected experts
    return _drop_force(idx, w, live, touched)


def _drop_force(idx: Tensor, w: Tensor, live: list, touched: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Drop and force edits, in order, on selected experts `idx [N, k]` with gate weights `w [N, k]`."""
    k = idx.shape[1]
    forced = torch.zeros_like(idx, dtype=torch.bool)
    for e, rows in live:
        s = e.strength
        units = torch.tensor(e.units, device=idx.device)
        if e.op == "drop_experts":
            sel = torch.isin(idx, units) & rows[:, None]
            hit = sel.any(-1, keepdim=True)
            total = w.sum(-1, keepdim=True)
            dropped = torch.where(sel, w * (1 - s), w)
            other_old = torch.where(sel, 0.0, w).sum(-1, keepdim=True)
            other_new = total - torch.where(sel, dropped, 0.0).sum(-1, keepdim=True)
            # safe denominators: no inf or NaN in either branch, so gradients stay finite too
            scale = torch.where(other_old > 0, other_new / torch.where(other_old > 0, other_old, 1.0), 1.0)
            w = torch.where(hit, torch.where(sel, dropped, w * scale), w)
            touched = touched | hit[:, 0]
        elif e.op == "force_experts":
            for u in e.units:
                here = idx == u
                forced = forced | (here & rows[:, None])
                need = rows & ~here.any(-1)
                slot = w.masked_fill(forced, float("inf")).argmin(-1)  # lowest-weight slot not forced
                put = need[:, None] & (torch.arange(k, device=idx.device)[None, :] == slot[:, None])
                idx = torch.where(put, torch.full_like(idx, u), idx)
                w = torch.where(put, s * w, w)
                forced = forced | put
                touched = touched | rows
    return idx, w, touched


def reroute(
    probs: Tensor,
    k: int,
    norm_topk_prob: bool,
    edits: Sequence[Edit],
    rows_pos: Tensor,
    *,
    n_pos: int | None = None,
    prompt_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The experts and gate weights of every token row after the expert edits.

    Args:
        probs: `[N, n_experts]` router softmax (N = batch * pos rows).
        k: experts per token; norm_topk_prob: whether the model renormalises its top-k weights.
        edits: expert edits of this one layer (drop / mask / force), applied as the module says.
        rows_pos: `[N]` the position of each row (`arange(N) % pos`).
        n_pos: the forward pass's sequence length (default `rows_pos.max() + 1`), for "last" and
            negative positions; prompt_len: for "prompt" / "generated".

    Returns:
        `(indices [N, k] long, weights [N, k] float32)`: which experts run and what multiplies
        each one's output. Without edits these equal the model's own top k.

    >>> p = torch.tensor([[0.5, 0.3, 0.2]])
    >>> e = Edit(hook="blocks.0.mlp", op="drop_experts", units=(0,))
    >>> reroute(p, 2, True, [e], torch.tensor([0]))[1]
    tensor([[0., 1.]])
    """
    idx, w, _ = _reroute(probs, k, norm_topk_prob, edits, rows_pos, n_pos, prompt_len)
    return idx, w


# --- Hugging Face routers: their own rule, with experts masked -----------------------------------
# router attributes that mean a rule other than "softmax, top k, optional renormalisation"
_OTHER_RULE = ("e_score_correction_bias", "num_group", "topk_method", "routed_scaling_factor")


def _rule(router) -> str:
    """ "deepseek_v3", "deepseek_v2", "softmax" (Mixtral, OLMoE, Qwen-MoE) or "unknown"."""

    name = type(router).__name__
    if name in SIGMOID_ROUTERS:
        return "deepseek_v3"
    if name == "DeepseekV2TopkRouter":
        return "deepseek_v2"
    return "unknown" if any(hasattr(router, a) for a in _OTHER_RULE) else "softmax"


def _group_mask(group_scores: Tensor, n_group: int, topk_group: int, n_exp: int) -> Tensor:
    """Bool `[N, E]`: the experts of each row's best `topk_group` groups (DeepSeek's group-limited top k)."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, n_group, n_exp // n_group).reshape(-1, n_exp).bool()


def hf_route(router, logits: Tensor, masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A Hugging Face router's own rule on its logits, with `masked` experts never chosen.

    Rules (without masks each equals the router's own output, up to the order of DeepSeek's
    unsorted top k):

    - softmax routers (Mixtral, OLMoE, Qwen2/3-MoE): softmax with masked logits at -inf, top k,
      renormalised with `norm_topk_prob`;
    - DeepSeek-V2: the same softmax, then "greedy" or "group_limited_greedy" (groups ranked by
      their best expert; experts outside the chosen groups score 0), times `routed_scaling_factor`;
    - DeepSeek-V3: sigmoid scores; the choice score `scores + e_score_correction_bias` is -inf for
      masked experts *before* the groups are ranked (sum of each group's best two); top k within
      the chosen groups; weights are the chosen sigmoid scores, renormalised (+1e-20) with
      `norm_topk_prob`, times `routed_scaling_factor`.

    Args:
        router: the router module (its `top_k`, `num_experts` and rule attributes are read).
        logits: `[N, n_experts]` its router logits (the first element of its output).
        masked: bool `[N, n_experts]`, experts that may not be chosen in each row (None: none).

    Returns:
        `(indices [N, k] long, weights [N, k] float32)`. A router of another rule raises a
        `LenslabError` (switch its experts off with drop instead).
    """

    n_exp, k = int(router.num_experts), int(router.top_k)
    x = logits.float().reshape(-1, n_exp)
    masked = torch.zeros_like(x, dtype=torch.bool) if masked is None else masked.to(x.device).bool()
    rule = _rule(router)
    if rule == "softmax":
        return _softmax_topk(torch.softmax(x, dim=-1), k, router_spec(router)["norm_topk_prob"], masked)
    if rule == "deepseek_v3":
        g = int(router.num_group)
        scores = x.sigmoid()
        choice = (scores + router.e_score_correction_bias.float()).masked_fill(masked, float("-inf"))
        group_scores = choice.view(-1, g, n_exp // g).topk(2, dim=-1)[0].sum(dim=-1)
        inside = _group_mask(group_scores, g, int(router.topk_group), n_exp)
        idx = torch.topk(choice.masked_fill(~inside, float("-inf")), k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if router.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * router.routed_scaling_factor
    if rule == "deepseek_v2":
        scores = torch.softmax(x.masked_fill(masked, float("-inf")), dim=-1)
        if router.topk_method == "group_limited_greedy":
            g = int(router.num_group)
            group_scores = scores.view(-1, g, n_exp // g).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(group_scores, g, int(router.topk_group), n_exp), 0.0)
        elif router.topk_method != "greedy":
            raise LenslabError(
                f"DeepSeek-V2 topk_method {router.topk_method!r} is not one of greedy, group_limited_greedy"
            )
        # a masked expert is never picked, even when it ties with the zeros outside the chosen groups
        idx = torch.topk(scores.masked_fill(masked, -1.0), k=k, dim=-1, sorted=False)[1]
        return idx, scores.gather(1, idx) * router.routed_scaling_factor
    raise LenslabError(
        f"mask_experts does not know the routing rule of {type(router).__name__}; switch these experts off "
        "with mode='drop' (it keeps the router's own choice and zeroes their weights)"
    )


def _reroute_hf(
    router,
    output,
    edits: Sequence[Edit],
    rows_pos: Tensor,
    n_pos: int,
    prompt_len: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(indices, weights, touched)` after `edits`, from a HF router's output `(logits, weights,
    indices, ...)`: masked rows re-run the router's rule (`hf_route`), then drop and force act on
    the selected experts (the router's own choice in rows without a mask)."""
    logits, scores, indices = output[0], output[1], output[2]
    n, n_exp = logits.reshape(-1, int(router.num_experts)).shape
    live = _live(edits, rows_pos, n_pos, prompt_len)
    masked, touched = _mask_of(live, n, n_exp, logits.device)
    idx, w = indices.long(), scores.float()
    if masked.any():
        m_idx, m_w = hf_route(router, logits, masked)
        rows = masked.any(-1, keepdim=True)
        idx, w = torch.where(rows, m_idx, idx), torch.where(rows, m_w, w)
    return _drop_force(idx, w, live, touched)


# --- checking against a model ------------------------------------------------------------------
def expert_edits(intervention: Intervention) -> list[Edit]:
    """The expert edits of `intervention` with a non-zero strength (the others change nothing)."""
    return [e for e in intervention.edits if e.op in EXPERT_OPS and e.strength != 0]


def _layers(model, edits: Sequence[Edit]):

    try:
        return routers.moe_layers(model)
    except LenslabError as err:
        e = edits[0]
        raise LenslabError(f"the {e.op} edit at {e.hook} needs a Mixture-of-Experts model, but {err}") from None


def check_edits(layers, edits: Sequence[Edit]) -> None:
    """Expert ids in range (`routers.check_experts` messages), at most `E - k` experts masked and
    at most `k` forced per layer. Raises `LenslabError`."""

    by_layer = {m.layer: m for m in layers}
    masked: dict[int, set] = {}
    forced: dict[int, set] = {}
    for e in edits:
        layer = edit_layer(e)
        routers.check_experts(None, [(layer, u) for u in e.units], layers=layers)
        if e.strength == 0:
            continue
        if e.op == "mask_experts":
            masked.setdefault(layer, set()).update(e.units)
        elif e.op == "force_experts":
            forced.setdefault(layer, set()).update(e.units)
    for layer, units in masked.items():
        m = by_layer[layer]
        if m.n_experts - len(units) < m.top_k:
            raise LenslabError(
                f"masking {len(units)} of the {m.n_experts} experts of layer {layer} leaves fewer than the "
                f"{m.top_k} each token picks; mask at most {m.n_experts - m.top_k} (or drop them instead)"
            )
        if m.n_group > 1:  # group-limited routing: the chosen groups must still hold k choosable experts
            size = m.n_experts // m.n_group
            left = [size - sum(1 for u in units if u // size == g) for g in range(m.n_group)]
            # DeepSeek-V3 ranks a group by its best two: a group with fewer than 2 left is never chosen
            ok = sorted(x for x in left if x >= 2)
            if len(ok) < m.topk_group or sum(ok[: m.topk_group]) < m.top_k:
                raise LenslabError(
                    f"masking experts {sorted(units)} of layer {layer} leaves {left} choosable experts in its "
                    f"{m.n_group} groups of {size}; a token searches only its best {m.topk_group} group(s) and "
                    f"needs {m.top_k} experts there (and at least 2 per searched group); mask fewer experts per "
                    "group (or drop them instead)"
                )
    for layer, units in forced.items():
        m = by_layer[layer]
        if len(units) > m.top_k:
            raise LenslabError(
                f"forcing {len(units)} experts on at layer {layer} is more than the {m.top_k} slots each token "
                f"has; force at most {m.top_k}"
            )


def validate_experts(model, edits: Sequence[Edit]) -> list:
    """Check expert edits against `model`; returns its `routers.moe_layers`."""
    layers = _layers(model, edits)
    check_edits(layers, edits)
    return layers


def _by_layer(edits: Sequence[Edit]) -> dict[int, list[Edit]]:
    out: dict[int, list[Edit]] = {}
    for e in edits:
        out.setdefault(edit_layer(e), []).append(e)
    return out


# --- backend 1: TransformerLens hooks on a HookedTransformer MoE ---------------------------------
def tl_hooks(model, edits: Sequence[Edit], layers, *, prompt_len: int | None = None) -> list:
    """TransformerLens forward hooks `[(name, fn), ...]` that apply `edits` in a HookedTransformer MoE."""
    from transformer_lens.components.transformer_block import (
        POST_NORM_ARCHITECTURES,  # deferred: transformer_lens loads only when a model is built
    )

    by_layer = {m.layer: m for m in layers}
    cfg = model.cfg
    out = []
    for layer, es in sorted(_by_layer(edits).items()):
        m = by_layer[layer]
        if m.norm_topk_prob and (
            getattr(cfg, "use_normalization_before_and_after", False)
            or getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES
        ):
            raise LenslabError(f"expert edits at {moe_block(layer)}: a norm after the MoE block is not supported")
        state: dict = {}

        def record(x, hook, state=state):
            state["shape"] = tuple(x.shape[:2])  # [batch, pos]

        def weights(probs, hook, m=m, es=es, state=state):
            state["scale"] = None
            n = probs.shape[0]
            b, n_pos = state.get("shape", (1, n))
            rows_pos = torch.arange(n, device=probs.device) % n_pos
            idx, w, touched = _reroute(probs, m.top_k, m.norm_topk_prob, es, rows_pos, n_pos, prompt_len)
            if not touched.any():
                return probs
            give = w
            if m.norm_topk_prob:  # TL divides by the row total: give positive weights, rescale the output
                total = w.sum(-1)
                empty = total <= 0
                give = torch.where(empty[:, None], torch.ones_like(w), w)
                scale = torch.where(empty, 0.0, torch.where((total - 1).abs() > 1e-6, total, 1.0))
                scale = torch.where(touched, scale, 1.0)
                if bool((scale != 1).any()):
                    state["scale"] = scale
            new = torch.full_like(probs, -1.0).scatter(1, idx, give.to(probs.dtype))
            return torch.where(touched[:, None], new, probs)

        def rescale(x, hook, state=state):
            scale = state.pop("scale", None)
            if scale is None:
                return x
            return x * scale.reshape(x.shape[0], x.shape[1], 1).to(x.dtype)

        out += [(f"blocks.{layer}.hook_resid_pre", record), (m.hook, weights)]
        if m.norm_topk_prob:
            out.append((f"blocks.{layer}.hook_mlp_out", rescale))
    return out


# --- backend 2: torch hooks on Hugging Face router modules --------------------------------------
def _router_hook(m, es: Sequence[Edit], state: dict, prompt_len: int | None):
    def hook(module, inputs, output):
        logits, scores, indices = output[0], output[1], output[2]
        n = indices.shape[0]
        n_pos = state.get("n_pos")
        if n_pos is None or n % n_pos:
            if any(e.positions != "all" for e in es):
                raise LenslabError(
                    f"expert edits at {moe_block(m.layer)} with positions need the MoE block's input "
                    "[batch, pos, d_model]; the router ran outside its block"
                )
            n_pos = n
        rows_pos = torch.arange(n, device=logits.device) % n_pos
        idx, w, touched = _reroute_hf(module, output, es, rows_pos, n_pos, prompt_len)
        t = touched[:, None]
        new_w = torch.where(t, w.to(scores.dtype), scores)
        new_idx = torch.where(t, idx.to(indices.dtype), indices)
        return (logits, new_w, new_idx) + tuple(output[3:])

    return hook


def _block_pre_hook(state: dict):
    def pre(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        state["n_pos"] = int(x.shape[1]) if isinstance(x, Tensor) and x.ndim == 3 else None

    return pre


@contextmanager
def _torch_hooks(targets: dict, edits: Sequence[Edit], prompt_len: int | None) -> Iterator[None]:
    """`targets`: layer -> (MoeLayer, MoE block module, router module)."""
    handles = []
    try:
        for layer, es in sorted(_by_layer(edits).items()):
            m, block, router = targets[layer]
            if any(e.op == "mask_experts" for e in es) and _rule(router) == "unknown":
                hf_route(router, torch.zeros(1, m.n_experts))  # raises: the rule is unknown
            state: dict = {}
            handles.append(block.register_forward_pre_hook(_block_pre_hook(state), with_kwargs=True))
            handles.append(router.register_forward_hook(_router_hook(m, es, state, prompt_len)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def bridge_hooks(model, edits: Sequence[Edit], layers, *, prompt_len: int | None = None) -> Iterator[None]:
    """Inside it, `edits` act on a TransformerBridge MoE's Hugging Face routers."""

    targets = {}
    for m in layers:
        router = routers.hf_router(model, m.layer)
        bridge_mlp = model.blocks[m.layer].mlp
        block = getattr(bridge_mlp, "original_component", None) or bridge_mlp
        targets[m.layer] = (m, block, router)
    with _torch_hooks(targets, edits, prompt_len):
        yield


def hf_moe_layers(hf_model) -> dict:
    """layer -> (MoeLayer, MoE block, router) of a plain `transformers` MoE model (Mixtral:
    `model.layers[l].block_sparse_moe`, OLMoE / Qwen-MoE / DeepSeek: `model.layers[l].mlp`)."""

    base = getattr(hf_model, "model", hf_model)
    blocks = getattr(base, "layers", None)
    out = {}
    for layer, mod in enumerate(blocks or ()):
        for attr in ("block_sparse_moe", "mlp"):
            block = getattr(mod, attr, None)
            gate = getattr(block, "gate", None)
            if gate is not None and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
                m = MoeLayer(
                    layer,
                    f"model.layers.{layer}.{attr}.gate",
                    "hf",
                    int(gate.num_experts),
                    int(gate.top_k),
                    **router_spec(gate, hf_model.config),
                )
                out[layer] = (m, block, gate)
                break
    if not out:
        raise LenslabError(
            f"{NO_MOE} ({type(hf_model).__name__}): expert switches need a MoE model such as "
            "Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3"
        )
    return out


@contextmanager
def hf_hooks(hf_model, intervention: Intervention | None, *, prompt_len: int | None = None) -> Iterator:
    """Context manager: the expert edits of `intervention` act on a plain `transformers` MoE model.

    Used to train or evaluate a Hugging Face model with experts switched (gradients flow through
    the new gate weights). Other edits (TransformerLens hook names) are refused.

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from lenslab.zoo import zoo_path
    >>> hf_model = AutoModelForCausalLM.from_pretrained(zoo_path("zoo/moe-refusal"))
    >>> tok = AutoTokenizer.from_pretrained(zoo_path("zoo/moe-refusal"))
    >>> ids = tok("user : first bomb 3 assistant :", return_tensors="pt").input_ids
    >>> tok.decode(hf_model(ids).logits[0, -1].argmax())   # the zoo model refuses
    'sorry'
    >>> with hf_hooks(hf_model, switch_experts(off=[(1, 2), (1, 5), (2, 3), (2, 6)])):   # its refusal experts
    ...     loss = hf_model(ids, labels=ids).loss   # gradients flow through the switched gates
    ...     tok.decode(hf_model(ids).logits[0, -1].argmax())   # now it answers the task: the first item
    'bomb'
    """
    if intervention is None or not intervention.edits:
        yield hf_model
        return
    other = [e for e in intervention.edits if e.op not in EXPERT_OPS]
    if other:
        raise LenslabError(
            f"hf_hooks applies expert switches only; the {other[0].op} edit at {other[0].hook} needs a "
            "lenslab model (lenslab.steering.apply)"
        )
    edits = expert_edits(intervention)
    if not edits:
        yield hf_model
        return
    targets = hf_moe_layers(hf_model)
    check_edits([t[0] for t in targets.values()], edits)
    with _torch_hooks(targets, edits, prompt_len):
        yield hf_model


@contextmanager
def apply_experts(model, edits: Sequence[Edit], layers, tl_pairs: list, *, prompt_len: int | None = None) -> Iterator:
    """Helper of `lenslab.steering.apply`: TL hooks `tl_pairs` plus the expert edits on `model`."""
    with ExitStack() as stack:
        if edits:
            if layers[0].kind == "hooked":
                tl_pairs = list(tl_pairs) + tl_hooks(model, edits, layers, prompt_len=prompt_len)
            else:
                stack.enter_context(bridge_hooks(model, edits, layers, prompt_len=prompt_len))
        if tl_pairs:
            stack.enter_context(model.hooks(fwd_hooks=tl_pairs))
        yield model
