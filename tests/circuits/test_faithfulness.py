"""Faithfulness: correlations computed right, exact methods score 1, figure and JSON work."""
from __future__ import annotations

import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks, zoo


def test_correlations_match_numpy_reference():
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=gen)
    y = x + 0.5 * torch.randn(50, generator=gen)
    y[3] = y[4]  # a tie
    assert circuits.pearson(x, y) == pytest.approx(float(np.corrcoef(x.numpy(), y.numpy())[0, 1]), abs=1e-10)
    def rank(a):
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(1, len(a) + 1)
        for v in np.unique(a):
            r[a == v] = r[a == v].mean()
        return r
    ref = float(np.corrcoef(rank(x.numpy()), rank(y.numpy()))[0, 1])
    assert circuits.spearman(x, y) == pytest.approx(ref, abs=1e-10)
    assert math.isnan(circuits.pearson(torch.ones(4), torch.arange(4.0)))


def test_faithfulness_on_linear_model(tmp_path):
    tok = zoo.word_tokenizer([f"t{i}" for i in range(40)])
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=24, n_ctx=32, d_head=6, n_heads=3,
                                                      d_vocab=len(tok), attn_only=True, normalization_type=None, seed=2), tokenizer=tok)
    model.lenslab_name = "linear-test"
    task = tasks.induction(model, n=3, seq_len=5, seed=0)
    faith = circuits.faithfulness(model, task, ["atp", "relp", "ig"], ["resid_post", "attn_out"], steps=2, progress=False)
    table = faith.table()
    assert len(table) == 6 and set(table["method"]) == {"atp", "relp", "ig"}
    # the single layer's outputs feed the logits linearly: every method is exact
    assert (table["pearson"] > 0.9999).all() and (table["spearman"] > 0.999).all()
    back = circuits.Faithfulness.from_json(faith.to_json(tmp_path / "f.json"))
    assert back.rows == faith.rows
    fig = faith.figure()
    assert len(fig.data) == 2 * 3 + 2 and "Faithfulness" in fig.layout.title.text
    assert "| resid_post | atp |" in faith.to_markdown()


def test_faithfulness_errors(tiny_model):
    task = tasks.induction(tiny_model, n=2, seq_len=4)
    with pytest.raises(lenslab.LenslabError, match="method 'exact' is not one of"):
        circuits.faithfulness(tiny_model, task, ["exact"], ["resid_pre"])
    with pytest.raises(lenslab.LenslabError, match="did you mean"):
        circuits.faithfulness(tiny_model, task, ["atp"], ["mlp_outt"])
