"""`Intervention`: what changes the model, as data.

An intervention is a list of edits. Each edit names one TransformerLens hook point
(`blocks.3.hook_resid_post`, `blocks.1.attn.hook_z`, `blocks.2.mlp.hook_post`), the positions
it touches, the units (entries of the activation's last dimension; for per-head hooks such as
`hook_z` of shape `[batch, pos, head, d_head]` the `head x d_head` entries flattened), an
operation and a strength. Every steering method in lenslab returns one (DiffMean and ActAdd in
`lenslab.steering.baselines`, AUSteer units, LinEAS maps, SAE-feature edits, expert switches), so one
`apply` (`lenslab.steering.edit_hooks`) serves generation and evaluation, and a preset is a JSON
file plus a safetensors file.

Operations, for the selected entries `x` and strength `s` (each is the identity at `s = 0` and
its full effect at `s = 1`):

| op | tensors | new value |
|---|---|---|
| `add` | `vector` | `x + s * vector` (ActAdd, DiffMean / CAA) |
| `multiply` | `vector` (factors f) | `x * (1 + s * (f - 1))` (AUSteer: f = 1 + alpha * beta) |
| `affine` | `vector` (scale a), `shift` (b) | `s * (a * x + b) + (1 - s) * x` (LinEAS) |
| `clamp` | `vector` (values c) | `s * c + (1 - s) * x` |
| `zero` | none | `(1 - s) * x` |
| `project` | `vector` (direction v) | `x - s * (x . v / v . v) * v` (project out; probe directions) |
| `feature` | `vector` (decoder row d), `feature` (`FeatureRead`) | `x + s * (target - a(x)) * d` |

A `feature` edit sets one SAE feature's activation to `target` (0: ablate, c: clamp) and keeps
everything else the SAE does not explain: `a(x)` is the feature's current activation, read from
the edited entries with the SAE's own encoder (`FeatureRead`: encoder column, bias, `b_dec`,
threshold or top-k), and `d` its decoder row. The result equals the SAE's decomposition
`decode(acts) + error` with that one activation replaced (sae-lens's error-term forward). Build them
with `lenslab.steering.features` (`ablate_feature`, `clamp_feature`; `add_feature` is an `add` edit
with vector `c * W_dec[f]`). A transcoder feature reads one hook and writes another (the MLP's input
and its output): its `FeatureRead.hook` names the hook `a` is read at, at the same positions, and
the edit sits at the hook it writes (`lenslab.steering.graph_interventions` builds them from
attribution-graph nodes).

MoE expert switches (`lenslab.steering.experts`, MoTE) are edits too: `hook` is the MoE block
`"blocks.{layer}.mlp"`, `units` the expert ids, no tensors; `drop_experts` (zero the gate weight,
renormalise the rest of the top k), `mask_experts` (router logit -inf: the next expert enters) and
`force_experts` (into every token's top k). `switch_experts` builds them from (layer, expert) pairs.

Positions: `"all"`, `"last"` (the last position of each forward pass), `"prompt"` / `"generated"`
(needs `prompt_len`, given by `generate`), or a tuple of indices (negative ones count from the
end). An `add` edit at explicit positions may carry one vector per position (`[n_pos, n_units]`,
as ActAdd does).

>>> import torch
>>> from lenslab.steering import Edit, Intervention
>>> iv = Intervention(edits=(Edit(hook="blocks.0.hook_resid_post", op="add", vector=torch.ones(32)),))
>>> (iv + iv.with_strength(0.5)).strengths()
[1.0, 0.5]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.toolbox import hook_unit_sizes, load_spec, save_spec

UNIT_OPS = ("add", "multiply", "affine", "clamp", "zero", "feature", "project")
EXPERT_OPS = ("drop_experts", "mask_experts", "force_experts")  # MoE switches: lenslab.steering.experts
OPS = UNIT_OPS + EXPERT_OPS
POSITION_WORDS = ("all", "last", "prompt", "generated")
FEATURE_KINDS = ("relu", "jumprelu", "topk")
FORMAT = "lenslab.intervention/1"

Positions = str | tuple[int, ...]
_MOE_BLOCK = re.compile(r"blocks\.\d+\.mlp")


def _tensor(v, what: str) -> Tensor | None:
    if v is None:
        return None
    t = v.detach().cpu() if isinstance(v, Tensor) else torch.as_tensor(v)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise LenslabError(f"{what} has a NaN or infinite entry at index {bad}; pass finite numbers")
    return t.contiguous()


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureRead:
    """How a `feature` edit reads one SAE feature's activation `a(x)` from the edited entries
    `x` `[..., d_in]`, and the activation it sets (`target`). With
    `pre = (x - b_dec) @ encoder + bias` (no `b_dec` term when it is None):

    - `relu` (sae-lens `StandardSAE`): `a = max(pre, 0)`;
    - `jumprelu` (`JumpReLUSAE`): `a = max(pre, 0) * (pre > threshold)`;
    - `topk` (`TopKSAE`): `encoder` is the whole encoder `[d_in, d_sae]` and `bias` `[d_sae]`;
      `a = max(pre[index], 0)` when `index` is among the `k` largest entries of `pre`, else 0.

    `x` is the edited entries themselves unless `hook` names another hook point: then `x` is that
    hook's activation at the edited positions (a transcoder reads the MLP's input,
    `blocks.{l}.ln2.hook_normalized`, and its feature edits write the MLP's output,
    `blocks.{l}.hook_mlp_out`). That hook must run before the edited one in the forward pass.

    Attributes:
        index: the feature's id in its SAE.
        kind: "relu", "jumprelu" or "topk".
        encoder: `[d_in]`, the encoder column `W_enc[:, index]` (`[d_in, d_sae]` for topk).
        bias: `[]`, the encoder bias `b_enc[index]` (`[d_sae]` for topk).
        b_dec: `[d_in]`, subtracted before encoding (sae-lens `apply_b_dec_to_input`), or None.
        threshold: the JumpReLU threshold (jumprelu only).
        k: active features per token (topk only).
        target: the activation the feature is set to (0 ablates).
        hook: the hook point the activation is read at, or None for the edited entries.
    """

    index: int
    kind: str
    encoder: Tensor
    bias: Tensor
    b_dec: Tensor | None = None
    threshold: float = 0.0
    k: int | None = None
    target: float = 0.0
    hook: str | None = None

    def __post_init__(self) -> None:
        if self.hook is not None and (not isinstance(self.hook, str) or not self.hook):
            raise LenslabError(
                f"hook of feature {self.index} must be a hook name like 'blocks.0.ln2.hook_normalized' or None, "
                f"got {self.hook!r}"
            )
        if self.kind not in FEATURE_KINDS:
            raise LenslabError(
                f"feature kind {self.kind!r} is not one of {', '.join(FEATURE_KINDS)}"
                f"{did_you_mean(self.kind, FEATURE_KINDS)}"
            )
        for name in ("threshold", "target"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise LenslabError(f"{name} of feature {self.index} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "index", int(self.index))
        enc = _tensor(self.encoder, f"encoder of feature {self.index}")
        bias = _tensor(self.bias, f"encoder bias of feature {self.index}")
        b_dec = _tensor(self.b_dec, f"b_dec of feature {self.index}")
        object.__setattr__(self, "encoder", enc)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "b_dec", b_dec)
        topk = self.kind == "topk"
        if topk:
            if enc.ndim != 2 or bias.shape != enc.shape[1:]:
                raise LenslabError(
                    f"a topk feature read needs the whole encoder [d_in, d_sae] and bias [d_sae], got "
                    f"{tuple(enc.shape)} and {tuple(bias.shape)}"
                )
            if not 0 <= self.index < enc.shape[1]:
                raise LenslabError(f"feature {self.index} is out of range for an encoder of {enc.shape[1]} features")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= enc.shape[1]:
                raise LenslabError(f"a topk feature read needs k between 1 and d_sae={enc.shape[1]}, got {self.k!r}")
        else:
            if enc.ndim != 1 or bias.ndim != 0:
                raise LenslabError(
                    f"a {self.kind} feature read needs the encoder column [d_in] and a scalar bias, got "
                    f"{tuple(enc.shape)} and {tuple(bias.shape)}"
                )
            if self.k is not None:
                raise LenslabError(f"k is only for topk feature reads (this one is {self.kind}); drop it")
        if b_dec is not None and b_dec.shape != enc.shape[:1]:
            raise LenslabError(
                f"b_dec of feature {self.index} has shape {tuple(b_dec.shape)}, the encoder reads "
                f"{enc.shape[0]} entries; make them equal"
            )

    @property
    def d_in(self) -> int:
        return int(self.encoder.shape[0])

    def with_target(self, target: float) -> FeatureRead:
        return replace(self, target=target)

    def activation(self, x: Tensor) -> Tensor:
        """The feature's activation `[...]` on entries `x` `[..., d_in]` (float32)."""
        x = x.float()
        enc = self.encoder.to(x.device)
        if self.b_dec is not None:
            x = x - self.b_dec.to(x.device)
        if self.kind == "topk":
            pre = x @ enc + self.bias.to(x.device)  # [..., d_sae]
            chosen = (pre.topk(self.k, dim=-1).indices == self.index).any(-1)
            return pre[..., self.index].clamp(min=0) * chosen
        pre = x @ enc + self.bias.to(x.device)
        a = pre.clamp(min=0)
        return a * (pre > self.threshold) if self.kind == "jumprelu" else a

    def __eq__(self, other) -> bool:
        if not isinstance(other, FeatureRead):
            return NotImplemented
        return (
            (self.index, self.kind, self.threshold, self.k, self.target, self.hook)
            == (other.index, other.kind, other.threshold, other.k, other.target, other.hook)
            and _teq(self.encoder, other.encoder)
            and _teq(self.bias, other.bias)
            and _teq(self.b_dec, other.b_dec)
        )

    __hash__ = None

    def to_preset(self, prefix: str) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able fields, tensors keyed under `prefix`): this read's half of a preset."""
        tensors = {f"{prefix}.encoder": self.encoder, f"{prefix}.bias": self.bias}
        if self.b_dec is not None:
            tensors[f"{prefix}.b_dec"] = self.b_dec
        d = {
            "index": self.index,
            "kind": self.kind,
            "target": self.target,
            "threshold": self.threshold,
            "k": self.k,
            **{key.rsplit(".", 1)[1]: key for key in tensors},
        }
        if self.hook is not None:
            d["hook"] = self.hook
        return d, tensors

    @classmethod
    def from_preset(cls, d: dict, tensors: dict[str, Tensor]) -> FeatureRead:
        """The read `to_preset` wrote."""
        kw = {k: d[k] for k in ("index", "kind", "target", "threshold", "k", "hook") if k in d}
        for key in ("encoder", "bias", "b_dec"):
            if d.get(key) is not None:
                if d[key] not in tensors:
                    raise LenslabError(
                        f"preset names tensor {d[key]!r} but its safetensors file lacks it; re-save the preset"
                    )
                kw[key] = tensors[d[key]]
        return cls(**kw)


