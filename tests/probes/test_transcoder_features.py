"""Transcoder features as sae-lens SAEs: the SAE encodes exactly as the zoo's transcoders do (per-layer
and cross-layer) on real activations, its feature store's top contexts carry the transcoder's own
activations, and a graph node's dashboard is that feature's."""

from __future__ import annotations

import pytest
import torch

from lenslab import LenslabError
from lenslab.probes import features as F
from lenslab.probes import transcoder_features as TF
from lenslab.probes import transcoders as T

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "zoo/ioi-4l"


@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models(MODEL)


@pytest.fixture(scope="module")
def corpus(model):
    return F.corpus_for(model, 32)


@pytest.mark.parametrize("source", ["zoo/ioi-4l/per-layer", "zoo/ioi-4l/clt"])
def test_sae_encodes_as_the_transcoder(model, corpus, source):
    tc = T.load_transcoders(source, model=model)
    _, cache = model.run_with_cache(model.to_tokens(corpus[:8]))
    for layer in tc.layers:
        sae = TF.transcoder_as_sae(tc, layer)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        x = cache[sae.cfg.metadata.hook_name]
        ref = tc.features(layer, x)
        assert (ref > 0).any()
        torch.testing.assert_close(sae.encode(x), ref, atol=1e-6, rtol=0)
        own = tc[layer].W_dec if source.endswith("per-layer") else tc.W_dec[layer][:, 0]
        assert torch.equal(sae.W_dec, own)  # the decoder into this layer's MLP output


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_relu_and_jumprelu_transcoders(activation):
    g = torch.Generator().manual_seed(0)
    tc = T.Transcoder(8, 12, layer=0, activation=activation)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if tc.threshold is not None:
            tc.threshold.copy_(torch.rand(12, generator=g))
    sae = TF.transcoder_as_sae(T.TranscoderSet({0: tc}), 0)
    x = torch.randn(5, 8, generator=g)
    ref = tc.encode(x)
    assert 0 < int((ref > 0).sum()) < ref.numel()
    torch.testing.assert_close(sae.encode(x), ref, atol=1e-6, rtol=0)


def test_store_contexts_carry_the_transcoders_activations(model, corpus, tmp_path):
    tc = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    layer = 2
    sae = TF.transcoder_as_sae(tc, layer)
    with F.index(model, sae, corpus, tmp_path / "s.store", progress=False) as store:
        stats = [store.stats(f) for f in range(sae.cfg.d_sae)]
        f = max(range(len(stats)), key=lambda i: stats[i].max_act)
        top = store.contexts(f, 1)[0]
    tokens = model.to_tokens(corpus[top.prompt_id])[:, :64]
    _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.metadata.hook_name])
    want = tc.features(layer, cache[sae.cfg.metadata.hook_name])[0, top.pos, f]
    assert want > 0 and top.act == float(want)


def test_feature_node_dashboard(model):
    dash = TF.feature_node_dashboard(model, "zoo/ioi-4l/per-layer", "L2F195@3", n_docs=32)
    assert dash.feature == 195 and dash.hook == "blocks.2.ln2.hook_normalized"
    assert dash.contexts and dash.max_act == pytest.approx(dash.contexts[0].act)
    tc = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    with torch.no_grad():
        logits = tc[2].W_dec[195] @ model.W_U
    assert dash.pos_logits[0][1] == pytest.approx(float(logits.max()), abs=1e-5)
    again = TF.feature_node_dashboard(model, tc, "L2F195@3", corpus=F.corpus_for(model, 32))  # indexed afresh
    assert [c.act for c in again.contexts] == [c.act for c in dash.contexts] and again.n_fire == dash.n_fire
    with pytest.raises(LenslabError, match="feature node"):
        TF.feature_node_dashboard(model, "zoo/ioi-4l/per-layer", "MLP1.err@5")
