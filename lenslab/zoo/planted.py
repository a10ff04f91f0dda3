"""Planted models: tiny TransformerLens models whose mechanisms are set by hand.

Their weights are not trained but written, so what a detector must find is known exactly; the
tests hold `lenslab.probes.sinks` and `lenslab.probes.super_experts` to them.

- `planted_model()`: a 2-layer attention-only model with one massive activation (residual
  dimension 7 of the first token at 1000) and one attention-sink head (L1H0). `PLANTED` records
  where they are.
- `planted_moe_model()`: a 2-layer Mixture-of-Experts model in which one expert (expert 2 of
  layer 0, a planted super expert) writes that massive activation, read by the same kind of sink
  head. `PLANTED_MOE` records where.
- `planted_tokens()`: token batches for both, the BOS (token 0) first.
- `planted_atlas_model()`: a 2-layer model with LayerNorm, a gated (SiLU) MLP and random biases and
  norm weights, with two planted maxima for `lenslab.probes.atlas`: one residual channel at one
  token, and one MLP output channel at another. `PLANTED_ATLAS` records where;
  `planted_atlas_tokens()` are its prompts.

>>> from lenslab.zoo import planted
>>> planted.planted_model().cfg.model_name, planted.PLANTED["sink_head"]
('planted-sink-2l', (1, 0))
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lenslab.toolbox import name_model

__all__ = [
    "PLANTED",
    "PLANTED_ATLAS",
    "PLANTED_MOE",
    "planted_atlas_model",
    "planted_atlas_tokens",
    "planted_model",
    "planted_moe_model",
    "planted_tokens",
]

PLANTED = {"massive_dim": 7, "massive_pos": 0, "massive_value": 1000.0, "sink_head": (1, 0), "bos": 0}


def planted_model(seed: int = 0):
    """A 2-layer attention-only `HookedTransformer` (d_model 8, 2 heads, vocab 8, no LayerNorm)
    with weights set by hand: token 0 (the BOS) embeds residual dimension 7 at 1000 (a massive
    activation on the first token; every other entry is ~0.1), and head L1H0 has a constant
    query (b_Q) and a key that reads only dimension 7, so every query attends to position 0
    (an attention sink). No other weight reads or writes dimension 7, so nothing else is massive
    and no other head prefers position 0. Feed it tokens `[batch, pos]` with token 0 first
    (`planted_tokens`).

    >>> planted_model().cfg.n_layers
    2
    """

    from transformer_lens import (  # deferred: heavy; loads when a planted model is built
        HookedTransformer,
        HookedTransformerConfig,
    )

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=8,
        n_ctx=64,
        d_head=4,
        n_heads=2,
        d_vocab=8,
        attn_only=True,
        normalization_type=None,
        act_fn="gelu",
        seed=seed,
        positional_embedding_type="standard",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (docs/design.md)
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    D = PLANTED["massive_dim"]
    sd = model.state_dict()
    small = lambda *s: 0.1 * torch.randn(*s, generator=g)
    with torch.no_grad():
        for k in sd:
            if sd[k].is_floating_point() and "IGNORE" not in k and "mask" not in k:
                sd[k].zero_()
        sd["unembed.W_U"].copy_(small(8, 8) * 10)
        sd["unembed.W_U"][D] = 0
        sd["embed.W_E"].copy_(small(8, 8))
        sd["embed.W_E"][:, D] = 0
        sd["embed.W_E"][PLANTED["bos"], D] = PLANTED["massive_value"]
        for l in range(2):
            for name in ("W_Q", "W_K", "W_V"):
                w = small(2, 8, 4)
                w[:, D, :] = 0  # nobody reads dimension 7 ...
                sd[f"blocks.{l}.attn.{name}"].copy_(w)
            wo = small(2, 4, 8)
            wo[:, :, D] = 0  # ... or writes it
            sd[f"blocks.{l}.attn.W_O"].copy_(wo)
        sl, sh = PLANTED["sink_head"]
        sd[f"blocks.{sl}.attn.W_Q"][sh] = 0
        sd[f"blocks.{sl}.attn.b_Q"][sh] = torch.tensor([10.0, 0, 0, 0])  # the same query everywhere
        sd[f"blocks.{sl}.attn.W_K"][sh] = 0
        sd[f"blocks.{sl}.attn.W_K"][sh, D, 0] = 0.01  # ... matching only a key built from dimension 7
    model.load_state_dict(sd)
    name_model(model, "planted-sink-2l")
    return model.eval()


def planted_tokens(batch: int = 4, seq_len: int = 32, seed: int = 0) -> Tensor:
    """Tokens `[batch, seq_len]` for `planted_model`: token 0 first, then random tokens 1..7."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 8, (batch, seq_len), generator=g)
    toks[:, 0] = PLANTED["bos"]
    return toks


