"""Faults lose nothing (issue 19): a worker killed in the middle of a shard is retried, a driver
killed as a whole resumes from its saved shards, and the merged results equal one process.

Things are really killed here: a worker SIGKILLs its own process on a shard's first attempt, and
a driver subprocess connected to the session's Ray cluster is SIGKILLed after a few shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lenslab import LenslabError, jobs

pytestmark = pytest.mark.usefixtures("one_thread")  # Ray workers run one torch thread too


def killed_once_mix(payload):
    """`tanh(x @ W)` for a fixed W; the first attempt of a shard whose marker path ends in "kill"
    SIGKILLs its own worker process (the marker file remembers that it did). Every attempt
    appends its process id to `<marker>.attempts`."""
    x, marker = payload
    with open(marker + ".attempts", "a") as f:
        f.write(f"{os.getpid()}\n")
    if marker.endswith("kill") and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    w = torch.linspace(-1, 1, x.shape[-1] * 16).reshape(x.shape[-1], 16)
    return torch.tanh(x @ w)


@pytest.fixture(scope="module")
def by_value():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def always_killed(payload):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried_and_the_result_is_identical(ray_cluster, by_value, tmp_path):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 32, generator=gen) for _ in range(4)]
    expected = jobs.run_job(
        killed_once_mix, [jobs.Shard(f"s{i}", (x, str(tmp_path / f"ref{i}"))) for i, x in enumerate(xs)]
    )
    markers = [str(tmp_path / f"shard{i}{'-kill' if i == 1 else ''}") for i in range(4)]
    shards = [jobs.Shard(f"s{i}", (x, m)) for i, (x, m) in enumerate(zip(xs, markers))]
    out = jobs.run_job(killed_once_mix, shards, cluster=ray_cluster)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    attempts = [Path(m + ".attempts").read_text().split() for m in markers]
    assert [len(a) for a in attempts] == [1, 2, 1, 1]  # the killed shard ran again, in a new process
    assert attempts[1][0] != attempts[1][1] and Path(markers[1]).exists()


def test_worker_killed_beyond_retries_is_a_clear_error(ray_cluster, by_value):
    with pytest.raises(LenslabError, match="shard 'doomed' was lost: its worker process died 1 time "):
        jobs.run_job(always_killed, [jobs.Shard("doomed", 0)], cluster=ray_cluster, retries=0, progress=False)


def slow_square(payload):
    """x * x after 0.3 s, logging x to the file `log` (to count what ran)."""
    log, x = payload
    time.sleep(0.3)
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x * x


def driver_shards(log) -> list:
    return [jobs.Shard(f"s{i}", (str(log), i)) for i in range(12)]


# A driver in its own process: this module loaded under its pytest name (so the resume manifest
# names the same work function as a rerun here), the job run on the test's cluster.
DRIVER = """
import importlib.util, sys
import ray
from lenslab import jobs
name, path, address, resume, log = sys.argv[1:6]
spec = importlib.util.spec_from_file_location(name, path)
mod = importlib.util.module_from_spec(spec)
sys.modules[name] = mod
spec.loader.exec_module(mod)
ray.cloudpickle.register_pickle_by_value(mod)
jobs.run_job(mod.slow_square, mod.driver_shards(log), cluster=address, resume=resume, progress=False)
"""


@pytest.mark.slow
def test_killed_driver_resumes_from_its_saved_shards(ray_cluster, by_value, tmp_path):
    resume = tmp_path / "resume"
    args = [__name__, __file__, ray_cluster, str(resume), str(tmp_path / "log1.txt")]
    first = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(resume.glob("s*.pkl"))) < 3:
            assert first.poll() is None, f"the driver ended before it was killed:\n{first.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the driver saved no 3 shards within 120 s"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        first.stderr.close()
    saved = {p.name.rsplit("-", 1)[0] for p in resume.glob("s*.pkl")}
    assert 3 <= len(saved) < 12

    out = jobs.run_job(slow_square, driver_shards(tmp_path / "log2.txt"), cluster=ray_cluster, resume=resume)
    assert out == [i * i for i in range(12)]
    rerun = {f"s{x}" for x in (tmp_path / "log2.txt").read_text().split()}
    assert rerun == {f"s{i}" for i in range(12)} - saved  # the saved shards were loaded, not recomputed
