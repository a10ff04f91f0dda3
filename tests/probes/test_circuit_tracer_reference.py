"""lenslab's attribution graph against circuit-tracer's own output (issue 18, point 2).

The reference, tests/fixtures/circuit_tracer/ioi4l_reference.npz, is circuit-tracer 0.5.0's
`attribute` on zoo/ioi-4l with its committed per-layer transcoders, prompt "When Mary and John"
(5 tokens with BOS), every active feature, the salient logits. circuit-tracer pins
transformers <= 4.57.3 and lenslab runs on 5.x, so it was made once in a separate environment
by tests/fixtures/circuit_tracer/make_reference.py (its docstring has the exact versions and
commands); nothing here imports circuit-tracer.

Where the two are defined differently, the comparison accounts for it exactly:

* circuit-tracer zeroes the features and the errors at the first position (BOS); lenslab keeps
  them. The features at positions >= 1 are the same set, and every edge among the nodes both
  have is compared; circuit-tracer's BOS error columns are all zero.
* circuit-tracer's embedding node is the token embedding (`hook_embed`), lenslab's the token
  plus the position embedding. The token-only edges are lenslab's frozen replacement model with
  the position embedding's values set to zero (edges are value x gradient, and the gradient does
  not depend on the values), and lenslab's embedding edge is checked to be exactly the sum of the
  token-only and the position-only edges.
* `prune`'s default ranks only the features at the node step; `node_ranking="all"` is
  circuit-tracer's `prune_graph`, compared mask for mask.

Tolerance: 1e-5 of the largest |edge| (13.65): float32 sums in another order. Measured: 3.6e-7
(features, errors, logits), 1.4e-6 (token-only edges).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lenslab import LenslabError, labels
from lenslab.probes import attribution_graph as AG
from lenslab.probes import transcoders as T

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "circuit_tracer" / "ioi4l_reference.npz"
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def setup(ref, zoo_models):
    model = zoo_models("zoo/ioi-4l")
    tc = T.load_transcoders("zoo/ioi-4l/per-layer", model=model)
    tokens = torch.tensor(ref["tokens"])
    return model, tc, tokens, AG.attribution_graph(model, tokens, tc)


def ct_nodes(ref) -> list[str]:
    """circuit-tracer's nodes in its order (features by (layer, pos, feature), errors layer-major,
    token embeddings, logits), as lenslab labels."""
    P, L = len(ref["tokens"]), 4
    last = P - 1
    return (
        [labels.feature(layer, f, p) for layer, p, f in ref["active_features"].tolist()]
        + [labels.error_node(layer, p) for layer in range(L) for p in range(P)]
        + [labels.token_node(p) for p in range(P)]
        + [labels.logit_node(int(t), last) for t in ref["logit_tokens"]]
    )


def test_fixture_is_circuit_tracers_graph_on_this_prompt(ref, setup):
    model, _, tokens, _ = setup
    assert "circuit-tracer 0.5.0" in str(ref["versions"])
    assert tokens.tolist() == model.to_tokens("When Mary and John")[0].tolist() == [0, 207, 4, 212, 5]
    n = len(ct_nodes(ref))
    assert ref["adjacency"].shape == (n, n) == (277, 277)  # 251 features, 4 x 5 errors, 5 tokens, 1 logit
    assert len(ref["selected_features"]) == len(ref["active_features"]) == 251


def test_nodes_and_targets_equal_circuit_tracers(ref, setup):
    _, _, _, g = setup
    nodes = ct_nodes(ref)
    nf = len(ref["active_features"])
    ours = [(label, n) for label, n in zip(g.nodes, g.parsed) if n.kind == "feature"]
    # the same active features at positions >= 1; lenslab also keeps BOS's (circuit-tracer zeroes them)
    assert sorted(label for label, n in ours if n.pos > 0) == sorted(nodes[:nf])
    assert sum(n.pos == 0 for _, n in ours) == 63 and len(ours) == nf + 63
    idx = {n: i for i, n in enumerate(g.nodes)}
    acts = torch.tensor([float(g.activations[idx[n]]) for n in nodes[:nf]])
    assert torch.allclose(acts, torch.tensor(ref["activation_values"]), atol=1e-5)
    # the same salient logit (` and`, p = 0.9963) and weight
    assert g.nodes[-1] == nodes[-1] == "logit4@4"
    assert torch.allclose(g.target_weights, torch.tensor(ref["logit_probabilities"]), atol=1e-6)


def test_adjacency_equals_circuit_tracers(ref, setup):
    model, tc, tokens, g = setup
    nodes = ct_nodes(ref)
    A = torch.tensor(ref["adjacency"])
    P, L, nf = len(tokens), 4, len(ref["active_features"])
    tol = REL_TOL * float(A.abs().max())
    idx = {n: i for i, n in enumerate(g.nodes)}
    sel = torch.tensor([idx[n] for n in nodes])
    ours = g.adjacency[sel][:, sel]  # lenslab's graph in circuit-tracer's node order
    rows = list(range(nf)) + [len(nodes) - 1]  # the rows both have: features and the logit
    bos_errors = [nf + layer * P for layer in range(L)]
    token_cols = list(range(nf + L * P, nf + L * P + P))
    same = [c for c in range(len(nodes)) if c not in bos_errors and c not in token_cols]
    assert float(A.abs().max()) == pytest.approx(13.654, abs=1e-3)
    # features -> features, errors (positions >= 1) -> features, both -> the logit
    diff = (ours[rows][:, same] - A[rows][:, same]).abs().max()
    assert float(diff) <= tol, f"max |lenslab - circuit-tracer| = {float(diff):.3g} > {tol:.3g}"
    assert int((A[rows][:, same] != 0).sum()) == 16_042  # a real comparison: that many nonzero edges
    # circuit-tracer's BOS errors are zeroed (lenslab's are not: up to 3.2e-3 here)
    assert float(A[:, bos_errors].abs().max()) == 0.0
    # embeddings: circuit-tracer's token-only node = lenslab's frozen model with the position embedding at 0
    targets = [AG.feature_target(tc, layer, p, f) for layer, p, f in ref["active_features"].tolist()]
    frozen = AG.FrozenReplacement(model, tokens, tc)
    targets += AG.make_targets(model, frozen, None)[0]
    frozen.values["pos_embed"] = torch.zeros_like(frozen.values["pos_embed"])
    token_only = frozen.rows(targets)["tokens"]
    diff = (token_only - A[rows][:, token_cols]).abs().max()
    assert float(diff) <= tol, f"token-only edges: max diff {float(diff):.3g} > {tol:.3g}"
    frozen = AG.FrozenReplacement(model, tokens, tc)
    frozen.values["embed"] = torch.zeros_like(frozen.values["embed"])
    position_only = frozen.rows(targets)["tokens"]
    assert torch.allclose(token_only + position_only, ours[rows][:, token_cols], atol=1e-5)
    assert float(position_only.abs().max()) > 1.0  # the difference is real: the position embedding's edges


def ct_graph(ref) -> AG.AttributionGraph:
    """circuit-tracer's adjacency as a lenslab graph (for the scores and the pruning)."""
    nodes = ct_nodes(ref)
    n = len(nodes)
    return AG.AttributionGraph(
        nodes=nodes,
        adjacency=torch.tensor(ref["adjacency"]),
        activations=torch.zeros(n),
        inputs=torch.zeros(n),
        biases=torch.zeros(n),
        target_weights=torch.tensor(ref["logit_probabilities"]),
        tokens=ref["tokens"].tolist(),
        str_tokens=[str(t) for t in ref["tokens"].tolist()],
        n_layers=4,
    )


