"""lenslab.probes.graph_supernodes and the saved view of lenslab.probes.graph_files: supernodes merge
nodes (a merged edge is the sum of its members' edges, on a hand-made graph and on a real zoo/ioi-4l
graph), and the graph file keeps the pinned nodes and the supernodes in Neuronpedia's qParams form,
still valid for circuit-tracer's pydantic models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lenslab import labels
from lenslab._errors import LenslabError
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_files as GF
from lenslab.probes import graph_supernodes as GS

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "circuit_tracer_graph_models.py"


def _ct_models():
    spec = importlib.util.spec_from_file_location("circuit_tracer_graph_models", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hand_graph() -> AG.AttributionGraph:
    """Five nodes, exact binary fractions: f0, f1 (layer 0), f2 (layer 1), an embedding, a logit."""
    nodes = ["L0F1@1", "L0F2@1", "L1F3@1", "embed@1", "logit7@1"]
    a = torch.zeros(5, 5)
    a[0, 3], a[1, 3] = 0.5, -0.25  # embed -> f0, f1
    a[2, 0], a[2, 1], a[2, 3] = 1.5, 0.75, 0.125  # f0, f1, embed -> f2
    a[4, 0], a[4, 1], a[4, 2], a[4, 3] = 2.0, -1.0, 4.0, 0.0625  # everything -> logit
    return AG.AttributionGraph(
        nodes=nodes, adjacency=a, activations=torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0]), inputs=torch.zeros(5),
        biases=torch.zeros(5), target_weights=torch.ones(1), tokens=[0, 9], str_tokens=["<s>", "x"], n_layers=2,
    )  # fmt: skip


# --- merging: hand-made numbers ---------------------------------------------------------------------
def test_merged_edges_are_the_sums_of_the_members_edges():
    g = _hand_graph()
    m = GS.merge_supernodes(g, [GS.Supernode("early", ("L0F1@1", "L0F2@1"))])
    assert m.nodes == ["early", "L1F3@1", "embed@1", "logit7@1"]
    assert m.members[0] == ("L0F1@1", "L0F2@1")
    e = {(s, t): w for s, t, w in m.table("edges").itertuples(index=False)}
    assert e == {
        ("early", "logit7@1"): 1.0,  # 2.0 + (-1.0)
        ("early", "L1F3@1"): 2.25,  # 1.5 + 0.75
        ("embed@1", "early"): 0.25,  # 0.5 + (-0.25)
        ("L1F3@1", "logit7@1"): 4.0,  # untouched
        ("embed@1", "L1F3@1"): 0.125,
        ("embed@1", "logit7@1"): 0.0625,
    }
    assert m.internal == {"early": 0.0}  # f0 and f1 do not feed each other
    # a supernode spanning layers keeps its internal edges apart: f0 -> f2 (1.5) is internal
    m2 = GS.merge_supernodes(g, ["chain=L0F1@1,L1F3@1"])
    assert m2.nodes == ["chain", "L0F2@1", "embed@1", "logit7@1"]
    assert m2.internal == {"chain": 1.5}
    assert m2.adjacency[3].tolist() == [6.0, -1.0, 0.0625, 0.0]  # logit <- chain: 2 + 4
    assert m2.adjacency[0].tolist() == [0.0, 0.75, 0.625, 0.0]  # chain <- f1: 0.75, <- embed: 0.5 + 0.125
    nodes = m2.table("nodes")
    assert nodes["kind"].tolist() == ["supernode", "feature", "token", "logit"]
    assert nodes["activation"].tolist()[:2] == [4.0, 2.0]  # 1 + 3; f1's own
    # no supernodes: the graph as it is
    same = GS.merge_supernodes(g)
    assert same.nodes == g.nodes and torch.equal(same.adjacency, g.adjacency) and same.internal == {}


def test_two_supernodes_and_edges_between_them():
    g = _hand_graph()
    m = GS.merge_supernodes(g, [("inputs", ["embed@1", "L0F1@1"]), ["out", "L1F3@1", "logit7@1"]])
    assert m.nodes == ["inputs", "L0F2@1", "out"]
    i, f1, o = 0, 1, 2
    # inputs -> out: embed->f2 0.125, f0->f2 1.5, f0->logit 2, embed->logit 0.0625
    assert float(m.adjacency[o, i]) == 3.6875
    assert float(m.adjacency[o, f1]) == -0.25  # f1 -> f2 0.75, f1 -> logit -1
    assert float(m.adjacency[f1, i]) == -0.25  # embed -> f1
    assert m.internal == {"inputs": 0.5, "out": 4.0}
    # every edge is either merged or internal: the totals match
    assert float(m.adjacency.sum()) + sum(m.internal.values()) == float(g.adjacency.sum())


@pytest.mark.parametrize(
    "supernodes, message",
    [
        (["x=L0F1@1,L9F9@1"], "'L9F9@1' is not a node of this graph"),
        (["a=L0F1@1,L0F2@1", "b=L0F1@1,L1F3@1"], "node 'L0F1@1' is in two supernodes"),
        (["a=L0F1@1,L0F2@1", "a=L1F3@1,embed@1"], "two supernodes are labelled 'a'"),
        (["embed@1=L0F1@1,L0F2@1"], "is the name of a node of the graph"),
        (["x=L0F1@1"], "needs at least two nodes"),
        (["x=L0F1@1,L0F1@1"], "names a node twice"),
        (["=L0F1@1,L0F2@1"], "needs a label"),
        (["L0F1@1,L0F2@1"], "a supernode is written LABEL=NODE,NODE"),
        ([42], "a supernode is a Supernode"),
    ],
)
def test_bad_supernodes_are_clear_errors(supernodes, message):
    with pytest.raises(LenslabError, match=message):
        GS.merge_supernodes(_hand_graph(), supernodes)


def test_parse_and_add():
    assert GS.parse_supernode(" say Mary = L3F12@14 , L2F7@14,") == GS.Supernode("say Mary", ("L3F12@14", "L2F7@14"))
    g = _hand_graph()
    one = GS.add_supernode(g, [], "a", ["L0F1@1", "L0F2@1"])
    two = GS.add_supernode(g, one, " b ", ("L1F3@1", "logit7@1"))
    assert [s.as_list() for s in two] == [["a", "L0F1@1", "L0F2@1"], ["b", "L1F3@1", "logit7@1"]]
    with pytest.raises(LenslabError, match="in two supernodes"):
        GS.add_supernode(g, two, "c", ["L0F1@1", "embed@1"])


# --- a real graph -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models("zoo/ioi-4l")


@pytest.fixture(scope="module")
def pruned(model):
    return AG.prune(AG.attribution_graph(model, PROMPT, "zoo/ioi-4l/per-layer", max_feature_nodes=32), 0.8, 0.98)


def _groups(pruned) -> tuple[list[str], list[str]]:
    """Two supernodes of the real graph: the two features with the most outgoing edges, and two error nodes."""
    feats = [x for x, n in zip(pruned.nodes, pruned.parsed) if n.kind == "feature"]
    errors = [x for x, n in zip(pruned.nodes, pruned.parsed) if n.kind == "error"]
    deg = {x: int((pruned.adjacency[:, pruned.nodes.index(x)] != 0).sum()) for x in feats}
    return sorted(feats, key=lambda x: -deg[x])[:2], errors[:2]


def test_merging_a_real_graph(pruned):
    feats, errors = _groups(pruned)
    assert len(feats) == 2 and len(errors) == 2
    m = GS.merge_supernodes(pruned, [GS.Supernode("top features", tuple(feats)), GS.Supernode("errors", tuple(errors))])
    assert len(m.nodes) == len(pruned.nodes) - 2
    a, ix = pruned.adjacency, {x: i for i, x in enumerate(pruned.nodes)}
    f0, f1 = (ix[x] for x in feats)
    s = m.nodes.index("top features")
    checked = 0
    for j, members in enumerate(m.members):
        if j == s:
            continue
        cols = [ix[x] for x in members]
        out_w = float(a[f0, :][cols].sum() + a[f1, :][cols].sum())  # into the supernode from j
        in_w = float(a[cols][:, f0].sum() + a[cols][:, f1].sum())  # from the supernode into j
        assert float(m.adjacency[s, j]) == pytest.approx(out_w, abs=1e-6)
        assert float(m.adjacency[j, s]) == pytest.approx(in_w, abs=1e-6)
        checked += in_w != 0
    assert checked >= 2  # the supernode has real outgoing edges
    assert m.internal["top features"] == pytest.approx(float(a[f0, f1] + a[f1, f0]), abs=1e-6)
    # the targets' incoming totals are unchanged (no target is in a supernode)
    k = len(pruned.target_weights)
    torch.testing.assert_close(m.adjacency[-k:].sum(1), a[-k:].sum(1), atol=1e-5, rtol=1e-6)

    fig = m.figure(max_edges=1000)
    sup = next(t for t in fig.data if t.name == "supernodes")
    assert list(sup.text) == ["top features", "errors"]
    plain = next(t for t in fig.data if t.mode == "markers")
    assert len(plain.x) == len(pruned.nodes) - 4
    assert "2 supernodes" in fig.layout.title.text
    # the JSON download: the pruned graph, supernodes in its provenance
    back = AG.AttributionGraph.from_json(m.to_json())
    assert back.nodes == pruned.nodes and back.provenance["supernodes"] == [
        ["top features", *feats],
        ["errors", *errors],
    ]


def test_graph_file_keeps_pinned_nodes_and_supernodes(pruned, model, tmp_path):
    feats, errors = _groups(pruned)
    target = pruned.nodes[-1]
    f = GF.graph_file(
        pruned, model, slug="ioi-view", pinned=[*feats, target], supernodes=[f"say it={feats[0]},{feats[1]}"]
    )
    ct = _ct_models().Model.model_validate(f)
    nid = lambda x: GF.node_id(x, pruned.tokens, pruned.n_layers, model.cfg.d_vocab)
    assert ct.qParams.pinnedIds == [nid(x) for x in (*feats, target)]
    assert ct.qParams.supernodes == [["say it", nid(feats[0]), nid(feats[1])]]
    ids = {n["node_id"] for n in f["nodes"]}
    assert all(x in ids for s in f["qParams"]["supernodes"] for x in s[1:])
    n = labels.parse(feats[0])
    assert nid(feats[0]) == f"{n.layer}_{n.index}_{n.pos}"
    # everything else is as without them
    plain = GF.graph_file(pruned, model, slug="ioi-view")
    assert f["nodes"] == plain["nodes"] and f["links"] == plain["links"]
    out = GF.write_graph_file(pruned, model, tmp_path / "v.json", slug="v", supernodes=[("errs", errors)])
    assert json.loads(out.read_text())["qParams"]["supernodes"] == [["errs", *map(nid, errors)]]
    with pytest.raises(LenslabError, match="pinned node 'L9F9@0' is not a node of the written graph"):
        GF.graph_file(pruned, model, slug="x", pinned=["L9F9@0"])
    with pytest.raises(LenslabError, match="not a node of this graph"):
        GF.graph_file(pruned, model, slug="x", supernodes=[("s", [feats[0], "L9F9@0"])])
    with pytest.raises(LenslabError, match="names a node twice"):
        GF.graph_file(pruned, model, slug="x", pinned=[target, target])
