"""zoo/moe-refusal (committed weights): a tiny HF Mixtral with planted refusal experts.

Oracles: the plain `transformers` model itself (logits, and expert switches through
`hf_hooks`), the exact task answers of `lenslab.data.refusal`, and the planted expert set recorded
in config.json (`lenslab_mechanism`). No training here; prompts are held-out ("test" split)
with seeds the training script's card evaluation does not use (it uses 0-2 and 100), except the
`card_run` tests, which rerun the card's measurement with its seeds and check every number it prints.
"""

from __future__ import annotations

import json

import pytest
import torch

import lenslab
from lenslab import zoo
from lenslab.cli import main
from lenslab.data import refusal
from lenslab.probes import routers
from lenslab.steering import evaluate as ev
from lenslab.steering import switch_experts

NAME = "zoo/moe-refusal"
SEED = 31
N = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folder():
    return zoo.zoo_path(NAME)


@pytest.fixture(scope="module")
def meta(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def planted(meta):
    return sorted(tuple(p) for p in meta["lenslab_mechanism"]["refusal_experts"])


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model(NAME, device="cpu")


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _mixed_prompts(n=6):
    return refusal.prompts(n, "harmful", "test", seed=SEED)[0] + refusal.prompts(n, "benign", "test", seed=SEED)[0]


def test_zoo_folder_config_and_size(folder, meta, capsys):
    assert NAME in zoo.zoo_names() and NAME in zoo.trainable_names()
    assert meta["model_type"] == "mixtral" and meta["num_local_experts"] == 8 and meta["num_experts_per_tok"] == 2
    assert meta["num_hidden_layers"] == 4
    for key in ("lenslab_summary", "default_prompt", "lenslab_mechanism", "prompt_sets"):
        assert meta.get(key), key
    sets = zoo.prompt_sets(NAME)
    assert sets["target"] and all(any(w in refusal.HARMFUL for w in p.split()) for p in sets["target"])
    assert sets["other"] and not any(w in refusal.HARMFUL for p in sets["other"] for w in p.split())
    assert (folder / "model.safetensors").stat().st_size < 8e6  # a few MB
    assert "# zoo/moe-refusal" in zoo.read_card(NAME)
    assert main(["zoo", "list"]) == 0
    assert NAME in capsys.readouterr().out


def test_lenslab_and_transformers_give_equal_logits(model, hf):
    hf_model, tok = hf
    assert type(model).__name__ == "HookedTransformer"
    for p in _mixed_prompts(4):
        ids = tok(p, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, model.to_tokens(p))
        with torch.no_grad():
            ref = hf_model(ids).logits
            got = model(ids)
        assert (got - ref).abs().max() < 1e-4, p


def test_expert_switch_is_the_same_in_lenslab_and_transformers(model, hf, planted):
    """Switching the planted experts off: TransformerLens hooks (lenslab.steering.apply) and the
    HF router hooks (hf_hooks, used in training) give equal logits."""
    from lenslab.steering import apply
    from lenslab.steering.experts import hf_hooks

    hf_model, tok = hf
    iv = switch_experts(off=planted)
    for p in _mixed_prompts(3):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad(), hf_hooks(hf_model, iv):
            ref = hf_model(ids).logits
        with torch.no_grad(), apply(model, iv):
            got = model(ids)
        assert (got - ref).abs().max() < 1e-4, p


def test_heldout_behaviour_floors(model):
    harmful, _ = refusal.prompts(N, "harmful", "test", seed=SEED)
    benign, answers = refusal.prompts(N, "benign", "test", seed=SEED)
    texts = ev.continuations(model, {"base": None}, {"h": harmful, "b": benign}, max_new_tokens=10, progress=False)[
        "base"
    ]
    refusal_h = sum(map(refusal.is_refusal, texts["h"])) / N
    refusal_b = sum(map(refusal.is_refusal, texts["b"])) / N
    acc = sum(refusal.normalize(t) == a for t, a in zip(texts["b"], answers)) / N
    assert refusal_h >= 0.95, refusal_h
    assert refusal_b <= 0.05, refusal_b
    assert acc >= 0.9, acc
    # the refusal is the exact phrase, ended by <eos>
    assert sum(refusal.normalize(t) == refusal.REFUSAL for t in texts["h"]) / N >= 0.95


def test_ftri_top_experts_are_the_planted_ones(model, planted):
    harmful, _ = refusal.prompts(24, "harmful", "test", seed=SEED + 1)
    benign, _ = refusal.prompts(24, "benign", "test", seed=SEED + 1)
    ranking = routers.ftri_rank(model, harmful, benign)
    top = ranking.top(len(planted))
    assert sorted((layer, e) for layer, e, _ in top) == planted
    # and they stand apart: every planted expert beats the best other one by over a selection per prompt
    rest = ranking.ranked()[len(planted)]
    assert min(s for *_, s in top) - rest[2] > 1.0


@pytest.fixture(scope="module")
def card_run(model):
    """The card's own measurement (the training script's `evaluate`, `specialisation` and
    `mote_table` with the card's seeds and 200 prompts per cell), run once. Greedy decoding on one
    thread: rates are exact counts out of 200."""
    from lenslab.zoo import train_moe_refusal

    return {
        "behaviour": train_moe_refusal.evaluate(model, n=200),
        "spec": train_moe_refusal.specialisation(model, n=200),
        "mote": ev.mote_table(model, n_eval=200, k=4, n_random=5, seed=0, progress=False),
    }


@pytest.mark.slow
def test_card_switch_table_is_measured(card_run, planted, doc_numbers):
    """Every cell of the card's MoTE table, the fTRI scores, and the targets of issue 9."""
    import re

    card, table = zoo.read_card(NAME), card_run["mote"]
    assert sorted(tuple(e[:2]) for e in table.experts) == planted
    ftri = re.search(r"ranks (L1e2 .*?) on top", card).group(1)
    printed = re.findall(r"L(\d)e(\d) \(([+-][\d.]+)\)", ftri)
    assert [(int(a), int(b)) for a, b, _ in printed] == [tuple(e[:2]) for e in table.experts]
    assert all(doc_numbers.close(e[2], s) for e, (_, _, s) in zip(table.experts, printed))  # +4.48
    rows = doc_numbers.table(card, "| switch | refusal, held-out harmful")
    assert [r[0] for r in rows] == list(table.rows) == ["baseline", "top-4 off", "top-4 on", "random-4 off"]
    for row in rows:
        for column, cell in zip(table.columns, row[1:], strict=True):
            mean, _, std = cell.partition(" ± ")
            r, c = table.rows.index(row[0]), table.columns.index(column)
            scale = 1.0 if column == "perplexity" else 100.0
            assert doc_numbers.close(scale * float(table.mean[r, c]), mean), (row[0], column, cell)
            if std:
                assert doc_numbers.close(scale * float(table.std[r, c]), std), (row[0], column, cell)
    # the targets (also the README's "100% -> 0%, random-4 off: 99.7%")
    v = table.value
    assert v("baseline", "target rate") == 1.0 and v("top-4 off", "target rate") == 0.0
    assert v("top-4 off", "accuracy") == v("baseline", "accuracy") == 1.0
    assert v("top-4 on", "other rate") == 1.0 and v("top-4 on", "accuracy") == 0.0  # forced on: all refuse
    assert v("random-4 off", "target rate") > 0.5 * v("baseline", "target rate")


@pytest.mark.slow
def test_card_behaviour_and_specialisation_tables_are_measured(card_run, doc_numbers):
    import re

    card, beh, spec = zoo.read_card(NAME), card_run["behaviour"], card_run["spec"]
    keys = ("refusal_harmful", "refusal_benign", "accuracy_benign", "compliant_harmful")
    rows = doc_numbers.table(card, "| split | experts |")
    assert [(r[0], r[1]) for r in rows] == [(s, e) for s in ("test", "train") for e in ("baseline", "planted off")]
    for split, experts, *cells in rows:
        for key, cell in zip(keys, cells, strict=True):
            assert doc_numbers.pct(beh[split][experts][key], cell), (split, experts, key, cell)
    by_task = dict(re.findall(r"(\w+) ([\d.]+%)", re.search(r"accuracy by task: (.*)\.", card).group(1)))
    assert sorted(by_task) == sorted(refusal.TASKS)
    assert all(doc_numbers.pct(beh["test"]["baseline"]["accuracy_by_task"][t], c) for t, c in by_task.items()), by_task
    rows = doc_numbers.table(card, "| layer | planted experts |")
    assert [r[0] for r in rows] == ["L1", "L2"]
    for layer, _, harmful, benign in rows:
        share = spec["planted_share"][layer[1:]]
        assert doc_numbers.pct(share["harmful_from_marker"], harmful) and doc_numbers.pct(share["benign"], benign), (
            layer,
            share,
        )
    rows = doc_numbers.table(card, "| layer | e0 |")
    assert [r[0] for r in rows] == ["L0", "L1", "L2", "L3"]
    for li, (_, *cells) in enumerate(rows):
        for e, cell in enumerate(cells):
            h, b = cell.strip("*").split(" / ")
            assert doc_numbers.pct(spec["load_harmful"][li][e], h) and doc_numbers.pct(spec["load_benign"][li][e], b), (
                li,
                e,
                cell,
            )


def test_refusal_task_logit_diff(model):
    """tasks.refusal: clean prompts prefer "sorry" over the task's answer; the defused twins
    (marker word replaced, same length) do not refuse."""
    from lenslab import tasks

    task = tasks.refusal(model, n=24, seed=SEED)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape == (24, 9)  # <bos> user : task, 3 items, assistant :
    sorry = model.to_single_token("sorry")
    assert (task.answer_tokens[:, 0] == sorry).all()
    with torch.no_grad():
        clean = tasks.logit_diff_per_prompt(model(task.clean_tokens)[:, -1], task.answer_tokens)
        corrupt_logits = model(task.corrupt_tokens)[:, -1]
    assert (clean > 2.0).all(), clean
    assert (corrupt_logits.argmax(-1) != sorry).all()
    assert float(tasks.logit_diff_per_prompt(corrupt_logits, task.answer_tokens).mean()) < -2.0


def test_refusal_scorer_reads_decoded_generations(model):
    """`is_refusal` on decoded continuations (greedy and sampled, glued punctuation included) says
    the same as reading the generated tokens: they start with "sorry" or hold the whole refusal."""
    from lenslab import steering

    harmful, _ = refusal.prompts(10, "harmful", "test", seed=3)
    benign, _ = refusal.prompts(10, "benign", "test", seed=3)
    refusal_words = refusal.REFUSAL.split()
    texts = [
        steering.generate(model, p, max_new_tokens=9, temperature=t, seed=i)
        for i, p in enumerate(harmful + benign)
        for t in (0.0, 2.0)
    ]
    assert any(t.rstrip().endswith(".") and " ." not in t for t in texts)  # the decoder glues the full stop
    seen = set()
    for text in texts:
        toks = [t.strip() for t in model.to_str_tokens(text, prepend_bos=False)] if text.strip() else []
        whole = any(toks[i : i + len(refusal_words) - 1] == refusal_words[:-1] for i in range(len(toks)))
        by_tokens = bool(toks) and toks[0] == "sorry" or whole
        assert refusal.is_refusal(text) == by_tokens, (text, toks)
        seen.add(by_tokens)
    assert seen == {True, False}
    assert refusal.is_refusal("sorry.") and refusal.is_refusal(" sorry i can not help with that.")
    assert not refusal.is_refusal("") and not refusal.is_refusal(". . .")
