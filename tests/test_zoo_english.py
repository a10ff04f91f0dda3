"""zoo/english-4l: the committed weights still show what its card says (held-out loss, head scores and
induction and previous-token heads, copying of held-out text, attention sinks, massive activations), and
its corpus plumbing works offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import lenslab
from lenslab._errors import LenslabError
from lenslab.probes.sinks import attention_sinks, massive_activations
from lenslab.zoo import ZOO_DIR, corpora, read_card
from lenslab.zoo import train_english_4l as en

FOLDER = ZOO_DIR / "english-4l"
META = json.loads((FOLDER / "config.json").read_text())
VER = META["verification"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lenslab.load_model("zoo/english-4l", device="cpu")


def test_weights_are_small_float16_and_load_as_float32(model):
    size = (FOLDER / "model.safetensors").stat().st_size
    assert size < 20e6, size
    with safe_open(str(FOLDER / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert next(model.parameters()).dtype == torch.float32
    assert model.cfg.n_layers == 4 and model.cfg.normalization_type == "LN" and model.cfg.d_vocab == 4096


def test_tokenizer_is_english_bpe(model):
    text = "When John and the old man went to the store, John gave a drink to"
    toks = model.to_tokens(text)[0]
    assert toks[0].item() == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(toks[1:]) == text  # byte-level BPE round-trips exactly
    assert len(model.to_str_tokens(" John", prepend_bos=False)) == 1
    assert 10 <= len(toks) <= 20  # word-ish pieces, not characters


@pytest.mark.slow
def test_heldout_loss_matches_card(model):
    rows = en.heldout_rows(model)
    with torch.no_grad():
        loss = sum(
            model(rows[i : i + 32], return_type="loss").item() * len(rows[i : i + 32]) for i in range(0, len(rows), 32)
        )
    loss /= len(rows)
    assert loss == pytest.approx(VER["heldout_loss"], abs=2e-3)
    assert VER["heldout_perplexity"] == pytest.approx(math.exp(VER["heldout_loss"]), rel=1e-3)
    assert f"{VER['heldout_loss']:.3f}" in read_card("zoo/english-4l")
    assert loss < 0.6 * math.log(model.cfg.d_vocab)  # far below the uniform guess


def test_head_scores_and_copying_match_card(model):
    hs = en.head_scores(model)
    ind = VER["induction"]
    assert hs["loss_first_half"] == pytest.approx(ind["loss_first_half"], abs=2e-3)
    assert hs["loss_repeated_half"] == pytest.approx(ind["loss_repeated_half"], abs=2e-3)
    torch.testing.assert_close(hs["induction"], torch.tensor(ind["scores"]), atol=2e-3, rtol=0)
    torch.testing.assert_close(hs["prev_token"], torch.tensor(VER["prev_token"]["scores"]), atol=2e-3, rtol=0)
    first, repeat = en.repeat_losses(model)
    assert (first, repeat) == pytest.approx((VER["repeat"]["loss_first"], VER["repeat"]["loss_repeat"]), abs=2e-3)
    # the classic phenomena (issue 23): induction heads, fed by a previous-token head in an earlier
    # layer, that cut the loss on a repeat of random tokens, and reading a first copy of ordinary text
    assert ind["heads"] and hs["induction"].max() > en.IND_BAR
    prev_heads = VER["prev_token"]["heads"]
    assert prev_heads and min(layer for layer, _, _ in prev_heads) < ind["heads"][0][0]
    assert hs["loss_first_half"] - hs["loss_repeated_half"] > 1.0
    assert first - repeat > 0.5
    card = read_card("zoo/english-4l")
    top = ind["heads"][0]
    assert f"Induction heads (score > 0.4): L{top[0]}H{top[1]} ({top[2]:.2f})" in card


def test_default_copy_task_moves_the_logit_difference(model):
    """The app's default patching pair on this model: the noun read twice is favoured (clean) and the
    favour moves with the noun (corrupt), so patching has something to explain."""
    from lenslab import tasks, zoo

    d = zoo.default_prompts("zoo/english-4l")
    task = tasks.from_prompts(model, [d.clean], [d.corrupt], [(d.answer, d.wrong)])
    metric = tasks.get_metric("logit_diff", model, task)
    assert metric.clean_value > 2.0 and metric.clean_value - metric.corrupt_value > 2.0


def test_attention_sinks_and_massive_activations_match_card(model):
    sinks = VER["sinks"]
    res = attention_sinks(model, en.heldout_rows(model, 256, en.SINK_LEN, at_bos=True))
    torch.testing.assert_close(res.attn_to_first, torch.tensor(sinks["bos_first"]["attn_to_first"]), atol=2e-3, rtol=0)
    assert res.sink_rate == pytest.approx(sinks["bos_first"]["sink_rate"], abs=2e-3)
    assert [list(h) for h in res.sink_heads()] == sinks["bos_first"]["sink_heads"]
    mass = massive_activations(model, en.heldout_rows(model, 64, en.N_CTX, at_bos=True))
    assert len(mass.massive) == VER["massive"]["n_massive"]
    torch.testing.assert_close(
        mass.top_values[:, 0].abs(), torch.tensor(VER["massive"]["top_per_layer"]), atol=1e-2, rtol=1e-3
    )


def test_built_in_corpus_is_the_committed_heldout_text(model):
    a = corpora.corpus_for(model, 8, seed=3)
    b = corpora.corpus_for(model, 8, seed=3)
    assert a.shape == (8, en.CORPUS_CTX) and torch.equal(a, b)
    assert not torch.equal(a, corpora.corpus_for(model, 8, seed=4))
    stream = en.pack(model.tokenizer, en.heldout_docs()).long()
    row = a[0].tolist()
    assert any(stream[i : i + len(row)].tolist() == row for i in range(len(stream) - len(row) + 1))
    assert len(en.heldout_docs()) == en.N_HELDOUT


def test_missing_debian_corpus_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(en, "FORTUNES", tmp_path / "nope")
    with pytest.raises(LenslabError, match="apt-get .*install -y fortunes wordnet-base"):
        en.documents()


def test_licences_travel_with_the_text():
    text = (FOLDER / "LICENSES.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    assert "The Regents of the University of California" in text
    card = read_card("zoo/english-4l")
    assert "WordNet 3.0" in card and "BSD" in card and "MB" in card
