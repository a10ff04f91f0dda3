"""Attribution-graph edges by attention head: the split is exact (sum and interventions), it finds
the zoo's planted heads, and RelP edge weights equal the gradient's on the frozen replacement."""

from __future__ import annotations

import json

import pytest
import torch

from lenslab import LenslabError, labels, tasks
from lenslab.circuits import patching
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_heads as GH

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_graph_inputs):
    model, tokens, tc = tiny_graph_inputs
    g = AG.attribution_graph(model, tokens, tc, targets=[3, 7])
    return model, tokens, tc, g, GH.head_edges(model, g, tc, max_edges=None)


# --- exactness ----------------------------------------------------------------------------------
def test_heads_sum_to_the_edge(tiny):
    model, _, _, g, h = tiny
    assert len(h.sources) == int((g.adjacency != 0).sum()) > 40
    assert (h.residual + h.via_head.sum(1) - h.weights).abs().max() < 1e-5
    assert h.provenance["max_sum_error"] < 1e-5
    # not trivial: many edges cross heads of each layer, and cross-position edges have no residual part
    assert int((h.via_head[:, :4].abs().sum(1) > 1e-3).sum()) >= 10
    assert int((h.via_head[:, 4:].abs().sum(1) > 1e-3).sum()) >= 10
    # only the embeddings sit before layer 0's attention
    from_feature = torch.tensor([labels.parse(s).kind != "token" for s in h.sources])
    assert (h.via_head[from_feature][:, :4] == 0).all()
    cross = torch.tensor([labels.parse(s).pos != labels.parse(t).pos for s, t in zip(h.sources, h.targets)])
    assert cross.any() and (h.residual[cross] == 0).all() and (h.residual[~cross] != 0).any()
    # a layer-1 feature reads before layer 1's attention: no layer-1 head carries an edge into it
    into_l0 = torch.tensor([labels.parse(t).kind == "feature" and labels.parse(t).layer == 0 for t in h.targets])
    assert into_l0.any() and (h.via_head[into_l0][:, 4:] == 0).all()
    # the one-hop part is the last head's own OV: layer-0 heads have no earlier head
    assert torch.allclose(h.one_hop[:, :4], h.via_head[:, :4], atol=1e-6)
    assert (h.one_hop[:, 4:] - h.via_head[:, 4:]).abs().max() > 1e-3


def test_each_head_part_is_an_intervention(tiny):
    """`via_head[l, h]`: the edge's drop when head (l, h)'s OV path is off in the frozen model
    whose later attention layers are off; `one_hop[l, h]`: the edge with only that head on minus
    with no head on; `residual`: the edge with every head off."""
    model, tokens, tc, g, h = tiny
    frozen = AG.FrozenReplacement(model, tokens, tc)
    L, H = frozen.n_layers, frozen.n_heads
    row_nodes = sorted(set(h.targets), key=g.nodes.index)
    W_U = model.W_U.detach().float()
    tgts = [
        AG.feature_target(tc, n.layer, n.pos, n.index)
        if n.kind == "feature"
        else AG.Target(lab, AG.FINAL_HOOK, n.pos, W_U[:, n.index] - W_U.mean(-1))
        for lab, n in ((lab, labels.parse(lab)) for lab in row_nodes)
    ]
    sources = list(dict.fromkeys(h.sources))[:14]  # the strongest edges' sources
    without = {s: frozen.without(s) for s in sources}

    def edges(mask: torch.Tensor) -> dict[str, torch.Tensor]:
        clean = frozen.read(tgts, heads=mask)
        return {s: clean - frozen.read(tgts, without[s], heads=mask) for s in sources}

    ones = torch.ones(L, H)
    none = edges(torch.zeros(L, H))
    got, want = [], []
    for layer in range(L):
        later_off = ones.clone()
        later_off[layer + 1 :] = 0
        base = edges(later_off)
        for head in range(H):
            off = later_off.clone()
            off[layer, head] = 0
            only = torch.zeros(L, H)
            only[layer, head] = 1
            drop, alone = edges(off), edges(only)
            k = layer * H + head
            for e, (s, t) in enumerate(zip(h.sources, h.targets)):
                if s in without:
                    i = row_nodes.index(t)
                    got += [float(h.via_head[e, k]), float(h.one_hop[e, k])]
                    want += [float(base[s][i] - drop[s][i]), float(alone[s][i] - none[s][i])]
    for e, (s, t) in enumerate(zip(h.sources, h.targets)):
        if s in without:
            got.append(float(h.residual[e]))
            want.append(float(none[s][row_nodes.index(t)]))
    got, want = torch.tensor(got), torch.tensor(want)
    assert len(got) > 300 and want.abs().max() > 0.1
    assert (got - want).abs().max() < 1e-4


