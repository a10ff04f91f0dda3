"""Steering baselines: mean difference (DiffMean / CAA) and ActAdd. Each returns an `Intervention`.

* **Mean difference** (DiffMean; Contrastive Activation Addition, Rimsky et al. 2024,
  arXiv:2312.06681; Marks & Tegmark 2023): the mean activation at a layer over positive prompts
  minus the mean over negative prompts, read at the last token (`position="last"`, as CAA does
  at the answer letter) or averaged over each prompt's tokens (`position="mean"`), then added
  with a strength at every position (or the positions you pick).
* **ActAdd** (Turner et al. 2023, "Steering Language Models With Activation Engineering",
  arXiv:2308.10248): run a contrastive prompt pair ("Love" / "Hate"), take the difference of
  their residual streams at one layer, position by position (the shorter prompt padded at the
  end), and add it, times a strength, to the first positions of the user's prompt (the
  beginning-of-sequence token included, where the difference is zero).

>>> import lenslab
>>> from lenslab.data import sentiment
>>> from lenslab.steering import mean_difference, actadd
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> pos, neg = sentiment.prompts(8, "positive"), sentiment.prompts(8, "negative")
>>> iv = mean_difference(model, pos, neg, layers=[1], strength=4.0)
>>> [(e.hook, e.op, tuple(e.vector.shape), e.strength) for e in iv.edits]
[('blocks.1.hook_resid_post', 'add', (96,), 4.0)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.results import provenance
from lenslab.sites import site_hook
from lenslab.steering.edit_hooks import validate
from lenslab.steering.intervention import Edit, Intervention, Positions
from lenslab.toolbox import by_length, check_layers, check_prompts, model_device


def hook_name(layer: int, site: str) -> str:
    """The hook of `site` at `layer`: a name of the one site registry (`lenslab.sites.SITES`:
    "resid_post", "attn_out", "z", "mlp_neuron", ...) or a template with `{layer}`.

    >>> hook_name(3, "resid_post")
    'blocks.3.hook_resid_post'
    >>> hook_name(1, "blocks.{layer}.attn.hook_z")
    'blocks.1.attn.hook_z'
    """
    return site_hook(site, layer)


def mean_activations(model, prompts: Sequence[str], hooks: Sequence[str], position: str = "last") -> dict[str, Tensor]:
    """Mean activation `[d]` (last dims flattened) per hook over `prompts`.

    `position="last"` reads each prompt's last token; `"mean"` averages each prompt's tokens
    first (so long prompts do not weigh more). Prompts of equal token length run as one batch.
    """
    if position not in ("last", "mean"):
        raise LenslabError(f"position {position!r} must be 'last' or 'mean'{did_you_mean(position, ['last', 'mean'])}")
    device = model_device(model)
    rows = [model.to_tokens(p)[0] for p in prompts]
    sums = {h: None for h in hooks}
    names = set(hooks)
    with torch.no_grad():
        for idx in by_length(rows).values():
            batch = torch.stack([rows[i] for i in idx]).to(device)  # [batch, pos]
            _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
            for h in hooks:
                a = cache[h].reshape(batch.shape[0], batch.shape[1], -1).float()  # [batch, pos, d]
                per_prompt = a[:, -1] if position == "last" else a.mean(dim=1)  # [batch, d]
                s = per_prompt.sum(0)
                sums[h] = s if sums[h] is None else sums[h] + s
    return {h: (sums[h] / len(prompts)).cpu() for h in hooks}


def mean_difference(
    model,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: int | Sequence[int],
    *,
    site: str = "resid_post",
    position: str = "last",
    strength: float = 1.0,
    positions: Positions = "all",
    name: str = "",
) -> Intervention:
    """DiffMean / CAA: add `mean(act | positive) - mean(act | negative)` at each layer.

    Args:
        positive, negative: prompts with and without the concept (need not be paired).
        layers: layer index or indices; one `add` edit per layer.
        site: "resid_post" (default), "resid_pre", "resid_mid", "attn_out", "mlp_out", or a hook
            template such as "blocks.{layer}.attn.hook_z".
        position: where each prompt is read, "last" token or "mean" over tokens.
        strength: the edits' strength (the vector is added times this).
        positions: where the vector is added when applied ("all" by default).

    Returns:
        An `Intervention` with one edit per layer, vector `[d]` each.

    >>> iv = mean_difference(model, ["the day was lovely ."], ["the day was awful ."], layers=[0, 2],
    ...                      site="mlp_out", position="mean")
    >>> [(e.hook, e.vector.shape) for e in iv.edits]
    [('blocks.0.hook_mlp_out', torch.Size([96])), ('blocks.2.hook_mlp_out', torch.Size([96]))]
    """
    pos_prompts = check_prompts(positive, "positive")
    neg_prompts = check_prompts(negative, "negative")
    hooks = [hook_name(layer, site) for layer in check_layers(model, layers)]
    validate(model, Intervention(edits=tuple(Edit(hook=h, op="zero") for h in hooks)))
    mp = mean_activations(model, pos_prompts, hooks, position)
    mn = mean_activations(model, neg_prompts, hooks, position)
    edits = tuple(Edit(hook=h, op="add", vector=mp[h] - mn[h], positions=positions, strength=strength) for h in hooks)
    prov = provenance(
        model,
        method="mean_difference",
        timestamp=False,
        site=site,
        layers=list(check_layers(model, layers)),
        position=position,
        positive=pos_prompts,
        negative=neg_prompts,
    )
    return Intervention(edits=edits, name=name or "mean difference", provenance=prov)


def actadd(
    model,
    positive: str,
    negative: str,
    layer: int,
    *,
    site: str = "resid_pre",
    strength: float = 1.0,
    pad: str | int | None = None,
    name: str = "",
) -> Intervention:
    """ActAdd: the activation difference of a prompt pair, added at the user prompt's first positions.

    Args:
        positive, negative: the contrast pair, e.g. "Love" and "Hate".
        layer: the injection layer.
        site: "resid_pre" (Turner et al.'s choice) or another site / hook template.
        strength: the coefficient c (the paper uses values such as 3 to 15 on GPT-2 XL).
        pad: token (string or id) that pads the shorter prompt at the end; default the tokenizer's
            pad token, else its EOS token.

    Returns:
        An `Intervention` with one `add` edit whose vector is `[n_pos, d]` at positions
        `0..n_pos-1` (BOS included); applying it to a prompt shorter than `n_pos` tokens raises.

    >>> iv = actadd(model, "the day was lovely .", "the day was awful .", layer=1, strength=5.0)
    >>> e = iv.edits[0]
    >>> e.hook, e.vector.shape, e.positions   # [n_pos, d_model]: <bos> and the 5 words
    ('blocks.1.hook_resid_pre', torch.Size([6, 96]), (0, 1, 2, 3, 4, 5))
    >>> (e.vector.norm(dim=-1) > 0).tolist()   # zero while the two prompts still agree (causal attention)
    [False, False, False, False, True, True]
    """
    if not isinstance(positive, str) or not isinstance(negative, str) or not positive or not negative:
        raise LenslabError("actadd takes one positive and one negative prompt (non-empty strings)")
    (layer,) = check_layers(model, [layer])
    hook = hook_name(layer, site)
    validate(model, Intervention(edits=(Edit(hook=hook, op="zero"),)))
    tp, tn = model.to_tokens(positive)[0], model.to_tokens(negative)[0]
    n = max(len(tp), len(tn))
    if len(tp) != len(tn):
        pad_id = _pad_id(model, pad)
        tp = torch.cat([tp, tp.new_full((n - len(tp),), pad_id)])
        tn = torch.cat([tn, tn.new_full((n - len(tn),), pad_id)])
    device = model_device(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.stack([tp, tn]).to(device), names_filter=lambda x: x == hook)
    a = cache[hook].reshape(2, n, -1).float().cpu()  # [2, pos, d]
    diff = a[0] - a[1]  # [pos, d]
    edit = Edit(hook=hook, op="add", vector=diff, positions=tuple(range(n)), strength=strength)
    prov = provenance(
        model, method="actadd", timestamp=False, site=site, layer=layer, positive=positive, negative=negative
    )
    return Intervention(edits=(edit,), name=name or f"actadd {positive!r} - {negative!r}", provenance=prov)


def _pad_id(model, pad: str | int | None) -> int:
    if isinstance(pad, int):
        return pad
    if isinstance(pad, str):
        ids = model.to_tokens(pad, prepend_bos=False)[0].tolist()
        if len(ids) != 1:
            raise LenslabError(f"pad {pad!r} is {len(ids)} tokens; pass a single-token string or a token id")
        return ids[0]
    tok = model.tokenizer
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tok, attr, None) is not None:
            return int(getattr(tok, attr))
    raise LenslabError("the prompts differ in length and the tokenizer has no pad or EOS token; pass pad=")
