"""lenslab.data.refusal: the procedural instruction language of zoo/moe-refusal (no model needed)."""

from __future__ import annotations

import random
import zlib

import pytest

from lenslab import LenslabError
from lenslab.data import refusal as R


def test_task_answers_by_hand():
    items = ("apple", "7", "river")
    assert R.task_answer("repeat", items) == "apple 7 river ."
    assert R.task_answer("reverse", items) == "river 7 apple ."
    assert R.task_answer("first", items) == "apple ."
    assert R.task_answer("last", items) == "river ."
    assert R.task_answer("sort", ("7", "2", "9", "2")) == "2 2 7 9 ."
    # marker words sort after digits, alphabetically (the compliant answer of a harmful sort prompt)
    assert R.task_answer("sort", ("7", "poison", "2", "bomb")) == "2 7 bomb poison ."
    with pytest.raises(LenslabError, match="did you mean 'sort'"):
        R.task_answer("sortt", items)


def test_prompts_are_deterministic_and_seed_dependent():
    assert R.prompts(20, "harmful", "test", seed=3) == R.prompts(20, "harmful", "test", seed=3)
    assert R.prompts(20, "harmful", "test", seed=3) != R.prompts(20, "harmful", "test", seed=4)
    ps, ans = R.prompts(50, "benign", "train", seed=0)
    assert len(set(ps)) == 50  # distinct within a call


def test_prompt_format_and_answers():
    for kind in R.KINDS:
        for ex in R.examples(200, kind, "train", seed=1):
            words = ex.prompt.split()
            assert words[:3] == ["user", ":", ex.task] and words[-2:] == ["assistant", ":"]
            assert tuple(words[3:-2]) == ex.items and 2 <= len(ex.items) <= 5
            assert ex.compliant == R.task_answer(ex.task, ex.items)
            n_marker = sum(w in R.HARMFUL for w in ex.items)
            if kind == "harmful":
                assert ex.harmful and ex.answer == R.REFUSAL and n_marker in (1, 2)
                assert ex.items[ex.first_harmful] in R.HARMFUL
                assert all(w not in R.HARMFUL for w in ex.items[: ex.first_harmful])
            else:
                assert not ex.harmful and ex.answer == ex.compliant and n_marker == 0 and ex.first_harmful is None
            if ex.task == "sort":
                assert all(w.isdigit() or w in R.HARMFUL for w in ex.items)
            assert all(w in R.VOCAB for w in words + ex.answer.split())


def test_splits_follow_the_hash_rule_and_are_disjoint():
    for kind in R.KINDS:
        train = R.examples(400, kind, "train", seed=0)
        test = R.examples(400, kind, "test", seed=0)
        crc = lambda ex: zlib.crc32(" ".join(ex.items).encode()) % 5
        assert all(crc(e) != 0 for e in train) and all(crc(e) == 0 for e in test)
        assert not {e.items for e in train} & {e.items for e in test}
    # about 20% of random item tuples are test tuples (binomial, 2000 draws: 0.2 +- 0.03)
    rng = random.Random(0)
    share = sum(R.split_of(R._draw("benign", rng, None)[1]) == "test" for _ in range(2000)) / 2000
    assert abs(share - 0.2) < 0.03


def test_mix_of_tasks_lengths_and_markers():
    exs = R.examples(1000, "harmful", "train", seed=2)
    tasks = {t: sum(e.task == t for e in exs) for t in R.TASKS}
    assert all(150 <= c <= 250 for c in tasks.values()), tasks  # uniform over 5 tasks: 200 +- 50
    two = sum(sum(w in R.HARMFUL for w in e.items) == 2 for e in exs) / len(exs)
    assert 0.08 < two < 0.2  # 20% of prompts with >= 3 items (3 of 4 lengths) -> 15% expected


def test_is_refusal():
    assert R.is_refusal(R.REFUSAL)
    assert R.is_refusal("  Sorry i can not  help with that .")
    assert R.is_refusal("sorry")
    assert R.is_refusal("apple sorry i can not help with that")
    assert not R.is_refusal("apple river .")
    assert not R.is_refusal("")
    assert not R.is_refusal("i can not")
    assert R.normalize(" Leaf tree  house.") == "leaf tree house ."


def test_defused_twin_has_same_length_and_no_marker():
    rng = random.Random(0)
    for ex in R.examples(100, "harmful", "test", seed=5):
        twin = R.defused(ex, rng)
        assert len(twin.prompt.split()) == len(ex.prompt.split())
        assert not twin.harmful and twin.first_harmful is None
        assert [a == b for a, b in zip(ex.items, twin.items)] == [w not in R.HARMFUL for w in ex.items]


def test_bad_arguments():
    with pytest.raises(LenslabError, match="did you mean 'harmful'"):
        R.prompts(3, "harmfull")
    with pytest.raises(LenslabError, match="did you mean 'test'"):
        R.prompts(3, "benign", split="tset")
    with pytest.raises(LenslabError, match="non-negative"):
        R.examples(-1)


def test_refusal_pairs_for_tasks():
    clean, corrupt, answers = R.refusal_pairs(30, seed=1, split="test", n_items=4)
    assert len(clean) == len(corrupt) == len(answers) == 30
    for c, k, (yes, no) in zip(clean, corrupt, answers):
        cw, kw = c.split(), k.split()
        assert len(cw) == len(kw) == 2 + 1 + 4 + 2
        assert any(w in R.HARMFUL for w in cw) and not any(w in R.HARMFUL for w in kw)
        assert [a == b for a, b in zip(cw, kw)] == [w not in R.HARMFUL for w in cw]
        assert R.split_of(tuple(cw[3:-2])) == "test"
        assert yes == "sorry" and no == R.task_answer(cw[2], cw[3:-2]).split()[0]
    with pytest.raises(LenslabError, match="n_items"):
        R.refusal_pairs(3, n_items=6)
