"""The Task/metric contract: validation, constructors and the four named metrics."""

from __future__ import annotations

import pytest
import torch

import lenslab
from lenslab import tasks
from lenslab.tasks import Task


def _toks(*rows):
    return torch.tensor(rows)


def test_task_validates_shapes_and_ids():
    ok = Task(clean_tokens=_toks([0, 1, 2]), corrupt_tokens=_toks([0, 1, 3]), answer_tokens=_toks([4, 5]), d_vocab=8)
    assert ok.batch == 1 and ok.seq_len == 3 and ok.answer_tokens.shape == (1, 2)
    with pytest.raises(lenslab.LenslabError, match="same .batch, pos. shape"):
        Task(clean_tokens=_toks([0, 1, 2]), corrupt_tokens=_toks([0, 1]), answer_tokens=_toks([4, 5]))
    with pytest.raises(lenslab.LenslabError, match="non-empty"):
        Task(
            clean_tokens=torch.zeros(0, 3, dtype=torch.long),
            corrupt_tokens=torch.zeros(0, 3, dtype=torch.long),
            answer_tokens=torch.zeros(0, 2, dtype=torch.long),
        )
    with pytest.raises(lenslab.LenslabError, match=r"answer_tokens must be \[batch, 2\]"):
        Task(clean_tokens=_toks([0, 1], [0, 2]), corrupt_tokens=_toks([0, 1], [0, 2]), answer_tokens=_toks([4, 5, 6]))
    with pytest.raises(lenslab.LenslabError, match="prompt 1 .* token id 9, outside the vocabulary"):
        Task(
            clean_tokens=_toks([0, 1], [0, 9]),
            corrupt_tokens=_toks([0, 1], [0, 2]),
            answer_tokens=_toks([4, 5], [4, 5]),
            d_vocab=8,
        )
    with pytest.raises(lenslab.LenslabError, match="integer token ids"):
        Task(clean_tokens=torch.zeros(1, 3), corrupt_tokens=torch.zeros(1, 3), answer_tokens=torch.zeros(1, 2))


def test_task_roundtrip_and_subset():
    t = Task(
        clean_tokens=_toks([0, 1, 2], [0, 3, 4]),
        corrupt_tokens=_toks([0, 1, 5], [0, 3, 6]),
        answer_tokens=_toks([7, 8], [9, 10]),
        labels=("a", "b"),
        name="x",
        d_vocab=16,
    )
    back = Task.from_dict(t.to_dict())
    assert torch.equal(back.clean_tokens, t.clean_tokens) and back.labels == ("a", "b") and back.name == "x"
    sub = t.subset([1])
    assert sub.batch == 1 and sub.labels == ("b",) and sub.answer_tokens.tolist() == [[9, 10]]


def test_from_prompts_and_errors(tiny_model):
    t = tasks.from_prompts(tiny_model, ["t1 t2 t3", "t4 t5 t6"], ["t1 t2 t9", "t4 t5 t7"], [("t3", "t9"), ("t6", "t7")])
    assert t.clean_tokens.shape == (2, 4)  # BOS + 3 words
    vocab = tiny_model.tokenizer.get_vocab()
    assert t.answer_tokens.tolist() == [[vocab["t3"], vocab["t9"]], [vocab["t6"], vocab["t7"]]]
    with pytest.raises(lenslab.LenslabError, match=r"clean prompt 1 \('t4 t5'\) is 3 tokens long"):
        tasks.from_prompts(tiny_model, ["t1 t2 t3", "t4 t5"], ["t1 t2 t9", "t4 t5 t7"], [("t3", "t9"), ("t6", "t7")])
    with pytest.raises(lenslab.LenslabError, match="corrupt prompt 0"):
        tasks.from_prompts(tiny_model, ["t1 t2 t3"], ["t1 t2"], [("t3", "t9")])
    with pytest.raises(lenslab.LenslabError, match="not one: answers must be single tokens"):
        tasks.from_prompts(tiny_model, ["t1 t2 t3"], ["t1 t2 t4"], [("t3 t4", "t9")])
    with pytest.raises(lenslab.LenslabError, match="outside the model's vocabulary"):
        tasks.from_prompts(tiny_model, ["t1 zebra t3"], ["t1 t2 t4"], [("t3", "t9")])
    with pytest.raises(lenslab.LenslabError, match="empty"):
        tasks.from_prompts(tiny_model, ["  "], ["t1"], [("t3", "t9")])
    with pytest.raises(lenslab.LenslabError, match="one corrupt prompt"):
        tasks.from_prompts(tiny_model, ["t1 t2"], [], [])


