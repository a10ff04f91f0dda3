"""Sweeps as distributed jobs (lenslab.jobs): steering trade-offs, fTRI expert ranking and attribution
graphs on the session's local Ray cluster equal the single-process results, and a resume folder of an
interrupted job is picked up. Work functions live in lenslab (Ray workers import them by name); the
fit callables below are lambdas, which Ray pickles by value."""

from __future__ import annotations

import math

import pytest
import torch

import lenslab
from lenslab import labels, steering
from lenslab.cli import main
from lenslab.data import refusal
from lenslab.data import sentiment as S
from lenslab.probes import routers
from lenslab.probes.attribution_graph import attribution_graph
from lenslab.probes.graph_batch import attribution_graphs
from lenslab.probes.transcoders import load_transcoders
from lenslab.steering.tradeoff import tradeoff, tradeoff_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = [(1, 2), (1, 5), (2, 3), (2, 6)]  # zoo/moe-refusal's refusal experts (its card)


class Interrupted(Exception):
    pass


def _stop_after(n_calls: int):
    """A run_job progress callback that interrupts the job after `n_calls` finished shards."""
    calls = []

    def report(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) >= n_calls:
            raise Interrupted

    return report


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Rows equal key by key, NaN equal to NaN (an all-empty cell's in-context perplexity)."""

    def same(x, y):
        return (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) or x == y

    return len(a) == len(b) and all(r.keys() == s.keys() and all(same(r[k], s[k]) for k in r) for r, s in zip(a, b))


@pytest.fixture(scope="module")
def steer_model(zoo_models):
    return zoo_models("zoo/steer-sentiment")


@pytest.mark.slow  # about 10 s, more while the cluster's workers start (they import torch and lenslab)
def test_tradeoff_sweep_on_ray_equals_one_process(steer_model, ray_cluster):
    """methods × layers × strengths: fitted in the workers, cells in the workers, rows bit-identical."""
    pos, neg = S.prompts(8, "positive"), S.prompts(8, "negative")
    fit = {
        "DiffMean": lambda m, layer: steering.mean_difference(m, pos, neg, layers=layer),
        "ActAdd": lambda m, layer: steering.actadd(m, "the day was lovely .", "the day was awful .", layer=layer),
    }
    prompts = S.prompts(8, "negative", seed=99)
    kw = dict(strengths=(0, 1), max_new_tokens=6, progress=False)
    here = tradeoff_sweep(steer_model, fit, [0, 1], prompts, S.is_positive, **kw)
    there = tradeoff_sweep(steer_model, fit, [0, 1], prompts, S.is_positive, cluster=ray_cluster, **kw)
    assert len(here.rows) == 2 * 2 * 2
    assert _same_rows(here.rows, there.rows) and here.examples == there.examples
    # the same cells as tradeoff() on interventions fitted here: the docstring's DiffMean at layer 1
    ivs = {"DiffMean L1": steering.mean_difference(steer_model, pos, neg, layers=1)}
    one = tradeoff(steer_model, ivs, prompts, S.is_positive, **kw)
    assert _same_rows(one.rows, [{k: v for k, v in r.items() if k != "layer"} for r in there.rows[2:4]])
    assert [there.row("DiffMean L1", s)["concept_rate"] for s in (0, 1)] == [0.0, 1.0]
    assert there.row("DiffMean L1", 0)["perplexity"] == pytest.approx(79.9, abs=0.05)  # the docstring's row
    assert {r["layer"] for r in there.rows} == {0, 1}


@pytest.fixture(scope="module")
def moe():
    model = lenslab.load_model("zoo/moe-refusal", device="cpu")
    harmful, _ = refusal.prompts(48, "harmful", seed=0)
    benign, _ = refusal.prompts(48, "benign", seed=0)
    return model, harmful, benign


def test_ftri_on_ray_resumes_and_equals_one_process(moe, ray_cluster, tmp_path):
    """An interrupted sharded run (3 shards saved) is finished on the cluster, which runs only the rest;
    counts equal the single-process ranking bit for bit, gate-weight sums to float32 rounding."""
    model, harmful, benign = moe
    one = routers.ftri_rank(model, harmful, benign)
    assert sorted((layer, e) for layer, e, _ in one.top(4)) == PLANTED
    folder = tmp_path / "ftri"
    with pytest.raises(Interrupted):
        routers.ftri_rank(model, harmful, benign, resume=folder, shard_size=16, progress=_stop_after(3))
    assert len(list(folder.glob("*.pkl"))) == 3
    seen: list[int] = []
    resumed = routers.ftri_rank(
        model,
        harmful,
        benign,
        cluster=ray_cluster,
        resume=folder,
        shard_size=16,
        progress=lambda done, total: seen.append((done, total)),
    )
    total = len(harmful) + len(benign)
    n_shards = len(list(folder.glob("*.pkl")))
    assert n_shards > 3 and len(seen) == n_shards - 3 and seen[-1] == (total, total)
    assert seen[0][0] > 16  # the first report already counts the three saved shards
    for what in ("diff", "target_mean", "other_mean"):
        assert torch.equal(getattr(resumed, what), getattr(one, what)), what
    assert (resumed.n_target, resumed.n_other) == (48, 48) and resumed.top(4) == one.top(4)
    # gate weights: float sums merged in shard order agree within one float32 ulp of the means
    w_one = routers.ftri_rank(model, harmful, benign, weights=True)
    w_ray = routers.ftri_rank(model, harmful, benign, weights=True, cluster=ray_cluster, shard_size=16, progress=False)
    ulp = 2.0**-23
    torch.testing.assert_close(w_ray.target_mean, w_one.target_mean, rtol=ulp, atol=0)
    torch.testing.assert_close(w_ray.other_mean, w_one.other_mean, rtol=ulp, atol=0)
    assert sorted((layer, e) for layer, e, _ in w_ray.top(2)) == sorted((layer, e) for layer, e, _ in w_one.top(2))


def test_ftri_stats_add_across_prompt_sets(moe):
    model, harmful, benign = moe
    whole = routers.ftri_stats(model, harmful)
    parts = routers.ftri_stats(model, harmful[:20]) + routers.ftri_stats(model, harmful[20:])
    assert whole.n == parts.n == 48 and torch.equal(whole.sums, parts.sums)
    assert whole.sums.sum(1).tolist() == [float(sum(model.to_tokens(p).shape[1] for p in harmful) * 2)] * 4
    with pytest.raises(lenslab.LenslabError, match="do not add up"):
        _ = whole + routers.ftri_stats(model, harmful[:2], weights=True)


def test_attribution_graphs_on_ray_equal_one_by_one(zoo_models, ray_cluster):
    model = zoo_models("zoo/ioi-4l")
    tc = load_transcoders("zoo/ioi-4l/per-layer", model=model)
    prompts = [
        "When Mary and John went to the store, John gave a drink to",
        "When Tom and Anna went to the park, Anna gave a ball to",
    ]
    graphs = attribution_graphs(model, prompts, tc, cluster=ray_cluster, max_feature_nodes=8, progress=False)
    for p, g in zip(prompts, graphs):
        ref = attribution_graph(model, p, tc, max_feature_nodes=8)
        assert g.nodes == ref.nodes
        for what in ("adjacency", "activations", "inputs", "biases", "target_weights"):
            assert torch.equal(getattr(g, what), getattr(ref, what)), what
        assert (g.replacement_score, g.completeness_score) == (ref.replacement_score, ref.completeness_score)
    assert [model.to_string([labels.parse(g.nodes[-1]).index]) for g in graphs] == ["Mary", "Tom"]  # the IO names


def test_cli_moe_rank_and_steer_eval_with_ray(ray_cluster, tmp_path, capsys):
    """`--ray ADDRESS --resume DIR` prints what the single-process command prints."""
    rank = ["moe", "rank", "--device", "cpu", "--top-k", "4"]
    assert main([*rank, "--out", str(tmp_path / "a.json")]) == 0
    here = capsys.readouterr().out.splitlines()[:4]
    cmd = [*rank, "--out", str(tmp_path / "b.json"), "--ray", ray_cluster, "--resume", str(tmp_path / "r")]
    assert main(cmd) == 0
    assert capsys.readouterr().out.splitlines()[:4] == here
    assert (tmp_path / "r" / "manifest.json").is_file()
    ev = ["steer", "eval", "--device", "cpu", "--method", "diffmean", "--layers", "0", "1", "--n-fit", "8"]
    ev += ["--n-eval", "6", "--strengths", "0", "1", "--max-new-tokens", "4"]
    assert main(ev) == 0
    table = capsys.readouterr().out
    assert main([*ev, "--ray", ray_cluster]) == 0
    assert capsys.readouterr().out == table
    assert "| diffmean L1 | 1 |" in table
    assert main([*ev[:5], "austeer", *ev[6:]]) == 2  # --layers with a method that picks its own units
    assert "--layers: austeer" in capsys.readouterr().err
