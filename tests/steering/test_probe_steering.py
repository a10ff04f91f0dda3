"""`lenslab.steering.probe_steering`: a probe's direction as an `add` or `project` edit equals a hand
computation from its weights and class means; projecting out silences the probe at its hook; probe
steering runs in `generate` and `tradeoff` next to DiffMean; and benchmarks/probe_steering.py's
measurement (the one docs/probes.md includes) reproduces.

Tolerances: greedy decoding on one thread is deterministic, so on one machine every count and
perplexity repeats exactly. Across CPUs float32 sums may reorder and flip a near-tie argmax; a rerun
of seed 0 must match the committed seed-0 row within one prompt (1/40) and 5% perplexity, as
tests/steering/test_tradeoff.py holds the steering benchmark. Numbers docs/probes.md prints are
checked at their printed digits (tests/conftest.py, `doc_numbers`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lenslab import steering
from lenslab._errors import LenslabError
from lenslab.data import sentiment as S
from lenslab.probes.linear import train_probes
from lenslab.steering import Edit, Intervention
from lenslab.steering.probe_steering import probe_intervention, probe_steering, probe_vector
from lenslab.steering.tradeoff import TradeoffResult, tradeoff

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
PROMPT = "the day was awful . the movie was"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models("zoo/steer-sentiment")


@pytest.fixture(scope="module")
def fit_set():
    pos, neg, _ = S.seeded_sets(0)
    return pos, neg


@pytest.fixture(scope="module")
def probe(model, fit_set):
    pos, neg = fit_set
    res = train_probes(model, pos + neg, ["positive"] * 32 + ["negative"] * 32, site=HOOK, test_size=0, control=None)
    return res.probes[0]


def _acts(model, prompts, hook=HOOK):
    with torch.no_grad():
        return torch.stack([model.run_with_cache(p, names_filter=hook)[1][hook][0, -1] for p in prompts])


def test_add_edit_is_the_direction_times_the_class_separation(model, fit_set, probe):
    pos, neg = fit_set
    u = probe.weight[0] / probe.weight[0].norm()
    sep = (_acts(model, pos).mean(0) - _acts(model, neg).mean(0)) @ u  # along the direction, by hand
    iv = probe_intervention(probe, "positive", strength=2.0)
    (e,) = iv.edits
    assert (e.hook, e.op, e.strength, e.positions) == (HOOK, "add", 2.0, "all")
    torch.testing.assert_close(e.vector, sep * u, atol=1e-4, rtol=1e-4)
    # towards the other class flips the vector; ITI's scale is the spread along the direction
    torch.testing.assert_close(probe_vector(probe, "negative"), -e.vector, atol=1e-4, rtol=1e-4)
    x = _acts(model, pos + neg)
    torch.testing.assert_close(
        probe_vector(probe, scale="std").norm(), (x @ u).std(unbiased=False), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(probe_vector(probe, scale=3.0), 3.0 * u)
    # the steered logits equal a hand-written hook
    toks = model.to_tokens(PROMPT)
    hand = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: a + 2.0 * sep * u)])
    with steering.apply(model, iv):
        got = model(toks)
    torch.testing.assert_close(got, hand, atol=1e-4, rtol=1e-4)


def test_project_out_silences_the_probe_and_strength_zero_is_identity(model, fit_set, probe):
    pos, neg = fit_set
    iv = probe_intervention(probe, op="project")
    (e,) = iv.edits
    assert e.op == "project"
    toks = model.to_tokens(pos[:4])
    seen = {}

    def grab(a, hook):
        seen["x"] = a[:, -1].clone()

    with steering.apply(model, iv):
        model.run_with_hooks(toks, fwd_hooks=[(HOOK, grab)])  # runs after the edit at the same hook
    logit = probe.logits(seen["x"])[:, 0]
    torch.testing.assert_close(logit, probe.bias.double().expand(4), atol=1e-3, rtol=0)  # no evidence left
    u = e.vector / e.vector.norm()
    want = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: a - 0.5 * (a @ u)[..., None] * u)])
    with steering.apply(model, iv.with_strength(0.5)):
        torch.testing.assert_close(model(toks), want, atol=1e-4, rtol=1e-4)
    base = model(toks)
    with steering.apply(model, iv.with_strength(0.0)):
        assert torch.equal(model(toks), base)  # strength 0: bit-identical


def test_multiclass_project_removes_every_class_direction(model):
    kinds = ("positive", "negative", "neutral")
    prompts = [p for k in kinds for p in S.prompts(16, k, seed=7)]
    labels = [k for k in kinds for _ in range(16)]
    res = train_probes(model, prompts, labels, site=HOOK, test_size=0, control=None)
    probe = res.probes[0]
    assert probe.weight.shape == (3, model.cfg.d_model)
    iv = probe_intervention(probe, op="project")
    assert len(iv.edits) == 2  # three class directions sum to zero: a plane
    basis = torch.stack([e.vector for e in iv.edits])
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    seen = {}
    with steering.apply(model, iv):
        model.run_with_hooks(model.to_tokens(prompts[:3]), fwd_hooks=[(HOOK, lambda a, hook: seen.update(x=a[:, -1]))])
    z = probe.logits(seen["x"])
    z = z - z.mean(1, keepdim=True)
    b = probe.bias.double() - probe.bias.double().mean()
    torch.testing.assert_close(z, b.expand_as(z), atol=1e-3, rtol=0)  # only the biases decide
    with pytest.raises(LenslabError, match="name the one to steer towards"):
        probe_intervention(probe)
    assert probe_intervention(probe, "neutral").edits[0].op == "add"


def test_probe_steering_generates_side_by_side_and_is_a_tradeoff_method(model, fit_set):
    pos, neg = fit_set
    iv = probe_steering(model, pos, neg, layers=1, C=0.01, strength=1.0)
    dm = steering.mean_difference(model, pos, neg, layers=1)
    assert iv.provenance["method"] == "probe_steering" and iv.provenance["train_accuracy"] == [0.96875]
    plain = steering.generate(model, PROMPT, max_new_tokens=4)
    steered = steering.generate(model, PROMPT, iv, max_new_tokens=4)
    assert plain != steered and S.counts(steered)[0] > 0  # a positive word appears
    prompts = S.prompts(6, "negative", seed=99)
    res = tradeoff(
        model, {"DiffMean": dm, "Probe": iv}, prompts, S.is_positive, strengths=(0, 1), max_new_tokens=4, progress=False
    )
    assert res.methods() == ["DiffMean", "Probe"]
    assert res.row("Probe", 0)["concept_rate"] == res.row("DiffMean", 0)["concept_rate"] == 0.0
    assert res.row("Probe", 0)["perplexity"] == res.row("DiffMean", 0)["perplexity"]
    # small C leans towards the mean difference (the logistic gradient at w = 0 is the class-mean difference)
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    tiny = probe_steering(model, pos, neg, layers=1, C=1e-4).edits[0].vector
    default = probe_steering(model, pos, neg, layers=1).edits[0].vector
    assert cos(tiny, dm.edits[0].vector) > 0.99 and cos(default, dm.edits[0].vector) < 0.5
    # the preset round-trips
    back = Intervention.from_preset(*iv.to_preset())
    assert back == iv


def test_bad_input(model, probe):
    with pytest.raises(LenslabError, match="op 'remove' is not one of add, project"):
        probe_intervention(probe, op="remove")
    with pytest.raises(LenslabError, match="scale 'mean' must be one of means, std or a number"):
        probe_intervention(probe, scale="mean")
    with pytest.raises(
        LenslabError, match="label 'postive' is not one of the probe's classes.*did you mean 'positive'"
    ):
        probe_intervention(probe, "postive")
    with pytest.raises(LenslabError, match="takes no towards="):
        probe_intervention(probe, "positive", op="project")
    with pytest.raises(LenslabError, match="expected a lenslab.probes.linear.Probe"):
        probe_intervention("probe.json")
    with pytest.raises(LenslabError, match="needs a non-zero direction"):
        Edit(hook=HOOK, op="project", vector=torch.zeros(96))
    with pytest.raises(LenslabError, match="has 8 entries but the hook's last dimension has 96"):
        steering.validate(model, Intervention(edits=(Edit(hook=HOOK, op="project", vector=torch.ones(8)),)))


# --- the measurement docs/probes.md reports --------------------------------------------------------
@pytest.mark.slow
def test_benchmark_seed_0_reproduces_and_the_probe_steers_worse_than_diffmean(model, load_benchmark):
    bench = load_benchmark("probe_steering")  # the test fits exactly the benchmark's methods
    measured = TradeoffResult.from_json(bench.RESULTS / "probe_steering.json")
    projected = TradeoffResult.from_json(bench.RESULTS / "probe_projection.json")
    assert measured.n_seeds() == 5 and projected.n_seeds() == 5
    one = 1 / bench.N_EVAL
    strengths = (0, 0.75, 1, 2)
    res = tradeoff(
        model, bench.methods(model, 0), bench.eval_set(0), S.is_positive, strengths=strengths,
        max_new_tokens=bench.MAX_NEW, progress=False,
    )  # fmt: skip
    for m in res.methods():
        for s in strengths:
            got = res.row(m, s)
            seed0 = measured.seed_row(m, s, 0)
            assert abs(got["concept_rate"] - seed0["concept_rate"]) <= one + 1e-9, (m, s, got, seed0)
            assert got["perplexity"] == pytest.approx(seed0["perplexity"], rel=0.05), (m, s)
    out = tradeoff(
        model, bench.projections(model, 0), bench.positive_set(0), S.is_positive, strengths=(0, 1),
        max_new_tokens=bench.MAX_NEW, progress=False,
    )  # fmt: skip
    for m in out.methods():
        seed0 = projected.seed_row(m, 1, 0)
        assert abs(out.row(m, 1)["concept_rate"] - seed0["concept_rate"]) <= one + 1e-9, m
    dirs = json.loads((bench.RESULTS / "probe_directions.json").read_text())
    for m, d in bench.directions(model, 0).items():
        assert d["cosine"] == pytest.approx(dirs["0"][m]["cosine"], abs=1e-3), m
        assert d.get("test_accuracy") == dirs["0"][m].get("test_accuracy"), m

    # the claims of docs/probes.md, on the committed 5 seeds
    best = bench.best_within(measured)
    default = bench.probe_name(1.0)
    assert best[default]["rates"] == [0.0] * 5  # the default probe never steers within 2x perplexity ...
    assert max(r["concept_rate"] for r in measured.per_seed if r["method"] == default) == 0.0  # ... nor at all
    assert best["DiffMean"]["rate"] > best[default]["rate"]
    assert measured.row("DiffMean", 1)["concept_rate"] == 1.0
    for seed in map(str, range(5)):  # equally decodable, a different direction
        assert dirs[seed][default]["test_accuracy"] >= 0.9 and dirs[seed][default]["cosine"] < 0.5
    assert projected.row("DiffMean", 1)["concept_rate"] == 0.0  # removing DiffMean's direction removes the concept
    assert projected.row(default, 1)["concept_rate"] == projected.row(default, 0)["concept_rate"] >= 0.9


def test_docs_quote_the_measurement(doc_numbers, load_benchmark):
    """Every number the prose of docs/probes.md states about the comparison is the committed measurement's."""
    bench = load_benchmark("probe_steering")  # the test fits exactly the benchmark's methods
    measured = TradeoffResult.from_json(bench.RESULTS / "probe_steering.json")
    projected = TradeoffResult.from_json(bench.RESULTS / "probe_projection.json")
    dirs = json.loads((bench.RESULTS / "probe_directions.json").read_text())
    doc = (ROOT / "docs" / "probes.md").read_text()
    best = bench.best_within(measured)
    default = bench.probe_name(1.0)
    mean = lambda key, m: sum(dirs[s][m][key] for s in dirs) / len(dirs)
    claims = {
        "DIFFMEAN_BEST": best["DiffMean"]["rate"],
        "PROBE_BEST": best[default]["rate"],
        "PROBE_COS": mean("cosine", default),
        "PROBE_ACC": mean("test_accuracy", default),
        "SMALL_C_COS": mean("cosine", bench.probe_name(0.01)),
        "DIFFMEAN_OUT": projected.row("DiffMean", 1)["concept_rate"],
        "PROBE_OUT": projected.row(default, 1)["concept_rate"],
        "BASE_POSITIVE": projected.row(default, 0)["concept_rate"],
    }
    for key, value in claims.items():
        m = re.search(rf"<!-- {key} -->([-0-9.]+)", doc)
        assert m, f"docs/probes.md lacks the marked number {key}"
        assert doc_numbers.close(value, m.group(1)), (key, value, m.group(1))
