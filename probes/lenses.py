"""Lenses: every layer's residual stream read as a next-token prediction, by the logit lens and
the tuned lens, with one Result for both.

- `logit_lens(model, text, k)` -> `LogitLens` (`lens="logit"`): the final norm and unembedding
  applied to each layer's residual stream as it is (nostalgebraist, 2020).
- `tuned_lens(model, text, lens, k)` -> the same `LogitLens` Result with `lens="tuned"`: each
  layer's residual first goes through its trained affine translator (Belrose et al. 2023,
  "Eliciting Latent Predictions from Transformers with the Tuned Lens").
- `TunedLens`: the translators (an `nn.Module`), saved to and loaded from a folder
  (`config.json` + `translators.safetensors`), and read from tuned-lens's own layout
  (`config.json` + `params.pt`, `TunedLens.from_tuned_lens`) so published lenses work here.
- `load_tuned_lens`: a lens from a folder (either layout), a zoo model's shipped lens, or a
  tuned-lens resource id on the Hugging Face Hub (online).
- `train_tuned_lens(model, corpus, ...)`: the authors' recipe (KL to the final layer, zero-init
  translators added to the residual, SGD with Nesterov momentum, linear decay), scaled down.
- `lens_kl(model, lens, tokens)` -> `LensKL`: per layer, the KL from the model's output to each
  lens's reading (and how often their top tokens agree), on held-out text.

Rows are TransformerLens's residual labels: translator `l` reads `blocks.{l}.hook_resid_pre`
(row `{l}_pre`; `0_pre` is the embedding), as tuned-lens's `hidden_states[l]` does; the last row
(`final_post`) is the model's output, which needs no translator.

>>> import lenslab
>>> from lenslab.probes import lenses
>>> model = lenslab.load_model("zoo/ioi-4l", device="cpu")
>>> tl = lenses.tuned_lens(model, "When Mary and John went to the store, John gave a drink to", k=3)
>>> tl.lens, tl.layer_labels
('tuned', ['0_pre', '1_pre', '2_pre', '3_pre', 'final_post'])
>>> tl.top_tokens[-1][-1][0]  # the model's own prediction (last row, last position)
'Mary'
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lenslab import inspection, zoo
from lenslab._errors import LenslabError
from lenslab.figures import style
from lenslab.inspection import LogitLens
from lenslab.probes.sae_measure import corpus_tokens as token_rows
from lenslab.probes.sae_measure import excluded_tokens, keep_mask
from lenslab.results import Result, provenance
from lenslab.toolbox import model_device, model_name, progress_reporter, torch_threads

__all__ = [
    "CONFIG_FILE",
    "LENSES_DIR",
    "TUNED_LENS_HUB",
    "WEIGHTS_FILE",
    "LensKL",
    "LogitLens",
    "TunedLens",
    "lens_kl",
    "lens_logits",
    "load_tuned_lens",
    "logit_lens",
    "shipped_lens_path",
    "train_tuned_lens",
    "tuned_lens",
    "unembed_hash",
]

LENSES_DIR = "lenses"  # a zoo model's lenses: lenslab/zoo/<model>/lenses/tuned/
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "translators.safetensors"
FORMAT = "lenslab_tuned_lens"  # config.json's "lenslab_format"
TL_PARAMS_FILE = "params.pt"  # tuned-lens's translators (torch.save of the ModuleList's state dict)
TL_LENS_TYPE = "linear_tuned_lens"
TUNED_LENS_HUB = ("AlignmentResearch/tuned-lens", "space", "lens")  # repo id, repo type, folder of published lenses


# --- the translators ---------------------------------------------------------------------------
class TunedLens(nn.Module):
    """One affine translator per layer: `h -> h + W_l h + b_l`, from layer `l`'s residual stream
    (`blocks.{l}.hook_resid_pre`) towards the final one, before the model's final norm and
    unembedding.

    Starts as the identity (W and b zero, as tuned-lens initialises them), so an untrained lens is
    the logit lens; the translator is added to the residual so weight decay pulls towards the
    identity, not towards zero. Translators compute in float32.

    Attributes:
        translators: `nn.ModuleList` of `n_layers` `nn.Linear(d_model, d_model)`; its state dict
            keys (`"0.weight"`, `"0.bias"`, ...) are tuned-lens's.
        d_model, n_layers, bias: the shape.
        model_name: the model the lens was trained for.
        info: training settings and results (written to `config.json` under `"training"`).
        source: where the lens was loaded from (for provenance records).
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        bias: bool = True,
        model_name: str = "model",
        info: dict | None = None,
        source: str = "untrained",
    ):
        super().__init__()
        for nm, v in (("d_model", d_model), ("n_layers", n_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LenslabError(f"{nm} must be a positive integer, got {v!r}")
        translators = []
        for _ in range(n_layers):
            t = nn.Linear(d_model, d_model, bias=bias)
            nn.init.zeros_(t.weight)
            if bias:
                nn.init.zeros_(t.bias)
            translators.append(t)
        self.translators = nn.ModuleList(translators)
        self.d_model, self.n_layers, self.bias = int(d_model), int(n_layers), bool(bias)
        self.model_name = str(model_name)
        self.info = dict(info or {})
        self.source = source

    @classmethod
    def for_model(cls, model, *, bias: bool = True) -> TunedLens:
        """An identity lens shaped for `model` (its `d_model` and `n_layers`), on its device."""
        lens = cls(int(model.cfg.d_model), int(model.cfg.n_layers), bias=bias, model_name=model_name(model))
        return lens.to(model_device(model))

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """Layer `layer`'s residual `h` translated: `h + W_layer h + b_layer` (in `h`'s dtype)."""
        t = self.translators[layer]
        x = h.to(t.weight.dtype)
        return (x + t(x)).to(h.dtype)

    def config(self) -> dict:
        """What `config.json` holds: format, model, shape, and the training record."""
        out = {
            "lenslab_format": FORMAT,
            "model": self.model_name,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "bias": self.bias,
        }
        if self.info:
            out["training"] = self.info
        return out

    def check(self, model) -> TunedLens:
        """Raise a `LenslabError` unless the lens fits `model` (its width and layer count); warn
        when it was trained for a model of another name. Returns the lens."""
        name = model_name(model)
        d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
        if self.d_model != d_model:
            raise LenslabError(
                f"the tuned lens ({self.source}) has d_model={self.d_model} but {name!r} has d_model={d_model}: "
                f"it was trained for another model ({self.model_name!r}); train one for this model "
                f"(`lenslab lens train --model {name} --out DIR`)"
            )
        if self.n_layers != n_layers:
            raise LenslabError(
                f"the tuned lens ({self.source}) has {self.n_layers} translators but {name!r} has {n_layers} layers: "
                f"it was trained for another model ({self.model_name!r}); train one for this model "
                f"(`lenslab lens train --model {name} --out DIR`)"
            )
        if self.model_name not in ("model", name) and Path(self.model_name).name != Path(name).name:
            warnings.warn(
                f"this tuned lens was trained for {self.model_name!r}, not {name!r}; its shapes fit, but its "
                "readings are only meaningful on the model it was trained for",
                stacklevel=2,
            )
        return self

    # --- lenslab's format: config.json + translators.safetensors ------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write `config.json` and `translators.safetensors` (float32) to `folder`; returns it."""
        from safetensors.torch import save_file  # deferred: safetensors loads only when a file is read or written

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.translators.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; the zoo ships readable files
        (out / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> TunedLens:
        """A lens from `folder`: lenslab's layout (`translators.safetensors`) or tuned-lens's
        (`params.pt`), each with its `config.json`."""
        from safetensors.torch import load_file  # deferred: safetensors loads only when a file is read or written

        path = Path(folder).expanduser()
        if not (path / WEIGHTS_FILE).is_file() and (path / TL_PARAMS_FILE).is_file():
            return cls.from_tuned_lens(path)
        if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            raise LenslabError(
                f"{str(folder)!r} holds no tuned lens: expected {CONFIG_FILE} with {WEIGHTS_FILE} (lenslab) "
                f"or with {TL_PARAMS_FILE} (tuned-lens)"
            )
        cfg = _read_json(path / CONFIG_FILE)
        if cfg.get("lenslab_format") != FORMAT:
            raise LenslabError(
                f"{path / CONFIG_FILE} is not a lenslab tuned-lens config (no lenslab_format {FORMAT!r})"
            )
        lens = cls(
            int(cfg["d_model"]),
            int(cfg["n_layers"]),
            bias=bool(cfg.get("bias", True)),
            model_name=cfg.get("model", "model"),
            info=cfg.get("training"),
            source=str(folder),
        )
        _load_state(lens, load_file(str(path / WEIGHTS_FILE)), path / WEIGHTS_FILE)
        return lens

    # --- tuned-lens's format: config.json + params.pt -----------------------------------------
    @classmethod
    def from_tuned_lens(cls, folder: str | Path) -> TunedLens:
        """A lens from tuned-lens's layout: `config.json` (`TunedLensConfig`: `d_model`,
        `num_hidden_layers`, `bias`, `base_model_name_or_path`, `lens_type`, `unembed_hash`, ...) and
        `params.pt` (the `layer_translators` state dict, keys `"0.weight"`, `"0.bias"`, ...),
        as `TunedLens.save` of tuned-lens writes them and its Hub space publishes them."""
        path = Path(folder).expanduser()
        for f in (CONFIG_FILE, TL_PARAMS_FILE):
            if not (path / f).is_file():
                raise LenslabError(f"{str(folder)!r} is not a tuned-lens folder: {f} is missing")
        cfg = _read_json(path / CONFIG_FILE)
        lens_type = cfg.get("lens_type", TL_LENS_TYPE)
        if lens_type != TL_LENS_TYPE:
            raise LenslabError(
                f"{path / CONFIG_FILE}: lens_type {lens_type!r} is not supported (only {TL_LENS_TYPE!r})"
            )
        missing = [k for k in ("d_model", "num_hidden_layers") if k not in cfg]
        if missing:
            raise LenslabError(f"{path / CONFIG_FILE} lacks {', '.join(missing)}: not a tuned-lens config")
        state = torch.load(path / TL_PARAMS_FILE, map_location="cpu", weights_only=True)
        lens = cls(
            int(cfg["d_model"]),
            int(cfg["num_hidden_layers"]),
            bias=bool(cfg.get("bias", True)),
            model_name=cfg.get("base_model_name_or_path") or "model",
            info={"tuned_lens_config": cfg},
            source=str(folder),
        )
        _load_state(lens, state, path / TL_PARAMS_FILE)
        return lens

    def save_tuned_lens(self, folder: str | Path, model=None) -> Path:
        """Write tuned-lens's layout (`config.json` + `params.pt`) to `folder`, which tuned-lens's
        `TunedLens.from_model_and_pretrained(hf_model, folder)` reads; with `model`, the config
        carries its `unembed_hash`. Returns the folder."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.translators.state_dict().items()}
        torch.save(state, out / TL_PARAMS_FILE)
        cfg = {
            "base_model_name_or_path": self.model_name,
            "d_model": self.d_model,
            "num_hidden_layers": self.n_layers,
            "bias": self.bias,
            "base_model_revision": None,
            "unembed_hash": unembed_hash(model) if model is not None else None,
            "lens_type": TL_LENS_TYPE,
        }
        (out / CONFIG_FILE).write_text(json.dumps(cfg))
        return out


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except ValueError as exc:
        raise LenslabError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise LenslabError(f"{path} does not hold a JSON object")
    return d


def _load_state(lens: TunedLens, state: dict, path: Path) -> None:
    """Load translator weights, with an error naming what does not fit."""
    own = lens.translators.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LenslabError(
            f"{path} does not match its config ({lens.n_layers} translators of width {lens.d_model}, bias={lens.bias}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LenslabError(f"{path}: {k} has shape {tuple(v.shape)}, the config says {tuple(own[k].shape)}")
    lens.translators.load_state_dict({k: v.float() for k, v in state.items()})


def unembed_hash(model) -> str:
    """tuned-lens's fingerprint of a model's unembedding (its config's `unembed_hash`): SHA-256 of
    numpy's summary print of the `[d_vocab, d_model]` matrix at one decimal."""
    w = model.W_U.detach().float().cpu().T.numpy()
    with np.printoptions(threshold=1000, edgeitems=3, linewidth=75, suppress=False):  # numpy's defaults
        return hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()


# --- finding a lens ----------------------------------------------------------------------------
def shipped_lens_path(name: str) -> Path:
    """The folder of zoo model `name`'s shipped tuned lens (`lenslab/zoo/<model>/lenses/tuned/`)."""
    folder = zoo.ZOO_DIR / name.removeprefix(zoo.PREFIX) / LENSES_DIR / "tuned"
    if not (folder / WEIGHTS_FILE).is_file():
        have = sorted(
            zoo.PREFIX + p.parent.parent.parent.name for p in zoo.ZOO_DIR.glob(f"*/{LENSES_DIR}/tuned/{WEIGHTS_FILE}")
        )
        raise LenslabError(
            f"{name!r} ships no tuned lens (the zoo models that do: {', '.join(have) or 'none'}); train one with "
            f"`lenslab lens train --model {name} --out DIR` or `train_tuned_lens`, then pass that folder"
        )
    return folder


def load_tuned_lens(source: TunedLens | str | Path | None = None, model=None) -> TunedLens:
    """A tuned lens, checked against `model` when given.

    Args:
        source: a `TunedLens`; a folder (lenslab's `translators.safetensors` or tuned-lens's
            `params.pt`, each with `config.json`); a zoo model name (its shipped lens); None (the
            shipped lens of `model`, a zoo model); or a tuned-lens resource id such as `"gpt2"`
            or `"EleutherAI/pythia-160m-deduped"`, downloaded from tuned-lens's Hub space
            (`TUNED_LENS_HUB`, online).
        model: the model the lens will read; a lens of another width or layer count is a
            `LenslabError`.
    """
    if isinstance(source, TunedLens):
        lens = source
    elif source is None:
        if model is None:
            raise LenslabError("load_tuned_lens needs a source or a model (whose shipped lens to load)")
        name = model_name(model)
        if not name.startswith(zoo.PREFIX):
            raise LenslabError(
                f"{name!r} is not a zoo model, so it ships no tuned lens: pass lens= a folder (train one with "
                f"`lenslab lens train --model {name} --corpus FILE --out DIR`) or a tuned-lens resource id"
            )
        lens = _shipped(name)
    elif isinstance(source, Path) or Path(str(source)).expanduser().is_dir():
        lens = TunedLens.load(source)
    elif str(source).startswith(zoo.PREFIX):
        lens = _shipped(str(source))
    else:
        lens = TunedLens.from_tuned_lens(_hub_folder(str(source)))
    if model is not None:
        lens.check(model)
        lens.to(model_device(model))
    return lens


def _shipped(name: str) -> TunedLens:
    lens = TunedLens.load(shipped_lens_path(name))
    lens.source = f"{name} (shipped)"
    return lens


def _hub_folder(resource_id: str) -> Path:
    """tuned-lens's published lens `resource_id`, downloaded from its Hub space (cached)."""
    from huggingface_hub import hf_hub_download  # deferred: huggingface_hub loads only to download a lens

    repo_id, repo_type, sub = TUNED_LENS_HUB
    paths = []
    try:
        for f in (CONFIG_FILE, TL_PARAMS_FILE):
            paths.append(Path(hf_hub_download(repo_id, f, subfolder=f"{sub}/{resource_id}", repo_type=repo_type)))
    except Exception as exc:  # offline, unknown id, no network: one readable error
        raise LenslabError(
            f"{resource_id!r} is neither a folder nor a zoo model, and tuned-lens's published lens of that name "
            f"could not be fetched from the Hub ({repo_type} {repo_id}, {sub}/{resource_id}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Pass a folder holding "
            f"{CONFIG_FILE} and {TL_PARAMS_FILE} or {WEIGHTS_FILE}, or connect (and unset HF_HUB_OFFLINE)"
        ) from None
    return paths[0].parent


# --- reading residual streams through a lens ---------------------------------------------------
def _resid_names(model) -> list[str]:
    n = int(model.cfg.n_layers)
    return [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def _layer_labels(model) -> list[str]:
    return [f"{l}_pre" for l in range(int(model.cfg.n_layers))] + ["final_post"]


def _residuals(model, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    """The residual streams the lenses read (`n_layers + 1` of `[batch, pos, d_model]`) and the logits."""
    names = _resid_names(model)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[n] for n in names], logits


def _unembed(model, h: Tensor) -> Tensor:
    """The model's final norm (statistics recomputed for `h`) and unembedding."""
    ln_final = getattr(model, "ln_final", None)
    return model.unembed(ln_final(h) if ln_final is not None else h)


@torch.no_grad()
def lens_logits(model, tokens: Tensor, lens: TunedLens | None = None) -> Float[Tensor, "layer batch pos d_vocab"]:
    """Every residual stream read as logits: `[n_layers + 1, batch, pos, d_vocab]`, float32 on CPU.

    Without `lens` the logit lens (final norm and unembedding as they are); with one, the tuned
    lens (its translator first). The last row is the model's own output either way.
    """
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    resid, logits = _residuals(model, tokens.to(model_device(model)))
    rows = [_unembed(model, h if lens is None else lens(h, l)).float().cpu() for l, h in enumerate(resid[:-1])]
    return torch.stack([*rows, logits.float().cpu()])


def logit_lens(model, text: str, k: int = 5) -> LogitLens:
    """The logit lens of `text`: each layer's top-k next tokens (`lenslab.inspection.logit_lens`).

    Returns a `LogitLens` with `lens="logit"`, the Result `tuned_lens` returns too.
    """
    return inspection.logit_lens(model, text, k=k)


def tuned_lens(model, text: str, lens: TunedLens | str | Path | None = None, k: int = 5) -> LogitLens:
    """The tuned lens of `text`: each layer's top-k next tokens after its translator.

    Args:
        model: a TransformerLens model.
        text: the prompt (BOS is prepended as the model does).
        lens: a `TunedLens` or what `load_tuned_lens` accepts (default: the zoo model's shipped lens).
        k: how many top tokens to keep per layer and position.

    Returns:
        a `LogitLens` with `lens="tuned"` (rows `0_pre` ... `final_post`; the last is the model's output).
    """
    lens = load_tuned_lens(lens, model)
    tokens = inspection.tokenize(model, text).ids  # checks the prompt
    logits = lens_logits(model, tokens, lens)[:, 0]
    return inspection.lens_result(model, text, logits, _layer_labels(model), k=k, lens="tuned", tuned_lens=lens.source)


# --- training ----------------------------------------------------------------------------------
@contextmanager
def _frozen(model):
    """The model's parameters without gradients (the lens's loss flows through its final norm and
    unembedding, which stay fixed), in eval mode; restored after."""
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    was_training = model.training
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        model.train(was_training)


def _kl_rows(log_p: Tensor, logits: Tensor) -> Tensor:
    """KL(p || q) per position, `[batch, pos]`, from the target's log-probs and the lens's logits."""
    log_q = logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _linear_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `steps` (transformers's
    `get_linear_schedule_with_warmup`, which tuned-lens uses)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train_tuned_lens(
    model,
    corpus_tokens: Tensor | list[str],
    *,
    steps: int = 250,
    tokens_per_step: int = 2048,
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup_steps: int = 0,
    clip: float = 1.0,
    seed: int = 0,
    context_size: int | None = None,
    lens: TunedLens | None = None,
    progress: bool | Callable[[int, int], None] = True,
    out_dir: str | Path | None = None,
    threads: int | None = 1,
) -> TunedLens:
    """Train a tuned lens on `model` with tuned-lens's recipe, scaled down to small models.

    Each step reads a batch of corpus rows, runs the model once (no gradients), and for every
    layer `l` adds `KL(p_final || softmax(unembed(norm(h_l + W_l h_l + b_l))))`, the mean over the
    batch's tokens (padding excluded; every position, the current token's distribution: tuned-lens's
    `--loss kl`, `token_shift=0`), to the loss. Then the gradient norm of all translators together
    is clipped to `clip` and SGD takes a step with Nesterov momentum, `weight_decay`, and learning
    rate `lr * (1 - momentum)` (tuned-lens's `lr_scale` convention: with momentum the effective step
    is `lr`), scheduled by a linear warm-up over `warmup_steps` then a linear decay to 0.
    Translators start at zero (the identity: the logit lens). Deterministic for `seed`, which
    orders the rows (reshuffled after each pass over the corpus).

    Args:
        model: a TransformerLens model; its weights are not changed.
        corpus_tokens: a `[n, pos]` token tensor or documents (tokenized and right-padded, as
            `lenslab.probes.sae.corpus_tokens` does).
        steps: optimiser steps (tuned-lens: 250).
        tokens_per_step: corpus tokens per step (tuned-lens: 2**18); rows per step are this over
            the mean number of non-pad tokens in a row, at least one.
        lr, momentum, weight_decay, warmup_steps, clip: the schedule above (tuned-lens's
            defaults: 1.0, 0.9, 1e-3, 0, 1.0).
        seed: orders the corpus rows.
        context_size: tokens per row for documents (default: the longest, at most `n_ctx`).
        lens: continue training this lens (default: a new identity lens).
        progress: a tqdm bar (True), a `(done, total)` callback, or nothing (False).
        out_dir: also save the lens there (`TunedLens.save`).
        threads: torch threads while training (None: leave as is). One by default: on a busy CPU
            more threads make these small matrix products much slower, not faster.

    Returns:
        the trained `TunedLens`, whose `info` records the settings and the last steps' KL per layer.
    """
    for nm, v in (("steps", steps), ("tokens_per_step", tokens_per_step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LenslabError(f"{nm} must be a positive integer, got {v!r}")
    if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0 or not clip > 0:
        raise LenslabError(
            f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0 and clip > 0 (got {lr}, {momentum}, {weight_decay}, {clip})"
        )
    if not 0 <= warmup_steps < steps:
        raise LenslabError(f"warmup_steps must be in 0..steps-1, got {warmup_steps}")
    rows = token_rows(model, corpus_tokens, context_size)
    keep = keep_mask(rows, excluded_tokens(model, None))
    per_row = float(keep.sum()) / rows.shape[0]
    if per_row == 0:
        raise LenslabError("the corpus has no tokens other than padding")
    batch = max(1, min(rows.shape[0], math.ceil(tokens_per_step / per_row)))
    gen = torch.Generator().manual_seed(int(seed))
    need = steps * batch
    order = torch.cat([torch.randperm(rows.shape[0], generator=gen) for _ in range(math.ceil(need / rows.shape[0]))])

    device = model_device(model)
    if lens is None:
        lens = TunedLens.for_model(model)
    else:
        lens.check(model).to(device)
    lens.train()
    opt = torch.optim.SGD(
        lens.parameters(), lr=lr * (1 - momentum), momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_schedule(steps, warmup_steps))
    n_layers = lens.n_layers
    tail = max(1, steps // 10)  # the record's KL: mean over the last 10% of steps
    kl_tail = torch.zeros(n_layers, dtype=torch.float64)
    report = progress_reporter(progress, steps, "training the tuned lens")
    with _frozen(model), torch_threads(threads):
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            toks, mask = rows[idx].to(device), keep[idx].to(device)
            with torch.no_grad():
                resid, logits = _residuals(model, toks)
                log_p = logits.float().log_softmax(-1)
            n = mask.sum().clamp_min(1)
            for l in range(n_layers):  # one backward per layer, as tuned-lens does (saves memory)
                loss = (_kl_rows(log_p, _unembed(model, lens(resid[l], l))) * mask).sum() / n
                loss.backward()
                if step >= steps - tail:
                    kl_tail[l] += float(loss.detach()) / tail
            nn.utils.clip_grad_norm_(lens.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=False)
            sched.step()
            report()
    report(close=True)
    lens.eval()
    lens.model_name = model_name(model)
    lens.source = str(out_dir) if out_dir is not None else f"trained on {model_name(model)}"
    lens.info = {
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "rows_per_step": batch,
        "tokens": int(keep[order[:need]].sum()),
        "corpus_rows": int(rows.shape[0]),
        "context_size": int(rows.shape[1]),
        "optimizer": "SGD, Nesterov momentum",
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "schedule": "linear decay to 0",
        "clip": clip,
        "seed": seed,
        "loss": "KL(final || lens), every non-pad position",
        "train_kl_last_10pct": [round(float(x), 6) for x in kl_tail],
    }
    if out_dir is not None:
        lens.save(out_dir)
    return lens


# --- KL per layer ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LensKL(Result):
    """How far each lens's reading of each layer is from the model's output, on a corpus.

    Attributes:
        kl: `[lens, layer]` mean over tokens of `KL(p_model || p_lens)` in nats (padding excluded).
        top1: `[lens, layer]` share of tokens where the lens's top token is the model's.
        lenses: the lenses' names, one per row (`"logit"`, `"tuned"`).
        layer_labels: the residual streams read, `0_pre` ... (`final_post`, the output, is left out).
        n_tokens: tokens measured.
        model: the model's name.
        provenance: model, lens source, versions, time.
    """

    kl: Float[Tensor, "lens layer"]
    top1: Float[Tensor, "lens layer"]
    lenses: list[str]
    layer_labels: list[str]
    n_tokens: int
    model: str
    provenance: dict = field(default_factory=dict)
    KIND = "LensKL"

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "kl": self.kl.tolist(),
            "top1": self.top1.tolist(),
            "lenses": self.lenses,
            "layer_labels": self.layer_labels,
            "n_tokens": self.n_tokens,
            "model": self.model,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LensKL:
        return cls(
            kl=torch.tensor(d["kl"], dtype=torch.float64),
            top1=torch.tensor(d["top1"], dtype=torch.float64),
            lenses=list(d["lenses"]),
            layer_labels=list(d["layer_labels"]),
            n_tokens=int(d["n_tokens"]),
            model=d["model"],
            provenance=d.get("provenance") or {},
        )

    def of(self, lens: str) -> Tensor:
        """The KL per layer of lens `lens` (`"logit"` or `"tuned"`)."""
        if lens not in self.lenses:
            raise LenslabError(f"no lens {lens!r} in this result; it has {', '.join(self.lenses)}")
        return self.kl[self.lenses.index(lens)]

    def table(self):
        """One row per layer: `layer`, then `kl_<lens>` (nats) and `top1_<lens>` for each lens."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        rows = []
        for li, label in enumerate(self.layer_labels):
            row = {"layer": label}
            for i, name in enumerate(self.lenses):
                row[f"kl_{name}"] = float(self.kl[i, li])
            for i, name in enumerate(self.lenses):
                row[f"top1_{name}"] = float(self.top1[i, li])
            rows.append(row)
        return pd.DataFrame(rows)

    def figure(self):
        """KL per layer, one line per lens."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        fig = go.Figure()
        for i, name in enumerate(self.lenses):
            fig.add_trace(
                go.Scatter(
                    x=self.layer_labels,
                    y=self.kl[i].tolist(),
                    mode="lines+markers",
                    name=inspection.LENS_NAMES.get(name, name),
                    customdata=[[float(a)] for a in self.top1[i]],
                    hovertemplate="%{x}: KL %{y:.4f} nats<br>top-1 agrees %{customdata[0]:.1%}<extra></extra>",
                )
            )
        fig.update_xaxes(title_text="residual stream read")
        fig.update_yaxes(title_text="KL(model ‖ lens), nats", rangemode="tozero")
        return style(fig, f"Lens KL per layer · {self.model} · {self.n_tokens:,} tokens")


@torch.no_grad()
def lens_kl(
    model,
    lens: TunedLens | str | Path | None = None,
    tokens: Tensor | list[str] | None = None,
    *,
    batch_size: int = 64,
    context_size: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> LensKL:
    """Per layer, `KL(model's output || lens's reading)` for the logit lens and the tuned lens.

    Args:
        model: a TransformerLens model.
        lens: the tuned lens (what `load_tuned_lens` accepts; default: the zoo model's shipped one).
        tokens: held-out text: a `[n, pos]` token tensor or documents (padding is excluded).
        batch_size: rows per forward pass.
        context_size: tokens per row for documents.
        progress: a tqdm bar (True), a `(done, total)` callback, or nothing.
    """
    if tokens is None:
        raise LenslabError("lens_kl needs tokens: held-out documents or a [n, pos] token tensor")
    lens = load_tuned_lens(lens, model)
    rows = token_rows(model, tokens, context_size)
    keep = keep_mask(rows, excluded_tokens(model, None))
    n_layers = int(model.cfg.n_layers)
    kl = torch.zeros(2, n_layers, dtype=torch.float64)
    agree = torch.zeros(2, n_layers, dtype=torch.float64)
    starts = range(0, rows.shape[0], batch_size)
    report = progress_reporter(progress, len(starts), "lens KL")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for s in starts:
            toks, mask = rows[s : s + batch_size].to(device), keep[s : s + batch_size].to(device)
            resid, logits = _residuals(model, toks)
            log_p = logits.float().log_softmax(-1)
            top = log_p.argmax(-1)
            for l in range(n_layers):
                for i, read in enumerate((_unembed(model, resid[l]), _unembed(model, lens(resid[l], l)))):
                    kl[i, l] += float((_kl_rows(log_p, read) * mask).double().sum())
                    agree[i, l] += float(((read.argmax(-1) == top) & mask).sum())
            report()
    finally:
        model.train(was_training)
    report(close=True)
    n = int(keep.sum())
    return LensKL(
        kl=kl / max(1, n),
        top1=agree / max(1, n),
        lenses=["logit", "tuned"],
        layer_labels=_layer_labels(model)[:-1],
        n_tokens=n,
        model=model_name(model),
        provenance=provenance(model, method="lens_kl", tuned_lens=lens.source, rows=int(rows.shape[0])),
    )
