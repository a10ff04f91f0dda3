"""Published LN-free checkpoints: detect their format and fold their neutralised norms away.

Heimersheim (2024, "You can remove GPT2's LayerNorm by fine-tuning", `apollo-research/gpt2_noLN`)
and Baroni et al. (2025, "Transformers Don't Need LayerNorm at Inference Time", the
`schaeff/gpt2-{small,medium,large,xl}_LNFree{300,500,600,800}` models, code
submarat/removing-layer-norm) publish their LN-free GPT-2 models as ordinary `GPT2LMHeadModel`
checkpoints whose LayerNorms are neutralised rather than removed: every LayerNorm's epsilon is 1e12
(`config.json` `"layer_norm_epsilon": 1e12`) and its weight is multiplied by 1e6 (Baroni et al.:
by 1e6 / the fixed scale the fine-tuning found; their `utils.remove_layernorm_by_scaling`).
Such a norm computes

    (x - mean x) / sqrt(var x + eps) * w + b  =  (x - mean x) * (w / sqrt(eps)) + b

up to a relative error var / (2 eps) (below 1e-8 for any residual variance under 1e4; in float32
`var + 1e12` rounds to one number for every var < 32768): a fixed linear map. `fold_fixed_norms`
folds it, with its centring and bias, into the weights that read the norm (TransformerLens's own
`ProcessWeights.fold_layer_norm`, after dividing the norm weights by sqrt(eps)) and returns a
config with `normalization_type = None`: a `HookedTransformer` with no norm at all whose logits
are the checkpoint's. The model cards give the same recipe (divide the weights by 1e6, fold,
replace the norms by identities).

The format is told from the checkpoint, not its name: a norm epsilon of at least `MIN_EPS` in the
config. The published checkpoints ship no tokenizer; they are GPT-2 fine-tunes with GPT-2's
vocabulary, so `TOKENIZER_REPO`'s is used (lenslab._hf).

`probes.ln_removal.fold_fixed_scales` folds a loaded model's norms at measured scales; this module
is core (lenslab._hf loads checkpoints through it) and the core may not import lenslab.probes
(pyproject.toml's import contracts), so it folds TransformerLens state dicts with TransformerLens's
own folding instead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from lenslab._errors import LenslabError

MIN_EPS = 1e10
"""A norm epsilon at least this large marks the LN-free format (ordinary models use 1e-5 to 1e-6)."""
EPS_FIELDS = ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")
"""Config fields that hold a norm's epsilon (GPT-2: layer_norm_epsilon; GPT-NeoX: layer_norm_eps)."""
TOKENIZER_REPO = "openai-community/gpt2"
"""Where the tokenizer of an LN-free GPT-2 checkpoint without one comes from."""


@dataclass(frozen=True)
class NoLNFormat:
    """An LN-free checkpoint as detected: the config field and the epsilon it holds."""

    field: str
    eps: float

    def describe(self) -> str:
        return f"an LN-free checkpoint ({self.field}={self.eps:g} in config.json neutralises every norm)"


def detect(hf_config) -> NoLNFormat | None:
    """The LN-free format when `hf_config` (a transformers config) sets a norm epsilon >= MIN_EPS,
    else None."""
    for name in EPS_FIELDS:
        eps = getattr(hf_config, name, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= MIN_EPS:
            return NoLNFormat(name, float(eps))
    return None


def fold_fixed_norms(cfg, state: dict[str, torch.Tensor], fmt: NoLNFormat):
    """`(cfg, state)` of a `HookedTransformer` without norms that computes what the neutralised
    norms of `(cfg, state)` compute (TransformerLens's converted, unprocessed weights, float32).

    LayerNorm: `W <- C diag(w / sqrt(eps)) W`, `bias <- bias + b W` (C centres over d_model);
    RMSNorm: `W <- diag(w / sqrt(eps)) W`; for every norm and the weights that read it
    (`W_Q/W_K/W_V`, `W_in`/`W_gate`, `W_U` and their biases).
    """
    from transformer_lens.weight_processing import (
        ProcessWeights,  # deferred: transformer_lens loads only when a model is built
    )

    kind = cfg.normalization_type
    if kind not in ("LN", "RMS"):
        raise LenslabError(
            f"detected {fmt.describe()}, but its TransformerLens config has normalization_type={kind!r}; "
            "lenslab folds neutralised LayerNorm or RMSNorm only"
        )
    scale = 1.0 / math.sqrt(fmt.eps)
    norm_keys = [k for k in state if _is_norm(k)]
    if not norm_keys:
        raise LenslabError(f"detected {fmt.describe()}, but its converted weights hold no norm parameters")
    state = {k: (v.double() * scale).to(v.dtype) if _is_norm(k) and k.endswith(".w") else v for k, v in state.items()}
    if "unembed.b_U" not in state:  # GPT-2 has no unembedding bias; the final norm's bias folds into one
        state["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=state["unembed.W_U"].dtype)
    layer_norm = kind == "LN"
    folded = ProcessWeights.fold_layer_norm(state, cfg, fold_biases=layer_norm, center_weights=layer_norm)
    # ProcessWeights leaves each folded norm as an identity (weight 1, bias 0); anything else was not folded
    left = [k for k in norm_keys if not bool((folded[k] == (1.0 if k.endswith(".w") else 0.0)).all())]
    if left:  # pragma: no cover - a TransformerLens layout this code does not know
        raise LenslabError(f"detected {fmt.describe()}, but could not fold {left[:4]} into the weights reading them")
    out_cfg = copy.deepcopy(cfg)
    out_cfg.normalization_type = None
    return out_cfg, {k: v for k, v in folded.items() if not _is_norm(k)}


def _is_norm(key: str) -> bool:
    """A norm parameter of a HookedTransformer state dict (`blocks.0.ln1.w`, `ln_final.b`, ...)."""
    parts = key.split(".")
    return len(parts) >= 2 and (parts[-2].startswith("ln") or parts[-2] == "ln_final") and parts[-1] in ("w", "b")
