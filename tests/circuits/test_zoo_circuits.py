"""Exact patching on the zoo's planted mechanisms, and equality with TransformerLens there."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import patching

import lenslab
from lenslab import circuits, tasks, zoo


@pytest.fixture(scope="module")
def induction_model():
    if "zoo/induction-2l" not in zoo.zoo_names():
        pytest.fail("zoo/induction-2l weights are missing from the repo")
    return lenslab.load_model("zoo/induction-2l", device="cpu")


def _head(name: str) -> tuple[int, int]:
    layer, head = name[1:].split("H")
    return int(layer), int(head)


def test_patching_singles_out_induction_and_previous_token_heads(induction_model):
    mech = json.loads((zoo.zoo_path("zoo/induction-2l") / "config.json").read_text())["mechanism"]
    (ind_l, ind_h), (prev_l, prev_h) = _head(mech["induction_heads"][0]), _head(mech["previous_token_heads"][0])
    seq_len = 8
    task = tasks.induction(induction_model, n=16, seq_len=seq_len, seed=123)
    res = circuits.patch(induction_model, task, "z_by_pos", progress=False)
    norm = res.normalized()  # [layer, pos, head]: 0 = corrupt, 1 = clean
    last = task.seq_len - 1
    after_first = seq_len  # the token after the corrupted first occurrence (BOS at 0)
    # previous-token heads at the token after the first occurrence, induction heads at the last position
    assert int(norm[prev_l, after_first].argmax()) == prev_h and float(norm[prev_l, after_first, prev_h]) > 0.2
    assert int(norm[ind_l, last].argmax()) == ind_h and float(norm[ind_l, last, ind_h]) > 0.2
    mask = torch.ones_like(norm, dtype=torch.bool)
    mask[prev_l, after_first] = False
    mask[ind_l, last] = False
    assert float(norm[mask].abs().max()) < 0.06  # nothing else matters
    # the whole-output grid ranks the two mechanism heads first in their layers
    z = circuits.patch(induction_model, task, "z", progress=False).normalized()
    assert int(z[prev_l].argmax()) == prev_h and int(z[ind_l].argmax()) == ind_h


@pytest.mark.parametrize(
    "site,tl_fn",
    [
        ("resid_pre", patching.get_act_patch_resid_pre),
        ("attn_out", patching.get_act_patch_attn_out),
        ("z", patching.get_act_patch_attn_head_out_all_pos),
        ("pattern_by_pos", patching.get_act_patch_attn_head_pattern_by_pos),
    ],
)
def test_equals_transformer_lens_on_zoo(induction_model, site, tl_fn):
    task = tasks.induction(induction_model, n=4, seq_len=6, seed=0)
    metric = tasks.get_metric("logit_diff", induction_model, task)
    with torch.no_grad():
        _, cache = induction_model.run_with_cache(task.clean_tokens)
        ref = tl_fn(induction_model, task.corrupt_tokens, cache, metric)
    ours = circuits.patch(induction_model, task, site, progress=False, engine="reference")
    assert (ours.scores - ref).abs().max() <= 1e-4


def test_graph_from_node_scores_keeps_the_mechanism_heads(induction_model, tmp_path):
    mech = json.loads((zoo.zoo_path("zoo/induction-2l") / "config.json").read_text())["mechanism"]
    task = tasks.induction(induction_model, n=16, seq_len=8, seed=123)
    z = circuits.patch(induction_model, task, "z", progress=False)
    graph = circuits.CircuitGraph.from_node_scores(z, top_k=5)
    assert graph.nodes[0] == "input" and graph.nodes[-1] == "logits" and graph.edges == []
    kept = graph.nodes[1:-1]
    assert mech["induction_heads"][0] in kept and mech["previous_token_heads"][0] in kept
    delta = z.scores - z.baseline
    assert graph.node_scores[mech["induction_heads"][0]] == pytest.approx(
        float(delta[_head(mech["induction_heads"][0])])
    )
    back = circuits.CircuitGraph.from_json(graph.to_json(tmp_path / "g.json"))
    assert back.node_scores == graph.node_scores
    assert graph.figure().data[0].marker.size is not None
    with pytest.raises(lenslab.LenslabError, match=r"\[layer, head\] result"):
        circuits.CircuitGraph.from_node_scores(circuits.patch(induction_model, task, "resid_pre", progress=False))


# --- docs/circuits.md: the faithfulness table on zoo/ioi-4l, recomputed ---------------------------
def _close_to_printed(measured: float, printed: str) -> bool:
    """`printed` is `measured` rounded to its printed digits (2e-5 relative slack: float32 sums
    reordered on another CPU; on one machine and thread the run is bit-reproducible)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(measured - float(printed)) <= 0.5 * 10**-decimals + 2e-5 * max(1.0, abs(measured))


@pytest.mark.slow
def test_docs_faithfulness_table_on_ioi_is_measured():
    """The table and the clean / corrupt logit diffs in docs/circuits.md, with the documented
    setup (32 IOI prompts, seed 1, logit_diff, IG with 8 steps), every cell to its printed digits."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "circuits.md").read_text()
    section = doc.split("## Faithfulness on `zoo/ioi-4l`")[1].split("\n## ")[0]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = lenslab.load_model("zoo/ioi-4l", device="cpu")
        task = tasks.ioi(model, n=32, seed=1)
        metric = tasks.get_metric("logit_diff", model, task)
        faith = circuits.faithfulness(
            model,
            task,
            ["atp", "atp*", "relp", "ig"],
            ["resid_pre", "attn_out", "mlp_out", "z"],
            steps=8,
            progress=False,
        )
    finally:
        torch.set_num_threads(before)
    clean, corrupt = re.search(r"clean ([-\d.]+), ABC-corrupt ([-\d.]+);", section).groups()
    assert _close_to_printed(metric.clean_value, clean) and _close_to_printed(metric.corrupt_value, corrupt)
    rows = re.findall(r"^\| (\w+)(?: \(head outputs\))? \| (\S+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", section, re.M)
    got = {(r["site"], r["method"]): r for r in faith.rows}
    assert sorted((s, m) for s, m, *_ in rows) == sorted(got) and len(rows) == 16
    for site, method, pearson, spearman, cells in rows:
        r = got[(site, method)]
        assert _close_to_printed(r["pearson"], pearson), (site, method, r)
        assert _close_to_printed(r["spearman"], spearman), (site, method, r)
        assert int(cells) == r["n_cells"], (site, method, r)
    # the prose quotes the table
    cited = re.search(
        r"MLP outputs \(([\d.]+) vs ([\d.]+)\) and head outputs \(([\d.]+) vs ([\d.]+)\)", section
    ).groups()
    table = {(s, m): p for s, m, p, *_ in rows}
    assert cited == (table[("mlp_out", "relp")], table[("mlp_out", "atp")], table[("z", "relp")], table[("z", "atp")])
    assert min(float(table[(s, m)]) for s in ("resid_pre", "attn_out") for m in ("atp", "atp*", "relp", "ig")) > 0.93
