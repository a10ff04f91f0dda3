"""Edge attribution checked against real edge interventions; circuit graphs as data and figures."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks, zoo
from lenslab.figures import save_figure

TOK = zoo.word_tokenizer([f"t{i}" for i in range(40)])


def _model(**kw):
    # circuit-tracer's check: a random 2-layer, d_model=8 model
    m = HookedTransformer(
        HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=32, d_head=4, n_heads=2, d_vocab=len(TOK), seed=0, **kw),
        tokenizer=TOK,
    )
    m.cfg.model_name = "edge-test"
    return m


@pytest.fixture(scope="module")
def linear():
    return _model(attn_only=True, normalization_type=None)


@pytest.fixture(scope="module")
def nonlinear():
    return _model(d_mlp=32, normalization_type="LN")


def _exact(model, task, scores):
    return torch.tensor([circuits.patch_edge(model, task, u, v) for u, v, _ in scores.edges()])


def test_eap_equals_edge_patching_where_linear(linear):
    task = tasks.induction(linear, n=3, seq_len=5, seed=0)
    eap = circuits.attribute_edges(linear, task, progress=False)
    assert len(eap.edges()) == 13  # input->4 heads, input->logits, L0 heads->L1 heads (4), all heads->logits (4)
    exact = _exact(linear, task, eap)
    est = torch.tensor([s for *_, s in eap.edges()])
    into_logits = torch.tensor([v == "logits" for _, v, _ in eap.edges()])
    assert (exact[into_logits] - est[into_logits]).abs().max() <= 1e-5  # the read-out is linear
    assert circuits.pearson(exact, est) > 0.95
    assert not linear.cfg.use_attn_result and not linear.cfg.use_split_qkv_input  # settings restored


def test_eap_ig_improves_on_eap_and_reduces_to_it(nonlinear):
    task = tasks.induction(nonlinear, n=3, seq_len=5, seed=0)
    eap = circuits.attribute_edges(nonlinear, task, progress=False)
    one = circuits.attribute_edges(nonlinear, task, "eap-ig", steps=1, progress=False)
    assert torch.allclose(torch.nan_to_num(one.scores), torch.nan_to_num(eap.scores))
    ig = circuits.attribute_edges(nonlinear, task, "eap-ig", steps=20, progress=False)
    exact = _exact(nonlinear, task, eap)
    r_eap = circuits.pearson(exact, torch.tensor([s for *_, s in eap.edges()]))
    r_ig = circuits.pearson(exact, torch.tensor([s for *_, s in ig.edges()]))
    assert r_ig > 0.85 and r_ig > r_eap


def test_graph_data_and_figures(nonlinear, tmp_path):
    task = tasks.induction(nonlinear, n=2, seq_len=4, seed=1)
    scores = circuits.attribute_edges(nonlinear, task, progress=False)
    back = circuits.EdgeScores.from_json(scores.to_json())
    assert torch.equal(torch.nan_to_num(back.scores), torch.nan_to_num(scores.scores))
    from lenslab.circuits.graph import _prune

    g = circuits.CircuitGraph.from_edge_scores(scores, top_k=8)
    assert len(g.edges) >= 8 and g.nodes[0] == "input" and g.nodes[-1] == "logits"
    assert _prune(g.edges) == g.edges  # every kept edge lies on an input -> logits path
    ranked = sorted(scores.edges(), key=lambda e: -abs(e[2]))
    n = max(ranked.index(e) for e in g.edges) + 1
    assert _prune(ranked[:n]) == g.edges and len(_prune(ranked[: n - 1])) < 8  # the shortest such prefix
    every = circuits.CircuitGraph.from_edge_scores(scores, top_k=None, threshold=0.0, prune=False)
    assert len(every.edges) == len(scores.edges())
    g2 = circuits.CircuitGraph.from_json(g.to_json(tmp_path / "g.json"))
    assert g2.edges == g.edges and g2.nodes == g.nodes
    fig = g.figure()
    assert "Circuit" in fig.layout.title.text
    assert ET.parse(save_figure(fig, tmp_path / "g.svg")).getroot().tag.endswith("svg")
    with pytest.raises(lenslab.LenslabError, match="top_k=N or threshold"):
        circuits.CircuitGraph.from_edge_scores(scores, top_k=None)


def test_edge_errors(nonlinear):
    task = tasks.induction(nonlinear, n=2, seq_len=4)
    with pytest.raises(lenslab.LenslabError, match="no edge L1H0 -> L0H1"):
        circuits.patch_edge(nonlinear, task, "L1H0", "L0H1")
    with pytest.raises(lenslab.LenslabError, match="not in this model"):
        circuits.patch_edge(nonlinear, task, "L0H7", "logits")
    with pytest.raises(lenslab.LenslabError, match="'eap' or 'eap-ig'"):
        circuits.attribute_edges(nonlinear, task, "acdc")
