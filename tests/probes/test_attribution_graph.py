"""Attribution graphs: the frozen replacement model is exact, every edge is a direct effect, and
each node's input is the sum of its incoming edges plus its constant."""

from __future__ import annotations

import pytest
import torch

from lenslab import LenslabError, labels, tasks
from lenslab.probes import attribution_graph as AG
from lenslab.probes import transcoders as T

pytestmark = pytest.mark.usefixtures("one_thread")

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def tiny(tiny_graph_inputs):
    return tiny_graph_inputs


@pytest.fixture(scope="module")
def ioi(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    tc = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    return model, tc, AG.attribution_graph(model, IOI_PROMPT, tc)


def _row_targets(frozen, tc, g) -> tuple[list[int], list[AG.Target]]:
    """The graph's nodes that have inputs (features, targets), as `Target`s to read."""
    idx, tgts = [], []
    W_U = frozen.model.W_U.detach().float()
    for i, node in enumerate(g.nodes):
        n = labels.parse(node)
        if n.kind == "feature":
            tgts.append(AG.feature_target(tc, n.layer, n.pos, n.index))
        elif n.kind == "logit":
            tgts.append(AG.Target(node, AG.FINAL_HOOK, n.pos, W_U[:, n.index] - W_U.mean(-1)))
        else:
            continue
        idx.append(i)
    return idx, tgts


# --- exactness ----------------------------------------------------------------------------------
def test_frozen_replacement_reproduces_the_logits(tiny, ioi):
    model, tokens, tc = tiny
    frozen = AG.FrozenReplacement(model, tokens, tc)
    with torch.no_grad():
        assert (frozen.logits() - model(tokens[None])).abs().max() < 1e-5
    m, tcs, _ = ioi
    f2 = AG.FrozenReplacement(m, m.to_tokens(IOI_PROMPT)[0], tcs)
    with torch.no_grad():
        assert (f2.logits() - m(f2.tokens)).abs().max() < 1e-5


def test_every_edge_is_a_direct_effect(tiny):
    """Each source removed from the frozen replacement model (other features frozen) changes each
    target's input by exactly the edge weight: all edges of the tiny graph."""
    model, tokens, tc = tiny
    g = AG.attribution_graph(model, tokens, tc, targets=[3, 7])
    frozen = AG.FrozenReplacement(model, tokens, tc)
    idx, tgts = _row_targets(frozen, tc, g)
    clean = frozen.read(tgts)
    assert torch.allclose(clean, g.inputs[idx], atol=1e-5)
    n_src = sum(labels.parse(n).kind in ("feature", "error", "token") for n in g.nodes)
    assert n_src > 20 and sum(labels.parse(n).kind == "feature" for n in g.nodes) >= 8
    worst = 0.0
    for j in range(n_src):
        delta = clean - frozen.read(tgts, frozen.without(g.nodes[j]))
        worst = max(worst, float((delta - g.adjacency[idx, j]).abs().max()))
    assert worst < 1e-4
    # causality: no edge from a later layer's feature or a later position
    for i in idx:
        for j in g.adjacency[i].nonzero()[:, 0].tolist():
            s, t = labels.parse(g.nodes[j]), labels.parse(g.nodes[i])
            assert s.pos <= t.pos
            if s.kind in ("feature", "error") and t.kind == "feature":
                assert s.layer < t.layer


def test_inputs_are_incoming_edges_plus_biases(tiny, ioi):
    model, tokens, tc = tiny
    for g in (AG.attribution_graph(model, tokens, tc), ioi[2]):
        rows = [i for i, n in enumerate(g.nodes) if labels.parse(n).kind in ("feature", "logit", "target")]
        total = g.adjacency[rows].sum(1) + g.biases[rows]
        assert torch.allclose(total, g.inputs[rows], atol=1e-4, rtol=1e-5)


def test_logit_targets_are_demeaned_logits(ioi):
    model, _, g = ioi
    with torch.no_grad():
        logits = model(model.to_tokens(IOI_PROMPT))[0, -1]
    b_U = model.b_U.detach()
    k = [i for i, n in enumerate(g.nodes) if labels.parse(n).kind == "logit"]
    assert 1 <= len(k) <= 10 and float(g.target_weights.sum()) <= 1.0
    for i in k:
        t = labels.parse(g.nodes[i]).index
        want = logits[t] - logits.mean() - (b_U[t] - b_U.mean())
        assert abs(float(g.inputs[i]) - float(want)) < 1e-4
    top = int(logits.argmax())
    assert g.nodes[k[0]] == labels.logit_node(top, len(g.tokens) - 1)


def test_task_and_direction_targets(ioi):
    model, tc, _ = ioi
    task = tasks.ioi(model, n=2, seed=0)
    g = AG.attribution_graph(model, None, tc, targets=task, max_feature_nodes=16)
    assert g.nodes[-1] == labels.target_node(0, len(g.tokens) - 1)
    with torch.no_grad():
        logits = model(task.clean_tokens[:1])[0, -1]
    c, w = task.answer_tokens[0].tolist()
    want = (logits[c] - logits[w]) - (model.b_U[c] - model.b_U[w]).detach()
    assert abs(float(g.inputs[-1]) - float(want)) < 1e-4
    d = AG.attribution_graph(
        model,
        IOI_PROMPT,
        tc,
        targets=torch.randn(2, 128, generator=torch.Generator().manual_seed(0)),
        max_feature_nodes=8,
    )
    assert [labels.parse(n).kind for n in d.nodes[-2:]] == ["target", "target"]


# --- selection, pruning, scores -----------------------------------------------------------------
def test_max_feature_nodes_selects_by_influence(ioi):
    model, tc, full = ioi
    g = AG.attribution_graph(model, IOI_PROMPT, tc, max_feature_nodes=40, batch_size=16)
    feats = [n for n in g.nodes if labels.parse(n).kind == "feature"]
    assert len(feats) == 40 and set(feats) <= set(full.nodes)
    infl = dict(zip(full.nodes, full.node_influence().tolist()))
    top = sorted((n for n in full.nodes if labels.parse(n).kind == "feature"), key=infl.get, reverse=True)[:10]
    assert len(set(top) & set(feats)) >= 8  # the most influential features are found
    assert 0 < g.replacement_score <= 1 and 0 < g.completeness_score <= 1


def test_prune_keeps_tokens_and_targets(ioi):
    _, _, g = ioi
    p = AG.prune(g, node_threshold=0.8, edge_threshold=0.98)
    kinds = [labels.parse(n).kind for n in p.nodes]
    n_logits = sum(labels.parse(n).kind == "logit" for n in g.nodes)
    assert kinds.count("token") == len(g.tokens) and kinds.count("logit") == n_logits
    assert kinds.count("feature") < sum(labels.parse(n).kind == "feature" for n in g.nodes)
    assert p.pruned == (0.8, 0.98) and bool(p.adjacency.any())
    assert 0 <= p.replacement_score <= 1 and 0 <= p.completeness_score <= 1
    assert AG.AttributionGraph.from_json(p.to_json()).nodes == p.nodes
    assert len(p.figure().data) >= 2  # edges and nodes
    edges = p.table("edges")
    assert len(edges) == int((p.adjacency != 0).sum())


def test_scores_are_one_without_errors(tiny):
    """With every error set to zero weight in the graph, both scores are 1."""
    model, tokens, tc = tiny
    g = AG.attribution_graph(model, tokens, tc)
    err = torch.tensor([labels.parse(n).kind == "error" for n in g.nodes])
    a = g.adjacency.clone()
    a[:, err] = 0
    assert AG.graph_scores(a, g.nodes, g.target_weights) == pytest.approx((1.0, 1.0))


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_errors(ioi, zoo_models, tiny, random_transcoder):
    model, tc, g = ioi
    with pytest.raises(LenslabError, match="trained on another model"):
        AG.attribution_graph(zoo_models("zoo/steer-sentiment"), "the day was", tc)
    tmodel, ttoks, ttc = tiny
    other = random_transcoder("per-layer")
    other.model_name = "zoo/ioi-4l"
    with pytest.raises(LenslabError, match="trained on 'zoo/ioi-4l', not on model"):
        AG.attribution_graph(tmodel, ttoks, other)
    with pytest.raises(LenslabError, match="is not one token"):
        AG.attribution_graph(model, IOI_PROMPT, tc, targets=[" Mary John went"])
    for bad in (0, 1.5, -0.1):
        with pytest.raises(LenslabError, match=r"must be in \(0, 1\]"):
            AG.prune(g, node_threshold=bad)
        with pytest.raises(LenslabError, match=r"must be in \(0, 1\]"):
            AG.prune(g, edge_threshold=bad)
        with pytest.raises(LenslabError, match=r"must be in \(0, 1\]"):
            AG.attribution_graph(model, IOI_PROMPT, tc, desired_logit_prob=bad)
    d = g.to_dict()
    d["adjacency"] = [[0.0] * len(g.nodes) for _ in g.nodes]
    with pytest.raises(LenslabError, match="no edges"):
        AG.prune(AG.AttributionGraph.from_dict(d))
    with pytest.raises(LenslabError, match="attention-only"):
        AG.attribution_graph(zoo_models("zoo/induction-2l"), "a b", tc)


def test_documented_ioi_example(ioi):
    """The numbers docs/transcoders.md prints for the ioi-4l example."""
    _, _, g = ioi
    assert (len(g.nodes), g.provenance["n_active_features"]) == (1030, 954)
    assert g.replacement_score == pytest.approx(0.9484, abs=5e-4)
    assert g.completeness_score == pytest.approx(0.9788, abs=5e-4)
    top = g.table().query("kind != 'logit'").sort_values("influence", ascending=False).head(3)
    assert top.node.tolist() == ["embed@2", "L0F195@3", "L0F81@3"]
    assert top.influence.tolist() == pytest.approx([0.7639, 0.0978, 0.0588], abs=5e-4)
    p = AG.prune(g)
    assert (len(p.nodes), int((p.adjacency != 0).sum())) == (62, 194)
