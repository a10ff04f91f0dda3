"""lenslab.kernels: the fast batched exact-patching engine (and its Triton kernels).

`lenslab.circuits.patch(..., engine="batched")` runs many patch experiments per forward, skips
the layers below and the positions before each patch, and computes named metrics from the last
position only; the scores equal the reference engine's (one forward per patch) to float32
round-off. `engine="auto"` uses it wherever it covers the site and says when it does not.

>>> import lenslab
>>> from lenslab import circuits, kernels, tasks
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")  # doctest: +SKIP
>>> task = tasks.induction(model, n=4, seq_len=8, seed=0)  # doctest: +SKIP
>>> with kernels.options(memory_budget="256MB"):  # doctest: +SKIP
...     res = circuits.patch(model, task, "z", engine="batched")
"""
from __future__ import annotations

from lenslab.kernels.batched import (
    SITE_PLAN,
    EngineOptions,
    auto_engine,
    batched_engine,
    configure,
    coverage,
    current_options,
    memory_budget,
    options,
    parse_bytes,
)

ENGINES = {"batched": batched_engine, "auto": auto_engine}


def batched_patch(model, task, site: str, *, direction: str = "denoise", metric="logit_diff", layer: int | None = None,
                  layers=None, progress=True, **engine_options):
    """`lenslab.circuits.patch(..., engine="batched")` with engine options for this call.

    Args:
        engine_options: fields of `EngineOptions` (memory_budget="512MB", max_rows=..., position_skip=...,
            fused_metric=..., triton=...).

    Returns:
        The same `PatchResult` as the reference engine (provenance says engine="batched").
    """
    from lenslab import circuits

    with options(**engine_options):
        return circuits.patch(model, task, site, direction=direction, metric=metric, engine="batched", layer=layer,
                              layers=layers, progress=progress)


__all__ = [
    "ENGINES",
    "SITE_PLAN",
    "EngineOptions",
    "auto_engine",
    "batched_engine",
    "batched_patch",
    "configure",
    "coverage",
    "current_options",
    "memory_budget",
    "options",
    "parse_bytes",
]
