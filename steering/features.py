"""SAE feature steering: ablate, clamp or add one sparse-autoencoder feature during generation.

Each builder takes a sae-lens `SAE` (as `lenslab.probes.sae.load_sae` returns it) and a feature id
and returns an `Intervention` at the SAE's hook point, so everything that steers with
interventions (`apply`, `generate` / `stream`, presets, the app) steers with features too:

- `ablate_feature(sae, f)`: the feature's activation goes to 0;
- `clamp_feature(sae, f, c)`: the feature's activation is set to `c` wherever the edit acts
  (also where it was not firing);
- `add_feature(sae, f, c)`: `+ c * W_dec[f]` at every edited position (an `add` edit).

Ablate and clamp are one `feature` edit: with `x` the activation, `a(x)` the feature's current
activation (read with the SAE's own encoder: column, bias, `b_dec`, threshold, see `FeatureRead`)
and `d = W_dec[f]`, the new activation is `x + s * (target - a(x)) * d` at strength `s`. That is
the SAE's decomposition `decode(acts) + error` with `acts[f]` replaced by `target` and the
reconstruction error `x - decode(encode(x))` kept as it is (what sae-lens computes with
`use_error_term=True` and a hook that edits `hook_sae_acts_post`). Re-encoding the edited
activation moves the feature's pre-activation by `(target - a) * (W_dec[f] . W_enc[:, f])`: when
that product is 1 (a tied SAE with unit-norm decoder rows) an ablated feature re-encodes to exactly
0 and a clamped one to exactly `target` on the tokens where it fired. Trained SAEs are not tied:
the zoo SAEs' products range widely (zoo/steer-sentiment: median 0.19, 5-95% 0.03-0.62), so the
re-encoded value is generally not the target, and the other features move too (by `d`'s overlap
with their encoder columns). The edit is defined on the decomposition, not on re-encoding.

Architectures (sae-lens inference classes):

- `StandardSAE` (ReLU) and `JumpReLUSAE`: exact, from the feature's own encoder column, bias and
  threshold (a few kilobytes in a preset).
- `TopKSAE`: whether a feature is active depends on every other feature (it must be among the
  `k` largest pre-activations), so by default (`topk="exact"`) the edit carries the whole encoder
  `[d_in, d_sae]` and reads the activation exactly as sae-lens does (a preset then holds
  `4 * d_in * d_sae` bytes: 256 KB for the zoo SAEs, 75 MB for a 24k-feature GPT-2 SAE).
  `topk="relu"` carries only the feature's column and reads `max(pre, 0)`: exact where the feature
  is among the top k, but on tokens where its pre-activation is positive without being selected it
  counts an activation the SAE does not have (ablation then removes a direction that was not
  there). `rescale_acts_by_decoder_norm` is folded in (encoder columns times, decoder rows divided
  by, the decoder norms).

Not supported (a `LenslabError` says so): runtime input normalisation (`normalize_activations`
"layer_norm" or "constant_norm_rescale") and other architectures (gated, AbsTopK, transcoders...).
SAEs on one head of `hook_z` (`hook_head_index`) edit that head's entries (`units`).

>>> import lenslab
>>> from lenslab.probes.sae import load_sae
>>> from lenslab.steering import ablate_feature, generate
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> sae = load_sae("zoo/steer-sentiment/blocks.1.hook_resid_post", model=model)
>>> iv = ablate_feature(sae, 149)   # feature 149 fires on negative adjectives
>>> e = iv.edits[0]
>>> e.hook, e.op, e.feature.index, e.feature.kind, e.feature.target
('blocks.1.hook_resid_post', 'feature', 149, 'topk', 0.0)
>>> generate(model, "the day was awful . the movie was", iv, max_new_tokens=3)   # one feature does not flip it
' bitter. the'
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.probes.features.plumbing import check_feature
from lenslab.steering.intervention import Edit, FeatureRead, Intervention, Positions

__all__ = ["ablate_feature", "add_feature", "clamp_feature", "feature_read", "decoder_row"]

TOPK_MODES = ("exact", "relu")


def _hook(sae) -> str:
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not hook:
        raise LenslabError(
            "the SAE names no hook point (sae.cfg.metadata.hook_name is empty); set it to the hook it reads, "
            "e.g. sae.cfg.metadata.hook_name = 'blocks.1.hook_resid_post'"
        )
    return str(hook)


def _kind(sae) -> str:
    from sae_lens import JumpReLUSAE, StandardSAE, TopKSAE  # deferred: sae_lens loads only when an SAE is used

    try:
        from sae_lens.saes.abstopk_sae import AbsTopKSAE  # deferred: sae_lens loads only when an SAE is used
    except ImportError:  # older sae-lens
        AbsTopKSAE = ()
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise LenslabError(
            f"this SAE normalises its input at run time (normalize_activations={norm!r}), so a feature's activation "
            "is not a linear read of the activation: feature steering supports SAEs without it (or with the "
            "normalisation folded into the weights)"
        )
    if AbsTopKSAE and isinstance(sae, AbsTopKSAE):
        pass
    elif isinstance(sae, TopKSAE):
        return "topk"
    elif isinstance(sae, JumpReLUSAE):
        return "jumprelu"
    elif isinstance(sae, StandardSAE):
        return "relu"
    arch = sae.cfg.architecture() if hasattr(sae.cfg, "architecture") else type(sae).__name__
    raise LenslabError(
        f"feature steering supports sae-lens's StandardSAE (ReLU), JumpReLUSAE and TopKSAE inference classes, "
        f"not {type(sae).__name__} (architecture {arch!r}); load the SAE with lenslab.probes.sae.load_sae or "
        "sae_lens.SAE.load_from_disk"
    )


def _units(sae) -> tuple[int, ...] | None:
    """An SAE of one head of `hook_z` reads that head's entries of the flattened `[head, d_head]`."""
    head = getattr(sae.cfg.metadata, "hook_head_index", None)
    if head is None:
        return None
    d = int(sae.cfg.d_in)
    return tuple(range(int(head) * d, (int(head) + 1) * d))


