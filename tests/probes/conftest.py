"""Shared fixtures of the attribution-graph tests: a tiny random model with random transcoders."""

from __future__ import annotations

import pytest
import torch

from lenslab.probes import transcoders as T


def _tiny(randomize_params, norm: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=30, n_ctx=12, act_fn="gelu",
        normalization_type=norm, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    randomize_params(model, seed=3)
    return model.eval()


def _random_transcoder(kind: str, d_model=16, d_tc=10, n_layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.5: torch.randn(*s, generator=g) * std
    with torch.no_grad():
        if kind == "clt":
            tc = T.CrossLayerTranscoder(n_layers, d_model, d_tc, skip=True)
            for p in tc.parameters():
                p.copy_(r(*p.shape, std=0.3))
            return tc.requires_grad_(False)
        ts = {}
        for layer in range(n_layers):
            t = T.Transcoder(d_model, d_tc, layer=layer, skip=True)
            for p in t.parameters():
                p.copy_(r(*p.shape, std=0.3))
            ts[layer] = t.requires_grad_(False)
        return T.TranscoderSet(ts)


@pytest.fixture(scope="module", params=[("LN", "per-layer"), ("RMS", "per-layer"), ("LN", "clt")], ids=str)
def tiny_graph_inputs(request, randomize_params):
    """(model, tokens [6], transcoders): a 2-layer random model (random norm weights and biases) with
    LN or RMS norms, and random per-layer or cross-layer transcoders."""
    norm, kind = request.param
    model = _tiny(randomize_params, norm)
    tokens = torch.randint(0, 30, (6,), generator=torch.Generator().manual_seed(1))
    return model, tokens, _random_transcoder(kind)


@pytest.fixture
def random_transcoder():
    """`random_transcoder(kind, d_model=16, d_tc=10, n_layers=2, seed=0)`: a random TranscoderSet."""
    return _random_transcoder
