"""The batched engine's metric: scores from the final residual of each row, without `[rows, pos, vocab]` logits.

`MetricPlan` picks one of three paths for a metric:

* "pair": `logit_diff` / `logit_diff_normalized` as an affine map of the two answer logits, read
  from the final LayerNorm of the last position and the two answer columns of `W_U`
  (`unembed_pair`, or the Triton kernel `triton_ops.ln_unembed_pair` on CUDA);
* "last_row": other named metrics (`answer_prob`, `kl_to_clean`) from the last-position
  vocabulary row;
* "callable": a callable metric on full logits, rebuilt from the cached base logits for the
  positions the engine skipped (slower; said once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lenslab._errors import LenslabError
from lenslab.kernels import triton_ops
from lenslab.kernels.config import EngineOptions, say_once

__all__ = ["MetricPlan", "float32_logits", "unembed_pair", "want_triton"]


class MetricPlan:
    """How the scores are computed from the final residual of each row.

    `mode` is "pair", "last_row" or "callable" (the module docstring says when each applies);
    `base_logits` (set by the engine: the base run's `[batch, pos, vocab]` logits on the "callable"
    path, else None) supplies the positions before a chunk's start.
    """

    def __init__(self, model, task, metric, opt: EngineOptions):
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
        """Bytes of logits one row of `seq` recomputed positions needs on this metric path."""
        v = int(self.model.cfg.d_vocab)
        return {"pair": 0, "last_row": 2 * v, "callable": 2 * v * (seq + 1)}[self.mode]

    def scores(self, resid: Tensor, row_b: Tensor, start: int, triton: bool) -> Tensor:
        """`resid [rows, seq, d_model]` (positions start..S-1) -> per-experiment scores `[rows // batch]`.

        Rows come in blocks of `batch` consecutive rows per experiment; `row_b [rows]` is each
        row's prompt index.
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
    """`cap * tanh(x / cap)` (the model's output logit soft cap), or `x` itself without one."""
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


def want_triton(opt: EngineOptions, dev: torch.device) -> bool:
    """Whether the "pair" metric path uses the Triton kernel on `dev`; a LenslabError where
    `triton=True` asks for it and it cannot run."""
    if opt.triton is False:
        return False
    if opt.triton == "auto":  # CUDA only: the CPU interpreter is for tests (triton=True), ~1 ms per row
        return dev.type == "cuda" and triton_ops.available()
    usable = (dev.type == "cuda" or triton_ops.interpreted()) and triton_ops.available()
    if not usable:
        why = triton_ops.unavailable_reason(dev)
        raise LenslabError(f"triton=True was requested but {why}; use triton='auto' (torch on CPU) or False")
    return usable
