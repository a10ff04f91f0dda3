"""`lenslab.probes.linear`: probes equal scikit-learn fitted by hand on `run_with_cache` activations,
the split is by prompt and seeded, the control task follows Hewitt & Liang, probes round-trip, and the
zoo's planted information is decodable where the mechanism writes it while the control stays at chance.

Bands: the control task's test accuracy is held to chance +- 0.25 for two balanced classes on 32 test
prompts (the binomial standard deviation there is 0.088, so the band is about 3 of them); for the 140
IOI names (chance 1/61 on its test split) to at most chance + 0.05. Everything is seeded and runs on
one thread, so each number is the same on every run; the bands say what the claim is, not noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenslab import tasks
from lenslab._errors import LenslabError
from lenslab.data import refusal
from lenslab.probes import linear
from lenslab.probes.linear import Probe, ProbeResult, dataset, train_probes

pytestmark = pytest.mark.usefixtures("one_thread")

BAND = 0.25  # control task: |test accuracy - 0.5| for two balanced classes on 32 test prompts


@pytest.fixture(scope="module")
def sentiment_model(zoo_models):
    return zoo_models("zoo/steer-sentiment")


@pytest.fixture(scope="module")
def sentiment_data(sentiment_model):
    return dataset(sentiment_model, "sentiment", n=64, seed=0)


@pytest.fixture(scope="module")
def sentiment_res(sentiment_model, sentiment_data):
    return train_probes(sentiment_model, *sentiment_data, site=["resid_pre", "resid_post"], layers=[0, 1])


@pytest.fixture(scope="module")
def ioi_res(zoo_models):
    model = zoo_models("zoo/ioi-4l")
    return train_probes(model, tasks.ioi(model, n=200, seed=3), "answer", layers=[0, 1])


@pytest.fixture(scope="module")
def refusal_data(zoo_models):
    return dataset(zoo_models("zoo/moe-refusal"), "refusal", n=64, seed=0)


@pytest.fixture(scope="module")
def refusal_res(zoo_models, refusal_data):
    return train_probes(zoo_models("zoo/moe-refusal"), *refusal_data, site=["resid_pre", "mlp_out"], layers=[0, 1])


def _row(res, site, layer):
    return next(r for r in res.rows if r["site"] == site and r["layer"] == layer)


# --- the zoo's planted information ---------------------------------------------------------------
def test_sentiment_of_the_context_is_decodable(sentiment_res):
    """steer-sentiment keeps its context's sentiment: by the end of block 1 the last token (a stem word
    such as "was", which carries no sentiment itself) holds it; before block 0 it holds only the token."""
    r = _row(sentiment_res, "resid_post", 1)
    assert r["test"] >= 0.95 and r["train"] == 1.0
    assert r["n_test"] == 32 and r["chance"] == 0.5
    assert abs(r["control_test"] - 0.5) <= BAND
    assert r["selectivity"] >= 0.95 - 0.5 - BAND
    embed = _row(sentiment_res, "resid_pre", 0)  # the stem word's embedding only
    assert abs(embed["test"] - 0.5) <= BAND
    for row in sentiment_res.rows:
        assert abs(row["control_test"] - 0.5) <= BAND, row


def test_ioi_indirect_object_is_decodable_where_the_name_movers_write(zoo_models, ioi_res):
    """zoo/ioi-4l's layer-1 name movers copy the indirect object to the last position: which name it is
    (one of 140) is unreadable there after block 0 and read almost perfectly after block 1."""
    model, res = zoo_models("zoo/ioi-4l"), ioi_res
    l0, l1 = _row(res, "resid_post", 0), _row(res, "resid_post", 1)
    assert l1["test"] >= 0.95, l1
    assert l0["test"] <= 0.2, l0
    for r in (l0, l1):
        assert r["control_test"] <= r["chance"] + 0.05, r
    assert res.provenance["task"] == "ioi" and len(res.probes[1].label_names) > 50
    # the probe names the answer on prompts it has not seen (whose name is one of its classes)
    probe = res.probe(layer=1)
    fresh = tasks.ioi(model, n=60, seed=11)
    known = [i for i, a in enumerate(linear.resolve_labels(model, fresh, "answer")) if a in probe.label_names]
    assert len(known) >= 30 and probe.score(model, fresh.subset(known), "answer") >= 0.9


def test_refusal_harmfulness_is_decodable_from_the_refusal_experts_layer(zoo_models, refusal_data, refusal_res):
    """zoo/moe-refusal's planted refusal experts (L1e2, L1e5) write at layer 1's MoE output: harmful vs
    benign is read there at the last token, not from layer 0's MoE output or the last token's embedding."""
    model, (prompts, _), res = zoo_models("zoo/moe-refusal"), refusal_data, refusal_res
    assert _row(res, "mlp_out", 1)["test"] >= 0.95
    assert _row(res, "mlp_out", 0)["test"] <= 0.75
    assert abs(_row(res, "resid_pre", 0)["test"] - 0.5) <= BAND
    for r in res.rows:
        assert abs(r["control_test"] - 0.5) <= BAND, r
    # labels as a function of the tokens: "does the prompt hold a marker word" gives the same labels
    marker = {model.to_single_token(w) for w in refusal.HARMFUL}
    fn = lambda toks: "harmful" if any(int(t) in marker for t in toks) else "benign"
    again = train_probes(model, prompts, fn, site="mlp_out", layers=1)
    assert again.rows[0] == _row(res, "mlp_out", 1)


def test_docs_planted_table_is_the_measurement(sentiment_res, ioi_res, refusal_res, doc_numbers):
    """Every cell of docs/probes.md's table of planted mechanisms, at its printed digits."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "probes.md").read_text()
    rows = {r[0]: r for r in doc_numbers.table(doc, "| model | what is probed")}
    cases = {
        "zoo/steer-sentiment": (sentiment_res, ("resid_post", 1), ("resid_pre", 0)),
        "zoo/ioi-4l": (ioi_res, ("resid_post", 1), ("resid_post", 0)),
        "zoo/moe-refusal": (refusal_res, ("mlp_out", 1), ("mlp_out", 0)),
    }
    assert set(rows) == set(cases)
    for name, (res, at, before) in cases.items():
        r, b = _row(res, *at), _row(res, *before)
        cells = rows[name]
        assert cells[2] == f"`{at[0]}`, layer {at[1]}" and cells[6] == f"`{before[0]}`, layer {before[1]}", cells
        for value, printed in zip((r["test"], r["control_test"], r["selectivity"], b["test"]), (*cells[3:6], cells[7])):
            assert doc_numbers.close(value, printed), (name, value, printed)