def _weights(sae) -> dict[str, Tensor]:
    def w(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32)

    return {"W_enc": w(sae.W_enc), "b_enc": w(sae.b_enc), "W_dec": w(sae.W_dec), "b_dec": w(sae.b_dec)}


def _rescaled(sae) -> bool:
    return bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))


@torch.no_grad()
def decoder_row(sae, feature: int) -> Tensor:
    """`[d_in]`: what one unit of the feature's activation adds to the reconstruction: `W_dec[feature]`
    (divided by its norm for TopK SAEs with `rescale_acts_by_decoder_norm`)."""
    f = check_feature(feature, int(sae.cfg.d_sae))
    row = sae.W_dec[f].detach().to("cpu", torch.float32).clone()
    if _rescaled(sae):
        row = row / row.norm()
    return row


@torch.no_grad()
def feature_read(sae, feature: int, target: float = 0.0, *, topk: str = "exact") -> FeatureRead:
    """The `FeatureRead` of `feature`: how a feature edit reads its activation with the SAE's
    encoder (see the module docstring for the architectures and `topk`)."""
    if topk not in TOPK_MODES:
        raise LenslabError(f"topk must be one of {', '.join(TOPK_MODES)}, got {topk!r}")
    kind = _kind(sae)
    f = check_feature(feature, int(sae.cfg.d_sae))
    W = _weights(sae)
    b_dec = W["b_dec"] if getattr(sae.cfg, "apply_b_dec_to_input", True) else None
    if kind == "topk":
        enc, bias = W["W_enc"], W["b_enc"]  # [d_in, d_sae], [d_sae]
        if _rescaled(sae):
            norms = W["W_dec"].norm(dim=-1)
            enc, bias = enc * norms, bias * norms
        if topk == "exact":
            return FeatureRead(
                index=f,
                kind="topk",
                encoder=enc.contiguous(),
                bias=bias.contiguous(),
                b_dec=b_dec,
                k=int(sae.cfg.k),
                target=target,
            )
        return FeatureRead(
            index=f, kind="relu", encoder=enc[:, f].contiguous(), bias=bias[f].clone(), b_dec=b_dec, target=target
        )
    threshold = float(sae.threshold[f]) if kind == "jumprelu" else 0.0
    return FeatureRead(
        index=f,
        kind=kind,
        encoder=W["W_enc"][:, f].contiguous(),
        bias=W["b_enc"][f].clone(),
        b_dec=b_dec,
        threshold=threshold,
        target=target,
    )


