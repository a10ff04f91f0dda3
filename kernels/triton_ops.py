"""Triton kernels of the batched engine, each with a pure-torch twin that gives the same numbers.

`ln_unembed_pair`: the fused metric head. For each row it reads the last-position residual once,
applies the final LayerNorm/RMSNorm in float32, and dots it with the two answer columns of the
unembedding, writing `[rows, 2]` logits: no `[rows, vocab]` row, no `W_U.T.contiguous()` copy.
On CPU the torch twin runs (the same math, a gathered `[rows, 2, d_model]` slice of `W_U`).

Kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (set before anything
imports triton; tests do this in a subprocess). One autotune config at most (several fail without
a GPU); half-precision inputs are upcast to float32 inside the kernel.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from lenslab._errors import LenslabError

_NORMS = {None: 0, "LN": 1, "LNPre": 1, "RMS": 2, "RMSPre": 2}


def interpreted() -> bool:
    """True when Triton runs in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def available() -> bool:
    """True when `import triton` works."""
    try:
        import triton  # deferred: optional and slow to import; only where a kernel runs or is probed
        import triton.language  # deferred: optional, probed here  # noqa: F401
    except Exception:
        return False
    return True


def unavailable_reason(device: torch.device | str = "cpu") -> str:
    if not available():
        return "triton is not installed (pip install triton; Linux only)"
    if torch.device(device).type != "cuda" and not interpreted():
        return "Triton kernels need a CUDA GPU (none here) or TRITON_INTERPRET=1 for the CPU interpreter"
    return ""


@functools.cache
def _kernel():
    import triton  # deferred: optional and slow to import; only where a kernel runs or is probed
    import triton.language as tl  # deferred: optional, only where the kernel is built

    @triton.jit
    def ln_unembed_pair_kernel(
        X,
        W,
        B,
        WU,
        BU,
        COLS,
        OUT,
        D,
        stride_x,
        stride_wd,
        stride_wv,
        eps,
        NORM: tl.constexpr,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        x = tl.load(X + r * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        if NORM == 1:
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(m, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / D
            y = xc / tl.sqrt(var + eps)
        elif NORM == 2:
            ms = tl.sum(x * x, axis=0) / D
            y = x / tl.sqrt(ms + eps)
        else:
            y = x
        if HAS_W:
            y = y * tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.load(COLS + r * 2)
        c = tl.load(COLS + r * 2 + 1)
        wa = tl.load(WU + offs * stride_wd + a * stride_wv, mask=m, other=0.0).to(tl.float32)
        wc = tl.load(WU + offs * stride_wd + c * stride_wv, mask=m, other=0.0).to(tl.float32)
        la = tl.sum(y * wa, axis=0) + tl.load(BU + a).to(tl.float32)
        lc = tl.sum(y * wc, axis=0) + tl.load(BU + c).to(tl.float32)
        tl.store(OUT + r * 2, la)
        tl.store(OUT + r * 2 + 1, lc)

    return ln_unembed_pair_kernel


def _norm_params(ln_module, norm):
    w = getattr(ln_module, "w", None) if norm in ("LN", "RMS") else None
    b = getattr(ln_module, "b", None) if norm == "LN" else None
    return w, b


def ln_unembed_pair_torch(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    W_U: Tensor,
    b_U: Tensor,
    cols: Tensor,
    *,
    norm: str | None,
    eps: float,
) -> Tensor:
    """Pure-torch twin of the kernel: `x [rows, d_model]`, `cols [rows, 2]` -> float32 `[rows, 2]`."""
    if norm not in _NORMS:
        raise LenslabError(f"normalization_type {norm!r} is not one of {list(_NORMS)}")
    y = x.float()
    if _NORMS[norm] == 1:
        y = y - y.mean(-1, keepdim=True)
        y = y / (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    elif _NORMS[norm] == 2:
        y = y / (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if w is not None:
        y = y * w.float()
    if b is not None:
        y = y + b.float()
    wu = W_U.T[cols].float()  # [rows, 2, d_model]
    return torch.einsum("rd,rkd->rk", y, wu) + b_U.float()[cols]


def ln_unembed_pair_triton(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    W_U: Tensor,
    b_U: Tensor,
    cols: Tensor,
    *,
    norm: str | None,
    eps: float,
) -> Tensor:
    """The Triton kernel (CUDA, or CPU under `TRITON_INTERPRET=1`); same signature as the torch twin."""
    if not available():
        raise LenslabError(f"ln_unembed_pair_triton: {unavailable_reason(x.device)}")
    if x.device.type != "cuda" and not interpreted():
        raise LenslabError(f"ln_unembed_pair_triton: {unavailable_reason(x.device)}")
    if norm not in _NORMS:
        raise LenslabError(f"normalization_type {norm!r} is not one of {list(_NORMS)}")
    import triton  # deferred: optional and slow to import; only where a kernel runs or is probed

    x = x.contiguous()
    rows, d = x.shape
    out = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    cols = cols.to(torch.int64).contiguous()
    dummy = x  # never read when HAS_W / HAS_B are false
    _kernel()[(rows,)](
        x,
        w if w is not None else dummy,
        b if b is not None else dummy,
        W_U,
        b_U.contiguous(),
        cols,
        out,
        d,
        x.stride(0),
        W_U.stride(0),
        W_U.stride(1),
        float(eps),
        NORM=_NORMS[norm],
        HAS_W=w is not None,
        HAS_B=b is not None,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def ln_unembed_pair(
    last: Tensor, ln_module, W_U: Tensor, b_U: Tensor, cols: Tensor, *, norm: str | None, eps: float
) -> Tensor:
    """Final norm of `last [rows, d_model]` and the two answer logits per row, by Triton."""
    w, b = _norm_params(ln_module, norm)
    return ln_unembed_pair_triton(last, w, b, W_U, b_U, cols, norm=norm, eps=eps)