# --- against scikit-learn by hand ----------------------------------------------------------------
def _hand_acts(model, prompts, hook):
    with torch.no_grad():
        return torch.stack([model.run_with_cache(p, names_filter=hook)[1][hook][0, -1] for p in prompts]).double()


def test_probe_equals_scikit_learn_on_run_with_cache_activations(sentiment_model, sentiment_data, sentiment_res):
    from sklearn.linear_model import LogisticRegression

    prompts, labels = sentiment_data
    hook = "blocks.1.hook_resid_post"
    acts = linear.read_activations(sentiment_model, prompts, [hook])[hook]
    torch.testing.assert_close(acts.double(), _hand_acts(sentiment_model, prompts, hook), atol=1e-5, rtol=1e-5)
    x = acts.double().numpy()  # the same inputs: scikit-learn's lbfgs is deterministic
    test = sentiment_res.provenance["test_indices"]
    train = [i for i in range(len(prompts)) if i not in set(test)]
    y = np.asarray([labels[i] == "positive" for i in train], dtype=int)  # classes sorted: negative, positive
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(x[train], y)
    probe = sentiment_res.probe(layer=1, site="resid_post")
    assert probe.label_names == ("negative", "positive") and probe.hook == hook
    torch.testing.assert_close(probe.weight[0].double(), torch.from_numpy(ref.coef_[0]))
    pred = ref.predict(x[test])
    want = np.mean([("positive" if p else "negative") == labels[i] for p, i in zip(pred, test)])
    assert _row(sentiment_res, "resid_post", 1)["test"] == pytest.approx(want)
    # class means are the training split's means
    torch.testing.assert_close(
        probe.class_means[1].double(), torch.from_numpy(x[[i for i in train if labels[i] == "positive"]].mean(0))
    )
    # standardised fits come back in the activations' coordinates: same decisions as sklearn on scaled inputs
    std = train_probes(sentiment_model, prompts, labels, site=hook, standardize=True, control=None)
    mu, sd = x[train].mean(0), x[train].std(0)
    ref_s = LogisticRegression(C=1.0, max_iter=2000).fit((x[train] - mu) / sd, y)
    np.testing.assert_allclose(
        std.probes[0].logits(torch.from_numpy(x))[:, 0].numpy(),
        ref_s.decision_function((x - mu) / sd),
        rtol=1e-4,
        atol=1e-4,
    )