@dataclass(frozen=True, kw_only=True, eq=False)
class Edit:
    """One edit at one hook point (see the module docstring for the ops).

    Attributes:
        hook: a TransformerLens hook name, e.g. `"blocks.3.hook_resid_post"`; for expert ops the
            MoE block, `"blocks.3.mlp"`.
        op: "add", "multiply", "affine", "clamp", "zero", "feature", "project", or an expert op:
            "drop_experts", "mask_experts", "force_experts" (see `lenslab.steering.experts`).
        vector: `[n_units]` (or `[n_pos, n_units]` for `add` at explicit positions): the added
            vector, the factors, the affine scale, the clamp values, (feature) the SAE
            feature's decoder row or (project) the direction removed; None for `zero` and the
            expert ops.
        shift: `[n_units]`, the affine shift (affine only).
        feature: how a `feature` edit reads the SAE feature and what it sets it to
            (`FeatureRead`; feature edits only).
        units: indices into the (flattened) last dimension, or None for all of it; for expert
            ops the expert ids (required).
        positions: "all", "last", "prompt", "generated", or a tuple of position indices.
        strength: a finite float; 0 leaves the model unchanged.
    """

    hook: str
    op: str = "add"
    vector: Tensor | None = None
    shift: Tensor | None = None
    units: tuple[int, ...] | None = None
    positions: Positions = "all"
    strength: float = 1.0
    feature: FeatureRead | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise LenslabError(
                f"hook must be a TransformerLens hook name like 'blocks.0.hook_resid_post', got {self.hook!r}"
            )
        if self.op not in OPS:
            raise LenslabError(f"op {self.op!r} is not one of {', '.join(OPS)}{did_you_mean(self.op, OPS)}")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise LenslabError(f"strength of the edit at {self.hook} must be a finite number, got {s!r}")
        object.__setattr__(self, "strength", float(s))
        vec = _tensor(self.vector, f"vector of the {self.op} edit at {self.hook}")
        shift = _tensor(self.shift, f"shift of the affine edit at {self.hook}")
        object.__setattr__(self, "vector", vec)
        object.__setattr__(self, "shift", shift)
        if self.op in EXPERT_OPS:
            if not _MOE_BLOCK.fullmatch(self.hook):
                m = re.match(r"blocks\.(\d+)", self.hook)
                hint = f"; use 'blocks.{m.group(1)}.mlp'" if m else ""
                raise LenslabError(
                    f"a {self.op} edit names a MoE block, 'blocks.{{layer}}.mlp' (the same for every architecture), "
                    f"got {self.hook!r}{hint}"
                )
            if vec is not None or shift is not None:
                raise LenslabError(
                    f"a {self.op} edit at {self.hook} takes no vector or shift (its units are expert ids); drop them"
                )
            if self.units is None:
                raise LenslabError(f"a {self.op} edit at {self.hook} needs units=(expert ids, ...), e.g. units=(3,)")
        elif self.op == "zero":
            if vec is not None or shift is not None:
                raise LenslabError(f"a zero edit at {self.hook} takes no vector or shift; drop them")
        elif self.op == "feature":
            if not isinstance(self.feature, FeatureRead):
                raise LenslabError(
                    f"a feature edit at {self.hook} needs feature=FeatureRead(...) (build it with "
                    "lenslab.steering.features.ablate_feature / clamp_feature)"
                )
            if self.feature.hook is not None:  # read at another hook: the decoder row has the edited size
                if vec is None or vec.ndim != 1:
                    raise LenslabError(
                        f"a feature edit at {self.hook} needs its decoder row as a 1-D vector [n_units], got "
                        f"{None if vec is None else tuple(vec.shape)}"
                    )
            elif vec is None or vec.ndim != 1 or vec.shape != self.feature.encoder.shape[:1]:
                raise LenslabError(
                    f"a feature edit at {self.hook} needs its decoder row as vector [d_in] = [{self.feature.d_in}] "
                    f"(the size its encoder reads), got {None if vec is None else tuple(vec.shape)}"
                )
        elif vec is None:
            raise LenslabError(f"a {self.op} edit at {self.hook} needs a vector; pass vector=<tensor>")
        elif self.op == "project" and (vec.ndim != 1 or not bool(vec.norm() > 0)):
            raise LenslabError(
                f"a project edit at {self.hook} needs a non-zero direction [n_units], got shape {tuple(vec.shape)}"
                + (" of zeros" if vec.ndim == 1 else "")
            )
        if self.feature is not None and self.op != "feature":
            raise LenslabError(f"feature= is only for feature edits (the edit at {self.hook} is {self.op}); drop it")
        if shift is not None and self.op != "affine":
            raise LenslabError(f"shift is only for affine edits (the edit at {self.hook} is {self.op}); drop it")
        if self.op == "affine" and shift is None:
            object.__setattr__(self, "shift", torch.zeros_like(vec))
        units = self.units
        if units is not None:
            units = tuple(int(u) for u in (units.tolist() if isinstance(units, Tensor) else units))
            if not units:
                raise LenslabError(f"units of the edit at {self.hook} is empty; pass None for all units")
            if min(units) < 0:
                raise LenslabError(f"unit index {min(units)} at {self.hook} is negative; unit indices start at 0")
            if len(set(units)) != len(units):
                raise LenslabError(f"units of the edit at {self.hook} repeat an index; list each unit once")
            object.__setattr__(self, "units", units)
        pos = self.positions
        if isinstance(pos, str):
            if pos not in POSITION_WORDS:
                raise LenslabError(
                    f"positions {pos!r} is not one of {', '.join(POSITION_WORDS)} or a list of indices"
                    f"{did_you_mean(pos, POSITION_WORDS)}"
                )
        else:
            pos = tuple(int(p) for p in (pos.tolist() if isinstance(pos, Tensor) else pos))
            if not pos:
                raise LenslabError(f"positions of the edit at {self.hook} is empty; pass 'all' or some indices")
            object.__setattr__(self, "positions", pos)
        if vec is not None:
            n_units = len(units) if units is not None else None
            if vec.ndim == 2:
                if self.op != "add" or isinstance(pos, str) or vec.shape[0] != len(pos):
                    raise LenslabError(
                        f"a 2-D vector [n_pos, n_units] at {self.hook} needs op 'add' and one explicit position "
                        f"per row (got op {self.op!r}, positions {pos!r}, vector shape {tuple(vec.shape)})"
                    )
            elif vec.ndim != 1:
                raise LenslabError(f"vector at {self.hook} must be 1-D [n_units], got shape {tuple(vec.shape)}")
            if n_units is not None and vec.shape[-1] != n_units:
                raise LenslabError(
                    f"vector at {self.hook} has {vec.shape[-1]} entries but units lists {n_units}; give one entry per unit"
                )
            if shift is not None and shift.shape != vec.shape[-1:]:
                raise LenslabError(
                    f"shift at {self.hook} has shape {tuple(shift.shape)}, scale {tuple(vec.shape)}; make them equal"
                )

    def with_strength(self, strength: float) -> Edit:
        return replace(self, strength=strength)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Edit):
            return NotImplemented
        return (
            (self.hook, self.op, self.units, self.positions, self.strength)
            == (other.hook, other.op, other.units, other.positions, other.strength)
            and _teq(self.vector, other.vector)
            and _teq(self.shift, other.shift)
            and (self.feature == other.feature if self.feature is not None else other.feature is None)
        )

    __hash__ = None  # tensors inside


