"""Interventions from attribution-graph nodes (lenslab.steering.graph_interventions).

Oracles: `lenslab.probes.graph_validation.ablation_hooks` (the graph's own ablation in the live
model) for ablations, on the shipped TopK transcoders of zoo/ioi-4l and on seeded random
cross-layer (ReLU) and per-layer (JumpReLU with skip) transcoders; a hand-written hook adding the
decoder row for steering; the graph's edges for the first-order effect, with the attention patterns
and norm scales frozen at the clean run as the graph's linearisation freezes them.
"""

from __future__ import annotations

import pytest
import torch

from lenslab import LenslabError, labels
from lenslab import steering as S
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_validation as GV
from lenslab.probes import transcoders as T
from lenslab.steering import graph_interventions as GI

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "zoo/ioi-4l"
TC = "zoo/ioi-4l/per-layer"
PROMPT = "When Mary and John went to the store, John gave a drink to"
TOL = 1e-5  # logits (entries up to ~22), float32 rounding of the same sums in another order


@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models(MODEL)


@pytest.fixture(scope="module")
def tc():
    return T.load_transcoders(TC)


@pytest.fixture(scope="module")
def graph(model, tc):
    return AG.attribution_graph(model, PROMPT, tc, max_feature_nodes=24)


@pytest.fixture(scope="module")
def toks(graph):
    return torch.tensor([graph.tokens])


def _features(graph) -> list[str]:
    return [n for n, p in zip(graph.nodes, graph.parsed) if p.kind == "feature"]


def _top_node(graph) -> tuple[str, float]:
    """The feature node with the largest |edge| into the heaviest target, and that edge."""
    t = len(graph.nodes) - len(graph.target_weights) + int(graph.target_weights.argmax())
    feats = _features(graph)
    edges = graph.adjacency[t, : len(feats)]
    i = int(edges.abs().argmax())
    return feats[i], float(edges[i])


def _logits(model, toks, iv=None, extra=()):
    with torch.no_grad():
        return model.run_with_hooks(toks, fwd_hooks=[*extra, *(S.hooks(model, iv) if iv else [])])


def _reference_ablation(model, tc, toks, nodes):
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for n in map(labels.parse, nodes):
        by_layer.setdefault(n.layer, []).append((n.pos, n.index))
    with torch.no_grad():
        return model.run_with_hooks(toks, fwd_hooks=GV.ablation_hooks(tc, by_layer, int(model.cfg.n_layers)))


def test_ablating_nodes_equals_graph_validation(model, tc, graph, toks):
    clean = _logits(model, toks)
    feats = _features(graph)
    by_layer = {}
    for f in feats:
        by_layer.setdefault(labels.parse(f).layer, f)
    top, _ = _top_node(graph)
    supernode = sorted({top, *by_layer.values()})  # the top node and one node of each layer
    assert len({labels.parse(f).layer for f in supernode}) == 4
    for nodes in ([top], supernode):
        iv = GI.node_intervention(TC, nodes, "ablate", graph=graph)
        assert [e.op for e in iv.edits] == ["feature"] * len(nodes)
        ref = _reference_ablation(model, tc, toks, nodes)
        got = _logits(model, toks, iv)
        assert (ref - clean).abs().max() > 0.01  # the ablation does something
        assert torch.allclose(got, ref, atol=TOL, rtol=0)
    # the same through apply (what generation uses)
    with S.apply(model, iv), torch.no_grad():
        assert torch.allclose(model(toks), ref, atol=TOL, rtol=0)


def test_clamping_to_the_own_activation_changes_nothing(model, graph, toks):
    clean = _logits(model, toks)
    node, _ = _top_node(graph)
    a = float(graph.activations[graph.nodes.index(node)])
    for iv in (
        GI.node_intervention(TC, node, "clamp", factor=1.0, graph=graph),
        GI.node_intervention(TC, node, "clamp", a, graph=graph),
    ):
        assert torch.allclose(_logits(model, toks, iv), clean, atol=TOL, rtol=0)
    doubled = GI.node_intervention(TC, node, "clamp", factor=2.0, graph=graph)
    assert doubled.edits[0].feature.target == pytest.approx(2 * a)
    assert (_logits(model, toks, doubled) - clean).abs().max() > 0.01