def test_induction_task_structure(tiny_model):
    t = tasks.induction(tiny_model, n=5, seq_len=6, seed=3)
    assert t.clean_tokens.shape == (5, 1 + 6 + 5)
    again = tasks.induction(tiny_model, n=5, seq_len=6, seed=3)
    assert torch.equal(t.clean_tokens, again.clean_tokens)
    a = t.clean_tokens[:, 1:7]
    assert torch.equal(t.clean_tokens[:, 7:], a[:, :5])  # second half repeats the first
    assert torch.equal(t.answer_tokens[:, 0], a[:, 5])  # correct answer continues the repeat
    diff = (t.clean_tokens != t.corrupt_tokens).nonzero()
    assert diff[:, 1].tolist() == [1 + 4] * 5  # only the first occurrence of A[-2] differs
    special = set(tiny_model.tokenizer.all_special_ids)
    assert not special & set(t.clean_tokens[:, 1:].flatten().tolist())


def test_named_metrics_match_hand_computation(tiny_model):
    t = tasks.induction(tiny_model, n=4, seq_len=5, seed=0)
    with torch.no_grad():
        clean = tiny_model(t.clean_tokens)
        corrupt = tiny_model(t.corrupt_tokens)
    last = clean[:, -1]
    c, i = t.answer_tokens[:, 0], t.answer_tokens[:, 1]
    rows = torch.arange(4)
    ld = (last[rows, c] - last[rows, i]).mean()
    ld_corrupt = (corrupt[:, -1][rows, c] - corrupt[:, -1][rows, i]).mean()
    m = tasks.get_metric("logit_diff", tiny_model, t)
    assert float(m(clean)) == pytest.approx(float(ld), abs=1e-5)
    assert m.clean_value == pytest.approx(float(ld), abs=1e-5)
    assert m.corrupt_value == pytest.approx(float(ld_corrupt), abs=1e-5)
    assert m.per_prompt(last).shape == (4,)
    norm = tasks.get_metric("logit_diff_normalized", tiny_model, t)
    assert float(norm(clean)) == pytest.approx(1.0, abs=1e-4)
    assert float(norm(corrupt)) == pytest.approx(0.0, abs=1e-4)
    prob = tasks.get_metric("answer_prob", tiny_model, t)
    assert float(prob(clean)) == pytest.approx(float(last.softmax(-1)[rows, c].mean()), abs=1e-6)
    kl = tasks.get_metric("kl_to_clean", tiny_model, t)
    assert float(kl(clean)) == pytest.approx(0.0, abs=1e-6)
    p, q = last.softmax(-1), corrupt[:, -1].softmax(-1)
    assert float(kl(corrupt)) == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-4)


def test_metric_errors(tiny_model):
    t = tasks.induction(tiny_model, n=2, seq_len=5, seed=0)
    with pytest.raises(lenslab.LenslabError, match="did you mean 'logit_diff'"):
        tasks.get_metric("logit_dif", tiny_model, t)
    with pytest.raises(lenslab.LenslabError, match="returned nan"):
        tasks.get_metric(lambda logits: logits.sum() * float("nan"), tiny_model, t)
    with pytest.raises(lenslab.LenslabError, match="must return a scalar"):
        tasks.get_metric(lambda logits: logits[:, -1, 0], tiny_model, t)
    same = Task(clean_tokens=t.clean_tokens, corrupt_tokens=t.clean_tokens, answer_tokens=t.answer_tokens)
    with pytest.raises(lenslab.LenslabError, match="undefined"):
        tasks.get_metric("logit_diff_normalized", tiny_model, same)
    custom = tasks.get_metric(lambda logits: logits[:, -1, 3].mean(), tiny_model, t)
    assert custom.name == "<lambda>" and custom.per_prompt is None


# every builder of lenslab.tasks, the spec that names it, and the zoo model that reads its language
_SPECS = {
    "ioi": ("zoo/ioi-4l", lambda m: tasks.ioi(m, n=6, seed=3)),
    "ioi-heldout": ("zoo/ioi-4l", lambda m: tasks.ioi(m, n=6, seed=3, heldout=True)),
    "induction": ("zoo/induction-2l", lambda m: tasks.induction(m, n=6, seq_len=10, seed=3)),
    "refusal": ("zoo/moe-refusal", lambda m: tasks.refusal(m, n=6, seed=3, split="test")),
    "refusal-train": ("zoo/moe-refusal", lambda m: tasks.refusal(m, n=6, seed=3, split="train")),
}


def test_from_spec_builds_every_task(zoo_models):
    assert set(_SPECS) == set(tasks.BUILTIN_TASKS)
    builders = {f for f in ("induction", "ioi", "refusal") if callable(getattr(tasks, f))}
    assert {s.split("-")[0] for s in tasks.BUILTIN_TASKS} == builders  # no task builder without a spec
    for spec, (name, build) in _SPECS.items():
        model = zoo_models(name)
        got, want = tasks.from_spec(model, spec, n=6, seed=3), build(model)
        assert got.name == want.name and got.batch == 6, spec
        for field in ("clean_tokens", "corrupt_tokens", "answer_tokens"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (spec, field)
    with pytest.raises(lenslab.LenslabError, match="refusal-train"):
        tasks.from_spec(zoo_models("zoo/moe-refusal"), "refusal-tran")
