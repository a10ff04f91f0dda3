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
    """On a 1-layer attention-only model without norms, the outputs feed the logits linearly, so every
    method equals exact patching: asserted cell by cell, within float32 round-off.

    Spearman is not the claim here: most cells of the by-position sites have no effect at all, and
    exact patching measures them as 0 up to round-off (|x| < 1e-8) while the estimates are 0 or
    another round-off, so their ranks order noise (transformers 5.25 changed that noise and the
    tabulated Spearman of one site to 0.64). It is asserted on the head grid, whose effects differ.
    """
    tok = zoo.word_tokenizer([f"t{i}" for i in range(40)])
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1,
            d_model=24,
            n_ctx=32,
            d_head=6,
            n_heads=3,
            d_vocab=len(tok),
            attn_only=True,
            normalization_type=None,
            seed=2,
        ),
        tokenizer=tok,
    )
    model.cfg.model_name = "linear-test"
    task = tasks.induction(model, n=3, seq_len=5, seed=0)
    sites = ["resid_post", "attn_out", "z"]
    faith = circuits.faithfulness(model, task, ["atp", "relp", "ig"], sites, steps=2, progress=False)
    table = faith.table()
    assert len(table) == 9 and set(table["method"]) == {"atp", "relp", "ig"}
    for method in ("atp", "relp", "ig"):
        for site in sites:
            truth, est = faith.pairs(method, site)
            scale = truth.abs().max().item()
            assert scale > 1e-3, (method, site, scale)  # a real effect to compare with
            assert (est - truth).abs().max().item() <= 1e-5 * scale + 1e-7, (method, site, truth, est)
    assert (table["pearson"] > 0.9999).all()
    heads = table[table["site"] == "z"]
    truth, _ = faith.pairs("atp", "z")
    assert len(set(truth.tolist())) == len(truth) and (heads["spearman"] > 0.999).all(), (truth, heads)
    back = circuits.Faithfulness.from_json(faith.to_json(tmp_path / "f.json"))
    assert back.rows == faith.rows
    fig = faith.figure()
    assert len(fig.data) == 3 * 3 + 3 and "Faithfulness" in fig.layout.title.text
    assert "| resid_post | atp |" in faith.to_markdown()


def test_faithfulness_errors(tiny_model):
    task = tasks.induction(tiny_model, n=2, seq_len=4)
    with pytest.raises(lenslab.LenslabError, match="method 'exact' is not one of"):
        circuits.faithfulness(tiny_model, task, ["exact"], ["resid_pre"])
    with pytest.raises(lenslab.LenslabError, match="did you mean"):
        circuits.faithfulness(tiny_model, task, ["atp"], ["mlp_outt"])
