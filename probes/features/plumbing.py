"""Model + SAE plumbing for the feature modules: feature activations, identities, direct logit effects.

- `feature_acts`: the SAE's feature activations at its hook, `[batch, pos]` tokens ->
  `[batch, pos, d_sae]`, running the model only as far as the hook.
- `model_identity` / `sae_identity` / `sae_hash`: what a feature store records to recognise the
  model and the SAE it was built with.
- `logit_effects` / `logit_summary` (`logit_summary_arrays`): the direct logit effect
  `W_dec[f] @ W_U` of features (top promoted and suppressed tokens, histogram over the vocabulary).
- `check_pair`, `check_feature`, `open_sae`, `str_tokens`: checks and conversions the store,
  indexing, lookup and dashboard modules share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.probes.sae import check_sae, load_sae
from lenslab.toolbox import model_name

__all__ = [
    "LOGIT_BINS",
    "LOGIT_K",
    "check_feature",
    "check_pair",
    "feature_acts",
    "logit_effects",
    "logit_summary",
    "logit_summary_arrays",
    "model_identity",
    "open_sae",
    "sae_hash",
    "sae_identity",
    "str_tokens",
]

LOGIT_K = 10
"""Promoted and suppressed tokens kept per feature in a store and shown on a dashboard."""
LOGIT_BINS = 32
"""Bins of a feature's logit-effect histogram over the vocabulary."""


def _hook_name(sae) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise LenslabError(
            "the SAE does not say which hook it reads (sae.cfg.metadata.hook_name is empty): set it, e.g. "
            "sae.cfg.metadata.hook_name = 'blocks.1.hook_resid_post'"
        )
    return str(hook)


def check_pair(model, sae) -> str:
    """The SAE's hook (`sae.cfg.metadata.hook_name`), after `lenslab.probes.sae.check_sae` (the model
    has the hook, of the SAE's width)."""
    hook = _hook_name(sae)
    check_sae(model, sae)
    return hook


def _stop_layer(hook: str) -> int | None:
    parts = hook.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if hook in ("hook_embed", "hook_pos_embed"):
        return 0
    return None


@torch.inference_mode()
def feature_acts(model, sae, tokens: Tensor, *, check: bool = True) -> Tensor:
    """SAE feature activations at the SAE's hook: `tokens` `[batch, pos]` -> `[batch, pos, d_sae]` (float32).

    Runs the model only up to the block that holds the hook; `hook_z` activations `[batch, pos,
    head, d_head]` are flattened unless the SAE reshapes them itself, and an SAE of one head
    (`metadata.hook_head_index`) reads that head. `check=False` skips `check_pair` (a forward pass
    on two tokens), for a caller that checked the pair once and calls this per batch.
    """
    hook = check_pair(model, sae) if check else _hook_name(sae)
    stop = _stop_layer(hook)
    kw = {"names_filter": [hook]}
    if stop is not None:
        kw["stop_at_layer"] = stop
    try:
        _, cache = model.run_with_cache(tokens, **kw)
    except TypeError:  # a model without stop_at_layer
        kw.pop("stop_at_layer", None)
        _, cache = model.run_with_cache(tokens, **kw)
    x = cache[hook]
    head = getattr(sae.cfg.metadata, "hook_head_index", None)
    if head is not None and x.ndim == 4:
        x = x[:, :, int(head)]
    elif x.ndim == 4 and getattr(sae.cfg, "reshape_activations", "none") != "hook_z":
        x = x.flatten(-2)
    width = x.shape[-1] if x.ndim == 3 else x.shape[-2] * x.shape[-1]
    if width != sae.cfg.d_in:
        raise LenslabError(
            f"hook {hook!r} has width {width} in this model but the SAE expects d_in={sae.cfg.d_in}; "
            "load the SAE trained for this model"
        )
    x = x.to(device=sae.W_enc.device)
    return sae.encode(x).float()


