"""How the batched engine calls a transformer block: eager or `torch.compile`d, with one-pass GELU.

`compile_mode` reads the `compile` option (eager under `torch.inference_mode()`, said once);
`block_runner` returns the function the staircase calls each block with, eager or compiled once
per model and mode; `fused_activations` swaps TransformerLens' eight-pass `gelu_new` for torch's
one-pass tanh GELU (the same formula) while the engine runs.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from lenslab.kernels.config import EngineOptions, say_once

__all__ = ["block_runner", "compile_mode", "fused_activations"]


def compile_mode(opt: EngineOptions) -> str | None:
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

    Either way it is called as `fn(block, resid, **kw)` with `resid [rows, seq, d_model]` and
    returns the same shape.

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
    from transformer_lens.utilities.activation_functions import (  # deferred: transformer_lens is heavy to import
        gelu_new,
    )

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
    """torch's one-pass tanh GELU, elementwise (`[rows, pos, d_mlp]` in the MLP)."""
    return torch.nn.functional.gelu(x, approximate="tanh")
