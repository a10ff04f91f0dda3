"""AUSteer: steer a few atomic units instead of whole blocks.

Feng et al., "Steering less achieves more" (arXiv:2602.04428, ICLR 2026). For a linear map
`y = W x = sum_i x_i W[:, i]`, each column `W[:, i]` is an *atomic unit* and activation entry
`x_i` sets how much of it is written; block-level steering (ITI, CAA) moves helpful and harmful
units together, while steering a handful of well-chosen entries does better.

As in the authors' code (zijian678/AUSteer, `steer.py` and `rmodels/modeling_llama.py`):

1. Run each positive and each negative sample; read the site activation at its **last token**
   for every layer: `P, N` of shape `[S, n_layers, n_units]`. Samples are paired: `positive[i]`
   and `negative[i]` are the same prompt with the right and the wrong answer.
2. Score each (layer, unit) by the signed sign-consistency rate ("activation momentum"):
   `delta = P - N`, `n+ = #(delta > 0)`, `n- = #(delta < 0)`,
   `beta = max(n+, n-) / S`, negated when `n+ < n-`.
3. Select the top `k` entries globally across layers by `|beta|` (stable sort, so ties keep
   layer-major, unit-minor order); entries with `beta = 0` are never selected. `beta` takes only
   `S/2 + 1` distinct values, so with few samples many units tie at the top and this order,
   not the data, picks among them (`tie_report`). lenslab keeps the authors' order as the
   default and offers `tie_break="gap"` (larger mean `|P - N|` first among tied units) and
   `tie_break="random"` (a seeded shuffle among tied units).
4. Steer multiplicatively at every position, prompt and generated tokens:
   `x_j <- x_j * (1 + alpha * beta_j)`, so the change is proportional to the current activation.

Sites, in AUSteer's own names (each a site of `lenslab.sites.SITES`, whose names work too):
`"attn"` = the input of the attention output projection (`blocks.L.attn.hook_z`,
`[head, d_head]` flattened to `head * d_head + j`), `"mlp"` = the MLP output
(`blocks.L.hook_mlp_out`), `"resid"` = the block output (`blocks.L.hook_resid_post`): the
authors' three. lenslab adds `"neurons"` = the MLP's hidden units after the activation function
(`blocks.L.mlp.hook_post`, `d_mlp` wide; not in the authors' code). Multiplying a unit scales
whatever sign it has, so a unit that is positive on positive samples and negative on negative
ones is pushed the wrong way on the negatives; post-activation neurons rarely change sign, which
is why this site steers `zoo/steer-sentiment` where the authors' sites do not (docs/steering.md).

>>> import lenslab
>>> from lenslab.data import sentiment
>>> from lenslab.steering import austeer, austeer_scores
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
>>> iv = austeer(model, pos, neg, k=16, alpha=10.0, site="neurons")
>>> iv.n_units(), iv.edits[0].hook, iv.edits[0].op
(16, 'blocks.0.mlp.hook_post', 'multiply')
>>> iv.provenance["ties"]["decided_by_ties"]   # 8 pairs: beta has 5 values, the top is one big tie
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.results import provenance
from lenslab.sites import SITE_ALIASES, SITES
from lenslab.steering.edit_hooks import validate
from lenslab.steering.intervention import Edit, Intervention
from lenslab.toolbox import by_length, check_prompts, model_device

# AUSteer's own site names, spellings of sites of the one registry (`lenslab.sites.SITES`)
AU_SITES = {
    "attn": "z",  # blocks.{layer}.attn.hook_z: the input of W_O, not circuits' "attn_out"
    "mlp": "mlp_out",
    "resid": "resid_post",
    "neurons": "mlp_neuron",  # lenslab's addition (see the module docstring)
}


def canonical_site(site: str) -> str:
    """The registry name of an AUSteer site: its own names (`AU_SITES`) or any `lenslab.sites.SITES`
    name or alias whose activation has a position axis (`[batch, pos, ...]`)."""
    name = SITE_ALIASES.get(AU_SITES.get(site, site), AU_SITES.get(site, site))
    if name not in SITES or SITES[name].kind in ("pattern", "pattern_dest"):
        names = list(AU_SITES) + [s for s, v in SITES.items() if v.kind not in ("pattern", "pattern_dest")]
        raise LenslabError(f"site {site!r} is not one of {', '.join(names)}{did_you_mean(str(site), names)}")
    return name


def _site(site: str) -> str:
    return SITES[canonical_site(site)].hook


def last_token_activations(model, prompts: Sequence[str], site: str = "resid") -> Tensor:
    """Site activation at each prompt's last token, every layer: `[n_prompts, n_layers, n_units]`.

    Prompts of equal token length run as one batch; the result keeps the order of `prompts`.
    """
    template = _site(site)
    hooks = [template.format(layer=layer) for layer in range(model.cfg.n_layers)]
    names = set(hooks)
    device = model_device(model)
    toks = [model.to_tokens(p)[0] for p in prompts]
    out: list[Tensor | None] = [None] * len(prompts)
    with torch.no_grad():
        for idx in by_length(toks).values():
            batch = torch.stack([toks[i] for i in idx]).to(device)  # [batch, pos]
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
            acts = torch.stack([cache[h][:, -1].reshape(len(idx), -1).float().cpu() for h in hooks], dim=1)
            for j, i in enumerate(idx):
                out[i] = acts[j]  # [n_layers, n_units]
    return torch.stack(out)


def sign_consistency(pos: Tensor, neg: Tensor) -> Tensor:
    """AUSteer's score from paired activations `[S, ...]`: `beta` `[...]` in [-1, -0.5] U [0.5, 1]
    (0 where every difference is 0). `beta = max(n+, n-) / S`, negated when `n+ < n-`."""
    delta = pos - neg
    n_pos = (delta > 0).sum(0)
    n_neg = (delta < 0).sum(0)
    beta = torch.maximum(n_pos, n_neg).float() / delta.shape[0]
    return torch.where(n_pos < n_neg, -beta, beta)


def _paired(model, positive: Sequence[str], negative: Sequence[str], site: str) -> tuple[Tensor, Tensor]:
    """Last-token activations of the positive and the negative samples, `[S, n_layers, n_units]` each."""
    _site(site)
    pos = check_prompts(positive, "positive")
    neg = check_prompts(negative, "negative")
    if len(pos) != len(neg):
        raise LenslabError(
            f"AUSteer compares samples in pairs: got {len(pos)} positive and {len(neg)} negative; "
            "pass one negative per positive (the same prompt with the undesired answer)"
        )
    return last_token_activations(model, pos, site), last_token_activations(model, neg, site)


def austeer_scores(model, positive: Sequence[str], negative: Sequence[str], *, site: str = "resid") -> Tensor:
    """AUSteer's score table `beta` `[n_layers, n_units]` for paired positive/negative samples.

    Args:
        positive, negative: equally many samples; `positive[i]` and `negative[i]` form a pair
            (the same prompt with the desired and the undesired answer).
        site: "resid" (block output), "mlp" (MLP output), "attn" (input of W_O, heads flattened)
            or "neurons" (MLP hidden units after the activation; lenslab's addition), or the
            registry name of any site with a position axis ("resid_post", "z", "mlp_neuron", ...).

    >>> from lenslab.data import sentiment
    >>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
    >>> beta = austeer_scores(model, pos, neg, site="mlp")
    >>> beta.shape   # [n_layers, d_model]
    torch.Size([3, 96])
    >>> sorted(set(beta.abs().flatten().tolist()))   # S = 8 pairs: |beta| in {4/8, ..., 8/8}
    [0.5, 0.625, 0.75, 0.875, 1.0]
    """
    return sign_consistency(*_paired(model, positive, negative, site))


TIE_BREAKS = ("order", "gap", "random")


def _check_tie_break(tie_break: str) -> None:
    if tie_break not in TIE_BREAKS:
        raise LenslabError(
            f"tie_break {tie_break!r} is not one of {', '.join(TIE_BREAKS)}"
            f"{did_you_mean(str(tie_break), list(TIE_BREAKS))}"
        )


def select_units(
    beta: Tensor, k: int, *, tie_break: str = "order", gap: Tensor | None = None, seed: int = 0
) -> list[tuple[int, int]]:
    """The `k` (layer, unit) entries of `beta` `[n_layers, n_units]` with the largest `|beta|`.

    Entries with `beta = 0` are skipped. Among entries of equal `|beta|`:

    - `"order"` (default, the authors' code): a stable descending sort of the layer-major
      flattening, so ties keep (layer, unit) order, as Python's `sorted` does there;
    - `"gap"`: larger `gap` first (`[n_layers, n_units]`, e.g. the mean `|P - N|` that `austeer`
      passes), then (layer, unit) order;
    - `"random"`: a shuffle seeded by `seed`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LenslabError(f"k must be a positive integer (number of units to steer), got {k!r}")
    _check_tie_break(tie_break)
    flat = beta.flatten()
    order = torch.arange(flat.numel())
    if tie_break == "gap":
        if gap is None or gap.shape != beta.shape:
            raise LenslabError(
                f"tie_break='gap' needs gap of beta's shape {tuple(beta.shape)} (the mean |P - N| per unit)"
            )
        order = torch.sort(gap.flatten().double(), descending=True, stable=True).indices
    elif tie_break == "random":
        order = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(int(seed)))
    order = order[torch.sort(flat[order].abs(), descending=True, stable=True).indices]
    order = order[flat[order] != 0][:k]
    n_units = beta.shape[1]
    return [(int(i) // n_units, int(i) % n_units) for i in order]


def tie_report(beta: Tensor, k: int) -> dict:
    """How much ties decide AUSteer's selection of `k` units from `beta` `[n_layers, n_units]`.

    Returns a dict: `threshold` (the k-th largest non-zero `|beta|`), `above` (units strictly
    above it: chosen whatever the tie-break), `tied` (units at exactly the threshold), `slots`
    (how many of the tied units are chosen: `k - above`), and `decided_by_ties` (True when
    `tied > slots`: the tie-break, not the data, picks `slots` of the `tied` units).
    """
    mag = beta.flatten().abs()
    mag = mag[mag > 0]
    if mag.numel() == 0:
        return {"threshold": 0.0, "above": 0, "tied": 0, "slots": 0, "decided_by_ties": False}
    top = torch.sort(mag, descending=True).values
    threshold = float(top[min(k, top.numel()) - 1])
    above = int((mag > threshold).sum())
    tied = int((mag == threshold).sum())
    slots = min(k, top.numel()) - above
    return {"threshold": threshold, "above": above, "tied": tied, "slots": slots, "decided_by_ties": tied > slots}


def austeer(
    model,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    k: int = 16,
    alpha: float = 10.0,
    site: str = "resid",
    strength: float = 1.0,
    name: str = "",
    tie_break: str = "order",
    seed: int = 0,
) -> Intervention:
    """AUSteer: multiply the `k` most sign-consistent units by `1 + alpha * beta` at every position.

    Args:
        positive, negative: paired samples (see `austeer_scores`).
        k: number of (layer, unit) entries steered, chosen globally across layers by `|beta|`.
        alpha: the steering scale (the authors use 8 to 100 on 7B-9B models).
        site: "resid", "mlp", "attn" or "neurons".
        strength: the edits' strength `s`; the applied factor is `1 + s * alpha * beta`.
        tie_break: how units of equal `|beta|` are chosen (see `select_units`): "order" (the
            authors' code, default), "gap" (larger mean `|P - N|` first) or "random" (seeded by `seed`).

    Returns:
        An `Intervention` with one `multiply` edit per layer that has selected units
        (`vector = 1 + alpha * beta[units]`, positions "all"); provenance holds k, alpha, site,
        the selected units and their beta.

    >>> from lenslab.data import sentiment
    >>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
    >>> iv = austeer(model, pos, neg, k=8, alpha=20.0, site="attn")
    >>> [(e.hook, len(e.units)) for e in iv.edits]   # every tied top unit sits in layer 0 ("order" ties)
    [('blocks.0.attn.hook_z', 8)]
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LenslabError(f"alpha must be a finite number, got {alpha!r}")
    template = _site(site)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LenslabError(f"k must be a positive integer (number of units to steer), got {k!r}")
    _check_tie_break(tie_break)
    pos_acts, neg_acts = _paired(model, positive, negative, site)
    beta = sign_consistency(pos_acts, neg_acts)
    gap = (pos_acts - neg_acts).abs().mean(0)  # [n_layers, n_units]
    chosen = select_units(beta, k, tie_break=tie_break, gap=gap, seed=seed)
    if not chosen:
        raise LenslabError(
            "every AUSteer score is 0 (positive and negative activations are identical); "
            "use samples that differ at the last token"
        )
    by_layer: dict[int, list[int]] = {}
    for layer, unit in chosen:
        by_layer.setdefault(layer, []).append(unit)
    edits = []
    for layer in sorted(by_layer):
        units = sorted(by_layer[layer])
        vec = 1.0 + float(alpha) * beta[layer, units]
        edits.append(
            Edit(
                hook=template.format(layer=layer),
                op="multiply",
                vector=vec,
                units=tuple(units),
                positions="all",
                strength=strength,
            )
        )
    iv = Intervention(
        edits=tuple(edits),
        name=name or f"austeer {site} k={k}",
        provenance=provenance(
            model,
            method="austeer",
            timestamp=False,
            site=site,
            k=k,
            alpha=float(alpha),
            tie_break=tie_break,
            seed=int(seed),
            ties=tie_report(beta, k),
            units=[[layer, unit, float(beta[layer, unit])] for layer, unit in chosen],
            positive=list(positive),
            negative=list(negative),
        ),
    )
    validate(model, iv)
    return iv