def test_linear_probe_is_ridge_regression(sentiment_model):
    """kind="linear": ridge regression of a number (here the prompt's token count) with R² as the score."""
    from sklearn.linear_model import Ridge

    from lenslab.data import sentiment

    prompts = sentiment.prompts(48, "neutral", seed=3)
    counts = [len(sentiment_model.to_tokens(p)[0]) for p in prompts]
    res = train_probes(sentiment_model, prompts, counts, site="blocks.0.hook_resid_post", kind="linear", alpha=1.0)
    r = res.rows[0]
    assert r["metric"] == "r2" and res.probes[0].label_names == ()
    x = _hand_acts(sentiment_model, prompts, "blocks.0.hook_resid_post").numpy()
    test = res.provenance["test_indices"]
    train = [i for i in range(len(prompts)) if i not in set(test)]
    ref = Ridge(alpha=1.0).fit(x[train], np.asarray(counts, float)[train])
    assert r["test"] == pytest.approx(ref.score(x[test], np.asarray(counts, float)[test]), rel=1e-6, abs=1e-6)
    assert r["control_test"] is not None and r["chance"] == 0.0


def test_positions_mean_and_index(sentiment_model):
    prompts = ["the day was lovely . the movie was", "the day was awful . the movie was", "what a dull game ."]
    hook = "blocks.0.hook_mlp_out"
    with torch.no_grad():
        full = [sentiment_model.run_with_cache(p, names_filter=hook)[1][hook][0] for p in prompts]
    got = linear.read_activations(sentiment_model, prompts, [hook], "mean")[hook]
    torch.testing.assert_close(got, torch.stack([a.mean(0) for a in full]))
    got = linear.read_activations(sentiment_model, prompts, [hook], 2)[hook]
    torch.testing.assert_close(got, torch.stack([a[2] for a in full]))
    z = linear.read_activations(sentiment_model, prompts, ["blocks.0.attn.hook_z"], "last")["blocks.0.attn.hook_z"]
    assert z.shape == (3, sentiment_model.cfg.n_heads * sentiment_model.cfg.d_head)


# --- split and control ---------------------------------------------------------------------------
def test_split_is_by_prompt_seeded_and_stratified():
    rows = [torch.tensor([0, i % 10]) for i in range(40)]  # 10 distinct prompts, each 4 times
    labels = ["a" if i % 10 < 6 else "b" for i in range(40)]
    train, test = linear.split_by_prompt(rows, labels, test_size=0.3, seed=0)
    assert sorted(train + test) == list(range(40))
    keys = lambda idx: {tuple(rows[i].tolist()) for i in idx}
    assert not keys(train) & keys(test)  # a prompt's repeats never straddle the split
    assert {labels[i] for i in test} == {"a", "b"}  # stratified: both classes held out
    assert len(keys(test)) == round(0.3 * 6) + round(0.3 * 4)
    assert linear.split_by_prompt(rows, labels, test_size=0.3, seed=0) == (train, test)
    assert linear.split_by_prompt(rows, labels, test_size=0.3, seed=1) != (train, test)
    assert linear.split_by_prompt(rows, labels, test_size=0.0, seed=0) == (list(range(40)), [])


def test_control_task_gives_each_type_one_random_label():
    labels = ["x"] * 30 + ["y"] * 10
    types = [i % 7 for i in range(40)]
    ctl = linear.control_labels(labels, types, seed=0)
    assert ctl == linear.control_labels(labels, types, seed=0)
    for t in set(types):
        assert len({c for c, tt in zip(ctl, types) if tt == t}) == 1  # one label per type
    assert set(ctl) <= set(labels)
    draws = [linear.control_labels(labels, list(range(40)), seed=s) for s in range(50)]
    share = np.mean([c == "x" for d in draws for c in d])
    assert abs(share - 0.75) < 0.05  # drawn from the empirical label distribution


def test_token_control_reads_the_probed_token(sentiment_model, sentiment_data):
    """control="token" is Hewitt & Liang's word-type control: the probe reads the current token, so it
    fits that control as well as the task (selectivity near 0: "no more than the token" is not tested)."""
    res = train_probes(sentiment_model, *sentiment_data, site="resid_post", layers=1, control="token")
    assert res.rows[0]["control_test"] >= 0.9
    assert res.provenance["control"] == "token"


