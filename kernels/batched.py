"""The batched exact-patching engine: many patch experiments per forward, same numbers as the reference.

TransformerLens `patching` (and lenslab's reference engine) runs one full forward, with full
logits, per patch. This engine computes the *same* scores with far less work:

* **Batching.** Patch experiments are stacked along the batch: an experiment is one cell of the
  grid (e.g. resid_pre at layer 3, position 5) applied to all `batch` prompts, so it owns `batch`
  rows. A per-row table (which experiment, which prompt, which position/head/neuron) drives the
  patch, so one forward serves many experiments.
* **Layer skipping** (TransformerLens `start_at_layer`; ACDC in auto-circuit). Layers
  below the patched one are the same as in the unpatched base run, so an experiment at layer L
  joins the batch at block L, starting from the cached base residual `resid_pre[L]`. Blocks are
  run one by one with a growing batch (a "staircase").
* **Position skipping.** Under causal attention a patch at position p cannot change positions
  < p. Experiments at position p run only positions p..S-1; the keys/values of earlier positions
  come from the base run's cache (a frozen `TransformerLensKeyValueCacheEntry` per layer).
* **Fused metric.** Named metrics are computed from the last position only: the final LayerNorm
  of the last residual, then only the two answer columns of the unembedding for `logit_diff` /
  `logit_diff_normalized`, or the last-position vocabulary row for `answer_prob` / `kl_to_clean`.
  `[rows, pos, vocab]` logits are never formed. A callable metric still works (full logits,
  rebuilt from the cached base logits for skipped positions; slower, and it says so once).
* **Unchanged patches.** A patch whose values equal the base run's own, bitwise in every prompt
  (e.g. a position before the first token where clean and corrupt differ), is scored from the
  base run without a forward; a patch over all positions starts at the first position it changes.
* **Chunking** by a memory budget (free device memory, or a CPU default; overridable with
  `lenslab.kernels.options(memory_budget=...)`), with a progress bar.

The engine is split along its data flow; this module holds the entry points (`batched_engine`,
`auto_engine`, `ENGINES`) that tie the parts together, and re-exports the parts' public names:

* `lenslab.kernels.config`: `EngineOptions`, `configure` / `options` / `current_options`, the
  memory budget of a chunk, the warn-once notes;
* `lenslab.kernels.plan`: site coverage, one `Experiment` per grid cell, `Chunk`s by budget;
* `lenslab.kernels.runner`: the staircase that runs a chunk's rows through the blocks;
* `lenslab.kernels.blocks`: how a block is called (eager or `torch.compile`d, one-pass GELU);
* `lenslab.kernels.metric`: the scores from the final residual (fused metric paths);
* `lenslab.kernels.triton_ops`: the Triton metric kernel and its torch twin.

Cost model and measurements: /benchmarks/RESULTS.md and the kernels docs page. On a 2-core CPU
the GPT-2-small resid_pre grid of the benchmark's IOI-like prompts is 30-38x faster than
TransformerLens' loop (8-10x on prompts that share no prefix: see `skip_unchanged`).

>>> import lenslab
>>> from lenslab import circuits, tasks
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = tasks.induction(model, n=4, seq_len=8, seed=0)
>>> res = circuits.patch(model, task, "resid_pre", engine="batched")
>>> res.axes, res.scores.shape   # one score per layer and position of the 16-token prompts
(('layer', 'pos'), torch.Size([2, 16]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lenslab import sites, tasks
from lenslab._errors import LenslabError
from lenslab.kernels.blocks import block_runner, compile_mode, fused_activations
from lenslab.kernels.config import (
    COMPILE_MODES,
    EngineOptions,
    configure,
    current_options,
    memory_budget,
    options,
    parse_bytes,
    say_once,
)
from lenslab.kernels.metric import MetricPlan, float32_logits, unembed_pair, want_triton
from lenslab.kernels.plan import (
    SITE_PLAN,
    attention_mask_needed,
    coverage,
    experiments,
    last_block_trim_ok,
    plan_chunks,
    position_skip_ok,
    skip_unchanged,
)
from lenslab.kernels.runner import Progress, StaircaseRunner
from lenslab.results import PatchResult

__all__ = [
    "COMPILE_MODES",
    "ENGINES",
    "SITE_PLAN",
    "EngineOptions",
    "auto_engine",
    "batched_engine",
    "block_runner",
    "configure",
    "coverage",
    "current_options",
    "float32_logits",
    "fused_activations",
    "memory_budget",
    "options",
    "parse_bytes",
    "say_once",
    "unembed_pair",
]


def batched_engine(
    model, task, site, *, direction: str, metric, layers: Sequence[int], layer: int | None = None, progress=True
) -> PatchResult | None:
    """The `engine="batched"` entry point of `lenslab.circuits.patch` (same result layout as the
    reference engine); None where it does not cover the site or model (said once): circuits then
    runs the reference engine.

    `metric` is a metric name, a callable or a bound `tasks.Metric`; a name is bound from the
    engine's own two unpatched runs (no extra forwards for the clean/corrupt baselines).
    """
    reason = coverage(model, site)
    if reason is not None:
        say_once(f"{reason}; falling back to the reference engine (one forward per patch)")
        return None
    tasks.check_metric(metric)
    opt = current_options()
    dev = next(model.parameters()).device
    use_triton = want_triton(opt, dev)
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    st = site
    base_tokens, source_tokens = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    batch, seq_len = task.batch, task.seq_len
    kv_ok = bool(opt.position_skip and position_skip_ok(model))  # cached keys/values may stand in for a prefix
    pos_skip = kv_ok and SITE_PLAN[st.name][1]
    hook_layers = [layer] if st.kind == "neuron" else list(layers)
    src_names = {st.hook.format(layer=l) for l in hook_layers}
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    bound = None if isinstance(metric, str) else tasks.get_metric(metric, model, task)
    full_logits = not opt.fused_metric or (bound is not None and bound.per_prompt is None)

    with torch.no_grad():
        _, source_cache = model.run_with_cache(
            source_tokens, names_filter=lambda n: n in src_names or n == final, return_type=None
        )
        grid = sites.grid(model, st, task, hook_layers if st.kind != "neuron" else list(layers), source_cache, layer)
        exps = experiments(st, grid, n_layers, pos_skip, layer)
        min_join = min(e.join for e in exps)
        base_names = {f"blocks.{l}.hook_resid_pre" for l in range(min_join, n_layers)} | src_names | {final}
        if kv_ok:
            base_names |= {f"blocks.{l}.attn.hook_{kv}" for l in range(min_join, n_layers) for kv in "kv"}
        if cfg.positional_embedding_type == "shortformer":
            base_names.add("hook_pos_embed")
        base_logits, base_cache = model.run_with_cache(
            base_tokens,
            names_filter=lambda n: n in base_names,
            return_type="logits" if full_logits else None,
        )
        if bound is None:  # the baselines from the two runs above
            base_last, source_last = (tasks.logits_of_last(model, c[final][:, -1]) for c in (base_cache, source_cache))
            pair = (source_last, base_last) if direction == "denoise" else (base_last, source_last)
            bound = tasks.get_metric(metric, model, task, last=pair)
        mplan = MetricPlan(model, task, bound, opt)
        mplan.base_logits = base_logits
        unchanged: list = []
        if opt.skip_unchanged:
            exps, unchanged = skip_unchanged(st, exps, source_cache, base_cache, kv_ok)
        attn_mask = None
        if attention_mask_needed(model):
            from transformer_lens import utils as tl_utils  # deferred: transformer_lens is heavy to import

            attn_mask = tl_utils.get_attention_mask(model.tokenizer, base_tokens, model.cfg.default_prepend_bos).to(dev)

        elem = torch.finfo(cfg.dtype).bits // 8 if cfg.dtype.is_floating_point else 4
        chunks = plan_chunks(exps, cfg, seq_len, batch, dev, elem, mplan.vocab_bytes_per_row, opt)
        shape = [len(v) for v in grid]
        scores = torch.zeros(math.prod(shape), dtype=torch.float32)
        report = Progress(progress, len(exps) + len(unchanged), f"patching {st.name} (batched)")
        if unchanged:  # each of these patched runs is the base run itself
            base_score = mplan.scores(base_cache[final], torch.arange(batch, device=dev), 0, use_triton)
            scores[torch.tensor([e.cell for e in unchanged], dtype=torch.long)] = base_score.float().cpu()
            report(len(unchanged))
        runner = StaircaseRunner(model, st, source_cache, base_cache, batch, seq_len, attn_mask, pos_skip)
        runner.trim_last = mplan.mode != "callable" and last_block_trim_ok(model)
        mode = compile_mode(opt)
        runner.block_fn = block_runner(mode, opt.compile_backend, model)
        with fused_activations(model):
            for chunk in chunks:
                resid, row_b, row_e, start = runner.run(chunk)
                vals = mplan.scores(resid, row_b, start, use_triton).float().cpu()
                cells = torch.tensor([chunk_exp.cell for chunk_exp in row_e], dtype=torch.long)
                scores[cells] = vals
                report(len(chunk.exps))
        report.close()
    if not bool(torch.isfinite(scores).all()):
        raise LenslabError(
            f"metric {bound.name!r} returned nan/inf for some patches: check the model's logits for NaN/inf "
            "(e.g. float16 overflow: try dtype='float32') or the metric for a division by zero"
        )
    return sites.patch_result(
        model,
        task,
        st,
        grid,
        scores.reshape(shape),
        bound,
        direction,
        engine="batched",
        layer=layer,
        engine_details={
            "position_skip": pos_skip,
            "layer_skip": True,
            "unchanged_patches": len(unchanged),
            "prefix_skipped_patches": sum(1 for e in exps if e.start > 0 and not pos_skip),
            "metric_path": mplan.mode,
            "chunks": len(chunks),
            "max_chunk_experiments": max((len(c.exps) for c in chunks), default=0),
            "last_block_last_position_only": runner.trim_last,
            "triton": use_triton,
            "compile": mode or False,
            "dtype": str(cfg.dtype),
        },
    )


def auto_engine(model, task, site, *, direction: str, metric, layers, layer=None, progress=True) -> PatchResult | None:
    """`engine="auto"`: the batched engine where it covers the site, else None (said once), so
    `lenslab.circuits.patch` runs the reference engine."""
    reason = coverage(model, site)
    if reason is None:
        return batched_engine(
            model, task, site, direction=direction, metric=metric, layers=layers, layer=layer, progress=progress
        )
    say_once(f"{reason}; using the reference engine (one forward per patch)")
    return None


ENGINES = {"batched": batched_engine, "auto": auto_engine}
