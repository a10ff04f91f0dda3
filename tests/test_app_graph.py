"""The Graph page under Streamlit's AppTest: on zoo/ioi-4l it shows the library's attribution graph
(the same scores as `attribution_graph` on the same inputs, the node count `prune` gives for the
thresholds chosen, salient logits and explicit answer tokens), filters its tables, and on models
without transcoders it explains instead of failing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import labels
from lenslab.probes import attribution_graph as AG

MAIN = Path(__file__).resolve().parent.parent / "app" / "main.py"
MODEL = "zoo/ioi-4l"
TRANSCODERS = "zoo/ioi-4l/per-layer"
NODES = 16
pytestmark = pytest.mark.slow


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _app(monkeypatch, model: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSLAB_DEFAULT_MODEL", model)
    torch.set_num_threads(1)
    at = AppTest.from_file(str(MAIN), default_timeout=300).run()
    at.switch_page("page_graph.py").run()
    _ok(at)
    assert at.title[0].value == f"Graph · {model}"
    return at


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _compute(at) -> dict[str, str]:
    at.slider(key="ag_max_nodes").set_value(NODES).run()
    at.button(key="ag_go").click().run()
    _ok(at)
    return _metrics(at)


def test_graph_page_shows_the_librarys_graph(monkeypatch):
    at = _app(monkeypatch, MODEL)
    assert at.selectbox(key="ag_tc").value == TRANSCODERS
    assert any("Compute graph" in i.value for i in at.info)
    shown = _compute(at)
    prompt = at.text_area(key="prompt").value.strip()
    model = lenslab.load_model(MODEL, device="cpu")
    ref = AG.attribution_graph(model, prompt, TRANSCODERS, max_feature_nodes=NODES)
    assert float(shown["Replacement score"]) == pytest.approx(ref.replacement_score, abs=1e-6)
    assert float(shown["Completeness score"]) == pytest.approx(ref.completeness_score, abs=1e-6)
    default = AG.prune(ref, node_threshold=0.8, edge_threshold=0.98)
    assert int(shown["Nodes (pruned)"]) == len(default.nodes)
    assert int(shown["Edges (pruned)"]) == int((default.adjacency != 0).sum())
    assert len(at.get("plotly_chart")) == 1
    assert at.dataframe[0].value["node"].tolist() == default.nodes

    # a lower edge threshold re-prunes the stored graph: the count `prune` gives, and a different one
    at.slider(key="ag_node_t").set_value(0.5).run()
    at.slider(key="ag_edge_t").set_value(0.8).run()
    _ok(at)
    lower = AG.prune(ref, node_threshold=0.5, edge_threshold=0.8)
    assert len(lower.nodes) != len(default.nodes)
    assert int(_metrics(at)["Nodes (pruned)"]) == len(lower.nodes)
    assert float(_metrics(at)["Replacement score"]) == pytest.approx(ref.replacement_score, abs=1e-6)  # not recomputed

    # display filters: error nodes hidden from the tables, then one pinned node
    at.checkbox(key="ag_hide_err").check().run()
    _ok(at)
    nodes = at.dataframe[0].value
    assert "error" not in set(nodes["kind"]) and len(nodes) == sum(n.kind != "error" for n in lower.parsed)
    target = lower.nodes[-1]
    at.multiselect(key="ag_pin").set_value([target]).run()
    at.radio(key="ag_pin_edges").set_value("into / out of pinned").run()
    _ok(at)
    assert at.dataframe[0].value["node"].tolist() == [target]
    edges = at.dataframe[1].value
    assert len(edges) > 0 and set(edges["target"]) == {target}

    # explicit answer tokens
    at.radio(key="ag_target_kind").set_value("Answer tokens").run()
    _ok(at)
    answers = at.text_input(key="ag_answers").value
    assert answers == "Mary,John"
    at.button(key="ag_go").click().run()
    _ok(at)
    ref2 = AG.attribution_graph(model, prompt, TRANSCODERS, targets=["Mary", "John"], max_feature_nodes=NODES)
    assert float(_metrics(at)["Replacement score"]) == pytest.approx(ref2.replacement_score, abs=1e-6)
    assert float(_metrics(at)["Completeness score"]) == pytest.approx(ref2.completeness_score, abs=1e-6)

    # validation by ablation: the library's numbers for the pruned graph shown
    from lenslab.probes import graph_validation

    at.number_input(key="ag_n_random").set_value(3).run()
    at.button(key="ag_ablate").click().run()
    _ok(at)
    check = graph_validation.ablate_graph(model, AG.prune(ref2, 0.5, 0.8), TRANSCODERS, n_random=3)
    label = f"Target drop, the graph's {check.n_features} features ablated"
    assert float(_metrics(at)[label]) == pytest.approx(check.graph_effect(), abs=1e-4)
    assert len(at.get("plotly_chart")) == 2

    # edges split by attention head: the library's split of the pruned graph's strongest edges
    from lenslab.probes import graph_heads

    at.number_input(key="ag_heads_n").set_value(10).run()
    at.button(key="ag_heads_go").click().run()
    _ok(at)
    split = graph_heads.head_edges(model, AG.prune(ref2, 0.5, 0.8), TRANSCODERS, max_edges=10)
    shown = next(d.value for d in at.dataframe if "one_hop" in d.value.columns)
    want = split.table(top=3)
    assert shown[["source", "target", "path"]].values.tolist() == want[["source", "target", "path"]].values.tolist()
    assert shown["part"].tolist() == pytest.approx(want["part"].tolist(), abs=1e-5)
    assert len(at.get("plotly_chart")) == 3

    # a token that is not one token: a readable message, no traceback
    at.text_input(key="ag_answers").set_value("Mary,John Mary").run()
    at.button(key="ag_go").click().run()
    assert not at.exception and any("is not one token" in e.value for e in at.error)


def test_graph_page_groups_pinned_nodes_into_supernodes(monkeypatch):
    """Two pinned features grouped as "pair": the drawn graph has one node for them with the summed
    edges `merge_supernodes` gives, and the circuit-tracer download keeps the pins and the supernode;
    removing it restores the plain graph. The shipped CLT is offered beside the per-layer transcoders
    and its graph is the library's."""
    import json

    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    from lenslab.probes import graph_files as GF
    from lenslab.probes import graph_supernodes as GS

    files: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def keep(self, data, mimetype, kind, filename=None):
        if filename:
            files[filename] = data if isinstance(data, bytes) else str(data).encode()
        return original(self, data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    at = _app(monkeypatch, MODEL)
    assert list(at.selectbox(key="ag_tc").options) == ["zoo/ioi-4l/clt", "zoo/ioi-4l/per-layer"]
    _compute(at)
    prompt = at.text_area(key="prompt").value.strip()
    model = lenslab.load_model(MODEL, device="cpu")
    pruned = AG.prune(AG.attribution_graph(model, prompt, TRANSCODERS, max_feature_nodes=NODES), 0.8, 0.98)
    feats = [n for n, p in zip(pruned.nodes, pruned.parsed) if p.kind == "feature"][:2]
    assert at.button(key="ag_sn_add").disabled  # nothing pinned yet

    at.multiselect(key="ag_pin").set_value(feats).run()
    at.text_input(key="ag_sn_label").set_value("pair").run()
    at.button(key="ag_sn_add").click().run()
    _ok(at)
    merged = GS.merge_supernodes(pruned, [GS.Supernode("pair", tuple(feats))])
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    sup = next(t for t in fig if t.get("name") == "supernodes")
    plain = next(t for t in fig if t.get("mode") == "markers")
    assert sup["text"] == ["pair"] and len(plain["x"]) == len(pruned.nodes) - 2
    shown = next(d.value for d in at.dataframe if list(d.value.columns) == ["source", "target", "weight"]
                 and "pair" in set(d.value["source"]) | set(d.value["target"]))  # fmt: skip
    want = merged.table("edges")
    assert shown[["source", "target"]].values.tolist() == want[["source", "target"]].values.tolist()[:200]
    assert shown["weight"].tolist() == pytest.approx(want["weight"].tolist()[:200], abs=1e-6)
    out = next(w for (s, t), w in zip(want[["source", "target"]].values.tolist(), want["weight"]) if s == "pair")
    assert out != 0  # a real summed edge
    assert any("Supernode **pair**" in m.value for m in at.markdown)

    ct = json.loads(files["lenslab-graph.json"])
    nid = lambda x: GF.node_id(x, pruned.tokens, pruned.n_layers, model.cfg.d_vocab)
    assert ct["qParams"]["supernodes"] == [["pair", *map(nid, feats)]]
    assert ct["qParams"]["pinnedIds"] == [nid(x) for x in feats]
    lenslab_json = json.loads(files["attribution_graph_pruned.json"])
    assert lenslab_json["provenance"]["supernodes"] == [["pair", *feats]]

    # a second group may not reuse a member; removing the supernode restores the plain drawing
    at.text_input(key="ag_sn_label").set_value("again").run()
    at.button(key="ag_sn_add").click().run()
    assert any("in two supernodes" in e.value for e in at.error)
    at.button(key="ag_sn_rm_0").click().run()
    _ok(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert not any(t.get("name") == "supernodes" for t in fig)
    assert not any("Supernode **pair**" in m.value for m in at.markdown)

    # the shipped cross-layer transcoder: the library's graph through it
    at.selectbox(key="ag_tc").set_value("zoo/ioi-4l/clt").run()
    at.button(key="ag_go").click().run()
    _ok(at)
    clt = AG.attribution_graph(model, prompt, "zoo/ioi-4l/clt", max_feature_nodes=NODES)
    assert float(_metrics(at)["Replacement score"]) == pytest.approx(clt.replacement_score, abs=1e-6)
    assert float(_metrics(at)["Completeness score"]) == pytest.approx(clt.completeness_score, abs=1e-6)


@pytest.mark.parametrize(
    ("model", "says"),
    [("zoo/induction-2l", "attention-only"), ("zoo/ioi-4l-noln", "No transcoders are shipped for zoo/ioi-4l-noln")],
)
def test_models_without_transcoders_get_a_note(monkeypatch, model, says):
    at = _app(monkeypatch, model)
    assert any(says in i.value for i in at.info), [i.value for i in at.info]
    assert not at.button  # nothing to compute


def test_graph_page_intervenes_from_nodes(monkeypatch):
    """A supernode clamped to half its activation: the library's before/after numbers and first-order
    prediction; then the top node steered at every position: the library's side-by-side generation,
    kept (not regenerated) when another widget reruns the page."""
    from lenslab import steering as S
    from lenslab.app._shell import continuation_markdown
    from lenslab.steering import graph_interventions as GI

    at = _app(monkeypatch, MODEL)
    _compute(at)
    prompt = at.text_area(key="prompt").value.strip()
    model = lenslab.load_model(MODEL, device="cpu")
    ref = AG.attribution_graph(model, prompt, TRANSCODERS, max_feature_nodes=NODES)
    pruned = AG.prune(ref, node_threshold=0.8, edge_threshold=0.98)
    feats = [n for n, p in zip(pruned.nodes, pruned.parsed) if p.kind == "feature"]
    assert list(at.multiselect(key="ag_iv_nodes").options) == feats  # feature nodes only
    target = len(ref.nodes) - 1
    top = max(feats, key=lambda n: abs(float(ref.adjacency[target, ref.nodes.index(n)])))

    nodes = feats[:2]
    at.multiselect(key="ag_iv_nodes").set_value(nodes).run()
    at.text_input(key="ag_iv_name").set_value("two features").run()
    at.radio(key="ag_iv_mode").set_value("clamp").run()
    at.number_input(key="ag_iv_value").set_value(0.5).run()  # × its activation (the default)
    at.number_input(key="ag_iv_new_tokens").set_value(0).run()
    at.button(key="ag_iv_go").click().run()
    _ok(at)
    iv = GI.node_intervention(TRANSCODERS, nodes, "clamp", factor=0.5, graph=ref, name="two features")
    want = GI.intervention_effect(model, ref, iv)
    shown = _metrics(at)
    assert float(shown[f"Target {want.target_token!r}, before"]) == pytest.approx(want.target_before, abs=1e-4)
    assert float(shown["After: two features"]) == pytest.approx(want.target_after, abs=1e-4)
    assert float(shown["Graph's first-order change"]) == pytest.approx(want.predicted, abs=1e-4)
    assert at.dataframe[-1].value["id"].tolist() == want.token_ids

    at.multiselect(key="ag_iv_nodes").set_value([top]).run()
    at.text_input(key="ag_iv_name").set_value("").run()
    at.radio(key="ag_iv_mode").set_value("steer").run()
    at.number_input(key="ag_iv_value").set_value(30.0).run()
    at.radio(key="ag_iv_where").set_value("every position").run()
    at.number_input(key="ag_iv_new_tokens").set_value(4).run()
    at.button(key="ag_iv_go").click().run()
    _ok(at)
    iv = GI.node_intervention(TRANSCODERS, top, "steer", 30.0, positions="all")
    base, steered = S.generate(model, prompt, max_new_tokens=4), S.generate(model, prompt, iv, max_new_tokens=4)
    assert base != steered
    gens = [continuation_markdown(prompt, base), continuation_markdown(prompt, steered)]
    assert [m.value for m in at.markdown if m.value in gens] == gens
    assert float(_metrics(at)[f"After: {iv.name}"]) == pytest.approx(
        GI.intervention_effect(model, ref, iv).target_after, abs=1e-4
    )
    at.slider(key="ag_max_edges").set_value(100).run()  # another widget: the result and texts stay
    _ok(at)
    assert [m.value for m in at.markdown if m.value in gens] == gens
    assert f"After: {iv.name}" in _metrics(at)


def test_graph_page_opens_a_feature_nodes_dashboard(monkeypatch):
    """Choosing a feature node opens the library's dashboard of its transcoder feature
    (`transcoder_features.feature_node_dashboard`): its numbers and top contexts."""
    from lenslab.probes import transcoder_features as TF

    at = _app(monkeypatch, MODEL)
    _compute(at)
    box = at.selectbox(key="ag_dash_node")
    assert box.value is None and "Max activation" not in _metrics(at)  # closed until a node is chosen
    prompt = at.text_area(key="prompt").value.strip()
    model = lenslab.load_model(MODEL, device="cpu")
    ref = AG.prune(AG.attribution_graph(model, prompt, TRANSCODERS, max_feature_nodes=NODES), 0.8, 0.98)
    feats = [n for n, p in zip(ref.nodes, ref.parsed) if p.kind == "feature"]
    assert list(box.options) == feats
    node = feats[-1]
    box.set_value(node).run()
    _ok(at)
    want = TF.feature_node_dashboard(model, TRANSCODERS, node)
    assert want.contexts and want.feature == labels.parse(node).index
    shown = _metrics(at)
    assert shown["Max activation"] == f"{want.max_act:.4g}" and shown["Density"] == f"{want.density:.3%}"
    assert want.contexts_html() in [m.value for m in at.markdown]
    assert any(node in e.label for e in at.expander)
