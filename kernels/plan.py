"""The batched engine's plan: which sites and models it covers, the experiments of a grid, and their chunks.

`coverage` says whether the engine runs a site on a model; `position_skip_ok`,
`last_block_trim_ok` and `attention_mask_needed` say which shortcuts are exact on it.
`experiments` turns a site's grid into one `Experiment` per cell (its layer, the block where its
rows join the staircase, its first recomputed position), and `plan_chunks` groups them into
`Chunk`s that fit the memory budget: one start position per chunk, ordered by the joining block.
`skip_unchanged` sets aside the experiments whose patch writes the base run's own values and moves
the start of the others to the first position their patch changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lenslab.kernels.config import EngineOptions, memory_budget

__all__ = [
    "SITE_PLAN",
    "Chunk",
    "Experiment",
    "attention_mask_needed",
    "coverage",
    "experiments",
    "last_block_trim_ok",
    "plan_chunks",
    "position_skip_ok",
    "skip_unchanged",
]

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
    from transformer_lens import HookedTransformer  # deferred: transformer_lens is heavy to import

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


def position_skip_ok(model) -> bool:
    """Position skipping reuses cached keys/values; only where TransformerLens' cache path is exact."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("standard", "shortformer", "rotary"):
        return False
    if getattr(cfg, "ungroup_grouped_query_attention", False) or getattr(cfg, "use_attention_sinks", False):
        return False
    if getattr(cfg, "use_logn_attn", False):
        return False
    return attention_mask_needed(model) is False


def last_block_trim_ok(model) -> bool:
    """The last block may run on the last position alone (keys/values of the others projected
    separately) where TransformerLens' attention does nothing between projection and cache."""
    cfg = model.cfg
    if not position_skip_ok(model):
        return False
    if cfg.use_split_qkv_input or cfg.use_attn_in or getattr(cfg, "load_in_4bit", False):
        return False
    if getattr(cfg, "clip_qkv", None) is not None:
        return False
    arch = getattr(cfg, "original_architecture", None) or ""
    return not arch.startswith("Olmo")


def attention_mask_needed(model) -> bool:
    """True when the tokenizer pads on the left, so the blocks need a `[batch, pos]` attention mask."""
    tok = getattr(model, "tokenizer", None)
    return bool(tok is not None and getattr(tok, "padding_side", "right") == "left")


@dataclass
class Experiment:
    """One cell of the grid, patched into all `batch` prompts (so it owns `batch` rows of a chunk)."""

    cell: int  # flat index into the score grid
    layer: int  # layer of the hook that is patched
    join: int  # block at which the rows join the staircase (n_layers: only the final LN)
    start: int  # first recomputed position (0 without position skipping)
    pos: int = -1
    head: int = -1
    neuron: int = -1


@dataclass
class Chunk:
    """Experiments run through the staircase together; all share one `start` position."""

    exps: list[Experiment] = field(default_factory=list)


def experiments(st, grid, n_layers: int, pos_skip: bool, layer: int | None) -> list[Experiment]:
    """One `Experiment` per cell of `grid` (the site's axes: layers, then positions/heads/neurons), in flat order."""
    shape = [len(v) for v in grid]
    out = []
    for flat, cell in enumerate(itertools.product(*[range(n) for n in shape])):
        vals = [grid[a][i] for a, i in enumerate(cell)]
        if st.kind == "neuron":
            e = Experiment(flat, layer, layer, 0, neuron=vals[0])
        else:
            l = vals[0]
            e = Experiment(flat, l, l, 0)
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


_POSITION_KINDS = ("pos", "pos_head", "pattern_dest")  # one position per experiment; the rest patch all positions