PLANTED_MOE = {
    "super_expert": (0, 2),
    "massive_dim": 7,
    "marker_dim": 6,
    "massive_pos": 0,
    "sink_head": (1, 0),
    "bos": 0,
    "n_experts": 4,
    "top_k": 2,
}


def planted_moe_model(seed: int = 0):
    """A 2-layer Mixture-of-Experts `HookedTransformer` (d_model 8, 2 heads, vocab 8, 4 experts per
    layer with d_mlp 4, top-2 routing renormalised, SiLU-gated experts, no LayerNorm) with one
    super expert set by hand: expert 2 of layer 0.

    Token 0 (the BOS) embeds a marker, residual dimension 6 = 1 (every other token has 0 there).
    The layer-0 router scores expert 2 with 10 x dimension 6, so the BOS always picks it (gate
    weight ~1). Its hidden unit 0 reads only dimension 6 (gate and up weights 10), and its
    down-projection writes that unit into dimension 7 with weight 10: on the BOS the expert's
    down_proj output is 10 x silu(10) x 10 = 999.95 in dimension 7 (a massive activation on the
    first token), on every other token it is ~0.1. Head L1H0 has a constant query and a key that
    reads only dimension 7, so it attends to position 0 (an attention sink), as in `planted_model`.
    No other weight reads or writes dimensions 6 and 7, so nothing else is massive, no other
    expert's output is large, and zeroing expert (0, 2)'s down-projection removes the massive
    activation and the sink. Feed it `planted_tokens()`.

    >>> planted_moe_model().cfg.num_experts
    4
    """

    from transformer_lens import (  # deferred: heavy; loads when a planted model is built
        HookedTransformer,
        HookedTransformerConfig,
    )

    E, K = PLANTED_MOE["n_experts"], PLANTED_MOE["top_k"]
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=8,
        n_ctx=64,
        d_head=4,
        n_heads=2,
        d_vocab=8,
        d_mlp=4,
        num_experts=E,
        experts_per_token=K,
        norm_topk_prob=True,
        act_fn="silu",
        normalization_type=None,
        seed=seed,
        positional_embedding_type="standard",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (docs/design.md)
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    D, M = PLANTED_MOE["massive_dim"], PLANTED_MOE["marker_dim"]
    se_layer, se = PLANTED_MOE["super_expert"]
    sd = model.state_dict()
    small = lambda *s: 0.1 * torch.randn(*s, generator=g)

    def blind(w: Tensor, dim: int) -> Tensor:  # nobody reads or writes dimensions 6 and 7 ...
        w.narrow(dim, M, 2).zero_()
        return w

    with torch.no_grad():
        for k in sd:
            if sd[k].is_floating_point() and "IGNORE" not in k and "mask" not in k:
                sd[k].zero_()
        sd["unembed.W_U"].copy_(blind(small(8, 8) * 10, 0))
        sd["embed.W_E"].copy_(blind(small(8, 8), 1))
        sd["embed.W_E"][PLANTED_MOE["bos"], M] = 1.0
        for l in range(2):
            for name in ("W_Q", "W_K", "W_V"):
                sd[f"blocks.{l}.attn.{name}"].copy_(blind(small(2, 8, 4), 1))
            sd[f"blocks.{l}.attn.W_O"].copy_(blind(small(2, 4, 8), 2))
            sd[f"blocks.{l}.mlp.W_gate.weight"].copy_(blind(small(E, 8) * 10, 1))  # the router
            for e in range(E):
                pre = f"blocks.{l}.mlp.experts.{e}"
                sd[f"{pre}.W_gate.weight"].copy_(blind(small(4, 8) * 10, 1))
                sd[f"{pre}.W_in.weight"].copy_(blind(small(4, 8) * 10, 1))
                sd[f"{pre}.W_out.weight"].copy_(blind(small(8, 4), 0))
        pre = f"blocks.{se_layer}.mlp.experts.{se}"
        sd[f"blocks.{se_layer}.mlp.W_gate.weight"][se, M] = 10.0  # ... except: the BOS marker routes to the SE,
        for name in ("W_gate", "W_in"):
            sd[f"{pre}.{name}.weight"][0] = 0
            sd[f"{pre}.{name}.weight"][0, M] = 10.0  # its unit 0 fires on the marker only,
        sd[f"{pre}.W_out.weight"][:, 0] = 0
        sd[f"{pre}.W_out.weight"][D, 0] = 10.0  # and writes dimension 7;
        sl, sh = PLANTED_MOE["sink_head"]
        sd[f"blocks.{sl}.attn.W_Q"][sh] = 0
        sd[f"blocks.{sl}.attn.b_Q"][sh] = torch.tensor([10.0, 0, 0, 0])  # the sink head's query is constant
        sd[f"blocks.{sl}.attn.W_K"][sh] = 0
        sd[f"blocks.{sl}.attn.W_K"][sh, D, 0] = 0.01  # and its key reads dimension 7
    model.load_state_dict(sd)
    name_model(model, "planted-moe-2l")
    return model.eval()


