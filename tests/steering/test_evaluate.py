"""lenslab.steering.evaluate: behaviour rates, answer accuracy, perplexity, the expert switch table.

Oracles: `lenslab.steering.generate` one prompt at a time (the batched greedy decoder must give
the same continuations), hand-counted rates, a hand-computed teacher-forced perplexity, and for
the switch table the planted expert of the tiny Mixtral (`tiny_moe_dir(plant=True)`) plus
direct `behaviour_rates` calls with the same switches.
"""

from __future__ import annotations

import math

import pytest
import torch

import lenslab
from lenslab import LenslabError
from lenslab import steering as S
from lenslab.steering import Edit, Intervention
from lenslab.steering import evaluate as ev

PROMPTS = {
    "a": ["t1 t2 t3", "t4 t5 t6", "t7 t8", "t9 t10 t11 t12", "t1 t1", "t2 t3 t4"],
    "b": ["t3 t2 t1", "t5 t5 t5 t5", "t6"],
}
N_NEW = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _iv(positions="generated", scale=4.0):
    v = torch.randn(32, generator=torch.Generator().manual_seed(3)) * scale
    return Intervention(edits=(Edit(hook="blocks.0.hook_resid_post", op="add", vector=v, positions=positions),))


@pytest.fixture(scope="module")
def ivs():
    return {"baseline": None, "pushed": _iv()}


@pytest.fixture(scope="module")
def texts(tiny_model, ivs):
    return ev.continuations(tiny_model, ivs, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False)


def test_batched_continuations_equal_generate(tiny_model, ivs, texts):
    for name, iv in ivs.items():
        for s, ps in PROMPTS.items():
            assert texts[name][s] == [S.generate(tiny_model, p, iv, max_new_tokens=N_NEW) for p in ps]
    # the intervention acts on generated positions: some continuation differs
    assert texts["baseline"] != texts["pushed"]


def test_behaviour_rates_count_the_scored_continuations(tiny_model, ivs, texts):
    def score(t):
        return "t1" in t.split() or len(t.split()) < N_NEW  # some True, some False on this model

    table = ev.behaviour_rates(tiny_model, ivs, PROMPTS, score, max_new_tokens=N_NEW, progress=False)
    assert table.interventions == ("baseline", "pushed") and table.sets == ("a", "b") and table.n == (6, 3)
    for name in ivs:
        for s, ps in PROMPTS.items():
            gens = [S.generate(tiny_model, p, ivs[name], max_new_tokens=N_NEW) for p in ps]
            want = sum(score(g) for g in gens) / len(ps)
            assert table.value(name, s) == pytest.approx(want, abs=1e-6)
            assert table.texts[name][s] == gens
    # precomputed texts give the same table without generating
    again = ev.behaviour_rates(tiny_model, ivs, PROMPTS, score, texts=texts)
    assert torch.equal(again.values, table.values)


def test_answer_accuracy_exact_and_prefix(tiny_model, ivs, texts):
    gens = texts["baseline"]
    # the true continuation for even prompts, a continuation that never occurs for odd ones
    answers = {s: [g if i % 2 == 0 else "t63 t63 t63 t63 t63 t63" for i, g in enumerate(gens[s])] for s in PROMPTS}
    answers = {s: [a if a.strip() else "t63" for a in v] for s, v in answers.items()}
    want = {s: sum(i % 2 == 0 and gens[s][i].strip() != "" for i in range(len(v))) / len(v) for s, v in PROMPTS.items()}
    table = ev.answer_accuracy(tiny_model, {"baseline": None}, PROMPTS, answers, max_new_tokens=N_NEW, progress=False)
    assert table.metric == "exact match"
    for s in PROMPTS:
        assert table.value("baseline", s) == pytest.approx(want[s], abs=1e-6)
    # prefix: the first word of each continuation is always a prefix of it
    firsts = {s: [(g.split() or ["t63"])[0] for g in gens[s]] for s in PROMPTS}
    pre = ev.answer_accuracy(
        tiny_model, {"baseline": None}, PROMPTS, firsts, max_new_tokens=N_NEW, prefix=True, texts=texts
    )
    want_pre = {s: sum(bool(g.split()) for g in gens[s]) / len(gens[s]) for s in PROMPTS}
    for s in PROMPTS:
        assert pre.value("baseline", s) == pytest.approx(want_pre[s], abs=1e-6)