def _about(sae) -> dict:
    meta = sae.cfg.metadata
    src = (
        getattr(sae, "lenslab_source", None)
        or getattr(meta, "sae_path", None)
        or (f"{meta.release}/{meta.sae_id}" if getattr(meta, "release", None) else None)
    )
    return {
        "sae": str(src) if src else None,
        "sae_model": getattr(meta, "model_name", None),
        "hook": _hook(sae),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "architecture": type(sae).__name__,
    }


def _finite(v, what: str) -> float:

    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise LenslabError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _feature_iv(
    sae, feature, target: float, *, method: str, name: str, positions: Positions, strength: float, topk: str
) -> Intervention:
    read = feature_read(sae, feature, target, topk=topk)
    hook = _hook(sae)
    edit = Edit(
        hook=hook,
        op="feature",
        vector=decoder_row(sae, feature),
        feature=read,
        units=_units(sae),
        positions=positions,
        strength=strength,
    )
    prov = {
        "method": method,
        "feature": read.index,
        "target": target,
        "topk": topk if _kind(sae) == "topk" else None,
        **_about(sae),
    }
    return Intervention(edits=(edit,), name=name, provenance=prov)


def ablate_feature(
    sae, feature: int, *, positions: Positions = "all", strength: float = 1.0, topk: str = "exact"
) -> Intervention:
    """Set SAE feature `feature`'s activation to 0 at `positions` (its reconstruction error kept).

    Args:
        sae: a sae-lens `SAE` (StandardSAE, JumpReLUSAE or TopKSAE) naming its hook point.
        feature: the feature id, `0 <= feature < d_sae`.
        positions: "all", "last", "prompt", "generated" or indices (see `Edit`).
        strength: 1 removes the feature, 0 leaves the model unchanged, in between blends.
        topk: for TopK SAEs, "exact" (carry the whole encoder) or "relu" (the feature's column only).

    Returns:
        An `Intervention` with one `feature` edit at the SAE's hook.
    """
    f = check_feature(feature, int(sae.cfg.d_sae))
    return _feature_iv(
        sae,
        f,
        0.0,
        method="feature ablate",
        name=f"ablate f{f} @ {_hook(sae)}",
        positions=positions,
        strength=strength,
        topk=topk,
    )


def clamp_feature(
    sae, feature: int, value: float, *, positions: Positions = "all", strength: float = 1.0, topk: str = "exact"
) -> Intervention:
    """Set SAE feature `feature`'s activation to `value` at `positions` (also where it was 0).

    Same arguments as `ablate_feature`, plus `value`: the activation to hold (in the SAE's units,
    e.g. a multiple of the feature's maximum activation over a corpus).
    """
    f = check_feature(feature, int(sae.cfg.d_sae))
    value = _finite(value, "clamp value")
    return _feature_iv(
        sae,
        f,
        value,
        method="feature clamp",
        name=f"clamp f{f}={value:g} @ {_hook(sae)}",
        positions=positions,
        strength=strength,
        topk=topk,
    )


def add_feature(
    sae, feature: int, coeff: float, *, positions: Positions = "all", strength: float = 1.0
) -> Intervention:
    """Add `coeff` units of SAE feature `feature`'s decoder direction, `+ coeff * W_dec[feature]`
    `[d_in]`, at `positions`: an `add` edit (see `decoder_row` for TopK SAEs that rescale)."""
    f = check_feature(feature, int(sae.cfg.d_sae))
    coeff = _finite(coeff, "coeff")
    _kind(sae)
    edit = Edit(
        hook=_hook(sae),
        op="add",
        vector=coeff * decoder_row(sae, f),
        units=_units(sae),
        positions=positions,
        strength=strength,
    )
    return Intervention(
        edits=(edit,),
        name=f"add {coeff:g}·f{f} @ {_hook(sae)}",
        provenance={"method": "feature add", "feature": f, "coeff": coeff, **_about(sae)},
    )
