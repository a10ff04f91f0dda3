"""The batched exact-patching engine: many patch experiments per forward, same numbers as the reference.

TransformerLens `patching` (and lenslab's reference engine) runs one full forward, with full
logits, per patch. This engine computes the *same* scores with far less work:

* **Batching.** Patch experiments are stacked along the batch: an experiment is one cell of the
  grid (e.g. resid_pre at layer 3, position 5) applied to all `batch` prompts, so it owns `batch`
  rows. A per-row table (which experiment, which prompt, which position/head/neuron) drives the
  patch, so one forward serves many experiments.
* **Layer skipping** (TransformerLens `start_at_layer`, PR #382; ACDC in auto-circuit). Layers
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
* **Chunking** by a memory budget (free device memory, or a CPU default; overridable with
  `lenslab.kernels.options(memory_budget=...)`), with a progress bar.

Cost model and measurements: /benchmarks/RESULTS.md and the kernels docs page. On a 2-core CPU
the GPT-2-small resid_pre grid is ~10x faster than TransformerLens' loop.

>>> import lenslab
>>> from lenslab import circuits, tasks
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = tasks.induction(model, n=4, seq_len=8, seed=0)
>>> res = circuits.patch(model, task, "resid_pre", engine="batched")
>>> res.axes, res.scores.shape   # one score per layer and position of the 16-token prompts
(('layer', 'pos'), torch.Size([2, 16]))
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lenslab import sites
from lenslab._errors import LenslabError, did_you_mean
from lenslab.kernels import triton_ops
from lenslab.results import PatchResult

# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How the batched engine runs; set with `lenslab.kernels.options(...)` or `configure(...)`.

    Attributes:
        memory_budget: bytes the engine may use for activations per chunk; None derives it from
            free device memory (half of it on CUDA) or a CPU default (a quarter of available RAM,
            at most 2 GiB). Also accepts strings like "512MB", "2GiB".
        max_rows: cap on rows (experiments x prompts) per chunk; None: on CPU about 1440 tokens
            per block call (bigger batches fall out of cache), on GPU only the memory budget.
        position_skip: recompute only positions >= the patched one where the site allows it.
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
    fused_metric: bool = True
    triton: bool | str = "auto"
    compile: bool | str = False
    compile_backend: str | Callable = "inductor"


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
    return _OPTIONS[0]


def _validated(opt: EngineOptions) -> EngineOptions:
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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


# --- coverage --------------------------------------------------------------------------------

# site name -> (where the patch is written, whether position skipping applies)
#   "join": written into the residual when the rows join (resid_pre at L; resid_post at L joins L+1)
#   "hook": written by a hook inside block L
SITE_PLAN = {
    "resid_pre": ("join", True),
    "resid_post": ("join", True),
    "resid_mid": ("hook", True),
    "attn_out": ("hook", True),
    "mlp_out": ("hook", True),
    "z": ("hook", False),
    "q": ("hook", False),
    "k": ("hook", False),
    "v": ("hook", False),
    "z_by_pos": ("hook", True),
    "q_by_pos": ("hook", True),
    "k_by_pos": ("hook", True),
    "v_by_pos": ("hook", True),
    "pattern": ("hook", False),
    "pattern_by_pos": ("hook", True),
    "mlp_neuron": ("hook", False),
}


def coverage(model, site) -> str | None:
    """None when the batched engine covers `site` on `model`, else the reason it does not."""
    from transformer_lens import HookedTransformer

    name = getattr(site, "name", site)
    if not isinstance(model, HookedTransformer):
        return (
            f"the batched engine runs HookedTransformer blocks; {type(model).__name__} models use the reference engine"
        )
    if name not in SITE_PLAN:
        return f"the batched engine does not cover site {name!r}"
    cfg = model.cfg
    if getattr(cfg, "n_devices", 1) > 1:
        return "the batched engine does not split a model over several devices"
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return "the batched engine needs causal attention"
    return None


def _position_skip_ok(model) -> bool:
    """Position skipping reuses cached keys/values; only where TransformerLens' cache path is exact."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary"):
        return False
    if getattr(cfg, "ungroup_grouped_query_attention", False) or getattr(cfg, "use_attention_sinks", False):
        return False
    if getattr(cfg, "use_logn_attn", False):
        return False
    return _attention_mask_needed(model) is False