def test_answer_matching_ignores_decoder_spacing(tiny_model):
    texts = {"x": {"s": ["t1 t2.", "  t1   t2 .", "t1", "t1 t2 t3"]}}
    prompts = {"s": ["t5", "t6", "t7", "t8"]}
    exact = ev.answer_accuracy(tiny_model, {"x": None}, prompts, {"s": ["t1 t2 ."] * 4}, texts=texts)
    assert exact.value("x", "s") == pytest.approx(0.5, abs=1e-12)  # the first two match
    pre = ev.answer_accuracy(tiny_model, {"x": None}, prompts, {"s": ["t1 t2"] * 4}, texts=texts, prefix=True)
    assert pre.value("x", "s") == pytest.approx(0.75, abs=1e-12)  # all but "t1"


def test_perplexity_equals_hand_computation(tiny_model):
    answers = {"a": ["t5 t6", "t7", "t1 t2 t3", "t9", "t10 t11", "t4"], "b": ["t1", "t2 t2", "t8 t9 t10"]}
    iv = _iv(positions="all", scale=1.0)
    table = ev.perplexity(tiny_model, {"baseline": None, "pushed": iv}, PROMPTS, answers, batch_size=2, progress=False)
    for name, edit in (("baseline", None), ("pushed", iv)):
        for s, ps in PROMPTS.items():
            nll, count = 0.0, 0
            for p, a in zip(ps, answers[s]):
                pt = tiny_model.to_tokens(p)[0]
                at = tiny_model.to_tokens(a, prepend_bos=False)[0]
                full = torch.cat([pt, at])[None]
                with torch.no_grad(), S.apply(tiny_model, edit):
                    logp = tiny_model(full)[0].log_softmax(-1)
                for j, tok in enumerate(at.tolist()):
                    nll -= float(logp[len(pt) - 1 + j, tok])
                    count += 1
            assert table.value(name, s) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert table.value("baseline", "a") != pytest.approx(table.value("pushed", "a"), rel=1e-3)


def test_rate_table_json_markdown_and_figure(tiny_model, ivs, texts):
    table = ev.behaviour_rates(tiny_model, ivs, PROMPTS, lambda t: "t2" in t, texts=texts)
    back = ev.RateTable.from_json(table.to_json())
    assert torch.equal(back.values, table.values) and back.texts == table.texts and back.n == table.n
    md = table.to_markdown()
    assert "| baseline |" in md and "a (n=6)" in md and f"{100 * table.value('pushed', 'b'):.1f}%" in md
    fig = table.figure()
    assert len(fig.data) == 2 and list(fig.data[1].y) == pytest.approx(
        [100 * float(v) for v in table.values[1]], abs=1e-9
    )
    with pytest.raises(LenslabError, match="did you mean 'baseline'"):
        table.value("baselin", "a")


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda m: ev.continuations(m, {}, PROMPTS), "non-empty dict"),
        (lambda m: ev.continuations(m, {"x": "not an iv"}, PROMPTS), "not a lenslab Intervention"),
        (lambda m: ev.continuations(m, {"x": None}, {"a": []}), "non-empty list"),
        (lambda m: ev.continuations(m, {"x": None}, {"a": "t1 t2"}), "non-empty list"),
        (lambda m: ev.answer_accuracy(m, {"x": None}, {"a": ["t1"]}, {"a": ["t1", "t2"]}), "1 prompts but 2 answers"),
        (lambda m: ev.perplexity(m, {"x": None}, {"a": ["t1"]}, {"b": ["t1"]}), "no answers for prompt set 'a'"),
    ],
)
def test_bad_inputs(tiny_model, call, msg):
    with pytest.raises(LenslabError, match=msg):
        call(tiny_model)