# --- the result and the probe as files -----------------------------------------------------------
def test_result_round_trip_table_figure_and_probe_files(sentiment_model, sentiment_res, tmp_path):
    back = ProbeResult.from_json(sentiment_res.to_json())
    assert back.rows == sentiment_res.rows
    for a, b in zip(back.probes, sentiment_res.probes):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.label_names == b.label_names
    t = sentiment_res.table()
    assert list(t["layer"]) == [0, 1, 0, 1] and {"test", "control_test", "selectivity"} <= set(t.columns)
    fig = sentiment_res.figure()
    assert len(fig.data) == 8  # 2 sites x (test, train, control, selectivity)
    probe = sentiment_res.probe(layer=1, site="resid_post")
    path = probe.save(tmp_path / "sentiment_probe.json")
    assert (tmp_path / "sentiment_probe.safetensors").is_file()
    loaded = Probe.load(path)
    assert torch.equal(loaded.weight, probe.weight) and torch.equal(loaded.class_means, probe.class_means)
    assert (loaded.hook, loaded.layer, loaded.position, loaded.label_names) == (
        probe.hook,
        probe.layer,
        probe.position,
        probe.label_names,
    )
    assert loaded.metrics == probe.metrics and loaded.spread == probe.spread
    prompts = ["the day was lovely . the movie was", "the day was awful . the movie was"]
    assert loaded.predict_prompts(sentiment_model, prompts) == ["positive", "negative"]
    assert sentiment_res.probe() is sentiment_res.probes[sentiment_res.rows.index(sentiment_res.best())]


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(sentiment_model, sentiment_data, tmp_path):
    prompts, labels = sentiment_data
    m = sentiment_model
    with pytest.raises(
        LenslabError, match=r"hook 'blocks\.1\.hook_resid_pots'.*did you mean 'blocks\.1\.hook_resid_post'"
    ):
        train_probes(m, prompts, labels, site="blocks.1.hook_resid_pots")
    with pytest.raises(LenslabError, match=r"'resid_pots' is neither a site.*did you mean 'resid_post'"):
        train_probes(m, prompts, labels, site="resid_pots")
    with pytest.raises(LenslabError, match="got 127 labels for 128 prompts"):
        train_probes(m, prompts, labels[:-1])
    with pytest.raises(LenslabError, match="every prompt has the label 'positive'.*at least two classes"):
        train_probes(m, prompts, ["positive"] * len(prompts))
    with pytest.raises(LenslabError, match="look continuous"):
        train_probes(m, prompts, [float(i) for i in range(len(prompts))])
    with pytest.raises(LenslabError, match="not \\[batch, pos, ...\\].*a probe reads one activation per prompt"):
        train_probes(m, prompts, labels, site="pattern", layers=0)
    with pytest.raises(LenslabError, match="out of range: the model has 3 layers"):
        train_probes(m, prompts, labels, layers=[5])
    with pytest.raises(LenslabError, match="position 'first' must be 'last', 'mean' or a token index"):
        train_probes(m, prompts, labels, position="first")
    with pytest.raises(LenslabError, match="position 40 is out of range for a prompt of"):
        train_probes(m, prompts, labels, position=40)
    with pytest.raises(LenslabError, match="test_size must be in"):
        train_probes(m, prompts, labels, test_size=1.0)
    with pytest.raises(LenslabError, match="control 'word' is not one of prompt, token"):
        train_probes(m, prompts, labels, control="word")
    with pytest.raises(LenslabError, match="labels are missing"):
        train_probes(m, prompts)
    with pytest.raises(LenslabError, match="has no labels; pass labels="):
        train_probes(m, tasks.from_prompts(m, ["the day was"], ["the day is"], [("good", "bad")]))
    with pytest.raises(LenslabError, match="a linear \\(regression\\) probe needs finite numbers"):
        train_probes(m, prompts, labels, kind="linear")
    with pytest.raises(LenslabError, match="kind 'ridge' is not one of logistic, linear"):
        train_probes(m, prompts, labels, kind="ridge")
    with pytest.raises(LenslabError, match="dataset 'sentimnet' is not one of .*did you mean 'sentiment'"):
        dataset(m, "sentimnet")
    with pytest.raises(LenslabError, match="does not exist; write one with Probe.save"):
        Probe.load(tmp_path / "nope.json")
