"""Path patching: on a linear read-out, the paths through later heads plus the direct path add up
exactly to patching the sender's whole output."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks, zoo


@pytest.fixture(scope="module")
def linear_model():
    """2-layer attention-only model without LayerNorm: logit_diff is linear in the final residual."""
    tok = zoo.word_tokenizer([f"t{i}" for i in range(40)])
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=24,
        n_ctx=32,
        d_head=6,
        n_heads=3,
        d_vocab=len(tok),
        attn_only=True,
        normalization_type=None,
        seed=1,
    )
    model = HookedTransformer(cfg, tokenizer=tok)
    model.cfg.model_name = "linear-test"
    return model


def test_paths_decompose_sender_effect(linear_model):
    task = tasks.induction(linear_model, n=3, seq_len=5, seed=2)
    full = circuits.patch(linear_model, task, "z", progress=False)
    later = [(1, h) for h in range(3)]
    via_heads = circuits.path_patch(linear_model, task, later, receiver_input=["q", "k", "v"], progress=False)
    direct = circuits.path_patch(linear_model, task, "logits", senders=[(0, h) for h in range(3)], progress=False)
    base = full.corrupt_value
    for h in range(3):
        total = via_heads.scores[0, h] - base + direct.scores[0, h] - base
        assert float(full.scores[0, h] - base) == pytest.approx(float(total), abs=1e-4)
    # a last-layer head only has the direct path, which equals patching it
    last = circuits.path_patch(linear_model, task, "logits", senders=["L1H2"], progress=False)
    assert float(last.scores[1, 2]) == pytest.approx(float(full.scores[1, 2]), abs=1e-4)
    assert torch.isnan(last.scores[0]).all()


def test_path_patch_errors(linear_model):
    task = tasks.induction(linear_model, n=2, seq_len=4, seed=0)
    with pytest.raises(lenslab.LenslabError, match="not below the earliest receiver layer"):
        circuits.path_patch(linear_model, task, ["L0H1"], senders=["L1H0"])
    with pytest.raises(lenslab.LenslabError, match="receiver_input 'x'"):
        circuits.path_patch(linear_model, task, ["L1H1"], receiver_input="x")
    with pytest.raises(lenslab.LenslabError, match="out of range"):
        circuits.path_patch(linear_model, task, ["L1H9"])
    with pytest.raises(lenslab.LenslabError, match="must look like 'L3H1'"):
        circuits.path_patch(linear_model, task, ["head1"])
