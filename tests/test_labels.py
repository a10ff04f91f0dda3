"""Node labels: one grammar, printed and parsed in lenslab.labels, used by circuits, probes and steering."""

from __future__ import annotations

import pytest

from lenslab import LenslabError, labels
from lenslab.circuits import edges


@pytest.mark.parametrize(
    ("text", "node"),
    [
        ("input", labels.Node("input", -1)),
        ("logits", labels.Node("logits", None)),
        ("final_post", labels.Node("final_post", None)),
        ("L3", labels.Node("layer", 3)),
        ("L3H1", labels.Node("head", 3, 1)),
        ("L12H0", labels.Node("head", 12, 0)),
        ("MLP2", labels.Node("mlp", 2)),
        ("L2N117", labels.Node("neuron", 2, 117)),
        ("L1e2", labels.Node("expert", 1, 2)),
        ("L1shared", labels.Node("expert", 1, labels.SHARED)),
        ("0_pre", labels.Node("resid_pre", 0)),
        ("4_mid", labels.Node("resid_mid", 4)),
        ("5_post", labels.Node("resid_post", 5)),
        ("embed", labels.Node("embed", None)),
        ("pos_embed", labels.Node("pos_embed", None)),
        ("L3.b_O", labels.Node("attn_bias", 3)),
        ("MLP2.b_out", labels.Node("mlp_bias", 2)),
        ("final_bias", labels.Node("final_bias", None)),
        ("L1F37@5", labels.Node("feature", 1, 37, 5)),
        ("MLP1.err@5", labels.Node("error", 1, None, 5)),
        ("embed@0", labels.Node("token", None, None, 0)),
        ("logit117@9", labels.Node("logit", None, 117, 9)),
        ("target0@9", labels.Node("target", None, 0, 9)),
    ],
)
def test_parse_and_print_are_inverse(text, node):
    assert labels.parse(text) == node
    assert labels.label(node) == text


def test_printers_match_the_grammar():
    assert [labels.head(3, 1), labels.mlp(3), labels.expert(1, 2), labels.expert(1, labels.SHARED)] == [
        "L3H1",
        "MLP3",
        "L1e2",
        "L1shared",
    ]
    assert [labels.resid(2), labels.resid(2, "mid"), labels.resid(None)] == ["2_pre", "2_mid", "final_post"]
    assert [labels.attn_bias(3), labels.mlp_bias(2)] == ["L3.b_O", "MLP2.b_out"]


def test_graph_node_printers_match_the_grammar():
    assert [
        labels.feature(1, 37, 5),
        labels.error_node(1, 5),
        labels.token_node(0),
        labels.logit_node(117, 9),
        labels.target_node(0, 9),
    ] == ["L1F37@5", "MLP1.err@5", "embed@0", "logit117@9", "target0@9"]


@pytest.mark.parametrize(
    "bad",
    ["", "H1", "L3h1", "mlp3", "L-1H2", "L1E2", "head", "L3.b_o", "MLP2.b_O", "Embed", "L1F37", "L1F37@", "L3H1@2",
     "MLP1.err", "logit@3", "embed@-1"],
)  # fmt: skip
def test_unknown_labels_name_the_forms(bad):
    with pytest.raises(LenslabError, match="is not a node label: use input, logits"):
        labels.parse(bad)


def test_circuit_nodes_use_the_grammar(tiny_model):
    nodes = edges.node_names(tiny_model)
    assert [labels.label(labels.parse(n)) for n in nodes] == nodes
    assert {labels.parse(n).kind for n in nodes} == {"input", "head", "mlp", "logits"}
    with pytest.raises(LenslabError, match="not a circuit node"):
        edges.node_key("L1e2")
