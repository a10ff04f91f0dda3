"""Patching and attribution grids as distributed jobs (`cluster=`, `resume=`): split into shards
per task, or per layer of one task (patching), or per task and site (attribution), merged into
the same Results.

The single-process reference runs one torch thread, as a Ray worker does. Everything is
bit-identical to it except one task split by layer under the batched engine, which batches a
layer's patches differently alone: that agrees within float32 rounding (1e-5)."""

from __future__ import annotations

import pytest
import torch

from lenslab import LenslabError, circuits, tasks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_tasks(tiny_model):
    return [tasks.induction(tiny_model, n=3, seq_len=6, seed=s) for s in (0, 1)]


def _same(a, b):
    assert a.axes == b.axes and a.labels == b.labels and a.site == b.site and a.metric == b.metric
    assert (a.clean_value, a.corrupt_value) == (b.clean_value, b.corrupt_value)


def test_patch_on_ray_equals_one_process(ray_cluster, tiny_model, two_tasks):
    task = two_tasks[0]
    ref = circuits.patch(tiny_model, task, "z_by_pos", engine="reference", progress=False)
    got = circuits.patch(tiny_model, task, "z_by_pos", engine="reference", cluster=ray_cluster, progress=False)
    _same(got, ref)
    assert torch.equal(got.scores, ref.scores)  # bit-identical
    assert got.provenance["job"] == {"cluster": ray_cluster, "shards": 2, "split": "layer"}


def test_batched_engine_on_ray_within_rounding_and_equal_to_resumed_shards(
    ray_cluster, tiny_model, two_tasks, tmp_path
):
    task = two_tasks[1]
    one = circuits.patch(tiny_model, task, "resid_pre", progress=False)  # engine "auto": batched
    seen = []
    got = circuits.patch(tiny_model, task, "resid_pre", cluster=ray_cluster, progress=lambda d, t: seen.append((d, t)))
    _same(got, one)
    torch.testing.assert_close(got.scores, one.scores, rtol=1e-5, atol=1e-5)
    cells = 2 * task.seq_len  # 2 layers x every position, counted across workers
    assert seen[-1] == (cells, cells) and len(seen) == 2
    here = circuits.patch(tiny_model, task, "resid_pre", resume=tmp_path / "r", progress=False)  # same shards, here
    assert torch.equal(here.scores, got.scores)
    assert [e["chunks"] >= 1 for e in got.provenance["engine_details"]] == [True, True]


def test_patch_many_tasks_equals_each_task(ray_cluster, tiny_model, two_tasks):
    seen = []
    many = circuits.patch(tiny_model, two_tasks, "attn_out", cluster=ray_cluster, progress=lambda d, t: seen.append(d))
    here = circuits.patch(tiny_model, two_tasks, "attn_out", progress=False)
    assert len(many) == len(here) == 2 and many[0].provenance["job"]["split"] == "task"
    cells = 2 * two_tasks[0].seq_len  # a task's grid: 2 layers x every position
    assert two_tasks[1].seq_len == two_tasks[0].seq_len and seen == [cells, 2 * cells]
    for task, got, local in zip(two_tasks, many, here):
        ref = circuits.patch(tiny_model, task, "attn_out", progress=False)  # batched engine, whole grids: bit-identical
        _same(got, ref)
        assert torch.equal(got.scores, ref.scores) and torch.equal(local.scores, ref.scores)
    neurons = circuits.patch(tiny_model, two_tasks, "mlp_neuron", layer=1, cluster=ray_cluster, progress=False)
    assert torch.equal(neurons[1].scores, circuits.patch(tiny_model, two_tasks[1], "mlp_neuron", layer=1).scores)


def test_patch_resume_skips_finished_shards_and_refuses_another_task(tiny_model, two_tasks, tmp_path):
    seen = []
    first = circuits.patch(tiny_model, two_tasks[0], "z", resume=tmp_path / "r", progress=False)
    again = circuits.patch(
        tiny_model, two_tasks[0], "z", resume=tmp_path / "r", progress=lambda d, t: seen.append(d)
    )  # every shard loaded: nothing runs, nothing reports
    assert torch.equal(again.scores, first.scores) and seen == []
    assert len(list((tmp_path / "r").glob("task0_L*.pkl"))) == 2
    with pytest.raises(LenslabError, match="holds a different job: its fingerprint"):
        circuits.patch(tiny_model, two_tasks[1], "z", resume=tmp_path / "r", progress=False)


def test_bad_input_fails_before_any_shard(tiny_model, two_tasks, tmp_path):
    with pytest.raises(LenslabError, match="cluster must be"):
        circuits.patch(tiny_model, two_tasks[0], "z", cluster="nowhere")
    with pytest.raises(LenslabError, match="site 'zz' is not one of"):
        circuits.patch(tiny_model, two_tasks, "zz", resume=tmp_path / "r")
    with pytest.raises(LenslabError, match="empty list"):
        circuits.patch(tiny_model, [], "z")
    with pytest.raises(LenslabError, match="method 'atq' is not one of"):
        circuits.attribute(tiny_model, two_tasks, "atq", "z", resume=tmp_path / "a")
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("method", ["atp*", "relp", "ig"])
def test_attribute_on_ray_is_bit_identical(ray_cluster, tiny_model, two_tasks, method):
    sites = ["z", "resid_pre", "q_by_pos"]
    got = circuits.attribute(tiny_model, two_tasks, method, sites, steps=2, cluster=ray_cluster, progress=False)
    assert len(got) == 2
    for task, res in zip(two_tasks, got):
        ref = circuits.attribute(tiny_model, task, method, sites, steps=2, progress=False)
        assert res.sites == ref.sites and res.method == method
        for s in sites:
            _same(res[s], ref[s])
            assert torch.equal(res[s].scores, ref[s].scores), (method, s)
        assert res.provenance["job"]["shards"] == 6


def test_attribute_resume_one_task(tiny_model, two_tasks, tmp_path):
    ref = circuits.attribute(tiny_model, two_tasks[0], "atp", ["z", "mlp_out"], progress=False)
    got = circuits.attribute(tiny_model, two_tasks[0], "atp", ["z", "mlp_out"], resume=tmp_path, progress=False)
    assert isinstance(got, circuits.AttributionResult) and got.sites == ["z", "mlp_out"]
    assert all(torch.equal(got[s].scores, ref[s].scores) for s in got)
    assert len(list(tmp_path.glob("task0_*.pkl"))) == 2