def test_expert_switch_table_on_a_planted_moe(tiny_moe_dir):
    from lenslab.steering import switch_experts

    t = tiny_moe_dir
    model = lenslab.load_model(str(t("mixtral", plant=True)), device="cpu")
    w = t.WORDS
    target = [f"{w[3]} {t.PLANT_TOKEN} {w[5]}", f"{t.PLANT_TOKEN} {w[9]}", f"{w[11]} {w[12]} {t.PLANT_TOKEN}"]
    other = [f"{w[3]} {w[4]} {w[5]}", f"{w[8]} {w[9]}", f"{w[11]} {w[12]} {w[13]}", f"{w[20]} {w[21]}"]
    evals = [f"{w[i]} {w[i + 1]} {w[i + 2]}" for i in range(20, 30)]
    answers = [f"{w[i + 3]}" for i in range(20, 30)]

    def score(text):
        return text.split()[:1] in ([w[1]], [w[2]], [w[40]])

    table = ev.expert_switch_table(
        model,
        rank_target=target,
        rank_other=other,
        target=evals[:5],
        other=evals[5:],
        capability=evals,
        capability_answers=answers,
        score=score,
        k=1,
        n_random=3,
        seed=0,
        max_new_tokens=3,
        progress=False,
    )
    # fTRI finds the planted expert; the random draws never pick it and are deterministic
    assert tuple(table.experts[0][:2]) == (t.PLANT_LAYER, t.PLANT_EXPERT)
    assert table.experts[0][2] == pytest.approx(1.0, abs=1e-6)  # one more selection per target prompt
    assert len(table.random_draws) == 3 and all((t.PLANT_LAYER, t.PLANT_EXPERT) not in d for d in table.random_draws)
    assert table.random_draws == ev.random_expert_sets(model, 1, 3, exclude=[(1, 3)], seed=0)
    # each row equals direct evaluations with the same switches
    plant = [(t.PLANT_LAYER, t.PLANT_EXPERT)]
    ivs = {"baseline": None, "top-1 off": switch_experts(off=plant), "top-1 on": switch_experts(on=plant)}
    ivs.update({f"r{d}": switch_experts(off=pairs) for d, pairs in enumerate(table.random_draws)})
    sets = {"target": evals[:5], "other": evals[5:]}
    rates = ev.behaviour_rates(model, ivs, sets, score, max_new_tokens=3, progress=False)
    acc = ev.answer_accuracy(model, ivs, {"c": evals}, {"c": answers}, max_new_tokens=3, progress=False)
    ppl = ev.perplexity(model, ivs, {"c": evals}, {"c": answers}, progress=False)
    direct = torch.stack([rates.values[:, 0], rates.values[:, 1], acc.values[:, 0], ppl.values[:, 0]], 1)
    assert torch.allclose(table.mean[:3], direct[:3], atol=1e-6)
    assert torch.allclose(table.per_draw, direct[3:], atol=1e-6)
    assert torch.allclose(table.mean[3], direct[3:].mean(0), atol=1e-6)
    assert torch.allclose(table.std[3], direct[3:].std(0), atol=1e-6)
    # no capability prompt holds the planted token, so no token selects the planted expert: switching
    # it off leaves their accuracy and perplexity exactly as they were
    assert table.mean[1, 2:].tolist() == table.mean[0, 2:].tolist()
    assert table.rows == ("baseline", "top-1 off", "top-1 on", "random-1 off")
    back = ev.SwitchTable.from_json(table.to_json())
    assert torch.equal(back.mean, table.mean) and back.experts == [tuple(e) for e in table.experts]
    assert "random-1 off" in table.to_markdown() and len(table.figure().data) == 4


def test_switch_table_prints_perplexity_at_four_significant_digits():
    """A five-figure perplexity is printed without decimals (its 5th digit already differs between
    CPUs); small ones keep 3 decimals, and a random row's std takes its mean's decimals."""
    mean = torch.tensor(
        [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 58025.13], [0.997, 0.0, 0.923, 1.30912]], dtype=torch.float64
    )
    std = torch.tensor([[0.0] * 4, [0.0] * 4, [0.003, 0.0, 0.069, 0.28949]], dtype=torch.float64)
    table = ev.SwitchTable(
        mean=mean,
        std=std,
        rows=("baseline", "top-4 on", "random-4 off"),
        experts=[],
        random_draws=[],
        per_draw=torch.zeros(1, 4),
        n=(200, 200, 200, 200),
    )
    rows = table.to_markdown().splitlines()[2:]
    assert rows[0].endswith("| 100.0% | 1.000 |") and rows[1].endswith("| 0.0% | 58025 |")
    assert rows[2].endswith("| 92.3% ± 6.9 | 1.309 ± 0.289 |")