def _sha(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sae_hash(sae) -> str:
    """sha256 (16 hex) of the SAE's state dict, keys in sorted order."""
    sd = sae.state_dict()
    return _sha([sd[k] for k in sorted(sd)])


def model_identity(model) -> dict:
    """Name, sizes and a fingerprint of the embedding and unembedding (sha256, 16 hex)."""
    name = model_name(model)
    try:
        fp = _sha([model.W_E, model.W_U])
    except Exception:
        fp = None
    return {
        "model": str(name),
        "model_fingerprint": fp,
        "d_model": int(model.cfg.d_model),
        "d_vocab": int(model.cfg.d_vocab),
    }


def sae_identity(sae, source: str | None = None) -> dict:
    """Hook, sizes, source (`source`, else where the SAE was loaded from), architecture and weights
    hash (`sae_hash`) of an SAE."""
    src = source or getattr(sae, "lenslab_source", None) or getattr(sae.cfg.metadata, "sae_path", None)
    return {
        "hook": _hook_name(sae),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "sae_source": str(src) if src else None,
        "sae_hash": sae_hash(sae),
        "sae_architecture": type(sae).__name__,
    }


def open_sae(source: str, model=None):
    """An SAE by source (`lenslab.probes.sae.load_sae`); records the source on `sae.lenslab_source`."""
    sae = load_sae(source, model=model)
    if getattr(sae, "lenslab_source", None) is None:
        sae.lenslab_source = str(source)
    return sae


def str_tokens(model, ids) -> list[str]:
    """The model's token strings of token ids `ids` `[n]` (a list or a 1-d tensor)."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    return [str(s) for s in model.to_str_tokens(torch.tensor(ids))]


@torch.no_grad()
def logit_effects(
    model, sae, feature: int, k: int = LOGIT_K
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Direct logit effect of one feature, `W_dec[feature] @ W_U` `[d_vocab]`: the `k` most promoted
    and the `k` most suppressed tokens as (token id, value), strongest first. (No final LayerNorm:
    the direction's direct path to the logits, as in SAE dashboards.)"""
    check_feature(feature, int(sae.cfg.d_sae))
    v = sae.W_dec[feature].float().to(model.W_U.device) @ model.W_U.float()
    k = min(k, v.shape[0])
    top, bot = v.topk(k), (-v).topk(k)
    return (
        [(int(i), float(x)) for x, i in zip(top.values, top.indices)],
        [(int(i), -float(x)) for x, i in zip(bot.values, bot.indices)],
    )


def check_feature(feature, d_sae: int) -> int:
    """`feature` as an int in `0 .. d_sae - 1` (a Python or numpy integer, or a 0-d integer tensor;
    not a bool); a `LenslabError` otherwise. The one feature-id check of lenslab."""
    if isinstance(feature, Tensor) and feature.ndim == 0 and not feature.is_floating_point():
        feature = int(feature)
    if isinstance(feature, (bool, np.bool_)) or not isinstance(feature, (int, np.integer)):
        raise LenslabError(f"feature must be an integer id, got {feature!r}")
    if not 0 <= int(feature) < d_sae:
        raise LenslabError(f"feature {feature!r} is out of range: this SAE has features 0 .. {d_sae - 1}")
    return int(feature)


@torch.no_grad()
def logit_summary_arrays(v: Tensor, k: int) -> tuple[np.ndarray, ...]:
    """`logit_summary` as arrays, one row per row of `v` `[n, d_vocab]`: top-k promoted ids `[n, k]`
    and values (float32), top-k suppressed ids and values (most negative first), histogram heights
    `[n, LOGIT_BINS]` and edges `[n, LOGIT_BINS + 1]` (float64)."""
    v = v.float().cpu()
    k = min(k, v.shape[1])
    top, bot = v.topk(k, dim=1), (-v).topk(k, dim=1)
    vmin, vmax = v.min(1).values, v.max(1).values
    width = (vmax - vmin).clamp(min=1e-6)
    idx = ((v - vmin[:, None]) / width[:, None] * LOGIT_BINS).long().clamp(0, LOGIT_BINS - 1)
    heights = torch.zeros(v.shape[0], LOGIT_BINS, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
    edges = vmin[:, None].double() + width[:, None].double() * torch.linspace(0, 1, LOGIT_BINS + 1, dtype=torch.float64)
    return (
        top.indices.numpy(),
        top.values.numpy(),
        bot.indices.numpy(),
        (-bot.values).numpy(),
        heights.numpy(),
        edges.numpy(),
    )


def logit_summary(
    v: Tensor, k: int
) -> list[tuple[list[int], list[float], list[int], list[float], list[int], list[float]]]:
    """Per row of logit effects `v` `[n, d_vocab]`: top-k promoted ids and values, top-k suppressed
    ids and values (most negative first), and a LOGIT_BINS-bin histogram (heights, edges)."""
    arrays = logit_summary_arrays(v, k)
    return [tuple(a[j].tolist() for a in arrays) for j in range(v.shape[0])]