def _last_block_trim_ok(model) -> bool:
    """The last block may run on the last position alone (keys/values of the others projected
    separately) where TransformerLens' attention does nothing between projection and cache."""
    cfg = model.cfg
    if not _position_skip_ok(model):
        return False
    if cfg.use_split_qkv_input or cfg.use_attn_in or getattr(cfg, "load_in_4bit", False):
        return False
    if getattr(cfg, "clip_qkv", None) is not None:
        return False
    arch = getattr(cfg, "original_architecture", None) or ""
    return not arch.startswith("Olmo")


def _attention_mask_needed(model) -> bool:
    tok = getattr(model, "tokenizer", None)
    return bool(tok is not None and getattr(tok, "padding_side", "right") == "left")


# --- experiments and chunks ------------------------------------------------------------------


@dataclass
class _Exp:
    cell: int  # flat index into the score grid
    layer: int  # layer of the hook that is patched
    join: int  # block at which the rows join the staircase (n_layers: only the final LN)
    start: int  # first recomputed position (0 without position skipping)
    pos: int = -1
    head: int = -1
    neuron: int = -1


@dataclass
class _Chunk:
    exps: list[_Exp] = field(default_factory=list)


def _experiments(st, grid, n_layers: int, pos_skip: bool, layer: int | None) -> list[_Exp]:
    shape = [len(v) for v in grid]
    out = []
    for flat, cell in enumerate(itertools.product(*[range(n) for n in shape])):
        vals = [grid[a][i] for a, i in enumerate(cell)]
        if st.kind == "neuron":
            e = _Exp(flat, layer, layer, 0, neuron=vals[0])
        else:
            l = vals[0]
            e = _Exp(flat, l, l, 0)
            if st.kind == "pos":
                e.pos = vals[1]
            elif st.kind in ("head", "pattern"):
                e.head = vals[1]
            elif st.kind == "pos_head":
                e.pos, e.head = vals[1], vals[2]
            elif st.kind == "pattern_dest":
                e.head, e.pos = vals[1], vals[2]
            if st.name == "resid_post":
                e.join = l + 1
            if pos_skip and SITE_PLAN[st.name][1]:
                e.start = e.pos
        out.append(e)
    return out


