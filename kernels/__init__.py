"""lenslab.kernels: the fast batched exact-patching engine (and its Triton kernels).

`lenslab.circuits.patch(..., engine="batched")` runs many patch experiments per forward, skips
the layers below and the positions before each patch, and computes named metrics from the last
position only; the scores equal the reference engine's (one forward per patch) to float32
round-off. `engine="auto"` uses it wherever it covers the site and says when it does not.

>>> import lenslab
>>> from lenslab import circuits, kernels, tasks
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = tasks.induction(model, n=4, seq_len=8, seed=0)
>>> with kernels.options(memory_budget="256MB"):
...     res = circuits.patch(model, task, "z", engine="batched")
>>> res.axes, res.scores.shape
(('layer', 'head'), torch.Size([2, 4]))

Modules: `batched` (the engine's entry points, `ENGINES`), `config` (options, memory budget),
`plan` (coverage, experiments, chunks), `runner` (the staircase of blocks), `blocks` (eager or
compiled block calls), `metric` (scores from the final residual), `triton_ops` (the Triton
metric kernel and its torch twin).
"""

from __future__ import annotations

if __name__ != "lenslab.kernels":  # imported as top-level `kernels`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `kernels`, or a clear error
else:
    import warnings

    from lenslab.kernels.batched import ENGINES, auto_engine, batched_engine
    from lenslab.kernels.config import EngineOptions, configure, current_options, memory_budget, options, parse_bytes
    from lenslab.kernels.plan import SITE_PLAN, coverage

    __all__ = [
        "ENGINES",
        "SITE_PLAN",
        "EngineOptions",
        "auto_engine",
        "batched_engine",
        "configure",
        "coverage",
        "current_options",
        "memory_budget",
        "options",
        "parse_bytes",
    ]

    def __getattr__(name: str):
        """`lenslab.kernels.batched_patch` moved to `lenslab.circuits.batched_patch` (kernels sits
        below circuits and imports none of it); this alias stays for one release."""
        if name == "batched_patch":
            from lenslab.circuits import batched_patch  # deferred: deprecated alias (pyproject: ignore_imports)

            warnings.warn(
                "lenslab.kernels.batched_patch moved to lenslab.circuits.batched_patch",
                DeprecationWarning,
                stacklevel=2,
            )
            return batched_patch
        raise AttributeError(f"module 'lenslab.kernels' has no attribute {name!r}")