def test_steering_adds_the_decoder_row(model, tc, graph, toks):
    clean = _logits(model, toks)
    node, _ = _top_node(graph)
    n = labels.parse(node)
    assert torch.equal(_logits(model, toks, GI.node_intervention(TC, node, "steer", 0.0)), clean)
    iv = GI.node_intervention(TC, node, "steer", 3.0)
    assert torch.equal(_logits(model, toks, iv.with_strength(0.0)), clean)

    def add(act, hook):
        act = act.clone()
        act[:, n.pos] += 3.0 * tc[n.layer].W_dec[n.index]
        return act

    by_hand = _logits(model, toks, extra=[(f"blocks.{n.layer}.hook_mlp_out", add)])
    assert (by_hand - clean).abs().max() > 0.01
    assert torch.allclose(_logits(model, toks, iv), by_hand, atol=TOL, rtol=0)
    # adding v at the node equals clamping to the node's activation + v there
    a = float(graph.activations[graph.nodes.index(node)])
    clamped = GI.node_intervention(TC, node, "clamp", a + 3.0, graph=graph)
    assert torch.allclose(_logits(model, toks, clamped), by_hand, atol=TOL, rtol=0)
    # every position: the edit's positions, and more change than at the node alone
    everywhere = GI.node_intervention(TC, node, "steer", 3.0, positions="all")
    assert everywhere.edits[0].positions == "all"
    assert not torch.allclose(_logits(model, toks, everywhere), by_hand, atol=1e-3)


def test_top_node_moves_the_target_as_its_edge_says(model, graph, toks):
    """Ablating the top feature node of the target moves it the way the edge's sign says, in the
    live model; with the attention patterns and norm scales frozen at the clean run (the graph's
    linearisation) a 5% cut moves it by the graph's first-order amount, within 10% (the rest is the
    indirect paths through the later layers' features, which the live transcoders recompute)."""
    node, edge = _top_node(graph)
    assert abs(edge) > 1.0
    res = GI.intervention_effect(model, graph, GI.node_intervention(TC, node, "ablate", graph=graph))
    assert res.target_token == "Mary" and res.predicted == pytest.approx(-edge, rel=1e-5)
    assert res.target_change() * edge < 0  # the edge's sign
    small = GI.node_intervention(TC, node, "clamp", factor=0.95, graph=graph)
    res = GI.intervention_effect(model, graph, small)
    assert res.predicted == pytest.approx(-0.05 * edge, rel=1e-5)
    names = lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale")
    with torch.no_grad():
        clean, cache = model.run_with_cache(toks, names_filter=names)
    frozen = [(k, lambda act, hook, k=k: cache[k]) for k in cache]
    t = res.target
    value = lambda logits: float(logits[0, -1, t] - logits[0, -1].mean())
    assert value(clean) == pytest.approx(res.target_before, abs=TOL)
    change = value(_logits(model, toks, small, extra=frozen)) - value(clean)
    assert change == pytest.approx(res.predicted, rel=0.10)


def test_the_result_reports_the_logits_before_and_after(model, graph, toks):
    node, _ = _top_node(graph)
    iv = GI.node_intervention(TC, node, "steer", 20.0, name="my supernode")
    res = GI.intervention_effect(model, graph, iv, target="John", k=3)
    before, after = _logits(model, toks)[0, -1], _logits(model, toks, iv)[0, -1]
    john = model.to_single_token("John")
    assert res.name == "my supernode" and res.nodes == [node] and res.mode == "steer"
    assert res.target == john and res.target_token == "John"
    assert res.target_before == pytest.approx(float(before[john] - before.mean()), abs=TOL)
    assert res.target_after == pytest.approx(float(after[john] - after.mean()), abs=TOL)
    assert res.token_ids[:3] == before.topk(3).indices.tolist()
    assert set(after.topk(3).indices.tolist()) <= set(res.token_ids) and john in res.token_ids
    idx = torch.tensor(res.token_ids)
    assert torch.allclose(res.logits_after, after[idx], atol=TOL)
    assert torch.allclose(res.probs_before, before.softmax(-1)[idx], atol=1e-6)
    assert res.predicted is None  # John is not a target of the graph (salient logits: Mary)
    table = res.table()
    assert list(table["id"]) == res.token_ids
    back = GI.NodeIntervention.from_json(res.to_json())
    assert back.token_ids == res.token_ids and torch.equal(back.logits_after, res.logits_after.float())
    # a plain prompt instead of the graph: the same logits, no prediction, default target the top token
    res2 = GI.intervention_effect(model, PROMPT, iv)
    assert res2.target == int(before.argmax()) and res2.predicted is None
    assert res2.target_after == pytest.approx(float(after[res2.target] - after.mean()), abs=TOL)


def test_generation_streams_the_intervention(model, graph):
    prompt = GI.graph_prompt(model, graph)
    assert prompt == PROMPT
    node, _ = _top_node(graph)
    iv = GI.node_intervention(TC, node, "steer", 20.0, positions="all")
    res = GI.intervention_effect(model, graph, iv)
    first = model.to_single_str_token(res.token_ids[int(res.probs_after.argmax())])
    steered = S.generate(model, prompt, iv, max_new_tokens=4)
    assert steered.strip().split()[0] == first.strip()
    assert S.generate(model, prompt, iv.with_strength(0.0), max_new_tokens=4) == S.generate(
        model, prompt, max_new_tokens=4
    )


