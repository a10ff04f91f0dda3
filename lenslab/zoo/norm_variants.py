"""Where the norms sit: Pre-LN, Peri-LN and Post-LN on a TransformerLens `HookedTransformer`.

With `F` a sub-layer (attention or MLP) and `Norm` the model's `normalization_type` ("LN" or "RMS"):

| variant | a sub-layer | final norm |
|---|---|---|
| `"pre"` (TransformerLens's, GPT-2's) | `x + F(Norm(x))` | yes |
| `"peri"` (Kim et al. 2025, "Peri-LN", arXiv 2502.02732; Gemma 2's "sandwich") | `x + Norm_out(F(Norm_in(x)))` | yes |
| `"post"` (Vaswani et al. 2017) | `Norm(x + F(x))` | no (the last block's norm is the model's last) |

TransformerLens builds Pre-LN only (its `use_normalization_before_and_after`, Gemma 2's Peri-LN,
fails for `normalization_type="LN"`), so `apply_norm_variant` rebuilds a Pre-LN model in place:

- Peri-LN adds `blocks.{l}.ln1_post` and `blocks.{l}.ln2_post` (TransformerLens's names for
  Gemma 2's output norms) and applies them at `hook_attn_out` / `hook_mlp_out`;
- Post-LN replaces `ln1`, `ln2` and `ln_final` by identities, adds `blocks.{l}.ln_resid_mid` and
  `blocks.{l}.ln_resid_post` and applies them at `hook_resid_mid` / `hook_resid_post`.

A norm is applied by the hook point it sits at (`NormedHookPoint`): the hook point's forward is
the norm, and its hooks run on the normed tensor. So every hook keeps its name and sees what the
block actually uses: `hook_attn_out` what Peri-LN adds to the residual stream, `hook_resid_post`
Post-LN's normed stream; the atlas, sinks and caches work unchanged. New norms start at weight 1
and bias 0 (TransformerLens's own initialisation) and draw no random numbers, so the three
variants of one seed share every other initial weight.

The variant is `model.lenslab_norm_variant`; `zoo.save_hooked` records it in config.json
(`"norm_variant"`) and `zoo.load_hooked` applies it again before loading the weights.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformer_lens.components import LayerNorm, RMSNorm
from transformer_lens.hook_points import HookPoint

from lenslab._errors import LenslabError, did_you_mean

__all__ = ["VARIANTS", "NormedHookPoint", "apply_norm_variant", "norm_variant"]

VARIANTS = ("pre", "peri", "post")
"""The norm placements `apply_norm_variant` builds."""

ATTR = "lenslab_norm_variant"


class NormedHookPoint(HookPoint):
    """A hook point whose forward is a norm: its hooks see the normed tensor. The norm is held by
    reference, not as a child module (the block owns it: one state-dict key per weight)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        object.__setattr__(self, "_norm", norm)

    def forward(self, x: Tensor) -> Tensor:
        return self._norm(x)


def _norm(cfg) -> nn.Module:
    kind = cfg.normalization_type
    if kind == "LN":
        return LayerNorm(cfg)
    if kind == "RMS":
        return RMSNorm(cfg)
    raise LenslabError(
        f"Peri-LN and Post-LN need a model with trainable norms (normalization_type 'LN' or 'RMS'), "
        f"got {kind!r}: build the model with normalization_type='LN'"
    )


def norm_variant(model) -> str:
    """Which of `VARIANTS` `model` is ("pre" unless `apply_norm_variant` made it another)."""
    return getattr(model, ATTR, "pre")


def apply_norm_variant(model, variant: str):
    """Make the Pre-LN `HookedTransformer` `model` a `variant` one, in place; returns it.

    Args:
        model: a freshly built (or Pre-LN) HookedTransformer with normalization_type "LN" or "RMS",
            sequential attention and MLP (`attn_only` allowed: then a block has one sub-layer).
        variant: one of `VARIANTS`; "pre" changes nothing.

    The new norms are built on the model's device and dtype, weight 1 and bias 0.
    """
    if variant not in VARIANTS:
        raise LenslabError(
            f"norm variant {variant!r} is not one of {', '.join(VARIANTS)}{did_you_mean(variant, VARIANTS)}"
        )
    current = norm_variant(model)
    if current == variant:
        return model
    if current != "pre":
        raise LenslabError(f"the model is already {current!r}: build a fresh Pre-LN model to make it {variant!r}")
    if variant == "pre":
        return model
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False) or getattr(cfg, "use_normalization_before_and_after", False):
        raise LenslabError(
            "Peri-LN and Post-LN are built on sequential Pre-LN blocks (no parallel_attn_mlp, no sandwich norms)"
        )
    _norm(cfg)  # a clear error for a model without trainable norms, before anything changes
    param = next(model.parameters())
    for block in model.blocks:
        sites = (("attn_out", "ln1"),) if cfg.attn_only else (("attn_out", "ln1"), ("mlp_out", "ln2"))
        if variant == "peri":
            for hook, ln in sites:
                norm = _norm(cfg).to(param.device, param.dtype)
                setattr(block, f"{ln}_post", norm)
                setattr(block, f"hook_{hook}", NormedHookPoint(norm))
        else:  # post
            for _, ln in sites:
                setattr(block, ln, nn.Identity())
            for hook in ("resid_post",) if cfg.attn_only else ("resid_mid", "resid_post"):
                norm = _norm(cfg).to(param.device, param.dtype)
                setattr(block, f"ln_{hook}", norm)
                setattr(block, f"hook_{hook}", NormedHookPoint(norm))
    if variant == "post" and hasattr(model, "ln_final"):
        model.ln_final = nn.Identity()
    setattr(model, ATTR, variant)
    model.setup()  # the hook dictionary now names the new hook points (and the new norms' own)
    return model
