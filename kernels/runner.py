"""Running a chunk of experiments through the "staircase" of blocks, and reporting progress per chunk.

`StaircaseRunner.run(chunk)` starts each experiment's rows at the block where its patch applies,
from the base run's cached residual, and runs the blocks one by one with a growing batch. A
"join" site is patched into the residual as the rows join; a "hook" site by a hook on the joining
block, registered for that call only. With position skipping only positions `start..S-1` run and
the earlier keys/values come from the base run's cache. `Progress` reports the patches done.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenslab.kernels.blocks import block_runner
from lenslab.kernels.plan import SITE_PLAN, Chunk, Experiment

__all__ = ["Progress", "StaircaseRunner"]


class Progress:
    """A tqdm bar over patches advanced once per chunk, or `progress(done, total)` once per chunk."""

    def __init__(self, progress, total: int, desc: str):
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


def _frozen_kv(keys: Tensor, values: Tensor):
    """A frozen TransformerLens key/value cache entry of `keys`/`values [rows, prefix, n_heads, d_head]`."""
    from transformer_lens.cache.key_value_cache_entry import (  # deferred: transformer_lens is heavy to import
        TransformerLensKeyValueCacheEntry,
    )

    return TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values, frozen=True)


class StaircaseRunner:
    """Runs one chunk through the staircase: rows join at their block, patched on join or by a hook.

    `source_cache` holds the patched-in activations, `base_cache` the base run's residuals (and,
    with position skipping, its keys/values); `attn_mask` is None or the base run's
    `[batch, pos]` mask.
    """

    def __init__(self, model, st, source_cache, base_cache, batch, seq_len, attn_mask, pos_skip):
        self.model, self.st = model, st
        self.src, self.base = source_cache, base_cache
        self.batch, self.seq_len = batch, seq_len
        self.attn_mask, self.pos_skip = attn_mask, pos_skip
        self.n_layers = int(model.cfg.n_layers)
        self.dev = next(model.parameters()).device
        self.active: dict | None = None  # the patch the hook of the current block applies
        self.trim_last = False  # set by the engine when the metric reads the last position only
        self.block_fn: Callable = block_runner(None)  # eager, or the compiled block runner the engine sets

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
        kw = dict(kw, past_kv_cache_entry=_frozen_kv(k_new, v_new))
        if pos is not None:
            kw["shortformer_pos_embed"] = pos[:, -1:]
        return self.block_fn(block, resid[:, -1:], **kw)

    def _base_resid(self, join: int, b: Tensor, start: int) -> Tensor:
        name = (
            f"blocks.{join}.hook_resid_pre" if join < self.n_layers else f"blocks.{self.n_layers - 1}.hook_resid_post"
        )
        return self.base[name][b, start:]

    def run(self, chunk: Chunk):
        """-> final residual `[rows, seq - start, d_model]`, row prompt index, row experiment, start."""
        exps = chunk.exps
        start = exps[0].start
        B = self.batch
        ar = torch.arange(B, device=self.dev)
        by_join: dict[int, list[Experiment]] = {}
        for e in exps:
            by_join.setdefault(e.join, []).append(e)
        resid = None
        row_b = torch.empty(0, dtype=torch.long, device=self.dev)
        row_e: list[Experiment] = []
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
                kw["past_kv_cache_entry"] = _frozen_kv(
                    self.base[f"blocks.{l}.attn.hook_k"][row_b, :start],
                    self.base[f"blocks.{l}.attn.hook_v"][row_b, :start],
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
