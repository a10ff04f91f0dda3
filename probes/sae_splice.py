"""Splicing an SAE into a forward pass: TransformerLens hooks that replace an activation by the SAE's reconstruction.

- `splice_hooks`: forward hooks `[(hook_name, fn)]` that put `decode(encode(x))` in place of the
  activation at the SAE's hook point (usable with `model.run_with_hooks` / `model.hooks`);
  `sae_metrics` measures the loss with them.
- `zero_hooks`: the same hook point zero-ablated (the baseline of the loss recovered).
- `sae_input` / `encode_decode`: what `sae.encode` takes from a hook activation, and the SAE's
  features and reconstruction of it, flattened to `d_in`.

Re-exported by `lenslab.probes.sae`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lenslab._errors import LenslabError

__all__ = ["encode_decode", "sae_input", "splice_hooks", "zero_hooks"]


def sae_input(sae, act: Tensor) -> Tensor:
    """What `sae.encode` takes from a hook activation `[..., *hook dims]`: one head when
    `hook_head_index` is set, the heads as they are for SAEs that reshape `hook_z` themselves,
    else the last dimensions flattened to `d_in`."""
    head = sae.cfg.metadata.hook_head_index
    if head is not None:
        return act[..., head, :]
    if getattr(sae, "hook_z_reshaping_mode", False):
        return act
    if act.shape[-1] != sae.cfg.d_in and act.ndim >= 2 and act.shape[-2] * act.shape[-1] == sae.cfg.d_in:
        return act.flatten(-2)
    return act


def encode_decode(sae, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`x` from `sae_input` -> (x `[..., d_in]`, features `[..., d_sae]`, reconstruction `[..., d_in]`);
    an SAE that reshapes `hook_z` itself takes and returns `[..., n_heads, d_head]`, flattened here to `d_in`."""
    f = sae.encode(x)
    x_hat = sae.decode(f)

    def flat(t: Tensor) -> Tensor:
        return t if t.shape[-1] == sae.cfg.d_in else t.flatten(-2)

    return flat(x), f, flat(x_hat)


def _reconstruct(sae, act: Tensor) -> Tensor:
    """Replacement for a hook activation: the SAE's reconstruction in the activation's own shape."""
    device = next((p.device for p in sae.parameters()), act.device)  # a split model's layer may sit elsewhere
    x = sae_input(sae, act).to(device)
    x_hat = sae.decode(sae.encode(x)).to(act.device, act.dtype)
    head = sae.cfg.metadata.hook_head_index
    if head is not None:
        out = act.clone()
        out[..., head, :] = x_hat
        return out
    return x_hat.reshape(act.shape)


def splice_hooks(sae, hook_name: str | None = None) -> list[tuple[str, object]]:
    """Forward hooks `[(hook_name, fn)]` that replace the activation at the SAE's hook point with
    the SAE's reconstruction `decode(encode(x))` at every position.

    >>> import lenslab
    >>> from lenslab.probes.sae import load_sae
    >>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
    >>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
    >>> tokens = model.to_tokens("t5 t6 t7 t5 t6 t7")
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(sae))
    >>> logits.shape   # [batch, pos, d_vocab]
    torch.Size([1, 7, 304])
    """
    name = hook_name or sae.cfg.metadata.hook_name
    if not name:
        raise LenslabError("the SAE names no hook point: pass hook_name= or set sae.cfg.metadata.hook_name")

    def hook(act, hook=None):
        return _reconstruct(sae, act)

    return [(name, hook)]


def zero_hooks(sae, hook_name: str) -> list[tuple[str, object]]:
    """Forward hooks `[(hook_name, fn)]` that set the activation at `hook_name` to zero (only the SAE's
    head, `[..., head, :]`, when `hook_head_index` is set)."""
    head = sae.cfg.metadata.hook_head_index

    def hook(act, hook=None):
        if head is None:
            return torch.zeros_like(act)
        out = act.clone()
        out[..., head, :] = 0
        return out

    return [(hook_name, hook)]