def test_presets_keep_where_the_feature_is_read(model, graph, toks, tmp_path):
    node, _ = _top_node(graph)
    iv = GI.node_intervention(TC, node, "clamp", factor=0.5, graph=graph)
    assert iv.edits[0].feature.hook == "blocks.0.ln2.hook_normalized"
    back = S.load(S.save(iv, tmp_path / "node.json"))
    assert back == iv and back.edits[0].feature.hook == "blocks.0.ln2.hook_normalized"
    assert torch.equal(_logits(model, toks, back), _logits(model, toks, iv))


def _random_transcoders(model, kind: str):
    torch.manual_seed(0)
    d, n = int(model.cfg.d_model), int(model.cfg.n_layers)
    if kind == "clt":
        tc = T.CrossLayerTranscoder(n, d, 48, activation="relu")
    else:
        tc = T.TranscoderSet(
            {layer: T.Transcoder(d, 48, layer=layer, activation="jumprelu", skip=True) for layer in range(n)}
        )
    with torch.no_grad():
        for name, p in tc.named_parameters():
            p.copy_(torch.rand_like(p) * 0.05 if "threshold" in name else torch.randn_like(p) * 0.2)
    return tc


@pytest.mark.parametrize("kind", ["clt", "jumprelu"])
def test_other_transcoders_match_graph_validation(model, toks, kind):
    tc = _random_transcoders(model, kind)
    T.check_transcoders(model, tc)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda h: h.endswith("ln2.hook_normalized"))
    nodes = []
    for layer in (0, 2):
        f = tc.features(layer, cache[f"blocks.{layer}.ln2.hook_normalized"][0].float())
        pos, idx = (f > 0).nonzero()[0].tolist()
        nodes.append(labels.feature(layer, idx, pos))
    iv = GI.node_intervention(tc, nodes, "ablate")
    n_layers = int(model.cfg.n_layers)
    writes = [n_layers - labels.parse(x).layer for x in nodes] if kind == "clt" else [1, 1]
    assert len(iv.edits) == sum(writes)  # a cross-layer feature writes to its layer and every later one
    ref = _reference_ablation(model, tc, toks, nodes)
    assert (ref - _logits(model, toks)).abs().max() > 1e-3
    assert torch.allclose(_logits(model, toks, iv), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: GI.node_intervention(TC, "MLP0.err@3", graph=g), "is an error node: only feature nodes"),
        (lambda g: GI.node_intervention(TC, "embed@2", graph=g), "is a token node: only feature nodes"),
        (lambda g: GI.node_intervention(TC, g.nodes[-1], graph=g), "is a logit node: only feature nodes"),
        (lambda g: GI.node_intervention(TC, "L9F1@3"), "cover layers [0, 1, 2, 3], not layer 9"),
        (lambda g: GI.node_intervention(TC, "L0F999@3"), "feature 999 is out of range for transcoders of 256"),
        (lambda g: GI.node_intervention(TC, "L0F1@3", graph=g), "node L0F1@3 is not in the graph"),
        (lambda g: GI.node_intervention(TC, "L0F1"), "is not a node label"),
        (lambda g: GI.node_intervention(TC, ["L0F1@3", "L0F1@3"]), "listed twice"),
        (lambda g: GI.node_intervention(TC, [], "ablate"), "no nodes given"),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "zap"), "mode 'zap' is not one of ablate, clamp, steer"),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "ablate", 1.0), "takes no value"),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "clamp"), "clamp needs exactly one of value="),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "clamp", factor=2.0), "pass graph="),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "steer"), "steer needs value="),
        (lambda g: GI.node_intervention(TC, "L0F1@3", "steer", float("nan")), "must be a finite number"),
    ],
)
def test_bad_input_is_a_clear_error(graph, call, message):
    with pytest.raises(LenslabError) as exc:
        call(graph)
    assert message in str(exc.value)


def test_a_graph_of_another_model_is_refused(zoo_models, graph):
    other = zoo_models("zoo/english-4l")
    iv = GI.node_intervention(TC, _top_node(graph)[0], "ablate")
    with pytest.raises(LenslabError, match="trained on 'zoo/ioi-4l', not on model 'zoo/english-4l'"):
        GI.intervention_effect(other, "the cat sat", iv)
    with pytest.raises(LenslabError, match="the graph was computed on 'zoo/ioi-4l'"):
        GI.intervention_effect(other, graph, iv)


def test_a_read_hook_must_exist_and_run_first(model, graph):
    from dataclasses import replace

    iv = GI.node_intervention(TC, _top_node(graph)[0], "ablate")
    e = iv.edits[0]
    for hook, message in [
        ("blocks.3.ln2.hook_normalized", "a later layer: the read hook must run before the edited one"),
        ("blocks.0.ln2.hook_nope", "which is not a hook point of this model"),
    ]:
        bad = S.Intervention(edits=(replace(e, feature=replace(e.feature, hook=hook)),))
        with pytest.raises(LenslabError, match=message):
            S.validate(model, bad)
