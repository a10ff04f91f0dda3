"""Attribution graphs under a memory budget, and pruning without n² temporaries (issue 18, point 7).

The budget changes how a graph is computed (targets per backward pass, rows in memory or in a
temporary file), never what: the graph under a small budget equals the unbounded one. Pruning
finds its edge threshold by two histogram passes instead of sorting all n² scores: the threshold
and the kept edges equal a full sort's (circuit-tracer's `prune_graph` step, with exact running
sums), ties included, and the whole bounded `prune` equals a dense reference written here.
"""

from __future__ import annotations

import bisect
import itertools
import math

import pytest
import torch
from torch import Tensor

from lenslab import LenslabError, labels
from lenslab.cli import main
from lenslab.probes import attribution_graph as AG
from lenslab.probes import transcoders as T

pytestmark = pytest.mark.usefixtures("one_thread")

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def ioi(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    tc = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    return model, tc, AG.attribution_graph(model, IOI_PROMPT, tc)


# --- the threshold: a histogram selection equals the full sort ------------------------------------
def sorted_threshold(scores: Tensor, fraction: float) -> float:
    """circuit-tracer's `find_threshold` by a full sort, with exact running sums: the first score,
    in descending order, at which the running sum reaches `fraction` of the total. Each float32 is
    an exact integer multiple of 2^-149 (its significand shifted by its exponent)."""
    s = scores.flatten().float().sort(descending=True).values
    key = s.view(torch.int32).long()
    e = key >> 23
    sig = ((key & 0x7FFFFF) | (e > 0).long() << 23).tolist()
    running = list(itertools.accumulate(m << max(x - 1, 0) for m, x in zip(sig, e.tolist())))
    num, den = fraction.as_integer_ratio()
    i = bisect.bisect_left(running, -(-num * running[-1] // den))  # first running sum >= fraction x total
    return float(s[min(i, len(s) - 1)])


@pytest.mark.parametrize("fraction", [1e-6, 0.1, 0.5, 0.8, 0.98, 1.0])
def test_threshold_equals_the_full_sort(fraction, ioi):
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 6, (300, 200), generator=g).float() * 0.25  # many ties
    smooth = torch.rand(400, 500, generator=g) ** 6  # spread over many exponents
    smooth[smooth < 1e-3] = 0.0
    edges = ioi[2].adjacency[:300].abs()  # a real graph's |edges|, from 1e-12 to 13
    for scores in (ties, smooth, edges):
        want = sorted_threshold(scores, fraction)
        # blocks of rows, as prune passes them
        got = AG.find_threshold(lambda s=scores: s.split(37), fraction)
        assert float(got) == want
        assert torch.equal(scores >= got, scores.double() >= want)


def test_threshold_keeps_ties_whole():
    scores = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 0.0])
    # total 15: the running sum reaches 7.5 inside the block of 3s, so all three are kept
    assert float(AG.find_threshold(lambda: [scores], 0.5)) == 3.0
    assert int((scores >= AG.find_threshold(lambda: [scores], 0.5)).sum()) == 4
    assert float(AG.find_threshold(lambda: [scores], 1 / 3)) == 5.0  # reached exactly at the first score
    assert float(AG.find_threshold(lambda: [scores], 1.0)) == 1.0  # every nonzero score, not the zeros


# --- the bounded prune equals a dense one -------------------------------------------------------------
def dense_prune(g: AG.AttributionGraph, node_threshold: float, edge_threshold: float, node_ranking: str):
    """circuit-tracer's `prune_graph` on dense n x n tensors with full sorts (lenslab's node ranking
    options): the (node mask, edge mask) that `prune` must reproduce."""
    kinds = [labels.parse(x).kind for x in g.nodes]
    nf, ne = kinds.count("feature"), kinds.count("error")
    a = g.adjacency.float()
    n = len(a)
    w = torch.zeros(n)
    w[n - len(g.target_weights) :] = g.target_weights

    def normalize(x):
        x = x.abs()
        return x / x.sum(1, keepdim=True).clamp(min=1e-10)

    def influence(an):
        cur = w @ an
        total = cur.clone()
        while cur.any():
            cur = cur @ an
            total += cur
        return total

    infl = influence(normalize(a))
    node_mask = torch.ones(n, dtype=torch.bool)
    if node_ranking == "all":
        node_mask = infl.double() >= sorted_threshold(infl, node_threshold)
        node_mask[nf + ne :] = True
    else:
        node_mask[:nf] = infl[:nf].double() >= sorted_threshold(infl[:nf], node_threshold)
    pa = a.clone()
    pa[~node_mask] = 0
    pa[:, ~node_mask] = 0
    pn = normalize(pa)
    scores = pn * (influence(pn) + w)[:, None]
    edge_mask = (scores.double() >= sorted_threshold(scores, edge_threshold)) & (pa != 0)
    while True:
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[: nf + ne] &= edge_mask[:, : nf + ne].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
        if torch.equal(old, node_mask):
            return node_mask, edge_mask


