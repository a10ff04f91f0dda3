"""The batched engine's process-wide settings: its options, the memory budget of a chunk, and its warn-once notes.

`EngineOptions` holds how the engine runs; `configure(...)` changes the process default and
`options(...)` changes it inside a `with` block (both validate first). `memory_budget` turns the
options and the device into bytes per chunk; `say_once` prints each fallback or slow-path note
once per process.

>>> from lenslab import kernels
>>> with kernels.options(memory_budget="256MB") as opt:
...     kernels.parse_bytes(opt.memory_budget)
256000000
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from lenslab._errors import LenslabError, did_you_mean

__all__ = [
    "COMPILE_MODES",
    "EngineOptions",
    "configure",
    "current_options",
    "memory_budget",
    "options",
    "parse_bytes",
    "say_once",
]


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How the batched engine runs; set with `lenslab.kernels.options(...)` or `configure(...)`.

    Attributes:
        memory_budget: bytes the engine may use for activations per chunk; None derives it from
            free device memory (half of it on CUDA) or a CPU default (a quarter of available RAM,
            at most 2 GiB). Also accepts strings like "512MB", "2GiB".
        max_rows: cap on rows (experiments x prompts) per chunk; None: on CPU about 1440 tokens
            per block call (960 with one torch thread; bigger batches fall out of cache), on GPU
            only the memory budget.
        position_skip: recompute only positions >= the patched one where the site allows it.
        skip_unchanged: exact shortcuts where a patch writes the base run's own values (bitwise,
            in every prompt): such a patch is the unpatched base run, so it is scored from that run
            and not run; a patch over all positions (a head's output, a neuron) whose values equal
            the base run's before position f recomputes only positions >= f (counterfactual prompts
            usually share a prefix: positions before the first differing token are unchanged).
        fused_metric: compute named metrics from the last position only (never full logits).
        triton: "auto" (Triton kernels on CUDA when triton is importable), True (require them),
            False (pure torch).
        compile: opt-in `torch.compile` of the block forward of the staircase: False (eager,
            default), True (= "default"), or a torch.compile mode: "default",
            "reduce-overhead" (CUDA graphs on a GPU), "max-autotune",
            "max-autotune-no-cudagraphs". One compiled function serves every block (parameters
            are graph inputs, shapes dynamic); the block where a hook site is patched runs eager.
            Compilation costs tens of seconds per process on CPU; see benchmarks/RESULTS.md for
            where it pays. Not used under `torch.inference_mode()` (a dynamo guard on
            TransformerLens' attention scale fails there): it runs eager and says so.
        compile_backend: the torch.compile backend ("inductor"; "aot_eager" or a backend callable
            trace without code generation, e.g. for tests).
    """

    memory_budget: int | str | None = None
    max_rows: int | None = None
    position_skip: bool = True
    skip_unchanged: bool = True
    fused_metric: bool = True
    triton: bool | str = "auto"
    compile: bool | str = False
    compile_backend: str | Callable = "inductor"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_OPTIONS = [EngineOptions()]


def configure(**kwargs) -> EngineOptions:
    """Change the engine's default options for this process; returns the new options."""
    _OPTIONS[0] = _validated(replace(_OPTIONS[0], **kwargs))
    return _OPTIONS[0]


@contextlib.contextmanager
def options(**kwargs) -> Iterator[EngineOptions]:
    """Temporarily change engine options: `with kernels.options(memory_budget="256MB"): ...`."""
    old = _OPTIONS[0]
    _OPTIONS[0] = _validated(replace(old, **kwargs))
    try:
        yield _OPTIONS[0]
    finally:
        _OPTIONS[0] = old


def current_options() -> EngineOptions:
    """The options the engine runs with now (the process default, or the innermost `options(...)` block)."""
    return _OPTIONS[0]


def _validated(opt: EngineOptions) -> EngineOptions:
    """`opt` itself, or a LenslabError naming the first field with an invalid value."""
    if opt.memory_budget is not None:
        parse_bytes(opt.memory_budget)
    if opt.max_rows is not None and (not isinstance(opt.max_rows, int) or opt.max_rows < 1):
        raise LenslabError(f"max_rows={opt.max_rows!r} must be a positive integer (or None for automatic)")
    if opt.triton not in (True, False, "auto"):
        raise LenslabError(f"triton={opt.triton!r} must be True, False or 'auto'")
    if opt.compile not in (True, False) and opt.compile not in COMPILE_MODES:
        raise LenslabError(
            f"compile={opt.compile!r} must be True, False or a torch.compile mode "
            f"({', '.join(COMPILE_MODES)}){did_you_mean(str(opt.compile), COMPILE_MODES)}"
        )
    if not callable(opt.compile_backend) and (not isinstance(opt.compile_backend, str) or not opt.compile_backend):
        raise LenslabError(
            f"compile_backend={opt.compile_backend!r} must be a torch.compile backend (a name "
            "such as 'inductor' or 'aot_eager', or a backend callable)"
        )
    return opt


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """`1_000_000`, "512MB", "2GiB" -> bytes."""
    if isinstance(value, bool):
        raise LenslabError(f"memory_budget={value!r} must be a number of bytes or a string like '512MB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise LenslabError(f"memory_budget={value!r} must be positive")
        return int(value)

    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]i?b|b)?\s*", str(value).lower())
    if not m:
        raise LenslabError(f"memory_budget={value!r} must be bytes or a string like '512MB' or '2GiB'")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2) or "b"]))


def memory_budget(device: torch.device, opt: EngineOptions | None = None) -> int:
    """Bytes available to one chunk: the override, else half the free CUDA memory, else a CPU default."""
    opt = opt or current_options()
    if opt.memory_budget is not None:
        return parse_bytes(opt.memory_budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(2 * 2**30, avail // 4) if avail else 2 * 2**30


_SAID: set[str] = set()


def say_once(msg: str) -> None:
    """Warn once per process per message (fallbacks, slow paths)."""
    if msg not in _SAID:
        _SAID.add(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
