"""`lenslab graph attribute|prune|export|validate|heads|intervene`: each writes what the library computes (lenslab's
AttributionGraph JSON, circuit-tracer's graph file, a figure); bad input is one readable line, exit code 2."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from lenslab.cli import build_parser, main
from lenslab.probes import attribution_graph as AG
from lenslab.probes import graph_files as GF

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "When Mary and John went to the store, John gave a drink to"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "circuit_tracer_graph_models.py"


def _circuit_tracer_models():
    spec = importlib.util.spec_from_file_location("circuit_tracer_graph_models", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    """`lenslab graph attribute` run once: (path, printed output)."""
    out = tmp_path_factory.mktemp("graph") / "graph.json"
    argv = ["graph", "attribute", "--model", "zoo/ioi-4l", "--prompt", PROMPT, "--targets", "Mary", "John"]
    buf = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(buf):
        code = main([*argv, "--max-feature-nodes", "32", "--out", str(out)])
    assert code == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def library(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    return model, AG.attribution_graph(
        model, PROMPT, "zoo/ioi-4l/per-layer", targets=["Mary", "John"], max_feature_nodes=32
    )


def test_graph_commands_are_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    cmds = next(a for a in sub.choices["graph"]._actions if a.dest == "graph_command").choices
    assert set(cmds) == {"attribute", "prune", "export", "validate", "heads", "intervene"}


def test_attribute_writes_the_librarys_graph(attributed, library):
    path, printed = attributed
    model, lib = library
    g = AG.AttributionGraph.from_json(path)
    assert g.nodes == lib.nodes and g.tokens == lib.tokens
    assert torch.allclose(g.adjacency, lib.adjacency, atol=1e-6)
    assert g.replacement_score == pytest.approx(lib.replacement_score, abs=1e-6)
    mary, john = (model.to_single_token(t) for t in ("Mary", "John"))
    last = len(lib.tokens) - 1
    assert g.nodes[-2:] == [f"logit{mary}@{last}", f"logit{john}@{last}"]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([lib.tokens]))[0, -1], -1)
    assert g.target_weights.tolist() == pytest.approx([float(probs[mary]), float(probs[john])], abs=1e-5)
    nf = sum(x.startswith("L") for x in lib.nodes)
    assert nf == 32
    assert f"{len(lib.nodes)} nodes ({nf} features" in printed
    assert f"replacement score {lib.replacement_score:.4f}, completeness score {lib.completeness_score:.4f}" in printed
    assert f"target logit{mary}@{last} 'Mary': weight {float(probs[mary]):.4f}" in printed


def test_prune_writes_the_librarys_pruned_graph(attributed, library, tmp_path, capsys):
    path, _ = attributed
    _, lib = library
    out = tmp_path / "pruned.json"
    argv = ["graph", "prune", "--graph", str(path), "--node-threshold", "0.7", "--edge-threshold", "0.95"]
    assert main([*argv, "--out", str(out)]) == 0
    g = AG.AttributionGraph.from_json(out)
    want = AG.prune(lib, 0.7, 0.95)
    assert g.nodes == want.nodes and g.pruned == (0.7, 0.95)
    assert torch.allclose(g.adjacency, want.adjacency, atol=1e-6)
    printed = capsys.readouterr().out
    assert f"kept {len(want.nodes)} nodes" in printed and f"of {len(lib.nodes)} nodes" in printed


def test_export_json_is_circuit_tracers_graph_file(attributed, library, tmp_path, capsys):
    path, _ = attributed
    model, lib = library
    out = tmp_path / "ioi.json"
    assert main(["graph", "export", "--graph", str(path), "--slug", "ioi-mary", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    m = _circuit_tracer_models().Model.model_validate(d)
    want = AG.prune(lib, 0.8, 0.98)
    assert m.metadata.slug == "ioi-mary" and m.metadata.scan == "zoo/ioi-4l" and len(m.nodes) == len(want.nodes)
    lib_file = GF.graph_file(lib, model, slug="ioi-mary")
    assert d["nodes"] == lib_file["nodes"]
    assert [x["weight"] for x in d["links"]] == pytest.approx([x["weight"] for x in lib_file["links"]], abs=1e-6)
    assert f"{len(d['nodes'])} nodes, {len(d['links'])} links" in capsys.readouterr().out
    # the slug defaults to the file name; --model names the model explicitly
    out2 = tmp_path / "second.json"
    assert main(["graph", "export", "--graph", str(path), "--model", "zoo/ioi-4l", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["metadata"]["slug"] == "second"


def test_export_figures(attributed, tmp_path):
    path, _ = attributed
    html = tmp_path / "graph.html"
    assert main(["graph", "export", "--graph", str(path), "--out", str(html)]) == 0
    assert "plotly" in html.read_text() and "attribution graph" in html.read_text()
    if any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        svg = tmp_path / "graph.svg"
        assert main(["graph", "export", "--graph", str(path), "--out", str(svg)]) == 0
        assert svg.read_text().lstrip().startswith("<svg")


def test_export_keeps_pinned_nodes_and_supernodes(attributed, library, tmp_path, capsys):
    """--supernode LABEL=NODE,NODE (repeatable) and --pin go into the file's qParams as node ids; a
    figure draws each supernode as one node; a node the graph lacks is a one-line error."""
    path, _ = attributed
    model, lib = library
    pruned = AG.prune(lib, 0.8, 0.98)
    feats = [x for x, n in zip(pruned.nodes, pruned.parsed) if n.kind == "feature"]
    target = pruned.nodes[-1]
    out = tmp_path / "view.json"
    argv = ["graph", "export", "--graph", str(path), "--out", str(out)]
    sn = ["--supernode", f"pair={feats[0]},{feats[1]}", "--supernode", f"say it={feats[2]}, {target}"]
    assert main([*argv, *sn, "--pin", feats[0], target]) == 0
    d = json.loads(out.read_text())
    _circuit_tracer_models().Model.model_validate(d)
    nid = lambda x: GF.node_id(x, lib.tokens, lib.n_layers, model.cfg.d_vocab)
    assert d["qParams"]["supernodes"] == [
        ["pair", nid(feats[0]), nid(feats[1])],
        ["say it", nid(feats[2]), nid(target)],
    ]
    assert d["qParams"]["pinnedIds"] == [nid(feats[0]), nid(target)]
    assert d["nodes"] == GF.graph_file(lib, model, slug="view")["nodes"]  # the nodes are as without them
    assert "2 pinned, 2 supernodes" in capsys.readouterr().out

    html = tmp_path / "view.html"
    assert main(["graph", "export", "--graph", str(path), "--out", str(html), *sn[:2]]) == 0
    text = html.read_text()
    assert "1 supernode:" in text and '"pair"' in text
    assert "supernode 'pair': 2 nodes merged into one" in capsys.readouterr().out

    assert main([*argv, "--supernode", f"x={feats[0]},L9F9@0"]) == 2
    assert "'L9F9@0' is not a node of this graph" in capsys.readouterr().err
    assert main([*argv, "--supernode", "no equals sign"]) == 2
    assert "a supernode is written LABEL=NODE,NODE" in capsys.readouterr().err
    assert main([*argv[:-1], str(html), "--pin", target]) == 2
    assert "--pin is saved in the graph file only" in capsys.readouterr().err


def test_attribute_through_the_shipped_clt(library, tmp_path, capsys):
    """--transcoders zoo/ioi-4l/clt: the cross-layer transcoder's graph, as the library computes it."""
    out = tmp_path / "clt.json"
    argv = ["graph", "attribute", "--model", "zoo/ioi-4l", "--prompt", PROMPT, "--transcoders", "zoo/ioi-4l/clt"]
    assert main([*argv, "--max-feature-nodes", "16", "--out", str(out)]) == 0
    g = AG.AttributionGraph.from_json(out)
    assert g.provenance["transcoders"] == "cross-layer"
    model, _ = library
    ref = AG.attribution_graph(model, PROMPT, "zoo/ioi-4l/clt", max_feature_nodes=16)
    assert g.nodes == ref.nodes and torch.allclose(g.adjacency, ref.adjacency, atol=1e-6)
    assert f"replacement score {ref.replacement_score:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["graph", "prune", "--graph", "nowhere.json", "--out", "p.json"], "--graph 'nowhere.json' does not exist"),
        (["graph", "export", "--graph", "nowhere.json", "--out", "p.json"], "--graph 'nowhere.json' does not exist"),
        (
            ["graph", "attribute", "--model", "zoo/moe-refusal", "--out", "g.json"],
            "model 'zoo/moe-refusal' has no shipped transcoders (models that have them: zoo/english-4l, zoo/ioi-4l, zoo/steer-sentiment)",
        ),
        (["graph", "attribute", "--model", "zoo/ioi-4l", "--out", "g.svg"], "--out 'g.svg': the graph is written as"),
        (["graph", "export", "--graph", "g.json", "--out", "g.txt"], "--out 'g.txt': the extension picks the format"),
        (
            [
                "graph",
                "attribute",
                "--model",
                "zoo/no-such",
                "--transcoders",
                "zoo/ioi-4l/per-layer",
                "--out",
                "g.json",
            ],
            "no-such",
        ),
        (["graph", "prune", "--graph", "bad.json", "--out", "p.json"], "--graph 'bad.json' is not JSON"),
        (
            ["graph", "prune", "--graph", "other.json", "--out", "p.json"],
            "--graph 'other.json': not a AttributionGraph JSON (kind='PatchResult')",
        ),
        (["graph", "intervene", "--node", "MLP0.err@3"], "'MLP0.err@3' is an error node: only feature nodes can"),
        (
            ["graph", "intervene", "--node", "L0F1@3", "--mode", "clamp", "--factor", "2"],
            "--factor multiplies the node's activation recorded in the graph: pass --graph",
        ),
        (["graph", "intervene", "--node", "L0F1@3", "--positions", "anywhere"], "--positions 'anywhere' is not one of"),
        (["graph", "intervene", "--node", "L0F1@3", "--mode", "steer"], "steer needs value="),
        (["graph", "intervene", "--node", "L0F1@3", "--out", "r.txt"], "--out 'r.txt'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "PatchResult"}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: ") and message in err and "Traceback" not in err