def synthetic_graph(n: int, layers: int = 4, seed: int = 0) -> AG.AttributionGraph:
    """benchmarks/graph_vs_circuit_tracer.py's synthetic dense graph: n // 8 positions, features in
    `layers` layers reading earlier layers, errors and embeddings read by everything, one logit."""
    P = n // 8
    nf = n - (layers + 1) * P - 1
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    a[nf:-1] = 0
    a[:, -1] = 0
    layer_of = torch.arange(nf) * layers // nf
    a[:nf, :nf] *= layer_of[:, None] > layer_of[None, :]
    a[:nf] *= torch.rand(nf, 1, generator=g) < 0.9
    nodes = (
        [labels.feature(int(layer_of[i]), i, 1) for i in range(nf)]
        + [labels.error_node(layer, p) for layer in range(layers) for p in range(P)]
        + [labels.token_node(p) for p in range(P)]
        + [labels.logit_node(0, P - 1)]
    )
    z = torch.zeros(n)
    return AG.AttributionGraph(
        nodes=nodes, adjacency=a, activations=z, inputs=z, biases=z, target_weights=torch.ones(1),
        tokens=list(range(P)), str_tokens=[""] * P, n_layers=layers,
    )  # fmt: skip


@pytest.mark.parametrize("node_ranking", AG.PRUNE_RANKINGS)
def test_bounded_prune_equals_the_dense_prune(node_ranking, ioi, monkeypatch):
    """With blocks of 32 rows (the ioi graph, 1,030 nodes) and 27 rows (a synthetic 1,200-node
    graph), `prune` keeps the nodes and edges of the dense reference, edge for edge."""
    monkeypatch.setattr(AG, "CHUNK_ELEMENTS", 1 << 15)
    counts = []
    for g in (ioi[2], synthetic_graph(1200)):
        n = len(g.nodes)
        assert n // (AG.CHUNK_ELEMENTS // n) > 30  # blocks of rows
        node_mask, edge_mask = dense_prune(g, 0.8, 0.98, node_ranking)
        p = AG.prune(g, 0.8, 0.98, node_ranking=node_ranking)
        keep = node_mask.nonzero()[:, 0]
        assert p.nodes == [g.nodes[i] for i in keep.tolist()]
        assert torch.equal(p.adjacency, (g.adjacency * edge_mask)[keep][:, keep])
        counts.append((len(p.nodes), int((p.adjacency != 0).sum())))
    want = [(62, 194), (974, 122_961)] if node_ranking == "features" else [(23, 25), (742, 77_029)]
    assert counts == want  # ioi: the documented pruned graph (docs/transcoders.md)


def test_prune_budget(ioi):
    g = ioi[2]
    n = len(g.nodes)
    need = AG.prune_bytes(n)
    assert AG.prune_bytes(4096) < 200 * 2**20 < AG.prune_bytes(70_000) < 1000 * 2**20  # ~n²/8 beyond a block
    with pytest.raises(LenslabError, match=r"too small to prune a 1,030-node graph: it needs at least"):
        AG.prune(g, memory_budget=need - 1)
    with pytest.raises(LenslabError, match="too small for this pruned graph"):
        AG.prune(g, memory_budget=need + 100)
    p = AG.prune(g, memory_budget="1GiB")
    assert p.nodes == AG.prune(g).nodes and torch.equal(p.adjacency, AG.prune(g).adjacency)
    with pytest.raises(LenslabError, match="memory_budget="):
        AG.prune(g, memory_budget="lots")


