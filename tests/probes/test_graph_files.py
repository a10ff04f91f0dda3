"""lenslab.probes.graph_files: circuit-tracer's graph JSON of a real zoo/ioi-4l attribution graph,
validated with circuit-tracer's own pydantic models (vendored: tests/fixtures/circuit_tracer_graph_models.py)
and checked against the graph's numbers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lenslab import labels
from lenslab._errors import LenslabError
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_files as GF

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "circuit_tracer_graph_models.py"


def _load_models():
    spec = importlib.util.spec_from_file_location("circuit_tracer_graph_models", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CT = _load_models()


@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models("zoo/ioi-4l")


@pytest.fixture(scope="module")
def graph(model):
    return AG.attribution_graph(model, PROMPT, "zoo/ioi-4l/per-layer", max_feature_nodes=32)


@pytest.fixture(scope="module")
def pruned(graph):
    return AG.prune(graph, 0.8, 0.98)


@pytest.fixture(scope="module")
def file(graph, model):
    return GF.graph_file(graph, model, slug="ioi-mary")


def _ids(g, model) -> dict[str, str]:
    """node_id -> lenslab label, for graph `g`."""
    return {GF.node_id(x, g.tokens, g.n_layers, model.cfg.d_vocab): x for x in g.nodes}


def test_file_validates_with_circuit_tracers_models(file):
    m = CT.Model.model_validate(file)
    # every node field is one of circuit-tracer's, and none is missing or coerced
    assert [n.model_dump() for n in m.nodes] == file["nodes"]
    assert all(CT.Link.model_validate(link).model_dump() == link for link in file["links"])
    meta = m.metadata
    assert meta.slug == "ioi-mary" and meta.scan == "zoo/ioi-4l" and meta.schema_version == 1
    assert meta.node_threshold == 0.8 and meta.transcoder_list == []
    assert meta.prompt_tokens[1:4] == ["When", "Mary", "and"] and "Mary" in meta.prompt
    assert m.qParams.model_dump() == {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    assert file["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert file["metadata"]["generation_settings"]["max_feature_nodes"] == 32
    assert file["metadata"]["info"]["generator"]["name"] == "lenslab"
    json.dumps(file, allow_nan=False)  # the frontend's JSON.parse takes no NaN


def test_nodes_are_what_circuit_tracers_factories_make(file, pruned, model):
    ids = _ids(pruned, model)
    seen = set()
    for node in file["nodes"]:
        n = labels.parse(ids[node["node_id"]])
        seen.add(n.kind)
        if n.kind == "feature":
            made = CT.Node.feature_node(n.layer, n.pos, n.index, node["influence"], node["activation"])
        elif n.kind == "error":
            made = CT.Node.error_node(n.layer, n.pos, node["influence"])
        elif n.kind == "token":
            made = CT.Node.token_node(n.pos, pruned.tokens[n.pos], node["influence"])
        else:
            tok = model.to_single_str_token(n.index)
            made = CT.Node.logit_node(n.pos, n.index, tok, pruned.n_layers, node["is_target_logit"], node["token_prob"])
        assert made.model_dump() == node
    assert seen == {"feature", "error", "token", "logit"}
    assert len({n["node_id"] for n in file["nodes"]}) == len(file["nodes"])
    assert len({n["jsNodeId"] for n in file["nodes"] if n["feature_type"] != "cross layer transcoder"}) == sum(
        n["feature_type"] != "cross layer transcoder" for n in file["nodes"]
    )


def test_numbers_are_the_graphs(file, graph, pruned, model):
    assert len(file["nodes"]) == len(pruned.nodes)
    assert len(file["links"]) == int((pruned.adjacency != 0).sum()) > 10
    ids = _ids(pruned, model)
    full = {x: i for i, x in enumerate(graph.nodes)}
    for link in file["links"][:: max(1, len(file["links"]) // 7)]:
        t, s = full[ids[link["target"]]], full[ids[link["source"]]]
        assert link["weight"] == pytest.approx(float(graph.adjacency[t, s]), abs=1e-6)
        assert link["weight"] != 0
    # logits: token_prob is the model's probability of that token at the last position
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([graph.tokens]))[0, -1].float(), -1)
    logits = [n for n in file["nodes"] if n["feature_type"] == "logit"]
    assert logits and logits[0]["is_target_logit"] and not any(n["is_target_logit"] for n in logits[1:])
    for n in logits:
        assert n["token_prob"] == pytest.approx(float(probs[n["feature"]]), abs=1e-5)
        assert n["ctx_idx"] == len(graph.tokens) - 1 and n["layer"] == str(graph.n_layers + 1)
        assert n["influence"] is None
    # features: activation is the graph's; influence is circuit-tracer's cumulative score on the unpruned graph
    infl = graph.node_influence()
    total = float(infl.sum())
    for n in file["nodes"]:
        label = ids[n["node_id"]]
        if n["feature_type"] == "cross layer transcoder":
            assert n["activation"] == pytest.approx(float(graph.activations[full[label]]), abs=1e-6)
        if n["feature_type"] != "logit":
            mine = float(infl[full[label]])
            assert n["influence"] == pytest.approx(float(infl[infl >= mine].sum()) / total, abs=1e-5)
            assert 0 < n["influence"] <= 1 + 1e-6


def test_a_pruned_graph_is_written_as_it_is(pruned, file, model):
    again = GF.graph_file(pruned, model, slug="ioi-mary", node_threshold=0.5)
    assert [n["node_id"] for n in again["nodes"]] == [n["node_id"] for n in file["nodes"]]
    assert again["links"] == file["links"]
    assert again["metadata"]["node_threshold"] == 0.8  # the graph's own thresholds
    tighter = GF.graph_file(pruned.__class__.from_dict(pruned.to_dict()), model, slug="x")
    assert len(tighter["nodes"]) == len(pruned.nodes)


def test_write_graph_file_to_a_file_and_to_a_folder(graph, model, file, tmp_path):
    out = GF.write_graph_file(graph, model, tmp_path / "sub" / "g.json", slug="ioi-mary")
    d = json.loads(out.read_text())
    assert CT.Model.model_validate(d) and d["nodes"] == file["nodes"] and d["links"] == file["links"]
    folder = tmp_path / "graphs"
    p1 = GF.write_graph_file(graph, model, folder, slug="a")
    GF.write_graph_file(graph, model, folder, slug="b", node_threshold=0.6)
    GF.write_graph_file(graph, model, folder, slug="a", node_threshold=0.7)
    assert p1 == folder / "a.json" and (folder / "b.json").is_file()
    meta = json.loads((folder / "graph-metadata.json").read_text())["graphs"]
    assert [(g["slug"], g["node_threshold"]) for g in meta] == [("b", 0.6), ("a", 0.7)]
    assert all(CT.Metadata.model_validate(g) for g in meta)


def test_direction_targets_get_virtual_vocabulary_indices(model):
    d = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    g = AG.attribution_graph(model, PROMPT, "zoo/ioi-4l/per-layer", targets=d, max_feature_nodes=8)
    f = GF.graph_file(g, model, slug="dirs", node_threshold=1.0, edge_threshold=1.0)
    CT.Model.model_validate(f)
    logits = [n for n in f["nodes"] if n["feature_type"] == "logit"]
    assert [n["feature"] for n in logits] == [model.cfg.d_vocab, model.cfg.d_vocab + 1]
    assert [n["token_prob"] for n in logits] == pytest.approx([0.5, 0.5])
    assert logits[0]["clerp"] == 'Output "target0" (p=0.500)'


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(slug="ok", node_threshold=0), "node_threshold must be in (0, 1]"),
        (dict(slug="ok", edge_threshold=1.5), "edge_threshold must be in (0, 1]"),
        (dict(slug="has space"), "slug must be"),
        (dict(slug=""), "slug must be"),
        (dict(slug="ok", scan=" "), "scan must be a non-empty string"),
    ],
)
def test_bad_arguments_are_clear_errors(graph, model, kwargs, message):
    with pytest.raises(LenslabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GF.graph_file(graph, model, **kwargs)


def test_empty_and_foreign_graphs_are_clear_errors(graph, pruned, model):
    empty = dataclasses.replace(graph, adjacency=torch.zeros_like(graph.adjacency))
    with pytest.raises(LenslabError, match="no edges"):
        GF.graph_file(empty, model, slug="x")
    with pytest.raises(LenslabError, match="no edges"):
        GF.graph_file(dataclasses.replace(pruned, adjacency=torch.zeros_like(pruned.adjacency)), model, slug="x")
    foreign = dataclasses.replace(graph, provenance=dict(graph.provenance, model="zoo/steer-sentiment"))
    with pytest.raises(LenslabError, match="computed on model 'zoo/steer-sentiment'"):
        GF.graph_file(foreign, model, slug="x")
    with pytest.raises(LenslabError, match="needs an AttributionGraph"):
        GF.graph_file({"nodes": []}, model, slug="x")