def test_round_trip_table_figure(tiny):
    _, _, _, _, h = tiny
    back = GH.HeadEdges.from_json(h.to_json())
    assert json.loads(back.to_json()) == json.loads(h.to_json())
    assert torch.equal(back.via_head, h.via_head) and back.heads == h.heads
    t = h.table(top=2)
    first = t[(t.source == h.sources[0]) & (t.target == h.targets[0])]
    assert 1 <= len(first) <= 3 and set(first.path) <= {GH.RESIDUAL, *h.heads}
    split = h.edge(h.sources[0], h.targets[0])
    assert sum(split.values()) == pytest.approx(float(h.weights[0]), abs=1e-5)
    assert len(h.figure().data) == 1


# --- the zoo's planted mechanisms ---------------------------------------------------------------
def _mechanism(name: str) -> dict:
    from lenslab import zoo

    return json.loads((zoo.ZOO_DIR / name / "config.json").read_text())["mechanism"]


@pytest.mark.parametrize(("seed", "top", "part"), [(0, "L1H1", 4.464), (1, "L1H3", 5.413)])
def test_induction_edge_runs_through_the_induction_heads(zoo_models, seed, top, part):
    """On a repeated block, the strongest edge into the correct next token's logit is the token
    after the first occurrence, and it runs through the card's layer-1 induction heads: all of it,
    each of the four carrying a share (the card: "the work is shared")."""
    model = zoo_models("zoo/induction-2l")
    induction_heads = _mechanism("induction-2l")["induction_heads"]
    task = tasks.induction(model, n=1, seq_len=10, seed=seed)
    toks = task.clean_tokens[0]
    correct = int(task.answer_tokens[0, 0])
    g = AG.attribution_graph(model, toks, None, targets=[correct])
    assert [labels.parse(n).kind for n in g.nodes] == ["token"] * len(toks) + ["logit"]
    assert g.replacement_score == 1.0  # no MLPs: no error nodes
    h = GH.head_edges(model, g)
    assert (h.residual + h.via_head.sum(1) - h.weights).abs().max() < 1e-5
    src, tgt, w = labels.parse(h.sources[0]), h.targets[0], float(h.weights[0])
    first = toks.tolist().index(int(toks[-1]))  # the current token's first occurrence
    assert tgt == labels.logit_node(correct, len(toks) - 1) and src.pos == first + 1
    assert int(toks[src.pos]) == correct and w > 10
    split = h.head_totals(tgt, top_edges=1)
    assert next(iter(split)) == top in induction_heads and split[top] == pytest.approx(part, abs=0.01)
    assert sum(split[k] for k in induction_heads) / w > 0.999
    assert all(split[k] / w > 0.1 for k in induction_heads)
    # the induction head's own OV carries most of it: the token is read where it sits
    one = h.one_hop[0, [h.heads.index(k) for k in induction_heads]].sum()
    assert float(one) / w > 0.9