# --- the graph under a budget -------------------------------------------------------------------------
def test_graph_under_a_small_budget_equals_the_unbounded_graph(ioi):
    model, tc, full = ioi
    frozen = AG.FrozenReplacement(model, model.to_tokens(IOI_PROMPT)[0], tc)
    active = torch.cat([torch.cat([torch.full((len(nz), 1), L), nz], 1) for L in frozen.layers
                        for nz in [(frozen.values["features"][L] != 0).nonzero()]])  # fmt: skip

    def tight(n_features):
        """A budget 1 byte short of 3 targets per pass with the rows in memory: the rows go to
        disk, for at least 3 targets per pass, as many as the rest of the budget holds (no more)."""
        free = AG.plan_memory(frozen, active, 1, n_features, 32, None)
        assert (free.batch_size, free.offload, free.budget) == (32, False, None)
        parts = (free.fixed, free.per_target, free.rows, free.adjacency, 0)
        budget = math.ceil(AG.MemoryPlan(3, False, *parts).peak / AG.HEADROOM) - 1
        plan = AG.plan_memory(frozen, active, 1, n_features, 32, budget)
        room = AG.HEADROOM * budget  # the plan leaves 10% of the budget for what it does not count
        assert plan.offload and 3 <= plan.batch_size < 32 and plan.peak <= room
        assert AG.MemoryPlan(plan.batch_size + 1, True, *parts).peak > room
        return budget, plan

    budget, plan = tight(len(active))
    g = AG.attribution_graph(model, IOI_PROMPT, tc, memory_budget=budget)
    assert g.provenance["batch_size"] == plan.batch_size and g.provenance["rows_on_disk"] is True
    assert g.provenance["memory_budget"] == budget and g.provenance["planned_peak"] <= AG.HEADROOM * budget
    assert g.nodes == full.nodes
    assert torch.allclose(g.adjacency, full.adjacency, atol=1e-6 * float(full.adjacency.abs().max()), rtol=0)
    assert torch.equal(g.inputs, full.inputs) and torch.equal(g.biases, full.biases)
    # the influence-ranked selection reads its rows back from the file: the same features
    sel = AG.attribution_graph(model, IOI_PROMPT, tc, max_feature_nodes=40, batch_size=16)
    budget, plan = tight(40)
    small = AG.attribution_graph(model, IOI_PROMPT, tc, max_feature_nodes=40, batch_size=16, memory_budget=budget)
    assert small.provenance["rows_on_disk"] is True and small.provenance["batch_size"] == min(16, plan.batch_size)
    assert small.nodes == sel.nodes
    assert torch.allclose(small.adjacency, sel.adjacency, atol=1e-6 * float(sel.adjacency.abs().max()), rtol=0)


def test_graph_budget_too_small_names_the_minimum(ioi):
    model, tc, _ = ioi
    with pytest.raises(LenslabError, match=r"memory_budget=1 MiB is too small for this graph: it needs at least \d+"):
        AG.attribution_graph(model, IOI_PROMPT, tc, memory_budget="1MiB")
    with pytest.raises(LenslabError, match="batch_size must be >= 1"):
        AG.attribution_graph(model, IOI_PROMPT, tc, batch_size=0)


def test_cli_passes_the_budget_through(tmp_path, capsys):
    argv = ["graph", "attribute", "--model", "zoo/ioi-4l", "--prompt", IOI_PROMPT, "--max-feature-nodes", "8"]
    out = tmp_path / "graph.json"
    assert main([*argv, "--memory-budget", "1MiB", "--out", str(out)]) == 2
    assert "memory_budget=1 MiB is too small for this graph" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--memory-budget", "256MiB", "--out", str(out)]) == 0
    assert AG.AttributionGraph.from_json(out).provenance["memory_budget"] == 256 * 2**20


def test_progress_counts_every_row_once():
    """`progress(done, total)` after each backward pass: rising to the targets + features, the graph unchanged."""
    import lenslab
    from lenslab.probes.attribution_graph import attribution_graph

    model = lenslab.load_model("zoo/ioi-4l", device="cpu")
    seen: list[tuple[int, int]] = []
    prompt = "When Mary and John went to the store, John gave a drink to"
    g = attribution_graph(model, prompt, "zoo/ioi-4l/per-layer", max_feature_nodes=20, batch_size=8,
                          progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    ref = attribution_graph(model, prompt, "zoo/ioi-4l/per-layer", max_feature_nodes=20, batch_size=8)
    total = len(g.target_weights) + 20
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted({d for d, _ in seen}) and len(seen) >= 3
    assert torch.equal(g.adjacency, ref.adjacency)
