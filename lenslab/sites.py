"""Sites: the one registry of named places in a TransformerLens model that every area reads.

A `Site` names a hook per layer (`blocks.{layer}.attn.hook_z`, TransformerLens's names), the axes
patching iterates (`("layer", "head")`) and how one patch indexes the activation. The reference
patching engine (`lenslab.circuits.patch`), the batched engine (`lenslab.kernels`) and
attribution build their `PatchResult` with `patch_result`; steering (`mean_difference`,
`actadd`, `austeer`, LinEAS hooks) resolves the same names with `site_hook`.

>>> resolve_site("head_out").hook
'blocks.{layer}.attn.hook_z'
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.results import PatchResult, provenance
from lenslab.tasks import Task


@dataclass(frozen=True)
class Site:
    """A patchable site: which hook per layer, which axes are iterated, how a patch is applied.

    `kind` says how the activation is indexed: "pos" (`[batch, pos, ...]`), "head" (`[batch, pos,
    head, d_head]`, all positions), "pos_head" (`[batch, pos, head, ...]` one position),
    "pattern" (`[batch, head, dest, src]`, all destinations), "pattern_dest" (one destination
    row), "neuron" (`[batch, pos, d_mlp]`, all positions, one chosen layer).
    """

    name: str
    hook: str  # format string with {layer}
    kind: str
    axes: tuple[str, ...]
    description: str


SITES: dict[str, Site] = {
    s.name: s
    for s in [
        Site(
            "resid_pre", "blocks.{layer}.hook_resid_pre", "pos", ("layer", "pos"), "residual stream before each block"
        ),
        Site(
            "resid_mid",
            "blocks.{layer}.hook_resid_mid",
            "pos",
            ("layer", "pos"),
            "residual stream between attention and MLP",
        ),
        Site(
            "resid_post", "blocks.{layer}.hook_resid_post", "pos", ("layer", "pos"), "residual stream after each block"
        ),
        Site("attn_out", "blocks.{layer}.hook_attn_out", "pos", ("layer", "pos"), "attention layer output"),
        Site("mlp_out", "blocks.{layer}.hook_mlp_out", "pos", ("layer", "pos"), "MLP layer output"),
        Site("z", "blocks.{layer}.attn.hook_z", "head", ("layer", "head"), "head output (z), all positions"),
        Site(
            "z_by_pos",
            "blocks.{layer}.attn.hook_z",
            "pos_head",
            ("layer", "pos", "head"),
            "head output (z) by position",
        ),
        Site("q", "blocks.{layer}.attn.hook_q", "head", ("layer", "head"), "head queries, all positions"),
        Site("k", "blocks.{layer}.attn.hook_k", "head", ("layer", "head"), "head keys, all positions"),
        Site("v", "blocks.{layer}.attn.hook_v", "head", ("layer", "head"), "head values, all positions"),
        Site(
            "q_by_pos", "blocks.{layer}.attn.hook_q", "pos_head", ("layer", "pos", "head"), "head queries by position"
        ),
        Site("k_by_pos", "blocks.{layer}.attn.hook_k", "pos_head", ("layer", "pos", "head"), "head keys by position"),
        Site("v_by_pos", "blocks.{layer}.attn.hook_v", "pos_head", ("layer", "pos", "head"), "head values by position"),
        Site(
            "pattern",
            "blocks.{layer}.attn.hook_pattern",
            "pattern",
            ("layer", "head"),
            "attention pattern, all destinations",
        ),
        Site(
            "pattern_by_pos",
            "blocks.{layer}.attn.hook_pattern",
            "pattern_dest",
            ("layer", "head", "dest_pos"),
            "attention pattern by destination position",
        ),
        Site(
            "mlp_neuron",
            "blocks.{layer}.mlp.hook_post",
            "neuron",
            ("neuron",),
            "MLP neurons of one layer (pass layer=), all positions",
        ),
    ]
}
SITE_ALIASES = {"head_out": "z", "head_out_by_pos": "z_by_pos", "attn_head_out": "z", "neuron": "mlp_neuron"}
DIRECTIONS = ("denoise", "noise")


def resolve_site(site: str) -> Site:
    """The `Site` for a name (aliases: head_out -> z, head_out_by_pos -> z_by_pos, neuron -> mlp_neuron)."""
    name = SITE_ALIASES.get(site, site)
    if name not in SITES:
        raise LenslabError(
            f"site {site!r} is not one of {', '.join(SITES)}{did_you_mean(str(site), list(SITES) + list(SITE_ALIASES))}"
        )
    return SITES[name]


def site_hook(site: str, layer: int) -> str:
    """The hook name of `site` at `layer`: a site name or alias of `SITES`, or a hook template with
    `{layer}` (`"blocks.{layer}.mlp.hook_post"`).

    >>> site_hook("resid_post", 3), site_hook("z", 1), site_hook("blocks.{layer}.mlp.hook_pre", 0)
    ('blocks.3.hook_resid_post', 'blocks.1.attn.hook_z', 'blocks.0.mlp.hook_pre')
    """
    if "{layer}" in site:
        return site.format(layer=layer)
    return resolve_site(site).hook.format(layer=layer)


def grid(model, st: Site, task: Task, layer_list, source_cache, layer) -> list[list[int]]:
    """Values iterated along each axis of the site (layer indices, positions, heads, ...)."""
    pos = list(range(task.seq_len))
    if st.kind == "neuron":
        return [list(range(source_cache[st.hook.format(layer=layer)].shape[-1]))]
    first = source_cache[st.hook.format(layer=layer_list[0])]
    if st.kind == "pos":
        return [layer_list, pos]
    if st.kind in ("head", "pos_head"):
        heads = list(range(first.shape[2]))  # key/value heads for k, v under grouped-query attention
        return [layer_list, heads] if st.kind == "head" else [layer_list, pos, heads]
    heads = list(range(first.shape[1]))
    return [layer_list, heads] if st.kind == "pattern" else [layer_list, heads, pos]


def position_labels(model, task: Task) -> list[str]:
    """'i:token' for each position of the first clean prompt (tokens can repeat, so the index leads)."""
    try:
        toks = model.to_str_tokens(task.clean_tokens[0])
    except Exception:  # a model without a tokenizer
        toks = [str(t) for t in task.clean_tokens[0].tolist()]
    return [f"{i}:{t}" for i, t in enumerate(toks)]


def axis_labels(model, task: Task, st: Site, grid) -> dict[str, list[str]]:
    """Labels along each axis of a site's grid: "L3", "0:token", "H1", "N5"."""
    out: dict[str, list[str]] = {}
    for ax, values in zip(st.axes, grid):
        if ax == "layer":
            out[ax] = [f"L{l}" for l in values]
        elif ax in ("pos", "dest_pos"):
            out[ax] = position_labels(model, task)
        elif ax == "head":
            out[ax] = [f"H{h}" for h in values]
        elif ax == "neuron":
            out[ax] = [f"N{n}" for n in values]
    return out


def patch_result(model, task: Task, st: Site, grid, scores: Tensor, metric, direction: str, **prov) -> PatchResult:
    """The `PatchResult` of an exact-patching engine: `scores` on `grid`, labels, the bound metric's
    baselines and provenance (`prov` adds engine details). Shared by every engine."""
    return PatchResult(
        scores=scores,
        axes=st.axes,
        labels=axis_labels(model, task, st, grid),
        site=st.name,
        method="exact",
        metric=metric.name,
        direction=direction,
        clean_value=metric.clean_value,
        corrupt_value=metric.corrupt_value,
        provenance=provenance(model, task, hook=st.hook, **prov),
    )