PLANTED_ATLAS = {
    "resid_token": 3,  # this token embeds residual channel 5 at 500
    "resid_channel": 5,
    "resid_value": 500.0,
    "resid_at": (1, 5),  # (sample, position) of the one resid_token in planted_atlas_tokens()
    "mlp_token": 4,  # this token makes layer 1's MLP write its output channel 11 (about 315)
    "mlp_layer": 1,
    "mlp_channel": 11,
    "mlp_unit": 0,  # the gated unit that writes it
    "mlp_at": (2, 8),  # (sample, position) of the one mlp_token in planted_atlas_tokens()
    "marker_channel": 13,  # the residual channel that carries mlp_token to layer 1's MLP
}


def planted_atlas_model(seed: int = 0):
    """A 2-layer `HookedTransformer` (d_model 16, 2 heads, d_mlp 32, vocab 16, LayerNorm, gated SiLU
    MLPs, learned positions) with two activation maxima set by hand, for `lenslab.probes.atlas`.

    TransformerLens's random initialisation, then every bias and norm weight moved off its constant
    start (biases ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.2), seeded), then two plants:

    - token 3 embeds residual channel 5 at 500 (every other embedding entry is about 0.1), so the
      embedding, every residual stream and the final residual carry ~500 at channel 5 on that token;
    - token 4 embeds channel 13 at 8 (no other weight writes channel 13 before layer 1's MLP), and
      gated unit 0 of layer 1's MLP reads only channel 13 (gate and linear weights 5) and writes only
      output channel 11 (weight 1): on that token layer 1's `hook_mlp_out` has about 315 at channel
      11, everywhere else a few units at most.

    `PLANTED_ATLAS` records the tokens, channels and, for `planted_atlas_tokens()`, the (sample,
    position) of each.

    >>> planted_atlas_model().cfg.gated_mlp
    True
    """

    from transformer_lens import (  # deferred: heavy; loads when a planted model is built
        HookedTransformer,
        HookedTransformerConfig,
    )

    P = PLANTED_ATLAS
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=64,
        d_head=4,
        n_heads=2,
        d_mlp=32,
        d_vocab=16,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="LN",
        seed=seed,
        positional_embedding_type="standard",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (docs/design.md)
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    R, M, L = P["resid_channel"], P["marker_channel"], P["mlp_layer"]
    with torch.no_grad():
        for _, p in model.named_parameters():  # biases and norm weights off their 0 / 1 start
            flat = p.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.embed.W_E[P["resid_token"], R] = P["resid_value"]
        for writer in (model.embed.W_E, model.pos_embed.W_pos):  # nothing writes channel 13 ...
            writer[:, M] = 0.0
        for l in range(L + 1):
            model.blocks[l].attn.W_O[..., M] = 0.0
            model.blocks[l].attn.b_O[M] = 0.0
            if l < L:
                model.blocks[l].mlp.W_out[:, M] = 0.0
                model.blocks[l].mlp.b_out[M] = 0.0
        model.embed.W_E[P["mlp_token"], M] = 8.0  # ... but token 4's embedding
        mlp, u = model.blocks[L].mlp, P["mlp_unit"]
        for w in (mlp.W_gate, mlp.W_in):  # unit 0 of layer 1's MLP reads channel 13 only
            w[:, u] = 0.0
            w[M, u] = 5.0
        mlp.W_out[u] = 0.0
        mlp.W_out[u, P["mlp_channel"]] = 1.0  # and writes output channel 11 only
    name_model(model, "planted-atlas-2l")
    return model.eval()


def planted_atlas_tokens() -> Tensor:
    """Tokens `[3, 12]` for `planted_atlas_model`: token 0 first, then random tokens other than 3
    and 4, except one token 3 at `PLANTED_ATLAS["resid_at"]` and one token 4 at `["mlp_at"]`."""
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([t for t in range(1, 16) if t not in (3, 4)])
    toks = choices[torch.randint(0, len(choices), (3, 12), generator=g)]
    toks[:, 0] = 0
    toks[PLANTED_ATLAS["resid_at"]] = PLANTED_ATLAS["resid_token"]
    toks[PLANTED_ATLAS["mlp_at"]] = PLANTED_ATLAS["mlp_token"]
    return toks
