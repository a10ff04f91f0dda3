"""Router views and helpers that need no model: `parse_experts`, load heatmaps, ranking views,
zoo prompt sets."""

from __future__ import annotations

import json

import pytest
import torch

from lenslab import zoo
from lenslab._errors import LenslabError
from lenslab.probes import routers


@pytest.mark.parametrize(
    "text, pairs",
    [
        ("2:5, 3:1", [(2, 5), (3, 1)]),
        ("L2e5 L3e1", [(2, 5), (3, 1)]),
        ("2,5; 3,1", [(2, 5), (3, 1)]),
        ("  ", []),
        ("0:0", [(0, 0)]),
    ],
)
def test_parse_experts(text, pairs):
    assert routers.parse_experts(text) == pairs


@pytest.mark.parametrize("bad", ["2", "abc", "2:5 x", "2:5:7"])
def test_parse_experts_rejects(bad):
    with pytest.raises(LenslabError, match="LAYER:EXPERT"):
        routers.parse_experts(bad)


def _result() -> routers.RouterResult:
    # 2 prompts, 2 layers, 4 experts, top-2; prompt 0 has 3 tokens, prompt 1 has 2
    idx = [
        torch.tensor([[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[1, 0], [3, 2]]]),
        torch.tensor([[[3, 0], [2, 1]], [[0, 1], [2, 0]]]),
    ]
    w = [torch.full(t.shape, 0.5) for t in idx]
    p = [torch.full((*t.shape[:2], 4), 0.25) for t in idx]
    return routers.RouterResult(
        indices=idx, weights=w, probs=p, tokens=[["a", "b", "c"], ["d", "e"]], layers=(1, 3), n_experts=4, top_k=2
    )


def test_load_figure_shows_the_load():
    res = _result()
    load = res.load(fraction=True)
    # layer 1 selections: e0 x5, e1 x3, e2 x1, e3 x1 over 5 tokens x top-2 = 10
    assert load[0].tolist() == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert float(load.sum()) == pytest.approx(2.0)
    fig = res.load_figure()
    z = fig.data[0].z
    assert torch.allclose(torch.tensor(z), load.float(), atol=1e-7)
    assert list(fig.data[0].y) == ["L1", "L3"]


def test_ranking_views_show_class_means():
    diff = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    r = routers.ExpertRanking(
        diff=diff, target_mean=diff + 2, other_mean=torch.full((2, 2), 2.0), layers=(0, 2), n_target=3, n_other=4
    )
    assert torch.tensor(r.figure("target").data[0].z).tolist() == (diff + 2).tolist()
    assert torch.tensor(r.figure("other").data[0].z).tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert torch.tensor(r.figure().data[0].z).tolist() == diff.tolist()
    with pytest.raises(LenslabError, match="diff, target, other"):
        r.figure("both")
    assert r.top(2) == [(0, 0, 1.0), (2, 0, 0.5)]


def test_prompt_sets_reads_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"prompt_sets": {"target": ["a b"], "other": ["c", "d"]}}))
    assert zoo.prompt_sets(str(tmp_path)) == {"target": ["a b"], "other": ["c", "d"]}
    assert zoo.prompt_sets(str(tmp_path / "missing")) == {}
    assert zoo.prompt_sets("zoo/induction-2l") == {}
