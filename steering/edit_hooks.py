"""From an `Intervention` to a steered model: `validate` checks it against a model, `hooks` turns it
into TransformerLens forward hooks, and `apply` steers every forward pass inside a `with` block.

Unit edits become hooks on their hook points; expert switches go through
`lenslab.steering.experts` (hooks on a HookedTransformer MoE, torch hooks on a bridge's routers).
A feature edit that reads its activation at another hook (`FeatureRead.hook`: a transcoder
feature, read at the MLP's input and written to its output) adds one hook there that keeps the
activation for the edit, after the edits at that hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.steering.experts import apply_experts, expert_edits, tl_hooks, validate_experts
from lenslab.steering.intervention import EXPERT_OPS, Edit, Intervention, position_index
from lenslab.toolbox import hook_unit_sizes

__all__ = ["apply", "hooks", "validate"]


def validate(model, intervention: Intervention) -> None:
    """Check `intervention` against `model`: hook names, vector sizes, unit indices.

    Raises:
        LenslabError: naming the edit, the problem and the fix.
    """
    _validate(model, intervention)


def _validate(model, intervention: Intervention) -> list | None:
    """`validate`; returns the model's MoE layers when there are expert edits, else None."""
    if not isinstance(intervention, Intervention):
        raise LenslabError(f"expected an Intervention, got {type(intervention).__name__}")
    unit_edits = [e for e in intervention.edits if e.op not in EXPERT_OPS]
    switches = [e for e in intervention.edits if e.op in EXPERT_OPS]
    layers = None
    if switches:
        layers = validate_experts(model, switches)
    names = list(model.hook_dict.keys())
    known = set(names)
    for e in unit_edits:
        if e.hook not in known:
            raise LenslabError(f"hook {e.hook!r} is not a hook point of this model{did_you_mean(e.hook, names)}")
    reads = [e for e in unit_edits if e.op == "feature" and e.feature.hook is not None]
    for e in reads:
        if e.feature.hook not in known:
            raise LenslabError(
                f"the feature edit at {e.hook} reads hook {e.feature.hook!r}, which is not a hook point of this model"
                f"{did_you_mean(e.feature.hook, names)}"
            )
        at, to = (re.match(r"blocks\.(\d+)\.", h) for h in (e.feature.hook, e.hook))
        if at and to and int(at.group(1)) > int(to.group(1)):
            raise LenslabError(
                f"the feature edit at {e.hook} reads its activation at {e.feature.hook}, a later layer: the read "
                "hook must run before the edited one"
            )
    dims = hook_unit_sizes(model, sorted({e.hook for e in unit_edits} | {e.feature.hook for e in reads}))
    for e in reads:
        if dims[e.feature.hook] != e.feature.d_in:
            raise LenslabError(
                f"the feature edit at {e.hook} reads d_in={e.feature.d_in} entries at {e.feature.hook}, which has "
                f"{dims[e.feature.hook]}: its transcoder was trained on another model"
            )
    for e in unit_edits:
        d = dims[e.hook]
        if e.units is not None:
            if max(e.units) >= d:
                raise LenslabError(
                    f"unit index {max(e.units)} is out of range at {e.hook}, which has {d} units (0..{d - 1})"
                )
        elif e.op == "feature" and e.vector.shape[-1] != d:
            raise LenslabError(
                f"the SAE feature edit at {e.hook} reads d_in={e.vector.shape[-1]} entries, but this model's {e.hook} "
                f"has {d}: the SAE was trained on another model (or hook); use an SAE trained on this model"
            )
        elif e.vector is not None and e.vector.shape[-1] != d:
            raise LenslabError(
                f"vector at {e.hook} has {e.vector.shape[-1]} entries but the hook's last dimension has {d}; "
                f"pass a vector of size {d} or list the units it covers"
            )
    return layers


