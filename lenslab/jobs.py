"""Distributed jobs: one long workload split into shards, run in this process or on a Ray cluster.

An area splits its work into `Shard`s (a stable key, a picklable payload, a size in units of
work), calls `run_job(work, shards, cluster=...)`, and merges the per-shard results into its own
Result type. The same call runs in this process one shard after another (`cluster=None`, the
default; Ray is never imported), on a Ray started here (`cluster="local"`), on the running cluster
(`"auto"`, after `ray start --head`) or on a cluster by address (`"host:port"`,
`"ray://host:port"`). Ray is the optional extra `lenslab[ray]`; lenslab schedules nothing itself.

What a job promises (docs/scaling.md):

- **Results in shard order**, whatever order workers finish in; a work function that is
  deterministic gives the same list on every cluster.
- **A dead worker is retried** (Ray's `max_retries=retries`): a worker process killed in the
  middle of a shard (out of memory, a lost node) runs the shard again elsewhere.
- **A bad shard stops the job**: an exception the work function raises (bad input) is not
  retried; the job cancels what is left and raises that shard's exception as itself, with a note
  naming the shard, never a Ray traceback.
- **Resume**: with `resume=folder` each finished shard's result is written there (atomically)
  as it arrives; a rerun with the same folder loads those and runs only the rest. A manifest
  (the work function's name, the shard keys, an optional fingerprint) refuses a folder that holds
  a different job. The files are pickles written by the job for itself: resume only from folders
  you wrote (the same trust as `torch.load`).
- **One progress bar** on the driver counts the units of work finished across all workers.

Writing a workload (how circuits' patching and attribution grids, steering sweeps, fTRI ranking
and SAE indexing use it):

1. The work function is a module-level function of an installed module (lenslab's areas are), so
   Ray workers import it by name; it takes one payload and returns a picklable result.
2. Give each shard a key that names its content (`"task3/layers0-1"`): the key names the resume
   file and appears in error messages.
3. A model reaches the work function through the payload as a *model handle*:
   `handle = share_model(model, cluster)` (an in-memory model: shipped once through Ray's object
   store, `ray.put`; with `cluster=None` the model object itself) or a `ModelSpec` / model name
   (each worker loads it). In the work function, `worker_model(handle)` returns the model, loaded
   or deserialised once per worker process and cached.
4. Run inner loops with `progress=False`; the job's bar counts shards (`Shard.size` units each).
5. Pass `fingerprint=` (the inputs the keys do not name: model name, options, a data hash) so a
   resume folder refuses another job's shards, and `num_gpus=1` when each shard needs a GPU.
6. Merge in the area so that `cluster=None` and a cluster give the same Result; test it on the
   session's local cluster (the `ray_cluster` fixture of tests/conftest.py gives its address;
   test-module work functions need `ray.cloudpickle.register_pickle_by_value(module)`).

>>> shards = [Shard(key=f"n{i}", payload=i) for i in range(4)]
>>> run_job(abs, shards, progress=False)
[0, 1, 2, 3]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from lenslab._errors import LenslabError
from lenslab.models import load_model

__all__ = [
    "ModelSpec",
    "Shard",
    "connect",
    "parse_cluster",
    "run_job",
    "share_model",
    "worker_model",
]

R = TypeVar("R")

CLUSTER_HELP = (
    "None (this process), 'local' (start Ray here), 'auto' (the running cluster, `ray start --head`) or "
    "an address 'host:port' / 'ray://host:port'"
)
_ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_INSTALL_HINT = "install the extra: pip install 'lenslab[ray]'"


@dataclass(frozen=True)
class Shard:
    """One unit of a job: `work(payload)` runs it.

    Attributes:
        key: a stable id, unique within the job (names its resume file and its errors).
        payload: the work function's picklable input.
        size: units of work it holds, for the job's progress bar.
    """

    key: str
    payload: Any
    size: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """A model each worker loads itself: `load_model(name, device=device, dtype=dtype)`.

    Cheaper than shipping weights for a model every worker can reach (a zoo name, a folder on a
    shared disk, a Hugging Face id in each machine's cache).
    """

    name: str
    device: str = "auto"
    dtype: str | None = None


def parse_cluster(cluster: str | None) -> str | None:
    """`cluster` checked and normalised: None, "local", "auto" or an address ("host:port",
    "ray://host:port"). Raises a `LenslabError` for anything else."""
    if cluster is None:
        return None
    if not isinstance(cluster, str) or not cluster.strip():
        raise LenslabError(f"cluster must be {CLUSTER_HELP}; got {cluster!r}")
    c = cluster.strip()
    if c.lower() in ("local", "auto"):
        return c.lower()
    m = _ADDRESS.match(c)
    if m is None or not 0 < int(m.group(3)) < 65536:
        raise LenslabError(f"cluster must be {CLUSTER_HELP}; got {cluster!r}")
    return c


def _ray():
    try:
        import ray  # deferred: optional extra (lenslab[ray]); cluster=None never imports it
    except ImportError:
        raise LenslabError(f"cluster= needs Ray, which is not installed; {_INSTALL_HINT}") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    m = _ADDRESS.match(address)
    return m.group(2).strip("[]"), int(m.group(3))


def _reachable(address: str, timeout: float) -> str | None:
    """None when a TCP connection to `address` opens within `timeout` s, else why not."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _same_address(a: str, b: str | None) -> bool:
    if not b:
        return False
    try:
        (ha, pa), (hb, pb) = _host_port(a), _host_port(b)
        return pa == pb and socket.gethostbyname(ha) == socket.gethostbyname(hb)
    except (AttributeError, OSError):
        return a == b


def _current_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client sessions have no GCS address on the driver
        return None


_CONNECT_LOCK = threading.Lock()


def connect(
    cluster: str, *, num_cpus: int | None = None, fallback: str | None = None, timeout: float = 10.0
) -> str | None:
    """Connect this process to Ray (or start one) and return the cluster's address.

    A Ray already initialised in this process is reused for "local", "auto" and its own
    address; another address raises (call `ray.shutdown()` first). A Ray started for "local" stays
    up until the process exits, so later jobs start at once.

    Args:
        cluster: "local", "auto" or an address (see `parse_cluster`).
        num_cpus: CPUs of a Ray started for "local" (None: all of this machine's).
        fallback: "local" starts a local Ray when the cluster cannot be reached (with a warning);
            None (the default) raises instead.
        timeout: seconds to wait for an address to answer.

    Raises:
        LenslabError: Ray is not installed, no cluster runs ("auto"), or the address does not answer.
    """
    kind = parse_cluster(cluster)
    if kind is None:
        raise LenslabError("connect() needs a cluster; cluster=None runs jobs in this process without Ray")
    if fallback not in (None, "local"):
        raise LenslabError(f"fallback must be None or 'local', got {fallback!r}")
    ray = _ray()
    with _CONNECT_LOCK:
        current = _current_address(ray) if ray.is_initialized() else None
        if ray.is_initialized() and (kind in ("local", "auto") or current is None or _same_address(kind, current)):
            return current
        if kind == "local":
            return _start_local(ray, num_cpus)
        why = None if kind == "auto" else _reachable(kind, timeout)
        if why is None and ray.is_initialized():
            raise LenslabError(
                f"this process is already connected to the Ray cluster at {current}, not {kind}; "
                "call ray.shutdown() before connecting to another cluster"
            )
        if why is None:
            try:
                ray.init(address=kind)
                return _current_address(ray)
            except Exception as err:  # ConnectionError, TimeoutError, Ray's AuthenticationError, ...
                why = f"{type(err).__name__}: {err}"
                if ray.is_initialized():
                    ray.shutdown()
        where = "no running Ray cluster was found (start one with `ray start --head`)" if kind == "auto" else ""
        where = where or f"the Ray cluster at {kind} cannot be reached ({why})"
        if fallback == "local":
            local = f"the Ray this process already runs ({current})" if ray.is_initialized() else "a local Ray"
            warnings.warn(f"{where}; falling back to {local} (fallback='local')", stacklevel=3)
            return current if ray.is_initialized() else _start_local(ray, num_cpus)
        raise LenslabError(
            f"{where}; check the address (`ray status` on the head node prints it), "
            "or pass fallback='local' to run on a local Ray instead"
        )


def _start_local(ray, num_cpus: int | None) -> str | None:
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    return _current_address(ray)


# --- models in workers ------------------------------------------------------------------------
MODEL_CACHE_SIZE = 2  # models one worker process keeps (the least recently used goes first)
_MODELS: OrderedDict = OrderedDict()
_MODELS_LOCK = threading.Lock()


def share_model(model, cluster: str | None):
    """A handle that carries `model` to a job's workers: the model itself for `cluster=None`;
    otherwise one copy in Ray's object store (`ray.put`, connecting first), which each worker
    process deserialises once (`worker_model`). A `ModelSpec` or a model name passes through:
    each worker loads it."""
    if cluster is None or isinstance(model, (str, ModelSpec)):
        return model
    connect(cluster)
    return _ray().put(model)


def worker_model(handle):
    """The model behind `handle`, in a work function: a model object as is; a `ModelSpec` or a
    name loaded with `load_model`, an object-store reference fetched; both cached per process
    (`MODEL_CACHE_SIZE` models), so a worker that runs several shards loads its model once."""
    if isinstance(handle, (str, Path)):
        handle = ModelSpec(str(handle))
    if isinstance(handle, ModelSpec):
        key = ("spec", handle)
    elif type(handle).__name__ == "ObjectRef":
        key = ("ref", handle.hex())
    else:
        return handle
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
    if key[0] == "spec":
        model = load_model(handle.name, device=handle.device, dtype=handle.dtype)
    else:
        model = _ray().get(handle)
        with contextlib.suppress(AttributeError):
            model.eval()
    with _MODELS_LOCK:
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    return model


# --- resume folders ---------------------------------------------------------------------------
def _work_name(work: Callable) -> str:
    return f"{getattr(work, '__module__', '?')}.{getattr(work, '__qualname__', type(work).__name__)}"


def _shard_file(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:60]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pkl"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Resume:
    """A job's resume folder: manifest.json and one pickle per finished shard."""

    VERSION = 1

    def __init__(self, folder: str | Path, work: Callable, keys: list[str], fingerprint: str | None):
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise LenslabError(f"resume={str(folder)!r} is a file; pass a folder (it is created if missing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"lenslab_job": self.VERSION, "work": _work_name(work), "fingerprint": fingerprint, "keys": keys}
        path = self.folder / "manifest.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None
            if not isinstance(old, dict) or old.get("lenslab_job") != self.VERSION:
                raise LenslabError(f"resume folder {str(self.folder)!r} has no readable job manifest; use a new folder")
            for what in ("work", "fingerprint", "keys"):
                if old.get(what) != manifest[what]:
                    shown = {"keys": "shard keys"}.get(
                        what, f"{what} ({old.get(what)!r} there, {manifest[what]!r} now)"
                    )
                    raise LenslabError(
                        f"resume folder {str(self.folder)!r} holds a different job: its {shown} differ; "
                        "pass a new folder, or delete this one to start over"
                    )
        else:
            _atomic_write(path, (json.dumps(manifest, indent=1) + "\n").encode())

    def path(self, key: str) -> Path:
        return self.folder / _shard_file(key)

    def load(self, key: str) -> tuple[bool, Any]:
        p = self.path(key)
        if not p.is_file():
            return False, None
        try:
            with open(p, "rb") as f:
                return True, pickle.load(f)
        except Exception as err:  # an unreadable file is recomputed, not trusted
            warnings.warn(
                f"resume file {p.name} of shard {key!r} is unreadable ({err}); running it again", stacklevel=4
            )
            return False, None

    def save(self, key: str, result: Any) -> None:
        _atomic_write(self.path(key), pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


# --- running ----------------------------------------------------------------------------------
def run_shard(work: Callable[[Any], R], payload: Any) -> R:
    """What a Ray task runs: `work(payload)` (a module-level function, so workers import it)."""
    return work(payload)


def _named(err: BaseException, key: str) -> BaseException:
    if hasattr(err, "add_note"):
        err.add_note(f"(raised by shard {key!r} of the job)")
    return err


def _check_shards(shards: Sequence[Shard]) -> list[Shard]:
    out = list(shards)
    seen: set[str] = set()
    for s in out:
        if not isinstance(s, Shard):
            raise LenslabError(f"run_job takes a sequence of jobs.Shard, got a {type(s).__name__}")
        if not isinstance(s.key, str) or not s.key:
            raise LenslabError(f"every shard needs a non-empty string key, got {s.key!r}")
        if s.key in seen:
            raise LenslabError(f"shard key {s.key!r} appears twice; keys must be unique within a job")
        if not isinstance(s.size, int) or s.size < 0:
            raise LenslabError(f"shard {s.key!r}: size must be a non-negative int, got {s.size!r}")
        seen.add(s.key)
    return out


def run_job(
    work: Callable[[Any], R],
    shards: Sequence[Shard],
    *,
    cluster: str | None = None,
    resume: str | Path | None = None,
    retries: int = 3,
    desc: str = "job",
    progress: bool | Callable[[int, int], None] = True,
    num_cpus: int | None = None,
    num_gpus: float = 0,
    fallback: str | None = None,
    fingerprint: str | None = None,
) -> list[R]:
    """Run `work(shard.payload)` for every shard; return the results in shard order.

    Args:
        work: a module-level function of an installed module (Ray workers import it by name).
        shards: the job's `Shard`s, keys unique.
        cluster: None (this process, one shard after another, no Ray); "local" (start Ray here,
            `ray.init(num_cpus=num_cpus)`); "auto" (the running cluster, `ray start --head`; an
            error if none); an address "host:port" / "ray://host:port" (a `LenslabError` if it
            does not answer).
        resume: a folder: each finished shard's result is saved there when it arrives, and a
            rerun with the same folder loads finished shards instead of running them.
        retries: how often a shard whose worker process died is run again (Ray's `max_retries`).
            An exception raised by `work` is never retried.
        desc: the progress bar's label.
        progress: True draws one tqdm bar counting `Shard.size` units finished across all
            workers; a callable receives `(units_done, units_total)`; False reports nothing.
        num_cpus: CPUs of a Ray started for "local".
        num_gpus: GPUs each shard's Ray task asks for (0: CPU only; 1: one GPU per worker).
        fallback: "local" runs on a local Ray when the cluster cannot be reached; None raises.
        fingerprint: a string naming the job's inputs beyond the keys (a model name, a task
            hash); stored in the resume manifest, and a rerun with another refuses the folder.

    Returns:
        `[work(s.payload) for s in shards]`, in shard order.

    Raises:
        The first exception a shard's `work` raised, as itself (a note names the shard); a
        `LenslabError` when a shard's worker died more than `retries` times, for a bad
        `cluster`, or for a resume folder that holds another job.
    """
    shards = _check_shards(shards)
    kind = parse_cluster(cluster)
    if not isinstance(retries, int) or retries < 0:
        raise LenslabError(f"retries must be an int >= 0, got {retries!r}")
    store = _Resume(resume, work, [s.key for s in shards], fingerprint) if resume is not None else None
    results: dict[int, Any] = {}
    if store is not None:
        for i, s in enumerate(shards):
            found, value = store.load(s.key)
            if found:
                results[i] = value
    total = sum(s.size for s in shards)
    done = sum(shards[i].size for i in results)
    bar = tqdm(total=total, initial=done, desc=desc, leave=False) if progress is True else None
    units = [done]

    def finish(i: int, value: Any) -> None:
        if store is not None:
            store.save(shards[i].key, value)
        results[i] = value
        units[0] += shards[i].size
        if bar is not None:
            bar.update(shards[i].size)
        elif callable(progress):
            progress(units[0], total)

    todo = [i for i in range(len(shards)) if i not in results]
    try:
        if kind is None:
            for i in todo:
                try:
                    value = work(shards[i].payload)
                except Exception as err:
                    _named(err, shards[i].key)
                    raise
                finish(i, value)
        elif todo:
            _run_on_ray(work, shards, todo, finish, kind, retries, num_cpus, num_gpus, fallback)
    finally:
        if bar is not None:
            bar.close()
    return [results[i] for i in range(len(shards))]


def _run_on_ray(work, shards, todo, finish, kind, retries, num_cpus, num_gpus, fallback) -> None:
    connect(kind, num_cpus=num_cpus, fallback=fallback)
    ray = _ray()
    from ray import exceptions as rex  # deferred: optional extra (lenslab[ray])

    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=retries, retry_exceptions=False)(run_shard)
    work_ref = ray.put(work)
    pending = {task.remote(work_ref, shards[i].payload): i for i in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                key = shards[i].key
                try:
                    value = ray.get(ref)
                except rex.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, Exception):
                        raise _named(cause.with_traceback(None), key) from None
                    raise LenslabError(f"shard {key!r} failed: {str(err).strip().splitlines()[-1]}") from None
                except rex.RayError as err:
                    raise LenslabError(
                        f"shard {key!r} was lost: its worker process died {retries + 1} time{'s' if retries else ''} "
                        f"({type(err).__name__}; out of memory, or a node went away?); finished shards are "
                        "kept when resume= names a folder: rerun with it, or raise retries="
                    ) from None
                finish(i, value)
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
