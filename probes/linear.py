"""Linear probes: is a property of the prompt linearly readable from a hook's activations?

A probe reads one activation per prompt (at the `last` token, a given position index, or the
`mean` over the prompt's tokens) at a hook, per layer, and fits a linear map to the prompt's label:
logistic regression for classes (`kind="logistic"`), ridge regression for numbers
(`kind="linear"`). The solver is scikit-learn's (`LogisticRegression`, `Ridge`): a well-kept,
well-tested library rather than a hand-written optimiser. Hooks are TransformerLens names
(`blocks.3.hook_resid_post`) or sites of the one registry (`lenslab.sites.SITES`: `resid_post`,
`attn_out`, `mlp_out`, `z`, `mlp_neuron`, ...) or templates with `{layer}`.

**Split by prompt.** Prompts are split into train and test by a seeded shuffle of the distinct
prompts (identical prompts always land on the same side), stratified by class, so a test accuracy
is always on prompts the probe never saw.

**Control task and selectivity** (Hewitt & Liang 2019, "Designing and Interpreting Probes with
Control Tasks", arXiv:1909.03368). A probe that is expressive enough decodes anything, so its
accuracy alone says little. The control task gives each *type* of input a random label, drawn from
the empirical label distribution with the seed, and the same probe (same hook, split, solver and
regularisation) is trained on it; *selectivity* is test accuracy minus control test accuracy. In
the paper a type is a word type (every occurrence of "cat" gets the same random label). Here an
input is a prompt, so the default type is the prompt itself (`control="prompt"`: repeats of a
prompt share one random label): the control then measures how much the probe *memorises*
(`control_train`) and its test accuracy sits at chance, so selectivity is how far the real labels
generalise beyond what a probe of this capacity fits to noise. `control="token"` is the paper's
word-type control read literally: the type is the token at the probed position (a probe that reads
the current token fits it perfectly, so selectivity is then "how much more than the token").
Any sequence of keys, one per prompt (a template id, say), defines the types too.

`train_probes` returns a `ProbeResult` (a `lenslab.results.Result`): per site and layer the train
and test accuracy (R² for `kind="linear"`), the control's, the selectivity and the majority-class
rate of the test split, with every trained `Probe` (weights, bias, hook, layer, position, label
names, the training classes' means) kept in it. A `Probe` saves to JSON plus safetensors, predicts
and scores new prompts, and gives its direction; `lenslab.steering.probe_steering` turns that
direction into an `Intervention`.

>>> import lenslab
>>> from lenslab.data import sentiment
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> prompts = sentiment.prompts(24, "positive", seed=5) + sentiment.prompts(24, "negative", seed=6)
>>> labels = ["positive"] * 24 + ["negative"] * 24
>>> res = train_probes(model, prompts, labels, site="resid_post", layers=[0, 1])
>>> [(r["layer"], r["test"], r["control_test"] <= 0.75) for r in res.rows]
[(0, 1.0, True), (1, 1.0, True)]
>>> probe = res.probe(layer=1)
>>> probe.hook, probe.label_names, probe.predict_prompts(model, ["the day was lovely . the movie was"])
('blocks.1.hook_resid_post', ('negative', 'positive'), ['positive'])
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lenslab import figures, tasks
from lenslab._errors import LenslabError, did_you_mean
from lenslab.data import refusal, sentiment
from lenslab.results import Result, provenance
from lenslab.sites import SITE_ALIASES, SITES, site_hook
from lenslab.tasks import Task
from lenslab.toolbox import (
    check_layers,
    hook_unit_sizes,
    length_batches,
    load_spec,
    model_device,
    progress_reporter,
    save_spec,
)

__all__ = [
    "CONTROLS",
    "DATASETS",
    "KINDS",
    "Probe",
    "ProbeResult",
    "control_labels",
    "dataset",
    "load_probe",
    "probe_hooks",
    "read_activations",
    "resolve_labels",
    "split_by_prompt",
    "train_probes",
]

KINDS = ("logistic", "linear")
POSITION_WORDS = ("last", "mean")
CONTROLS = ("prompt", "token")
FORMAT = "lenslab.probe/1"

Inputs = Sequence[str] | Tensor | Task
Labels = Sequence | Callable[[Tensor], object] | str | None
_BLOCK = re.compile(r"blocks\.(\d+)\.")


# --- inputs, hooks, activations ------------------------------------------------------------------
def token_rows(model, inputs: Inputs) -> tuple[list[Tensor], list[str] | None]:
    """`inputs` as one 1-D token tensor per prompt (CPU), and the prompts' texts where known.

    `inputs` is a list of prompts (tokenised with the model's BOS), a `[batch, pos]` token tensor
    or a `Task` (its clean tokens and prompts)."""
    if isinstance(inputs, Task):
        rows = list(inputs.clean_tokens.cpu())
        return rows, list(inputs.clean_prompts) if inputs.clean_prompts else None
    if isinstance(inputs, Tensor):
        if inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] == 0 or inputs.is_floating_point():
            raise LenslabError(
                f"a token tensor must be a non-empty [batch, pos] tensor of token ids, got {tuple(inputs.shape)} "
                f"{inputs.dtype}"
            )
        return list(inputs.long().cpu()), None
    if isinstance(inputs, str):
        inputs = [inputs]
    prompts = list(inputs)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise LenslabError("prompts must be a non-empty list of non-empty strings (or a token tensor, or a Task)")
    return [model.to_tokens(p)[0].cpu() for p in prompts], prompts


def layer_of(hook: str) -> int | None:
    """The block index a hook name sits in (`blocks.3.hook_resid_post` -> 3), else None."""
    m = _BLOCK.match(hook)
    return int(m.group(1)) if m else None


def probe_hooks(model, site: str | Sequence[str], layers: int | Sequence[int] | None = None) -> list[tuple]:
    """`(site, layer, hook)` for every site and layer, checked against the model.

    A site is a name of `lenslab.sites.SITES` (or an alias) or a template with `{layer}`, read at
    each of `layers` (None: every layer), or one full hook name (`"blocks.2.hook_mlp_out"`,
    `"hook_embed"`), read once. An unknown name raises a `LenslabError` suggesting the nearest.
    """
    sites = [site] if isinstance(site, str) else list(site)
    if not sites:
        raise LenslabError("site is empty: pass a site name such as 'resid_post' or a hook name")
    names = list(model.hook_dict)
    out = []
    for s in sites:
        if not isinstance(s, str) or not s:
            raise LenslabError(f"site {s!r} must be a site name or a hook name (a non-empty string)")
        if "{layer}" in s or s in SITES or s in SITE_ALIASES:
            out += [(s, layer, site_hook(s, layer)) for layer in check_layers(model, layers)]
        elif s in model.hook_dict:
            out.append((s, layer_of(s), s))
        elif "." in s or s.startswith("hook_"):
            raise LenslabError(f"hook {s!r} does not exist in this model{did_you_mean(s, names)}")
        else:
            options = names + list(SITES) + list(SITE_ALIASES)
            raise LenslabError(
                f"{s!r} is neither a site of lenslab.sites.SITES ({', '.join(SITES)}) nor a hook of this "
                f"model{did_you_mean(s, options)}"
            )
    for _, _, hook in out:
        if hook not in model.hook_dict:
            raise LenslabError(f"hook {hook!r} does not exist in this model{did_you_mean(hook, names)}")
    try:
        hook_unit_sizes(model, [h for _, _, h in out])
    except LenslabError as exc:  # a hook without a [batch, pos, ...] activation (hook_pattern)
        raise LenslabError(f"{exc}; a probe reads one activation per prompt position") from None
    return out


def check_position(position: str | int) -> str | int:
    if isinstance(position, bool) or not (isinstance(position, int) or position in POSITION_WORDS):
        raise LenslabError(
            f"position {position!r} must be 'last', 'mean' or a token index (negative counts from the end)"
            f"{did_you_mean(str(position), POSITION_WORDS)}"
        )
    return position


def pick(acts: Tensor, position: str | int) -> Tensor:
    """`[batch, pos, d]` -> `[batch, d]`: the last token, the mean over tokens, or one index."""
    if position == "last":
        return acts[:, -1]
    if position == "mean":
        return acts.mean(dim=1)
    n = acts.shape[1]
    if not -n <= position < n:
        raise LenslabError(f"position {position} is out of range for a prompt of {n} tokens")
    return acts[:, position]


def read_activations(
    model,
    inputs: Inputs,
    hooks: Sequence[str],
    position: str | int = "last",
    *,
    batch_size: int = 64,
    progress: bool | Callable[[int, int], None] = False,
) -> dict[str, Tensor]:
    """One activation per prompt at each hook: `{hook: [n_prompts, d]}` (float32, CPU; trailing
    axes flattened, so `hook_z` gives `n_heads * d_head`).

    `position`: "last" (each prompt's last token), "mean" (its tokens' mean, BOS included, as
    `steering.mean_activations` reads it) or an index. Prompts of equal token length run together,
    `batch_size` at a time."""
    position = check_position(position)
    rows, _ = token_rows(model, inputs)
    hooks = list(hooks)
    names = set(hooks)
    out: dict[str, list] = {h: [None] * len(rows) for h in hooks}
    device = model_device(model)
    chunks = list(length_batches(rows, batch_size))
    report = progress_reporter(progress, len(chunks), "activations")
    with torch.no_grad():
        for chunk in chunks:
            toks = torch.stack([rows[i] for i in chunk]).to(device)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
            for h in hooks:
                a = pick(cache[h].reshape(toks.shape[0], toks.shape[1], -1).float(), position).cpu()
                for j, i in enumerate(chunk):
                    out[h][i] = a[j]
            report()
    report(close=True)
    return {h: torch.stack(v) for h, v in out.items()}


# --- labelled prompts of the zoo's languages ------------------------------------------------------
DATASETS = ("sentiment", "refusal", "ioi")


def dataset(model, name: str, n: int = 64, seed: int = 0) -> tuple[list[str], list]:
    """Labelled prompts for the zoo's planted mechanisms: (prompts, labels).

    - "sentiment" (zoo/steer-sentiment): `n` positive and `n` negative review contexts ending
      before an adjective (`lenslab.data.sentiment.prompts`, seeds 31 + 100 seed and 32 + 100 seed,
      disjoint from training and from the steering sets); labels "positive" / "negative".
    - "refusal" (zoo/moe-refusal): `n` harmful and `n` benign held-out instructions
      (`lenslab.data.refusal.prompts`, split "test"); labels "harmful" / "benign".
    - "ioi" (zoo/ioi-4l): `n` IOI prompts (`lenslab.tasks.ioi`); the label is the indirect
      object's name, the answer the model must find.
    """
    if name not in DATASETS:
        raise LenslabError(f"dataset {name!r} is not one of {', '.join(DATASETS)}{did_you_mean(str(name), DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise LenslabError(f"n must be an int of at least 2, got {n!r}")
    if name == "sentiment":
        pos = sentiment.prompts(n, "positive", seed=31 + 100 * seed)
        neg = sentiment.prompts(n, "negative", seed=32 + 100 * seed)
        return pos + neg, ["positive"] * n + ["negative"] * n
    if name == "refusal":
        harmful, _ = refusal.prompts(n, "harmful", split="test", seed=seed)
        benign, _ = refusal.prompts(n, "benign", split="test", seed=seed)
        return harmful + benign, ["harmful"] * n + ["benign"] * n
    task = tasks.ioi(model, n=n, seed=seed)
    return list(task.clean_prompts), [model.to_string(t).strip() for t in task.answer_tokens[:, 0].cpu()]


# --- labels, split, control ---------------------------------------------------------------------
def resolve_labels(model, inputs: Inputs, labels: Labels, rows: Sequence[Tensor] | None = None) -> list:
    """One label per prompt from a list, a function of each prompt's tokens (`f(tokens[pos])`), or
    a `Task`: `labels=None` takes `task.labels`, `labels="answer"` the correct answer token of each
    prompt (as text, e.g. `" Mary"` for IOI: which name is the indirect object)."""
    if rows is None:
        rows, _ = token_rows(model, inputs)
    n = len(rows)
    if labels is None or isinstance(labels, str):
        if not isinstance(inputs, Task):
            raise LenslabError(
                "labels are missing: pass one label per prompt (a list), a function of each prompt's tokens, "
                "or a Task with labels"
            )
        if labels is None:
            if inputs.labels is None:
                raise LenslabError(
                    f"the Task {inputs.name!r} has no labels; pass labels=[...] (one per prompt), a function of "
                    "the tokens, or labels='answer' (each prompt's correct answer token)"
                )
            return list(inputs.labels)
        if labels != "answer":
            raise LenslabError(f"labels {labels!r} is not understood; with a Task pass None (task.labels) or 'answer'")
        return [model.to_string(t) for t in inputs.answer_tokens[:, 0].cpu()]
    if callable(labels):
        out = [labels(r) for r in rows]
    else:
        out = list(labels.tolist() if isinstance(labels, (Tensor, np.ndarray)) else labels)
    if len(out) != n:
        raise LenslabError(f"got {len(out)} labels for {n} prompts: give exactly one label per prompt")
    return [_plain(v) for v in out]


def _plain(v):
    """A label as a JSON value: Python str / int / float / bool (numpy and 0-d tensors unwrapped)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise LenslabError(f"a label must be one value, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if not isinstance(v, (str, int, float, bool)):
        raise LenslabError(f"a label must be a string, a number or a bool, got {type(v).__name__} {v!r}")
    return v


def _groups(rows: Sequence[Tensor]) -> list[tuple]:
    return [tuple(r.tolist()) for r in rows]


def split_by_prompt(
    rows: Sequence[Tensor], labels: Sequence, *, test_size: float = 0.25, seed: int = 0, stratify: bool = True
) -> tuple[list[int], list[int]]:
    """Train and test indices: the distinct prompts (token sequences) are shuffled with `seed` and
    `test_size` of them (per class when `stratify`) go to the test side; repeats of a prompt go with
    it. A class with a single distinct prompt stays in training."""
    if isinstance(test_size, bool) or not 0 <= float(test_size) < 1:
        raise LenslabError(f"test_size must be in [0, 1), got {test_size!r}")
    keys = _groups(rows)
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    strata: dict = {}
    for k, i in first.items():
        strata.setdefault(labels[i] if stratify else 0, []).append(k)
    rng = np.random.default_rng(seed)
    test_keys: set = set()
    for cls in sorted(strata, key=repr):
        ks = strata[cls]
        order = rng.permutation(len(ks))
        n_test = int(round(float(test_size) * len(ks)))
        if test_size > 0 and len(ks) >= 2:
            n_test = min(max(n_test, 1), len(ks) - 1)
        test_keys |= {ks[j] for j in order[:n_test]}
    train = [i for i, k in enumerate(keys) if k not in test_keys]
    test = [i for i, k in enumerate(keys) if k in test_keys]
    return train, test


def control_labels(labels: Sequence, types: Sequence, *, seed: int = 0, kind: str = "logistic") -> list:
    """Hewitt & Liang's control task: every distinct type gets one label drawn (seeded) from the
    empirical distribution of `labels` (for `kind="linear"`, a value drawn from the labels' values);
    each prompt takes its type's label."""
    if len(types) != len(labels):
        raise LenslabError(f"control types: got {len(types)} keys for {len(labels)} prompts; give one per prompt")
    rng = np.random.default_rng([int(seed), 1])
    drawn: dict = {}
    out = []
    for t in types:
        if t not in drawn:
            drawn[t] = labels[int(rng.integers(len(labels)))]
        out.append(drawn[t])
    return out


def control_types(control, rows: Sequence[Tensor], position: str | int) -> list:
    """The control task's type key per prompt: the prompt itself, the token at the probed position, or given keys."""
    if isinstance(control, str):
        if control == "prompt":
            return _groups(rows)
        if control == "token":
            if position == "mean":
                raise LenslabError(
                    "control='token' types by the token at the probed position; use position='last' or an index"
                )
            return [int(r[-1] if position == "last" else r[position]) for r in rows]
        raise LenslabError(
            f"control {control!r} is not one of {', '.join(CONTROLS)}{did_you_mean(control, CONTROLS)}, a list of "
            "type keys (one per prompt) or None"
        )
    keys = list(control)
    if len(keys) != len(rows):
        raise LenslabError(f"control types: got {len(keys)} keys for {len(rows)} prompts; give one per prompt")
    return [_plain(k) for k in keys]


# --- the probe ---------------------------------------------------------------------------------
def _some(names: Sequence, k: int = 12) -> str:
    """The first `k` names, comma-separated, and how many more."""
    shown = ", ".join(repr(n) for n in list(names)[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def _t(v, dtype=torch.float32) -> Tensor | None:
    if v is None:
        return None
    return (v.detach().cpu() if isinstance(v, Tensor) else torch.as_tensor(v)).to(dtype).contiguous()


@dataclass(frozen=True, kw_only=True, eq=False)
class Probe:
    """A trained linear probe: `logits = acts @ weight.T + bias` on one hook's activations at one position.

    Attributes:
        hook: the TransformerLens hook it reads, e.g. `"blocks.1.hook_resid_post"`.
        layer: the block of the hook (None for hooks outside the blocks, such as `hook_embed`).
        site: what the user named (a `SITES` name, a template or the hook).
        position: "last", "mean" or a token index.
        kind: "logistic" (classes) or "linear" (a number).
        weight: `[k, d]`; k = 1 for two classes (the logit of `label_names[1]`) and for "linear",
            else one row per class (multinomial).
        bias: `[k]`.
        label_names: the classes, in the order of the logits (empty for "linear").
        class_means: `[n_classes, d]`, each class's mean activation on the training split (None for "linear").
        spread: per direction (see `direction`), the standard deviation of the training
            activations projected on it.
        metrics: train / test accuracy (or R²), the control's, selectivity, split sizes.
        provenance: model, prompts' count, solver settings, seed.
    """

    hook: str
    layer: int | None
    site: str
    position: str | int
    kind: str
    weight: Tensor
    bias: Tensor
    label_names: tuple = ()
    class_means: Tensor | None = None
    spread: tuple[float, ...] = ()
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LenslabError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}{did_you_mean(self.kind, KINDS)}")
        w, b = _t(self.weight), _t(self.bias)
        if w.ndim == 1:
            w = w[None]
        b = b.reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise LenslabError(f"a probe needs weight [k, d] and bias [k], got {tuple(w.shape)} and {tuple(b.shape)}")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise LenslabError(f"the probe at {self.hook} has a NaN or infinite weight; retrain it")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)
        object.__setattr__(self, "label_names", tuple(_plain(v) for v in self.label_names))
        object.__setattr__(self, "class_means", _t(self.class_means))
        object.__setattr__(self, "spread", tuple(float(s) for s in self.spread))
        object.__setattr__(self, "position", check_position(self.position))
        if self.kind == "logistic":
            n = len(self.label_names)
            if n < 2 or w.shape[0] != (1 if n == 2 else n):
                raise LenslabError(
                    f"a logistic probe over {n} classes needs {1 if n == 2 else n} weight row(s), got {w.shape[0]}"
                )
        elif w.shape[0] != 1:
            raise LenslabError(f"a linear probe has one weight row, got {w.shape[0]}")

    @property
    def d(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, acts: Tensor) -> Tensor:
        """`[n, d]` activations -> `[n, k]` logits (or predicted values for "linear")."""
        acts = _t(acts)
        if acts.ndim != 2 or acts.shape[1] != self.d:
            raise LenslabError(
                f"the probe at {self.hook} reads {self.d} entries per prompt, got activations of shape {tuple(acts.shape)}"
            )
        return acts.double() @ self.weight.double().T + self.bias.double()

    def predict(self, acts: Tensor) -> list:
        """Predicted label per row of `[n, d]` activations (a float per row for "linear")."""
        z = self.logits(acts)
        if self.kind == "linear":
            return z[:, 0].tolist()
        idx = (z[:, 0] > 0).long() if z.shape[1] == 1 else z.argmax(1)
        return [self.label_names[i] for i in idx.tolist()]

    def score_acts(self, acts: Tensor, labels: Sequence) -> float:
        """Accuracy (logistic) or R² (linear) on `[n, d]` activations."""
        labels = [_plain(v) for v in labels]
        if len(labels) != acts.shape[0]:
            raise LenslabError(f"got {len(labels)} labels for {acts.shape[0]} prompts: give exactly one per prompt")
        pred = self.predict(acts)
        if self.kind == "linear":
            y, p = np.asarray(labels, dtype=np.float64), np.asarray(pred)
            ss = float(((y - y.mean()) ** 2).sum())
            return float("nan") if ss == 0 else 1.0 - float(((y - p) ** 2).sum()) / ss
        return float(np.mean([a == b for a, b in zip(pred, labels)]))

    def read(self, model, inputs: Inputs, *, batch_size: int = 64) -> Tensor:
        """The activations this probe reads, `[n, d]`, for prompts / tokens / a Task."""
        probe_hooks(model, self.hook)
        return read_activations(model, inputs, [self.hook], self.position, batch_size=batch_size)[self.hook]

    def predict_prompts(self, model, inputs: Inputs) -> list:
        """Predicted label of each prompt (runs the model)."""
        return self.predict(self.read(model, inputs))

    def score(self, model, inputs: Inputs, labels: Labels = None) -> float:
        """Accuracy (R² for "linear") on prompts with their labels (as `train_probes` takes them)."""
        rows, _ = token_rows(model, inputs)
        return self.score_acts(self.read(model, inputs), resolve_labels(model, inputs, labels, rows))

    def directions(self) -> Tensor:
        """Unit directions `[n_dir, d]`: for two classes or "linear" one (towards `label_names[1]`
        / larger values); for more classes one per class, its weight row minus the rows' mean (the
        softmax only sees those differences)."""
        w = self.weight.double()
        if w.shape[0] > 1:
            w = w - w.mean(0, keepdim=True)
        return (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()

    def direction(self, label=None) -> Tensor:
        """The unit direction `[d]` along which the probe's evidence for `label` grows (default: the
        second class of two, or larger values for "linear")."""
        dirs = self.directions()
        if label is None:
            if dirs.shape[0] > 1:
                raise LenslabError(
                    f"this probe has {dirs.shape[0]} classes; name the one to steer towards: "
                    f"label= one of {_some(self.label_names)}"
                )
            return dirs[0]
        i = self.label_index(label)
        if dirs.shape[0] == 1:
            return dirs[0] if i == 1 else -dirs[0]
        return dirs[i]

    def label_index(self, label) -> int:
        if self.kind == "linear":
            raise LenslabError("a linear (regression) probe has no classes; leave label=None")
        if label in self.label_names:
            return self.label_names.index(label)
        names = [str(n) for n in self.label_names]
        if str(label) in names:
            return names.index(str(label))
        raise LenslabError(
            f"label {label!r} is not one of the probe's classes ({_some(self.label_names)})"
            f"{did_you_mean(str(label), names)}"
        )

    # --- JSON + safetensors ------------------------------------------------------------------
    def spec(self) -> dict:
        """The probe's fields other than tensors (JSON-able)."""
        return {
            "format": FORMAT,
            "hook": self.hook,
            "layer": self.layer,
            "site": self.site,
            "position": self.position,
            "kind": self.kind,
            "label_names": list(self.label_names),
            "spread": list(self.spread),
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.weight, "bias": self.bias}
        if self.class_means is not None:
            out["class_means"] = self.class_means
        return out

    def to_dict(self) -> dict:
        """JSON-able: the spec with the tensors as nested lists."""
        return {**self.spec(), **{k: v.tolist() for k, v in self.tensors().items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        if d.get("format") != FORMAT:
            raise LenslabError(f"not a lenslab probe (format {d.get('format')!r}, expected {FORMAT!r})")
        return cls(
            hook=d["hook"],
            layer=d.get("layer"),
            site=d.get("site", d["hook"]),
            position=d.get("position", "last"),
            kind=d["kind"],
            weight=torch.as_tensor(d["weight"]),
            bias=torch.as_tensor(d["bias"]),
            label_names=tuple(d.get("label_names") or ()),
            class_means=None if d.get("class_means") is None else torch.as_tensor(d["class_means"]),
            spread=tuple(d.get("spread") or ()),
            metrics=d.get("metrics") or {},
            provenance=d.get("provenance") or {},
        )

    def save(self, path: str | Path) -> Path:
        """Write `path` (.json: everything but the tensors) and `<stem>.safetensors` beside it; returns the JSON path."""
        return save_spec(path, self.spec(), self.tensors(), "probe")

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        """Read a probe `save` wrote (JSON plus the safetensors file it names; never pickle)."""
        spec, tensors = load_spec(path, "probe", "write one with Probe.save or `lenslab probe train`")
        return cls.from_dict({**spec, **tensors})


def load_probe(path: str | Path) -> Probe:
    """`Probe.load(path)`."""
    return Probe.load(path)


# --- fitting -------------------------------------------------------------------------------------
def _fit(x: np.ndarray, y: list, kind: str, names: tuple, *, C: float, alpha: float, standardize: bool, max_iter: int):
    """(weight [k, d], bias [k]) in the activations' own coordinates, fitted by scikit-learn with as
    many BLAS / OpenMP threads as torch uses (more only contend for the cores on these small fits)."""
    from sklearn.exceptions import ConvergenceWarning  # deferred: scikit-learn loads only when a probe is trained
    from sklearn.linear_model import LogisticRegression, Ridge  # deferred: as above (scipy loads with it)
    from threadpoolctl import threadpool_limits  # deferred: scikit-learn's thread control, only for a fit

    mu = x.mean(0) if standardize else np.zeros(x.shape[1])
    sd = x.std(0) if standardize else np.ones(x.shape[1])
    sd = np.where(sd > 1e-8, sd, 1.0)
    xs = (x - mu) / sd
    limits = lambda: threadpool_limits(limits=torch.get_num_threads())  # applied on entering, restored on exit
    if kind == "linear":
        with limits():
            m = Ridge(alpha=alpha).fit(xs, np.asarray(y, dtype=np.float64))
        w, b = np.atleast_2d(m.coef_), np.atleast_1d(m.intercept_)
    else:
        idx = np.asarray([names.index(v) for v in y])
        present = np.unique(idx)
        if len(present) < 2:  # a control draw may leave one class in training: a constant predictor
            k = 1 if len(names) == 2 else len(names)
            w, b = np.zeros((k, x.shape[1])), np.zeros(k)
            if k == 1:
                b[0] = 1.0 if present[0] == 1 else -1.0
            else:
                b[present[0]] = 1.0
        else:
            with limits(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                # many classes with few prompts each (IOI names) are still classes
                warnings.filterwarnings("ignore", message="The number of unique classes", category=UserWarning)
                m = LogisticRegression(C=C, max_iter=max_iter).fit(xs, idx)
            w, b = m.coef_, m.intercept_
            if len(names) > 2 and len(present) < len(names):  # classes absent from training never win
                full_w, full_b = np.zeros((len(names), x.shape[1])), np.full(len(names), -1e9)
                full_w[present], full_b[present] = w, b
                w, b = full_w, full_b
    w_raw = w / sd
    b_raw = b - w_raw @ mu
    return torch.from_numpy(w_raw), torch.from_numpy(b_raw)


def _check_labels(labels: list, kind: str) -> tuple:
    if kind not in KINDS:
        raise LenslabError(f"kind {kind!r} is not one of {', '.join(KINDS)}{did_you_mean(str(kind), KINDS)}")
    if kind == "linear":
        if any(isinstance(v, (str, bool)) or not math.isfinite(float(v)) for v in labels):
            raise LenslabError(
                "a linear (regression) probe needs finite numbers as labels; for classes use kind='logistic'"
            )
        if len(set(labels)) < 2:
            raise LenslabError(f"every label is {labels[0]!r}: a regression probe needs labels that vary")
        return ()
    if any(isinstance(v, float) for v in labels) and len(set(labels)) > 0.5 * len(labels):
        raise LenslabError(
            "these labels look continuous (mostly distinct floats): use kind='linear' for a regression probe"
        )
    names = tuple(sorted(set(labels), key=lambda v: (type(v).__name__, v)))
    if len(names) < 2:
        raise LenslabError(
            f"every prompt has the label {labels[0]!r}: a probe needs at least two classes; add prompts of another class"
        )
    return names


def _spread(x: np.ndarray, dirs: Tensor) -> tuple[float, ...]:
    proj = x @ dirs.double().numpy().T  # [n, n_dir]
    return tuple(float(s) for s in proj.std(0))


def train_probes(
    model,
    inputs: Inputs,
    labels: Labels = None,
    *,
    site: str | Sequence[str] = "resid_post",
    layers: int | Sequence[int] | None = None,
    position: str | int = "last",
    kind: str = "logistic",
    test_size: float = 0.25,
    seed: int = 0,
    control: str | Sequence | None = "prompt",
    C: float = 1.0,
    alpha: float = 1.0,
    standardize: bool = False,
    max_iter: int = 2000,
    batch_size: int = 64,
    progress: bool | Callable[[int, int], None] = False,
) -> ProbeResult:
    """Train one linear probe per site and layer, with a split by prompt and a control task.

    Args:
        model: a lenslab model.
        inputs: prompts, a `[batch, pos]` token tensor or a `Task` (its clean prompts).
        labels: one per prompt (a list), a function of each prompt's tokens, or for a `Task`
            None (`task.labels`) or "answer" (each prompt's correct answer token).
        site: one or more sites (`"resid_post"`, `"mlp_out"`, `"z"`, ...), `{layer}` templates or
            hook names (`"blocks.1.hook_resid_post"`, read once).
        layers: the layers of each site (None: all).
        position: "last", "mean" or a token index.
        kind: "logistic" (classes; accuracy) or "linear" (numbers; R², ridge regression).
        test_size: share of the distinct prompts held out (per class), 0 for none.
        seed: the split's and the control task's seed.
        control: the control task's types: "prompt" (default), "token", a list of keys, or None.
        C: the logistic regression's inverse L2 strength; `alpha`: the ridge penalty.
        standardize: fit on features scaled to unit variance (weights are returned in the
            activations' own coordinates either way).

    Returns:
        A `ProbeResult`: one row and one `Probe` per (site, layer).

    Raises:
        LenslabError: an unknown site or hook (with the nearest), a label count that differs from
            the prompt count, a single class, continuous labels for a logistic probe.
    """
    position = check_position(position)
    rows, texts = token_rows(model, inputs)
    y = resolve_labels(model, inputs, labels, rows)
    names = _check_labels(y, kind)
    hooks = probe_hooks(model, site, layers)
    train, test = split_by_prompt(rows, y, test_size=test_size, seed=seed, stratify=kind == "logistic")
    if kind == "logistic" and len({y[i] for i in train}) < 2:
        raise LenslabError("the training split holds a single class; add prompts or lower test_size")
    y_ctl = None
    if control is not None:
        y_ctl = control_labels(y, control_types(control, rows, position), seed=seed, kind=kind)
    acts = read_activations(
        model, inputs, sorted({h for _, _, h in hooks}), position, batch_size=batch_size, progress=progress
    )
    chance = _chance([y[i] for i in test], kind)
    rows_out, probes = [], []
    fit_kw = dict(C=C, alpha=alpha, standardize=standardize, max_iter=max_iter)
    prov = provenance(
        model,
        inputs if isinstance(inputs, Task) else None,
        method="linear_probe",
        kind=kind,
        position=position,
        labels=list(names),
        n_prompts=len(rows),
        test_size=test_size,
        seed=seed,
        control=control if isinstance(control, str) or control is None else "custom",
        C=C,
        alpha=alpha,
        standardize=standardize,
        test_indices=test,
        **({"prompts": texts} if texts is not None and not isinstance(inputs, Task) else {}),
    )
    for s, layer, hook in hooks:
        x = acts[hook].double().numpy()
        w, b = _fit(x[train], [y[i] for i in train], kind, names, **fit_kw)
        means = None
        if kind == "logistic":
            means = torch.stack(
                [
                    torch.from_numpy(x[[i for i in train if y[i] == c]].mean(0))
                    if any(y[i] == c for i in train)
                    else torch.full((x.shape[1],), float("nan"))
                    for c in names
                ]
            )
            means = torch.nan_to_num(means)
        probe = Probe(
            hook=hook,
            layer=layer,
            site=s,
            position=position,
            kind=kind,
            weight=w,
            bias=b,
            label_names=names,
            class_means=means,
        )
        probe = _with(probe, spread=_spread(x[train], probe.directions()))
        r = {
            "site": s,
            "layer": layer,
            "hook": hook,
            "metric": "accuracy" if kind == "logistic" else "r2",
            "n_train": len(train),
            "n_test": len(test),
            "train": probe.score_acts(acts[hook][train], [y[i] for i in train]),
            "test": probe.score_acts(acts[hook][test], [y[i] for i in test]) if test else None,
            "control_train": None,
            "control_test": None,
            "selectivity": None,
            "chance": chance,
        }
        if y_ctl is not None:
            wc, bc = _fit(x[train], [y_ctl[i] for i in train], kind, names, **fit_kw)
            ctl = Probe(
                hook=hook, layer=layer, site=s, position=position, kind=kind, weight=wc, bias=bc, label_names=names
            )
            r["control_train"] = ctl.score_acts(acts[hook][train], [y_ctl[i] for i in train])
            if test:
                r["control_test"] = ctl.score_acts(acts[hook][test], [y_ctl[i] for i in test])
                r["selectivity"] = r["test"] - r["control_test"]
        probe = _with(probe, metrics={k: r[k] for k in r if k not in ("site", "layer", "hook")}, provenance=prov)
        rows_out.append(r)
        probes.append(probe)
    return ProbeResult(rows=rows_out, probes=probes, provenance=prov)


def _with(probe: Probe, **kw) -> Probe:
    return replace(probe, **kw)


def _chance(y: list, kind: str) -> float | None:
    """The majority class's share of `y` (what always guessing it scores); 0 for R² (the mean's score)."""
    if not y:
        return None
    if kind == "linear":
        return 0.0
    counts: dict = {}
    for v in y:
        counts[v] = counts.get(v, 0) + 1
    return max(counts.values()) / len(y)


# --- the result ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, eq=False)
class ProbeResult(Result):
    """Linear probes per site and layer, with their control task.

    Attributes:
        rows: one dict per (site, layer): site, layer, hook, metric ("accuracy" or "r2"), n_train,
            n_test, train, test, control_train, control_test, selectivity (test - control_test),
            chance (the test split's majority-class share).
        probes: the trained `Probe` of each row, in the same order.
        provenance: model, labels, position, solver settings, seed, the test split's indices.
    """

    rows: list[dict]
    probes: list[Probe] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    KIND = "ProbeResult"

    def probe(self, layer: int | None = None, site: str | None = None) -> Probe:
        """The probe at `layer` (and `site`, when several were probed); None: the best by test accuracy."""
        if layer is None and site is None:
            return self.probes[self.rows.index(self.best())]
        for r, p in zip(self.rows, self.probes):
            if (layer is None or r["layer"] == layer) and (site is None or r["site"] == site or r["hook"] == site):
                return p
        have = ", ".join(f"{r['site']}@{r['layer']}" for r in self.rows)
        raise LenslabError(f"no probe at layer {layer} (site {site}); this result has {have}")

    def best(self) -> dict:
        """The row with the highest test score (train score when there is no test split); ties: the earliest."""
        key = "test" if self.rows and self.rows[0]["test"] is not None else "train"
        return max(self.rows, key=lambda r: (r[key], -self.rows.index(r)))

    def table(self):
        """One row per (site, layer): scores of the probe and of its control, selectivity, chance."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        cols = ["site", "layer", "hook", "metric", "n_train", "n_test", "train", "test", "control_train",
                "control_test", "selectivity", "chance"]  # fmt: skip
        return pd.DataFrame([{c: r.get(c) for c in cols} for r in self.rows], columns=cols)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "rows": self.rows,
            "probes": [p.to_dict() for p in self.probes],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ProbeResult:
        return cls(
            rows=[dict(r) for r in d["rows"]],
            probes=[Probe.from_dict(p) for p in d.get("probes") or []],
            provenance=d.get("provenance") or {},
        )

    def figure(self):
        """Per layer: test accuracy, control test accuracy and selectivity (and train accuracy,
        dotted), one colour per site; the test split's chance level as a grey line."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        fig = go.Figure()
        sites = list(dict.fromkeys(r["site"] for r in self.rows))
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        metric = self.rows[0]["metric"] if self.rows else "accuracy"
        for n, s in enumerate(sites):
            rs = [r for r in self.rows if r["site"] == s]
            x = [r["layer"] if r["layer"] is not None else r["hook"] for r in rs]
            color = palette[n % len(palette)]
            series = [
                ("test", "solid", f"{metric} (test)"),
                ("train", "dot", f"{metric} (train)"),
                ("control_test", "dash", "control task (test)"),
                ("selectivity", "dashdot", "selectivity"),
            ]
            for key, dash, label in series:
                ys = [r[key] for r in rs]
                if all(v is None for v in ys):
                    continue
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=ys,
                        mode="lines+markers",
                        name=f"{s}: {label}" if len(sites) > 1 else label,
                        line=dict(color=color, dash=dash),
                        hovertemplate=f"{s} layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>",
                    )
                )
        chance = self.rows[0]["chance"] if self.rows else None
        if chance is not None:
            fig.add_hline(y=chance, line=dict(color="grey", width=1), annotation_text="chance (majority class)")
        fig.update_layout(xaxis_title="layer", yaxis_title=metric)
        if metric == "accuracy":
            fig.update_layout(yaxis_range=[-0.05, 1.05])
        p = self.provenance
        return figures.style(
            fig,
            f"Linear probes · model {p.get('model', '?')} · labels {', '.join(map(str, p.get('labels', [])))[:60]} · "
            f"position {p.get('position', '?')} · control per {p.get('control', '?')}",
        )