def test_ioi_edges_run_through_the_heads_patching_ranks_top(zoo_models):
    """The main edges into the IOI logit difference go through the heads that exact patching of
    head outputs ranks top (the layer-1 name movers of the card)."""
    model = zoo_models("zoo/ioi-4l")
    task = tasks.ioi(model, n=8, seed=0)
    g = AG.attribution_graph(model, None, "zoo/ioi-4l/per-layer", targets=task, max_feature_nodes=128)
    h = GH.head_edges(model, g, "zoo/ioi-4l/per-layer", targets=task, into=g.nodes[-1], max_edges=None)
    assert (h.residual + h.via_head.sum(1) - h.weights).abs().max() < 1e-4
    by_graph = [k for k in h.head_totals(g.nodes[-1], top_edges=10) if k != GH.RESIDUAL][:3]
    p = patching.patch(model, task, "z", progress=False)
    effect = p.scores - p.corrupt_value
    order = effect.flatten().argsort(descending=True)[:3].tolist()
    by_patching = [labels.head(i // effect.shape[1], i % effect.shape[1]) for i in order]
    assert set(by_graph) == set(by_patching) == {"L1H1", "L1H2", "L1H3"}
    assert set(by_graph) <= set(_mechanism("ioi-4l")["ablations"]["name movers (END attends to IO or IO+1)"]["heads"])
    # the strongest edge is the indirect object's token, moved by the name movers through IO+1
    io = labels.parse(h.sources[0])
    assert h.sources[0] == "embed@5" and g.str_tokens[io.pos] == "Jerry"
    split = h.edge(h.sources[0], h.targets[0])
    assert sum(v for k, v in split.items() if k.startswith("L1H")) / float(h.weights[0]) > 0.7
    i = h.heads.index("L1H2")
    assert abs(float(h.one_hop[0, i])) < 1e-3 < float(h.via_head[0, i])  # all of it via an earlier head


# --- RelP edge weights --------------------------------------------------------------------------
def test_relp_edges_equal_the_gradient_edges(tiny):
    """RelP's rules act only on what the replacement model already holds constant (norm
    denominators, patterns, the transcoder nonlinearity behind the stop-gradient); on the linear
    rest LRP-0 is the gradient: the same graph."""
    model, tokens, tc, g, _ = tiny
    r = AG.attribution_graph(model, tokens, tc, targets=[3, 7], rule="relp")
    assert r.nodes == g.nodes and r.provenance["rule"] == "relp" and g.provenance["rule"] == "gradient"
    assert (r.adjacency - g.adjacency).abs().max() < 1e-5 and g.adjacency.abs().max() > 0.5
    assert (r.replacement_score, r.completeness_score) == pytest.approx((g.replacement_score, g.completeness_score))
    with pytest.raises(LenslabError, match="rule must be one of"):
        AG.attribution_graph(model, tokens, tc, rule="lrp")


def test_relp_graph_equals_the_gradient_graph_on_ioi(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    prompt = "When Mary and John went to the store, John gave a drink to"
    g, r = (
        AG.attribution_graph(model, prompt, "zoo/ioi-4l/per-layer", max_feature_nodes=64, rule=rule)
        for rule in ("gradient", "relp")
    )
    assert r.nodes == g.nodes and float(g.adjacency.abs().max()) > 10
    assert (r.adjacency - g.adjacency).abs().max() < 1e-5
    assert AG.prune(r).nodes == AG.prune(g).nodes


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input(tiny, zoo_models):
    model, tokens, tc, g, h = tiny
    with pytest.raises(LenslabError, match="has MLPs: give transcoders"):
        GH.head_edges(model, g)
    with pytest.raises(LenslabError, match="into= names node"):
        GH.head_edges(model, g, tc, into="logit99@5")
    with pytest.raises(LenslabError, match="max_edges must be"):
        GH.head_edges(model, g, tc, max_edges=0)
    other = AG.attribution_graph(model, tokens.flip(0), tc, targets=[3, 7])
    wrong = AG.AttributionGraph.from_dict({**other.to_dict(), "tokens": tokens.tolist()})
    with pytest.raises(LenslabError, match="was the graph built on this model"):
        GH.head_edges(model, wrong, tc)
    d_dir = torch.randn(16, generator=torch.Generator().manual_seed(0))
    d = AG.attribution_graph(model, tokens, tc, targets=d_dir)
    with pytest.raises(LenslabError, match="pass the targets it was built with"):
        GH.head_edges(model, d, tc)
    assert "target0@5" in GH.head_edges(model, d, tc, targets=d_dir).targets
    with pytest.raises(LenslabError, match="no edge embed@0 -> logit99@5"):
        h.edge("embed@0", "logit99@5")
    ind = zoo_models("zoo/induction-2l")
    with pytest.raises(LenslabError, match="only an attention-only model"):
        AG.attribution_graph(model, tokens, None)
    assert len(AG.attribution_graph(ind, "t1 t2 t1", None).nodes) >= 5