def _edit_fn(e: Edit, prompt_len: int | None, kept: dict[str, Tensor]) -> Callable:
    """The hook function of unit edit `e`; `kept` holds the activations feature edits read at other hooks."""

    def fn(act: Tensor, hook) -> Tensor:
        if e.op == "feature" and e.strength == 0:
            return act  # bit-identical
        b, p = act.shape[:2]
        flat = act.reshape(b, p, -1)
        pos = position_index(e.positions, p, prompt_len, e.hook)
        if isinstance(pos, slice):
            pos = torch.arange(p)[pos]
        if pos.numel() == 0:
            return act
        units = torch.arange(flat.shape[-1]) if e.units is None else torch.tensor(e.units)
        pos, units = pos.to(act.device), units.to(act.device)
        ix = (slice(None), pos[:, None], units[None, :])
        x = flat[ix]  # [batch, n_pos, n_units]
        s = e.strength
        v = None if e.vector is None else e.vector.to(act.device, act.dtype)
        if e.op == "add":
            new = x + s * v
        elif e.op == "multiply":
            new = x * (1 + s * (v - 1))
        elif e.op == "affine":
            new = s * (v * x + e.shift.to(act.device, act.dtype)) + (1 - s) * x
        elif e.op == "clamp":
            new = s * v + (1 - s) * x
        elif e.op == "feature":
            if e.feature.hook is None:
                a = e.feature.activation(x)  # [batch, n_pos], float32
            else:
                src = kept.get(e.feature.hook)
                if src is None or src.shape[:2] != act.shape[:2]:
                    raise LenslabError(
                        f"the feature edit at {e.hook} reads {e.feature.hook}, which has not run in this forward "
                        "pass: the read hook must run before the edited one"
                    )
                a = e.feature.activation(src.reshape(b, p, -1)[:, pos])
            new = x + (s * (e.feature.target - a)).to(act.dtype)[..., None] * v
        elif e.op == "project":  # remove the component along v
            new = x - s * ((x @ v) / (v @ v))[..., None] * v
        else:  # zero
            new = (1 - s) * x
        out = flat.clone()
        out[ix] = new
        return out.reshape(act.shape)

    return fn


def _keeper(name: str, kept: dict[str, Tensor]) -> Callable:
    def keep(act: Tensor, hook) -> None:
        kept[name] = act

    return keep


def _unit_pairs(intervention: Intervention, prompt_len: int | None) -> list[tuple[str, Callable]]:
    """The hooks of the unit edits, then one per hook that a feature edit reads its activation at."""
    kept: dict[str, Tensor] = {}
    edits = [e for e in intervention.edits if e.op not in EXPERT_OPS]
    pairs = [(e.hook, _edit_fn(e, prompt_len, kept)) for e in edits]
    reads = dict.fromkeys(e.feature.hook for e in edits if e.op == "feature" and e.feature.hook is not None)
    return pairs + [(name, _keeper(name, kept)) for name in reads]


def hooks(model, intervention: Intervention, *, prompt_len: int | None = None) -> list[tuple[str, Callable]]:
    """Validated TransformerLens forward hooks `[(hook_name, fn), ...]` for `intervention`.

    Use with `model.run_with_hooks(tokens, fwd_hooks=hooks(model, iv))` or `model.hooks(...)`.
    `prompt_len` fixes what "prompt" and "generated" positions mean. Expert edits on a
    HookedTransformer MoE become hooks too; on a TransformerBridge MoE they act through torch
    hooks on the Hugging Face routers, so use `apply` there (this raises a `LenslabError`).
    """
    layers = _validate(model, intervention)
    pairs = _unit_pairs(intervention, prompt_len)
    switches = expert_edits(intervention)
    if switches:
        if layers[0].kind != "hooked":
            raise LenslabError(
                "expert switches on a TransformerBridge MoE act through torch hooks on its Hugging Face routers, "
                "not TransformerLens hooks: use `with lenslab.steering.apply(model, iv):` instead of hooks()"
            )
        pairs += tl_hooks(model, switches, layers, prompt_len=prompt_len)
    return pairs


@contextmanager
def apply(model, intervention: Intervention | None, *, prompt_len: int | None = None) -> Iterator:
    """Context manager: inside it every forward pass of `model` is steered by `intervention`.

    >>> import lenslab
    >>> from lenslab.steering import actadd
    >>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    >>> iv = actadd(model, "the day was lovely .", "the day was awful .", layer=1)
    >>> tokens = model.to_tokens("the day was awful . the movie was")
    >>> with apply(model, iv):
    ...     logits = model(tokens)  # [batch, pos, d_vocab], steered
    >>> model.to_string(logits[0, -1].argmax()), model.to_string(model(tokens)[0, -1].argmax())   # then unsteered
    ('lovely', 'bitter')
    """
    if intervention is None or not intervention.edits:
        yield model
        return
    layers = _validate(model, intervention)
    pairs = _unit_pairs(intervention, prompt_len)
    with apply_experts(model, expert_edits(intervention), layers, pairs, prompt_len=prompt_len):
        yield model