def test_scores_and_pruning_equal_circuit_tracers_on_its_adjacency(ref):
    g = ct_graph(ref)
    rep, comp = AG.graph_scores(g.adjacency, g.nodes, g.target_weights)
    assert rep == pytest.approx(float(ref["replacement_score"]), abs=1e-6) and rep == pytest.approx(0.9390, abs=1e-4)
    assert comp == pytest.approx(float(ref["completeness_score"]), abs=1e-6)
    assert comp == pytest.approx(0.9747, abs=1e-4)
    n = len(g.nodes)
    node_mask = ref["prune_node_mask"].astype(bool)
    edge_mask = np.unpackbits(ref["prune_edge_mask"])[: n * n].reshape(n, n).astype(bool)
    keep = np.nonzero(node_mask)[0]
    assert edge_mask.sum() == edge_mask[np.ix_(keep, keep)].sum() == 18
    pruned = AG.prune(g, 0.8, 0.98, node_ranking="all")
    assert pruned.nodes == [g.nodes[i] for i in keep]  # 6 features, MLP0.err@2, 5 embeddings, the logit
    assert np.array_equal((pruned.adjacency != 0).numpy(), edge_mask[np.ix_(keep, keep)])
    assert torch.equal(pruned.adjacency, g.adjacency[keep][:, keep] * torch.tensor(edge_mask[np.ix_(keep, keep)]))
    # lenslab's default ranks the features only (against the features' total) and keeps the errors
    # to the edge step: more nodes, a superset of circuit-tracer's
    default = AG.prune(g, 0.8, 0.98)
    assert (len(default.nodes), int((default.adjacency != 0).sum())) == (47, 100)
    assert set(pruned.nodes) < set(default.nodes)
    with pytest.raises(LenslabError, match="node_ranking must be one of"):
        AG.prune(g, node_ranking="errors")
    assert pruned.provenance["node_ranking"] == "all" and "node_ranking" not in default.provenance