def _bytes_per_row(cfg, seq: int, total: int, elem: int, vocab_rows: int) -> int:
    """Rough peak activation bytes of one row in one block call (and the metric)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    d_mlp = cfg.d_mlp or 0
    per_tok = 8 * d + 6 * h * dh + 3 * d_mlp
    attn = 3 * h * seq * total
    past = 4 * (total - seq) * h * dh  # the repeated cached prefix and its concatenation
    return int(2 * elem * (seq * per_tok + attn + past) + 4 * vocab_rows)


def _plan(
    exps: list[_Exp],
    cfg,
    seq_len: int,
    batch: int,
    device,
    elem: int,
    vocab_per_row: Callable[[int], int],
    opt: EngineOptions,
) -> list[_Chunk]:
    """Group experiments by first position, order by layer, split by the row cap of each group."""
    budget = memory_budget(device, opt)
    groups: dict[int, list[_Exp]] = {}
    for e in exps:
        groups.setdefault(e.start, []).append(e)
    chunks = []
    for start in sorted(groups):
        seq = seq_len - start
        rows_mem = max(1, budget // max(1, _bytes_per_row(cfg, seq, seq_len, elem, vocab_per_row(seq))))
        cap = rows_mem
        if opt.max_rows is not None:
            cap = min(cap, opt.max_rows)
        elif device.type == "cpu":
            cap = min(cap, max(batch, 1440 // seq))
        per_chunk = max(1, cap // batch)
        ordered = sorted(groups[start], key=lambda e: (e.join, e.cell))
        for i in range(0, len(ordered), per_chunk):
            chunks.append(_Chunk(ordered[i : i + per_chunk]))
    return chunks


# --- the metric ------------------------------------------------------------------------------


class _MetricPlan:
    """How the scores are computed from the final residual of each row."""

    def __init__(self, model, task, metric, base_tokens, opt: EngineOptions):
        self.model, self.metric, self.opt = model, metric, opt
        self.batch = task.batch
        self.answers = task.answer_tokens
        self.mode = "callable"
        if metric.per_prompt is not None and opt.fused_metric:
            self.mode = "last_row"
            if metric.name in ("logit_diff", "logit_diff_normalized"):
                affine = _logit_diff_affine(metric, self.batch, int(model.cfg.d_vocab), self.answers)
                if affine is not None:
                    self.mode = "pair"
                    self.scale, self.offset = affine
        elif metric.per_prompt is None:
            say_once(
                f"metric {metric.name!r} is a callable on full logits: the batched engine builds "
                "[batch, pos, vocab] logits per patch for it (slower); named metrics such as "
                "'logit_diff' are computed from the last position only"
            )
        self.base_logits = None
        self._WUt = None
        self.triton_failed = False

    def vocab_bytes_per_row(self, seq: int) -> int:
        v = int(self.model.cfg.d_vocab)
        return {"pair": 0, "last_row": 2 * v, "callable": 2 * v * (seq + 1)}[self.mode]

    def scores(self, resid: Tensor, row_b: Tensor, start: int, triton: bool) -> Tensor:
        """`resid [rows, seq, d_model]` (positions start..S-1) -> per-experiment scores `[rows // batch]`.

        Rows come in blocks of `batch` consecutive rows per experiment.
        """
        model = self.model
        n_exp = resid.shape[0] // self.batch
        if self.mode == "pair":
            cols = self.answers[row_b]  # [rows, 2]
            last = resid[:, -1]
            pair = None
            if triton and not self.triton_failed:
                try:
                    pair = triton_ops.ln_unembed_pair(
                        last,
                        model.ln_final,
                        model.unembed.W_U,
                        model.unembed.b_U,
                        cols,
                        norm=model.cfg.normalization_type,
                        eps=model.cfg.eps,
                    )
                except Exception as exc:  # same numbers from the torch twin; only "auto" may fall back
                    if self.opt.triton is True:
                        raise
                    self.triton_failed = True
                    say_once(
                        f"the Triton kernel ln_unembed_pair failed ({type(exc).__name__}: {exc}); "
                        "using its pure-torch twin (same results)"
                    )
            if pair is None:
                x = model.ln_final(last[:, None])[:, 0] if model.cfg.normalization_type is not None else last
                pair = unembed_pair(x, model.unembed.W_U, model.unembed.b_U, cols)
            pair = _softcap(pair, getattr(model.cfg, "output_logits_soft_cap", None))
            ld = (pair[:, 0] - pair[:, 1]).float()
            per = ld * self.scale[row_b] + self.offset[row_b]
            return per.view(n_exp, self.batch).mean(-1)
        if self.mode == "last_row":
            last = resid[:, -1:]
            x = model.ln_final(last) if model.cfg.normalization_type is not None else last
            if self._WUt is None:  # TransformerLens' Unembed copies W_U.T on every call; copy it once
                self._WUt = model.unembed.W_U.T.contiguous()
            logits = torch.nn.functional.linear(x[:, 0], self._WUt, model.unembed.b_U)
            logits = _softcap(logits, getattr(model.cfg, "output_logits_soft_cap", None))
            logits = logits.float().view(n_exp, self.batch, -1)  # metrics read float32 logits (as the reference)
            return torch.stack([self.metric.per_prompt(logits[i]).float().mean() for i in range(n_exp)])
        x = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
        logits = _softcap(model.unembed(x), getattr(model.cfg, "output_logits_soft_cap", None))
        logits = logits.view(n_exp, self.batch, *logits.shape[1:])
        out = []
        for i in range(n_exp):
            full = logits[i] if start == 0 else torch.cat([self.base_logits[:, :start], logits[i]], dim=1)
            out.append(self.metric(float32_logits(full)).float())
        return torch.stack(out)


def float32_logits(logits: Tensor) -> Tensor:
    """Half-precision logits upcast to float32 before a metric reads them (both engines do this, so
    a metric's own arithmetic, e.g. a batch mean, is never rounded to 8 or 11 bits)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _softcap(x: Tensor, cap) -> Tensor:
    if cap is None or cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


def unembed_pair(x: Tensor, W_U: Tensor, b_U: Tensor, cols: Tensor) -> Tensor:
    """`x [rows, d_model]`, `cols [rows, 2]` -> float32 logits of those two columns `[rows, 2]` (no full vocab).

    Accumulates in float32 whatever the model's dtype (as the Triton kernel does): only the
    `[rows, 2, d_model]` slice of `W_U` is upcast."""
    w = W_U.T[cols].float()  # [rows, 2, d_model]
    return torch.einsum("rd,rkd->rk", x.float(), w) + b_U.float()[cols]


def _logit_diff_affine(metric, batch: int, d_vocab: int, answers: Tensor):
    """Per-prompt (scale, offset) with `per_prompt(last) == scale * (logit[a] - logit[b]) + offset`.

    Probed from the bound metric itself in float64 (so the engine uses the metric's own constants,
    e.g. the clean/corrupt logit differences of `logit_diff_normalized`), and checked on a third
    probe; None when the metric is not of that form.
    """
    dev = answers.device
    try:
        zero = torch.zeros(batch, d_vocab, dtype=torch.float64, device=dev)
        one = zero.clone()
        one.scatter_(1, answers[:, :1], 1.0)
        off = metric.per_prompt(zero).double()
        scale = metric.per_prompt(one).double() - off
        probe = zero.clone()
        gen = torch.Generator().manual_seed(0)
        probe.scatter_(1, answers, torch.randn(batch, 2, generator=gen, dtype=torch.float64).to(dev))
        pd = probe.gather(1, answers)
        expect = scale * (pd[:, 0] - pd[:, 1]) + off
        if not torch.allclose(metric.per_prompt(probe).double(), expect, rtol=1e-9, atol=1e-9):
            return None
    except Exception:  # a per_prompt that does not accept these probes: use the full last row
        return None
    return scale.float(), off.float()


# --- the engine ------------------------------------------------------------------------------


def batched_engine(
    model, task, site, *, direction: str, metric, layers: Sequence[int], layer: int | None = None, progress=True
) -> PatchResult | None:
    """The `engine="batched"` entry point of `lenslab.circuits.patch` (same result layout as the
    reference engine); None where it does not cover the site or model (said once): circuits then
    runs the reference engine."""
    reason = coverage(model, site)
    if reason is not None:
        say_once(f"{reason}; falling back to the reference engine (one forward per patch)")
        return None
    opt = current_options()
    dev = next(model.parameters()).device
    use_triton = _want_triton(opt, dev)
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    st = site
    base_tokens, source_tokens = (
        (task.corrupt_tokens, task.clean_tokens) if direction == "denoise" else (task.clean_tokens, task.corrupt_tokens)
    )
    batch, seq_len = task.batch, task.seq_len
    pos_skip = bool(opt.position_skip and SITE_PLAN[st.name][1] and _position_skip_ok(model))
    hook_layers = [layer] if st.kind == "neuron" else list(layers)
    src_names = [st.hook.format(layer=l) for l in hook_layers]
    mplan = _MetricPlan(model, task, metric, base_tokens, opt)

    with torch.no_grad():
        top = max(hook_layers) + 1  # the source run stops after the last patched layer
        _, source_cache = model.run_with_cache(
            source_tokens,
            names_filter=lambda n: n in set(src_names),
            return_type=None,
            stop_at_layer=top if top < n_layers else None,
        )
        grid = sites.grid(model, st, task, hook_layers if st.kind != "neuron" else list(layers), source_cache, layer)
        exps = _experiments(st, grid, n_layers, pos_skip, layer)
        min_join = min(e.join for e in exps)
        base_names = {f"blocks.{l}.hook_resid_pre" for l in range(min_join, n_layers)}
        base_names.add(f"blocks.{n_layers - 1}.hook_resid_post")
        if pos_skip:
            base_names |= {f"blocks.{l}.attn.hook_{kv}" for l in range(min_join, n_layers) for kv in "kv"}
        if cfg.positional_embedding_type == "shortformer":
            base_names.add("hook_pos_embed")
        base_logits, base_cache = model.run_with_cache(
            base_tokens,
            names_filter=lambda n: n in base_names,
            return_type="logits" if mplan.mode == "callable" else None,
        )
        mplan.base_logits = base_logits
        attn_mask = None
        if _attention_mask_needed(model):
            from transformer_lens import utils as tl_utils

            attn_mask = tl_utils.get_attention_mask(model.tokenizer, base_tokens, model.cfg.default_prepend_bos).to(dev)

        elem = torch.finfo(cfg.dtype).bits // 8 if cfg.dtype.is_floating_point else 4
        chunks = _plan(exps, cfg, seq_len, batch, dev, elem, mplan.vocab_bytes_per_row, opt)
        shape = [len(v) for v in grid]
        scores = torch.zeros(math.prod(shape), dtype=torch.float32)
        report = _Progress(progress, len(exps), f"patching {st.name} (batched)")
        runner = _Runner(model, st, source_cache, base_cache, batch, seq_len, attn_mask, pos_skip)
        runner.trim_last = mplan.mode != "callable" and _last_block_trim_ok(model)
        compile_mode = _compile_mode(opt)
        runner.block_fn = block_runner(compile_mode, opt.compile_backend, model)
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
            f"metric {metric.name!r} returned nan/inf for some patches: check the model's logits for NaN/inf "
            "(e.g. float16 overflow: try dtype='float32') or the metric for a division by zero"
        )
    return sites.patch_result(
        model,
        task,
        st,
        grid,
        scores.reshape(shape),
        metric,
        direction,
        engine="batched",
        layer=layer,
        engine_details={
            "position_skip": pos_skip,
            "layer_skip": True,
            "metric_path": mplan.mode,
            "chunks": len(chunks),
            "max_chunk_experiments": max(len(c.exps) for c in chunks),
            "last_block_last_position_only": runner.trim_last,
            "triton": use_triton,
            "compile": compile_mode or False,
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


def _want_triton(opt: EngineOptions, dev: torch.device) -> bool:

    if opt.triton is False:
        return False
    if opt.triton == "auto":  # CUDA only: the CPU interpreter is for tests (triton=True), ~1 ms per row
        return dev.type == "cuda" and triton_ops.available()
    usable = (dev.type == "cuda" or triton_ops.interpreted()) and triton_ops.available()
    if not usable:
        why = triton_ops.unavailable_reason(dev)
        raise LenslabError(f"triton=True was requested but {why}; use triton='auto' (torch on CPU) or False")
    return usable


def _compile_mode(opt: EngineOptions) -> str | None:
    """The torch.compile mode the engine uses for this call, or None (eager)."""
    if opt.compile is False:
        return None
    if torch.is_inference_mode_enabled():
        say_once(
            "kernels.options(compile=...) is not used under torch.inference_mode() (a dynamo guard on "
            "TransformerLens' attention scale fails there); the blocks run eager. Use torch.no_grad() instead"
        )
        return None
    return "default" if opt.compile is True else str(opt.compile)


def _call_block(block, resid: Tensor, **kw) -> Tensor:
    """One block of the staircase: `resid [rows, seq, d_model]` -> the same shape."""
    return block(resid, **kw)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(mode, backend): runner}


def block_runner(mode: str | None, backend: str | Callable = "inductor", model=None) -> Callable:
    """The function that runs a block: eager (`mode=None`) or `torch.compile`d with dynamic shapes.

    One compiled function serves every block and every chunk: the block's parameters are graph
    inputs, so the blocks of one model share a graph; the growing batch and the recomputed
    positions are dynamic dimensions. Compiled once per model and (mode, backend) per process
    (inductor also caches generated code on disk, so a second process compiles faster); each
    model gets its own copy of the function, so its graphs never count against another model's
    dynamo recompile limit.

    Calls where a dimension is 1 (the last block on the last position, the last position's
    chunk, a cached prefix of one position) run eager: dynamo specialises size-1 dimensions, so
    each would cost a graph of its own (tens of seconds of compilation on CPU) for a call that
    does little work. So a model gets two graphs per mode: without and with a cached prefix.
    Under "reduce-overhead" (CUDA graphs) each call starts a new graph generation and its output
    is copied out of the graph's memory pool before the next call can reuse it.
    """
    if mode is None:
        return _call_block
    per_model = _COMPILED.setdefault(model, {}) if model is not None else {}
    key = (mode, backend)
    if key not in per_model:
        kwargs = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
        n = sum(len(v) for v in _COMPILED.values())
        fresh = types.FunctionType(
            _call_block.__code__.replace(co_name=f"_call_block_{n}"), _call_block.__globals__, f"_call_block_{n}"
        )  # a code object of its own: its own dynamo cache
        compiled = torch.compile(fresh, dynamic=True, backend=backend, **kwargs)
        graphs = mode == "reduce-overhead"

        def fn(block, resid: Tensor, **kw) -> Tensor:
            entry = kw.get("past_kv_cache_entry")
            if min(resid.shape) <= 1 or (entry is not None and min(entry.past_keys.shape) <= 1):
                return _call_block(block, resid, **kw)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(block, resid, **kw).clone()
            return compiled(block, resid, **kw)

        per_model[key] = fn
    return per_model[key]


@contextlib.contextmanager
def fused_activations(model):
    """Run TransformerLens' `gelu_new` MLPs with torch's one-pass `gelu(approximate="tanh")`.

    The same formula (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))), evaluated in one kernel
    instead of eight full passes over `[rows, pos, d_mlp]`, which the CPU profile showed as the
    largest cost after the GEMMs. Values agree to float32 rounding (~1e-7 relative). Only this
    model instance, only inside the engine; restored on exit.
    """
    from transformer_lens.utilities.activation_functions import gelu_new

    swapped = []
    for block in getattr(model, "blocks", []):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and getattr(mlp, "act_fn", None) is gelu_new:
            mlp.act_fn = _gelu_tanh
            swapped.append(mlp)
    try:
        yield
    finally:
        for mlp in swapped:
            mlp.act_fn = gelu_new


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


class _Progress:
    """A tqdm bar over patches advanced once per chunk, or `progress(done, total)` once per chunk."""

    def __init__(self, progress, total: int, desc: str):
        from tqdm.auto import tqdm

        self.progress, self.total, self.done = progress, total, 0
        self.bar = tqdm(total=total, desc=desc, leave=False, unit="patch") if progress is True else None

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif callable(self.progress):
            self.progress(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Runner:
    """Runs one chunk through the staircase: rows join at their block, patched on join or by a hook."""

    def __init__(self, model, st, source_cache, base_cache, batch, seq_len, attn_mask, pos_skip):
        self.model, self.st = model, st
        self.src, self.base = source_cache, base_cache
        self.batch, self.seq_len = batch, seq_len
        self.attn_mask, self.pos_skip = attn_mask, pos_skip
        self.n_layers = int(model.cfg.n_layers)
        self.dev = next(model.parameters()).device
        self.active: dict | None = None  # the patch the hook of the current block applies
        self.trim_last = False  # set by the engine when the metric reads the last position only
        self.block_fn: Callable = _call_block  # eager, or the compiled block runner

    def _patched_block(self, l: int, resid: Tensor, kw: dict) -> Tensor:
        """Block `l` with the active patch's hook registered on its hook point for this call only
        (always eager: the patch indexing stays out of any compiled graph)."""
        hp = self.model.hook_dict[self.active["name"]]
        handle = hp.register_forward_hook(lambda module, inp, out: self._hook(out, hp))
        try:
            return self.model.blocks[l](resid, **kw)
        finally:
            handle.remove()

    def _hook(self, act: Tensor, hook) -> Tensor:
        a = self.active
        if a is None or a["name"] != hook.name:
            return act
        act = act.clone()
        rows, b, start = a["rows"], a["b"], a["start"]
        src = self.src[hook.name]
        kind = self.st.kind
        if kind == "pos":
            p = a["pos"]
            act[rows, p - start] = src[b, p].to(act.dtype)
        elif kind == "head":
            h = a["head"]
            act[rows, :, h] = src[b, start:, h].to(act.dtype)
        elif kind == "pos_head":
            p, h = a["pos"], a["head"]
            act[rows, p - start, h] = src[b, p, h].to(act.dtype)
        elif kind == "pattern":
            h = a["head"]
            act[rows, h] = src[b, h, start:].to(act.dtype)
        elif kind == "pattern_dest":
            p, h = a["pos"], a["head"]
            act[rows, h, p - start] = src[b, h, p].to(act.dtype)
        elif kind == "neuron":
            n = a["neuron"]
            act[rows, :, n] = src[b, start:, n].to(act.dtype)
        return act

    def _last_block_last_position(self, resid: Tensor, row_b: Tensor, start: int, kw: dict) -> Tensor:
        """The last block for the last position only (all a fused metric reads).

        Keys/values of the earlier recomputed positions come from the block's own projection
        (`attn.calculate_qkv_matrices`, as inside TransformerLens' attention), joined to the cached
        prefix; the block then runs on one position with them as its frozen cache, so the MLP and
        attention output of the other positions are never computed. Saves ~12% of a resid grid.
        """
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        block = self.model.blocks[self.n_layers - 1]
        body = resid[:, :-1]
        ln = block.ln1(body)
        pos = kw.get("shortformer_pos_embed")
        qk_in = ln + pos[:, :-1] if pos is not None else ln
        _, k_new, v_new = block.attn.calculate_qkv_matrices(qk_in, qk_in, ln)
        entry = kw.get("past_kv_cache_entry")
        if entry is not None:
            k_new = torch.cat([entry.past_keys, k_new], dim=1)
            v_new = torch.cat([entry.past_values, v_new], dim=1)
        kw = dict(
            kw, past_kv_cache_entry=TransformerLensKeyValueCacheEntry(past_keys=k_new, past_values=v_new, frozen=True)
        )
        if pos is not None:
            kw["shortformer_pos_embed"] = pos[:, -1:]
        return self.block_fn(block, resid[:, -1:], **kw)

    def _base_resid(self, join: int, b: Tensor, start: int) -> Tensor:
        name = (
            f"blocks.{join}.hook_resid_pre" if join < self.n_layers else f"blocks.{self.n_layers - 1}.hook_resid_post"
        )
        return self.base[name][b, start:]

    def run(self, chunk: _Chunk):
        """-> final residual `[rows, seq - start, d_model]`, row prompt index, row experiment, start."""
        exps = chunk.exps
        start = exps[0].start
        B = self.batch
        ar = torch.arange(B, device=self.dev)
        by_join: dict[int, list[_Exp]] = {}
        for e in exps:
            by_join.setdefault(e.join, []).append(e)
        resid = None
        row_b = torch.empty(0, dtype=torch.long, device=self.dev)
        row_e: list[_Exp] = []
        first = min(by_join)
        kinds_join = SITE_PLAN[self.st.name][0] == "join"
        pos_embed = None
        if self.model.cfg.positional_embedding_type == "shortformer":
            pos_embed = self.base["hook_pos_embed"][:1, start:]
        for l in range(first, self.n_layers + 1):
            new = by_join.get(l, [])
            self.active = None
            if new:
                nb = ar.repeat(len(new))  # row -> prompt
                fresh = self._base_resid(l, nb, start)
                idx = torch.tensor([[e.pos, e.head, e.neuron] for e in new], device=self.dev).repeat_interleave(B, 0)
                n_old = 0 if resid is None else resid.shape[0]
                if kinds_join:
                    fresh = fresh.clone()
                    hook = self.st.hook.format(layer=new[0].layer)
                    p = idx[:, 0]
                    fresh[torch.arange(len(nb), device=self.dev), p - start] = self.src[hook][nb, p].to(fresh.dtype)
                else:
                    self.active = {
                        "name": self.st.hook.format(layer=new[0].layer),
                        "rows": torch.arange(n_old, n_old + len(nb), device=self.dev),
                        "b": nb,
                        "start": start,
                        "pos": idx[:, 0],
                        "head": idx[:, 1],
                        "neuron": idx[:, 2],
                    }
                if resid is not None and resid.shape[1] != fresh.shape[1]:  # joining after a trimmed last block
                    fresh = fresh[:, -resid.shape[1] :]
                resid = fresh if resid is None else torch.cat([resid, fresh], dim=0)
                row_b = torch.cat([row_b, nb])
                for e in new:
                    row_e.extend([e] * B)
            if l == self.n_layers:
                break
            kw = {}
            if pos_embed is not None:
                kw["shortformer_pos_embed"] = pos_embed
            if self.attn_mask is not None:
                kw["attention_mask"] = self.attn_mask[row_b]
            if start > 0:
                from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

                kw["past_kv_cache_entry"] = TransformerLensKeyValueCacheEntry(
                    past_keys=self.base[f"blocks.{l}.attn.hook_k"][row_b, :start],
                    past_values=self.base[f"blocks.{l}.attn.hook_v"][row_b, :start],
                    frozen=True,
                )
            if self.active is not None:
                resid = self._patched_block(l, resid, kw)
            elif l == self.n_layers - 1 and self.trim_last and resid.shape[1] > 1:
                resid = self._last_block_last_position(resid, row_b, start, kw)
            else:
                resid = self.block_fn(self.model.blocks[l], resid, **kw)
        self.active = None
        # one entry per experiment, in row-block order
        exps_in_order = row_e[::B]
        return resid, row_b, exps_in_order, start


ENGINES = {"batched": batched_engine, "auto": auto_engine}