def test_prune_thresholds_outside_the_unit_interval(attributed, capsys, tmp_path):
    path, _ = attributed
    argv = ["graph", "prune", "--graph", str(path), "--node-threshold", "1.5", "--out", str(tmp_path / "p.json")]
    assert main(argv) == 2
    assert "node_threshold must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_validate_prints_and_writes_the_librarys_ablation(attributed, library, tmp_path, capsys):
    from lenslab.probes import graph_validation

    path, _ = attributed
    pruned = tmp_path / "pruned.json"
    assert main(["graph", "prune", "--graph", str(path), "--out", str(pruned)]) == 0
    out = tmp_path / "ablation.json"
    assert main(["graph", "validate", "--graph", str(pruned), "--n-random", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model, _ = library
    ref = graph_validation.ablate_graph(
        model, AG.AttributionGraph.from_json(pruned), "zoo/ioi-4l/per-layer", n_random=3
    )
    got = graph_validation.GraphAblation.from_json(out)
    assert torch.allclose(got.graph, ref.graph, atol=1e-5) and torch.allclose(got.random, ref.random, atol=1e-5)
    assert f"weighted target drop {ref.graph_effect():.4f}" in printed


def _top_features(graph, n: int) -> list[str]:
    """The `n` feature nodes with the largest |edge| into the graph's heaviest target."""
    t = len(graph.nodes) - len(graph.target_weights) + int(graph.target_weights.argmax())
    feats = [x for x, p in zip(graph.nodes, graph.parsed) if p.kind == "feature"]
    return sorted(feats, key=lambda x: -abs(float(graph.adjacency[t, graph.nodes.index(x)])))[:n]


def test_intervene_prints_and_writes_the_librarys_effect(attributed, library, tmp_path, capsys):
    from lenslab import steering as S
    from lenslab.steering import graph_interventions as GI

    path, _ = attributed
    model, lib = library
    nodes = _top_features(lib, 2)
    out = tmp_path / "effect.json"
    argv = ["graph", "intervene", "--graph", str(path), "--node", nodes[0], "--node", nodes[1], "--name", "pair"]
    assert main([*argv, "--mode", "clamp", "--factor", "0.5", "--generate", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    iv = GI.node_intervention("zoo/ioi-4l/per-layer", nodes, "clamp", factor=0.5, graph=lib, name="pair")
    ref = GI.intervention_effect(model, lib, iv)
    got = GI.NodeIntervention.from_json(out)
    assert got.token_ids == ref.token_ids and got.nodes == nodes and got.name == "pair"
    assert torch.allclose(got.logits_after, ref.logits_after, atol=1e-5)
    assert got.predicted == pytest.approx(ref.predicted, abs=1e-5)
    assert "pair: 2 edit(s) at blocks.0.hook_mlp_out" in printed
    assert f"{ref.target_before:.4f} -> {ref.target_after:.4f} (change {ref.target_change():+.4f}" in printed
    assert f"the graph's first-order change {ref.predicted:+.4f}" in printed
    assert f"unsteered:{S.generate(model, PROMPT, max_new_tokens=3)}\n" in printed  # continuations start with a space
    assert f"steered:  {S.generate(model, PROMPT, iv, max_new_tokens=3)}   [pair; strength 1]" in printed


def test_intervene_on_a_prompt_without_a_graph(library, capsys):
    from lenslab import steering as S
    from lenslab.steering import graph_interventions as GI

    model, lib = library
    node = _top_features(lib, 1)[0]
    argv = ["graph", "intervene", "--model", "zoo/ioi-4l", "--prompt", PROMPT, "--node", node, "--mode", "steer"]
    assert main([*argv, "--value", "30", "--positions", "all", "--generate", "4", "--target", "John"]) == 0
    printed = capsys.readouterr().out
    iv = GI.node_intervention("zoo/ioi-4l/per-layer", node, "steer", 30.0, positions="all")
    ref = GI.intervention_effect(model, PROMPT, iv, target="John")
    assert f"target 'John' (logit - mean logit at position {ref.pos}): {ref.target_before:.4f} -> " in printed
    assert "first-order" not in printed  # no graph, no prediction
    steered = S.generate(model, PROMPT, iv, max_new_tokens=4)
    assert steered != S.generate(model, PROMPT, max_new_tokens=4)
    assert f"steered:  {steered}   [steer {node} 30; strength 1]" in printed


def test_heads_prints_and_writes_the_librarys_split(attributed, library, tmp_path, capsys):
    from lenslab.probes import graph_heads

    path, _ = attributed
    model, lib = library
    out = tmp_path / "heads.json"
    assert main(["graph", "heads", "--graph", str(path), "--max-edges", "20", "--out", str(out)]) == 0
    ref = graph_heads.head_edges(model, lib, "zoo/ioi-4l/per-layer", max_edges=20)
    got = graph_heads.HeadEdges.from_dict(json.loads(out.read_text()))
    assert got.sources == ref.sources and got.targets == ref.targets
    assert torch.allclose(torch.as_tensor(got.via_head), torch.as_tensor(ref.via_head), atol=1e-5)
    assert ref.table(top=3).to_string(index=False) in capsys.readouterr().out


def test_attention_only_model_needs_no_transcoders(tmp_path, capsys):
    """induction-2l has no MLPs: `graph attribute` builds its graph without transcoders and `graph heads`
    puts the repeated token's edge through the card's layer-1 induction heads."""
    from lenslab.probes import graph_heads

    g = tmp_path / "ind.json"
    argv = ["graph", "attribute", "--model", "zoo/induction-2l", "--prompt", "t5 t9 t2 t7 t5", "--targets", "t9"]
    assert main([*argv, "--out", str(g)]) == 0
    out = tmp_path / "heads.json"
    assert main(["graph", "heads", "--graph", str(g), "--out", str(out)]) == 0
    split = graph_heads.HeadEdges.from_dict(json.loads(out.read_text()))
    top = next(iter(split.head_totals(split.targets[0], top_edges=1)))
    assert top in {"L1H0", "L1H1", "L1H2", "L1H3"}


def test_attribute_many_prompts_one_graph_each(tmp_path, capsys):
    """--prompts writes OUT_i.json per prompt, each equal to the graph of --prompt alone; --ray without
    --prompts is refused before any work."""
    prompts = [
        "When Mary and John went to the store, John gave a drink to",
        "When Tom and Anna met, Anna gave a ball to",
    ]
    base = ["graph", "attribute", "--model", "zoo/ioi-4l", "--max-feature-nodes", "8"]
    assert main([*base, "--prompts", *prompts, "--out", str(tmp_path / "g.json")]) == 0
    assert main([*base, "--prompt", prompts[1], "--out", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    a, b = AG.AttributionGraph.from_json(tmp_path / "g_1.json"), AG.AttributionGraph.from_json(tmp_path / "one.json")
    assert (tmp_path / "g_0.json").is_file() and a.nodes == b.nodes
    assert torch.equal(a.adjacency, b.adjacency)
    assert main([*base, "--ray", "local", "--out", str(tmp_path / "x.json")]) == 2
    assert "--prompts" in capsys.readouterr().err