def _changed(kind: str, src: Tensor, base: Tensor) -> Tensor:
    """`[pos, unit]` booleans: where the source activation differs from the base run's in any
    prompt, bitwise (so -0.0 differs from 0.0 and NaN from everything); unit is the head, the
    neuron, or a single column for a residual-like site."""
    if src.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()]
        ne = src.contiguous().view(ints) != base.to(src.dtype).contiguous().view(ints)
    else:
        ne = src != base
    if kind == "pos":  # [batch, pos, d]
        return ne.flatten(2).any(-1).any(0)[:, None]
    if kind in ("head", "pos_head"):  # [batch, pos, head, d_head]
        return ne.any(-1).any(0)
    if kind in ("pattern", "pattern_dest"):  # [batch, head, query_pos, key_pos]
        return ne.any(-1).any(0).T
    return ne.any(0)  # neuron: [batch, pos, d_mlp]


def skip_unchanged(
    st, exps: list[Experiment], source_cache, base_cache, kv_ok: bool
) -> tuple[list[Experiment], list[Experiment]]:
    """-> (experiments to run, experiments whose patch is a no-op), exact by construction.

    A patch whose values equal the base run's own activation bitwise in every prompt leaves the
    base run unchanged: its score is the base run's, with no forward. A patch over all positions
    (a head's output, a neuron, a head's pattern) that equals the base values before position `f`
    changes nothing before `f` (causal attention), so where `kv_ok` (the base run's cached
    keys/values may stand in for the earlier positions) its experiment starts at `f`. Counterfactual
    prompts that share a prefix, e.g. IOI pairs that differ from the second subject on, gain the
    most. `source_cache` and `base_cache` must both hold the site's hook at every patched layer.
    """
    changed: dict[str, Tensor] = {}
    run, noop = [], []
    for e in exps:
        name = st.hook.format(layer=e.layer)
        if name not in changed:
            changed[name] = _changed(st.kind, source_cache[name], base_cache[name]).cpu()
        col = changed[name][:, max(e.head, e.neuron, 0)]
        if st.kind in _POSITION_KINDS:
            (run if bool(col[e.pos]) else noop).append(e)
        elif not bool(col.any()):
            noop.append(e)
        else:
            if kv_ok:
                e.start = max(e.start, int(col.int().argmax()))
            run.append(e)
    return run, noop


def _bytes_per_row(cfg, seq: int, total: int, elem: int, vocab_rows: int) -> int:
    """Rough peak activation bytes of one row in one block call (and the metric)."""
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    d_mlp = cfg.d_mlp or 0
    per_tok = 8 * d + 6 * h * dh + 3 * d_mlp
    attn = 3 * h * seq * total
    past = 4 * (total - seq) * h * dh  # the repeated cached prefix and its concatenation
    return int(2 * elem * (seq * per_tok + attn + past) + 4 * vocab_rows)


def plan_chunks(
    exps: list[Experiment],
    cfg,
    seq_len: int,
    batch: int,
    device,
    elem: int,
    vocab_per_row: Callable[[int], int],
    opt: EngineOptions,
) -> list[Chunk]:
    """Group experiments by first position, order by layer, split by the row cap of each group.

    `elem` is the bytes of one activation element; `vocab_per_row(seq)` the metric's bytes per row.
    """
    budget = memory_budget(device, opt)
    groups: dict[int, list[Experiment]] = {}
    for e in exps:
        groups.setdefault(e.start, []).append(e)
    chunks = []
    for start in sorted(groups):
        seq = seq_len - start
        rows_mem = max(1, budget // max(1, _bytes_per_row(cfg, seq, seq_len, elem, vocab_per_row(seq))))
        cap = rows_mem
        if opt.max_rows is not None:
            cap = min(cap, opt.max_rows)
        elif device.type == "cpu":  # GEMMs run fastest at ~960 tokens on one thread, ~1440 on two or more
            cap = min(cap, max(batch, (960 if torch.get_num_threads() == 1 else 1440) // seq))
        per_chunk = max(1, cap // batch)
        ordered = sorted(groups[start], key=lambda e: (e.join, e.cell))
        for i in range(0, len(ordered), per_chunk):
            chunks.append(Chunk(ordered[i : i + per_chunk]))
    return chunks
