"""Validating attribution graphs by ablation in the live model (lenslab.probes.graph_validation).

Oracles: the unablated hooks leave the logits bitwise unchanged; ablating one feature moves the
MLP output by exactly minus its activation times its decoder row at its position; on zoo/ioi-4l
(planted IOI circuit) ablating the pruned graph's features moves the answer logit far more than
ablating random active features of the same number.
"""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes import attribution_graph as ag
from lenslab.probes.graph_validation import GraphAblation, ablate_graph, ablation_hooks
from lenslab.probes.transcoders import load_transcoders

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"
TC = "zoo/ioi-4l/per-layer"


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model("zoo/ioi-4l", device="cpu")


@pytest.fixture(scope="module")
def pruned(model):
    return ag.prune(ag.attribution_graph(model, PROMPT, TC, max_feature_nodes=48))


def test_no_ablation_is_the_model_and_one_ablation_removes_its_decoder_row(model, pruned):
    tc = load_transcoders(TC)
    toks = torch.tensor([pruned.tokens])
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        same = model.run_with_hooks(toks, fwd_hooks=ablation_hooks(tc, {}, n_layers))
    assert torch.equal(same, logits)
    layer, pos, feature = next((n.layer, n.pos, n.index) for n in pruned.parsed if n.kind == "feature")
    act = tc.features(layer, cache[tc.input_hook.format(l=layer)].float())[0, pos, feature]
    assert act > 0
    out_hook = tc.output_hook.format(l=layer)
    got = {}
    hooks = ablation_hooks(tc, {layer: [(pos, feature)]}, n_layers)
    hooks.append((out_hook, lambda a, hook=None: got.__setitem__("out", a.clone())))
    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=hooks)
    delta = got["out"][0] - cache[out_hook][0]
    expect = torch.zeros_like(delta)
    expect[pos] = -act * tc[layer].W_dec[feature]
    assert (delta - expect).abs().max() < 1e-5


def test_graph_features_matter_more_than_random_ones(model, pruned):
    res = ablate_graph(model, pruned, TC, n_random=8, seed=0)
    n_feat = sum(n.kind == "feature" for n in pruned.parsed)
    assert res.n_features == n_feat and res.random.shape == (8, len(res.targets))
    assert res.targets == [n for n in pruned.nodes if n.startswith("logit")]
    mean, std = res.random_effect()
    assert res.graph_effect() > mean + 3 * std and res.graph_effect() > 0.05, (res.graph_effect(), mean, std)
    # the clean values are the model's logits minus the mean logit at the target's position
    with torch.no_grad():
        logits = model(torch.tensor([pruned.tokens]))[0, -1]
    tok = int(res.targets[0].split("@")[0].removeprefix("logit"))
    assert abs(float(res.clean[0]) - float(logits[tok] - logits.mean())) < 1e-4
    again = GraphAblation.from_json(res.to_json())
    assert torch.equal(again.random, res.random) and again.graph_effect() == res.graph_effect()


def test_bad_input(model, pruned):
    with pytest.raises(LenslabError, match="n_random"):
        ablate_graph(model, pruned, TC, n_random=-1)
    task_graph = ag.attribution_graph(model, PROMPT, TC, targets=torch.randn(model.cfg.d_model), max_feature_nodes=8)
    with pytest.raises(LenslabError, match="directions"):
        ablate_graph(model, task_graph, TC, n_random=0)


def test_the_documented_ioi_example(model):
    """docs/transcoders.md, "Validating a graph by ablation": every active feature, pruned at (0.8, 0.98)."""
    g = ag.prune(ag.attribution_graph(model, PROMPT, TC), node_threshold=0.8, edge_threshold=0.98)
    res = ablate_graph(model, g, TC, n_random=20, seed=0)
    mean, std = res.random_effect()
    assert res.n_features == 35 and res.targets == ["logit4@14"]
    assert round(res.graph_effect(), 3) == 0.369 and (round(mean, 3), round(std, 3)) == (-0.031, 0.029)
    assert round(float(res.clean[0]), 3) == 21.919