def _teq(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and torch.equal(a, b)


@dataclass(frozen=True, kw_only=True, eq=False)
class Intervention:
    """A composable list of `Edit`s, applied in order (edits at one hook compose left to right).

    Attributes:
        edits: the edits.
        name: a label for presets and the app.
        provenance: how it was made (method, model, prompts, layers, lenslab version...).
    """

    edits: tuple[Edit, ...] = ()
    name: str = ""
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        edits = tuple(self.edits) if not isinstance(self.edits, Edit) else (self.edits,)
        for e in edits:
            if not isinstance(e, Edit):
                raise LenslabError(f"Intervention edits must be Edit objects, got {type(e).__name__}")
        object.__setattr__(self, "edits", edits)

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        return compose([self, other])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Intervention):
            return NotImplemented
        return self.edits == other.edits and self.name == other.name and self.provenance == other.provenance

    __hash__ = None

    @property
    def hook_names(self) -> list[str]:
        return sorted({e.hook for e in self.edits})

    def strengths(self) -> list[float]:
        return [e.strength for e in self.edits]

    def with_strength(self, strength: float) -> Intervention:
        """The same edits, every one at `strength` (what a strength slider sets)."""
        return replace(self, edits=tuple(e.with_strength(strength) for e in self.edits))

    def n_units(self, model=None) -> int:
        """Number of (hook, unit) entries edited; edits over all units need `model` for the size."""
        total = 0
        for e in self.edits:
            if e.units is not None:
                total += len(e.units)
            elif e.vector is not None:
                total += e.vector.shape[-1]
            elif model is not None:
                total += hook_unit_sizes(model, [e.hook])[e.hook]
            else:
                raise LenslabError("a zero edit over all units needs the model to count units; pass model=")
        return total

    # --- JSON + safetensors ------------------------------------------------------------------
    def to_preset(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able spec, tensors by key): the two halves of a preset (`save` writes them)."""
        tensors: dict[str, Tensor] = {}
        edits = []
        for i, e in enumerate(self.edits):
            d = {
                "hook": e.hook,
                "op": e.op,
                "strength": e.strength,
                "positions": e.positions if isinstance(e.positions, str) else list(e.positions),
                "units": None if e.units is None else list(e.units),
            }
            for key in ("vector", "shift"):
                t = getattr(e, key)
                if t is not None:
                    tensors[f"edits.{i}.{key}"] = t
                    d[key] = f"edits.{i}.{key}"
            if e.feature is not None:
                d["feature"], ft = e.feature.to_preset(f"edits.{i}.feature")
                tensors.update(ft)
            edits.append(d)
        return {"format": FORMAT, "name": self.name, "edits": edits, "provenance": self.provenance}, tensors

    @classmethod
    def from_preset(cls, spec: dict, tensors: dict[str, Tensor]) -> Intervention:
        """The intervention `to_preset` wrote."""
        if spec.get("format") != FORMAT:
            raise LenslabError(
                f"not a lenslab intervention preset (format {spec.get('format')!r}, expected {FORMAT!r})"
            )
        edits = []
        for d in spec["edits"]:
            kw = {k: d[k] for k in ("hook", "op", "strength") if k in d}
            kw["positions"] = (
                d.get("positions", "all") if isinstance(d.get("positions", "all"), str) else tuple(d["positions"])
            )
            kw["units"] = None if d.get("units") is None else tuple(d["units"])
            for key in ("vector", "shift"):
                if d.get(key) is not None:
                    if d[key] not in tensors:
                        raise LenslabError(
                            f"preset names tensor {d[key]!r} but its safetensors file lacks it; re-save the preset"
                        )
                    kw[key] = tensors[d[key]]
            if d.get("feature") is not None:
                kw["feature"] = FeatureRead.from_preset(d["feature"], tensors)
            edits.append(Edit(**kw))
        return cls(edits=tuple(edits), name=spec.get("name", ""), provenance=spec.get("provenance", {}))


def compose(interventions: Iterable[Intervention]) -> Intervention:
    """One intervention applying all edits of `interventions`, in order."""
    ivs = list(interventions)
    edits = tuple(e for iv in ivs for e in iv.edits)
    name = " + ".join(iv.name for iv in ivs if iv.name)
    prov = {"composed_of": [iv.provenance for iv in ivs]} if any(iv.provenance for iv in ivs) else {}
    return Intervention(edits=edits, name=name, provenance=prov)


def save(intervention: Intervention, path: str | Path) -> Path:
    """Write `path` (JSON spec) and the tensors beside it (`<stem>.safetensors`); returns the JSON path.

    >>> iv = Intervention(edits=(Edit(hook="blocks.0.hook_resid_post", op="add", vector=torch.ones(32)),), name="ones")
    >>> path = save(iv, "preset.json")
    >>> sorted(p.name for p in path.parent.glob("preset.*"))
    ['preset.json', 'preset.safetensors']
    >>> load(path) == iv
    True
    """
    spec, tensors = intervention.to_preset()
    return save_spec(path, spec, tensors, "preset")


def load(path: str | Path) -> Intervention:
    """Read a preset written by `save` (JSON plus the safetensors file it names; never pickle)."""
    spec, tensors = load_spec(
        path, "preset", "check the path (a .json written by lenslab.steering.save)", tensors_required=False
    )
    return Intervention.from_preset(spec, tensors)


def position_index(positions: Positions, n_pos: int, prompt_len: int | None, hook: str) -> Tensor | slice:
    """Which positions of an `n_pos`-token activation `positions` selects at `hook`: a slice or an index tensor."""
    if positions == "all":
        return slice(None)
    if positions == "last":
        return slice(n_pos - 1, n_pos)
    if positions in ("prompt", "generated"):
        if prompt_len is None:
            if positions == "prompt":
                return slice(None)
            raise LenslabError(
                f"positions 'generated' at {hook} needs the prompt length: use lenslab.steering.generate, "
                "or apply(model, iv, prompt_len=n)"
            )
        return slice(0, prompt_len) if positions == "prompt" else slice(prompt_len, n_pos)
    idx = []
    for p in positions:
        if not -n_pos <= p < n_pos:
            raise LenslabError(
                f"position {p} at {hook} is out of range for an input of {n_pos} tokens; use a longer prompt "
                "or positions within it"
            )
        idx.append(p % n_pos)
    return torch.tensor(idx)
