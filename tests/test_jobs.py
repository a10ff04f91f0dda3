"""lenslab.jobs: shards in this process and on a local Ray cluster, resume folders, errors.

Work functions here are pickled by value (`register_pickle_by_value`): pytest's importlib mode
leaves this module unimportable by name in Ray workers."""

from __future__ import annotations

import os
import socket
import sys
import warnings

import pytest

from lenslab import LenslabError, jobs, toolbox


def square(x: int) -> int:
    if x < 0:
        raise LenslabError(f"payload {x} is negative; pass a non-negative int")
    return x * x


def logged_square(payload: tuple[str, int]) -> int:
    """Square, and append the payload to the log file `payload[0]` (to count what ran); 2 fails
    while the file `<log>.stop` exists (an interrupted job)."""
    log, x = payload
    if x == 2 and os.path.exists(log + ".stop"):
        raise RuntimeError("interrupted")
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * x


def model_unit_size(payload):
    """`(pid, id(model), unit size of the hook)` for a model handle and a hook name."""
    handle, hook = payload
    model = jobs.worker_model(handle)
    return os.getpid(), id(model), toolbox.hook_unit_sizes(model, [hook])[hook]


@pytest.fixture(scope="module")
def by_value():
    """Ray workers get this module's functions by value."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


# --- in this process -----------------------------------------------------------------------------
def test_in_process_order_progress_and_no_ray():
    seen = []
    shards = [jobs.Shard(f"s{i}", i, size=i + 1) for i in range(5)]
    out = jobs.run_job(square, shards, progress=lambda done, total: seen.append((done, total)))
    assert out == [0, 1, 4, 9, 16]
    assert seen == [(1, 15), (3, 15), (6, 15), (10, 15), (15, 15)]


def test_cluster_none_never_imports_ray(tmp_path):
    import subprocess

    code = (
        "import sys\nfrom lenslab import jobs\n"
        "print(jobs.run_job(abs, [jobs.Shard('a', -2)], progress=False), 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["[2]", "False"]


def test_bad_input_is_raised_as_itself_with_the_shard_named():
    with pytest.raises(LenslabError, match="payload -3 is negative") as info:
        jobs.run_job(square, [jobs.Shard("ok", 2), jobs.Shard("bad", -3)], progress=False)
    assert any("'bad'" in n for n in getattr(info.value, "__notes__", ["'bad'"]))


@pytest.mark.parametrize(
    "cluster, match",
    [("clusterx", "cluster must be"), ("host:99999", "cluster must be"), ("", "cluster must be"), (3, "cluster must")],
)
def test_parse_cluster_rejects(cluster, match):
    with pytest.raises(LenslabError, match=match):
        jobs.parse_cluster(cluster)


def test_parse_cluster_accepts():
    assert [jobs.parse_cluster(c) for c in (None, "LOCAL", " auto", "10.0.0.1:6379", "ray://head:10001")] == [
        None,
        "local",
        "auto",
        "10.0.0.1:6379",
        "ray://head:10001",
    ]


def test_shard_checks():
    with pytest.raises(LenslabError, match="appears twice"):
        jobs.run_job(square, [jobs.Shard("a", 1), jobs.Shard("a", 2)], progress=False)
    with pytest.raises(LenslabError, match="size must be"):
        jobs.run_job(square, [jobs.Shard("a", 1, size=-1)], progress=False)
    with pytest.raises(LenslabError, match="retries"):
        jobs.run_job(square, [jobs.Shard("a", 1)], retries=-1, progress=False)


def test_resume_loads_finished_shards_and_refuses_another_job(tmp_path):
    log = tmp_path / "log.txt"
    shards = [jobs.Shard(f"x/{i}", (str(log), i)) for i in range(6)]
    (tmp_path / "log.txt.stop").touch()
    with pytest.raises(RuntimeError, match="interrupted"):  # stops at shard 2: shards 0 and 1 are saved
        jobs.run_job(logged_square, shards, resume=tmp_path / "r", progress=False)
    assert len(list((tmp_path / "r").glob("*.pkl"))) == 2
    (tmp_path / "log.txt.stop").unlink()
    again = jobs.run_job(logged_square, shards, resume=tmp_path / "r", progress=False)
    assert again == [i * i for i in range(6)]
    assert [int(x) for x in log.read_text().split()] == [0, 1, 2, 3, 4, 5]  # 0 and 1 ran once, in the first run
    assert jobs.run_job(logged_square, shards, resume=tmp_path / "r", progress=False) == again  # all loaded
    assert len(log.read_text().split()) == 6
    with pytest.raises(LenslabError, match="different job: its shard keys differ"):
        jobs.run_job(logged_square, shards[:5], resume=tmp_path / "r", progress=False)
    with pytest.raises(LenslabError, match="different job: its work"):
        jobs.run_job(square, [jobs.Shard(s.key, 1) for s in shards], resume=tmp_path / "r", progress=False)
    with pytest.raises(LenslabError, match="different job: its fingerprint"):
        jobs.run_job(logged_square, shards, resume=tmp_path / "r", progress=False, fingerprint="model B")


def test_worker_model_caches_a_spec(tiny_zoo_dir):
    spec = jobs.ModelSpec(str(tiny_zoo_dir), device="cpu")
    a, b = jobs.worker_model(spec), jobs.worker_model(str(tiny_zoo_dir))
    assert a is jobs.worker_model(spec) and a.cfg.n_layers == 2
    assert b is not a  # another spec (device "auto"): its own entry
    model = object()
    assert jobs.worker_model(model) is model and jobs.share_model(model, None) is model


# --- on the session's local Ray cluster ------------------------------------------------------------
def test_ray_results_equal_in_process_in_shard_order(ray_cluster, by_value):
    shards = [jobs.Shard(f"s{i}", i, size=2) for i in range(7)]
    seen = []
    out = jobs.run_job(square, shards, cluster=ray_cluster, progress=lambda d, t: seen.append((d, t)))
    assert out == jobs.run_job(square, shards, progress=False) == [i * i for i in range(7)]
    assert seen[-1] == (14, 14) and len(seen) == 7
    assert jobs.run_job(square, shards, cluster="local", progress=False) == out  # "local" reuses the running Ray


def test_ray_bad_input_raises_the_shards_error_not_a_ray_traceback(ray_cluster, by_value):
    import ray

    shards = [jobs.Shard(f"s{i}", i) for i in range(4)] + [jobs.Shard("neg", -1)]
    with pytest.raises(LenslabError, match="payload -1 is negative") as info:
        jobs.run_job(square, shards, cluster=ray_cluster, progress=False)
    assert not isinstance(info.value, ray.exceptions.RayError)
    assert type(info.value) is LenslabError
    if hasattr(info.value, "__notes__"):
        assert info.value.__notes__ == ["(raised by shard 'neg' of the job)"]


def test_ray_wrong_hook_name_stops_the_job_with_lenslab_error(ray_cluster, by_value, tiny_model):
    handle = jobs.share_model(tiny_model, ray_cluster)
    good = [jobs.Shard(f"ok{i}", (handle, "blocks.0.attn.hook_z")) for i in range(4)]
    out = jobs.run_job(model_unit_size, good, cluster=ray_cluster, progress=False)
    assert {o[2] for o in out} == {32}  # 4 heads x d_head 8
    per_pid = {}
    for pid, ident, _ in out:  # a worker process deserialises the shipped model once
        per_pid.setdefault(pid, set()).add(ident)
    assert all(len(ids) == 1 for ids in per_pid.values()) and os.getpid() not in per_pid
    bad = good + [jobs.Shard("typo", (handle, "blocks.0.attn.hook_zz"))]
    with pytest.raises(LenslabError, match="hook 'blocks.0.attn.hook_zz' did not fire"):
        jobs.run_job(model_unit_size, bad, cluster=ray_cluster, progress=False)


def test_unreachable_address_says_so_and_falls_back_only_if_asked(ray_cluster, by_value):
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(LenslabError, match=f"the Ray cluster at {address} cannot be reached.*fallback='local'"):
        jobs.run_job(square, [jobs.Shard("a", 3)], cluster=address, progress=False)
    with pytest.raises(LenslabError, match="cannot be reached"):
        jobs.connect(address)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jobs.run_job(square, [jobs.Shard("a", 3)], cluster=address, fallback="local", progress=False) == [9]
    assert any("falling back" in str(w.message) for w in caught)


def test_another_reachable_cluster_while_connected_is_refused(ray_cluster):
    with socket.socket() as s:  # something answers, but this process is connected to ray_cluster
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(LenslabError, match="already connected to the Ray cluster"):
            jobs.connect(f"127.0.0.1:{s.getsockname()[1]}")
