"""Training an SAE offline with sae-lens's trainer, and writing its card.

- `train_sae`: sae-lens's `LanguageModelSAETrainingRunner` on an in-memory `datasets.Dataset` of
  token ids made locally (no hub dataset, no wandb), deterministic for a seed; writes the sae-lens
  folder, `card.md` and `metrics.json`.
- `sae_card`: the Markdown card of a trained SAE (training settings and `SaeMetrics` tables);
  `lenslab.zoo.train_saes` writes the zoo SAEs' cards with it.

Re-exported by `lenslab.probes.sae`.
"""

from __future__ import annotations

import json
import math
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from lenslab._errors import LenslabError, did_you_mean
from lenslab.probes.sae_load import CFG_FILE, hook_width, load_folder, quiet_sae_lens
from lenslab.probes.sae_measure import SaeMetrics, corpus_tokens, excluded_tokens, sae_metrics, write_metrics
from lenslab.toolbox import model_device, model_name, torch_threads

__all__ = ["sae_card", "train_sae"]


# --- training ----------------------------------------------------------------------------------
def train_sae(
    model,
    hook: str,
    *,
    corpus: list[str] | Tensor,
    d_sae: int | None = None,
    training_tokens: int = 300_000,
    lr: float = 4e-3,
    k: int | None = None,
    l1: float | None = None,
    context_size: int | None = None,
    batch_size_tokens: int = 512,
    seed: int = 0,
    out_dir: str | Path | None = None,
    eval_corpus: list[str] | Tensor | None = None,
    threads: int | None = 1,
    card_extra: str = "",
):
    """Train an SAE on `model`'s activations at `hook` with sae-lens's trainer, fully offline.

    The corpus becomes token rows (`corpus_tokens`) in an in-memory `datasets.Dataset` that
    sae-lens's `LanguageModelSAETrainingRunner` reads with the already-loaded model; pad positions
    are excluded from training (`exclude_special_tokens`), wandb is off, and the run is
    deterministic for `seed` (the global torch RNG is forked and seeded). sae-lens shows a
    progress bar. Learning rate: linear warm-up over the first 5% of steps, constant, then linear
    decay to 0 over the last 20%.

    Args:
        model: a TransformerLens model (e.g. `lenslab.load_model("zoo/ioi-4l")`).
        hook: the hook point, e.g. `"blocks.2.hook_resid_post"`.
        corpus: documents (one row each) or a `[n, pos]` token tensor.
        d_sae: number of features (default: 4 x the hook's width).
        training_tokens: activations the SAE sees (the corpus is repeated when it is shorter).
        lr: Adam learning rate.
        k: TopK SAE with `k` active features per token (the default when `l1` is None: 16, at most `d_sae`).
        l1: a standard (ReLU + L1) SAE with this L1 coefficient instead.
        context_size: tokens per row (default: the longest document, at most `n_ctx`).
        batch_size_tokens: activations per optimiser step.
        seed: seeds SAE initialisation and the activation shuffling.
        out_dir: where to write sae-lens's folder (`cfg.json`, `sae_weights.safetensors`,
            `sparsity.safetensors`, `runner_cfg.json`) plus `card.md` and `metrics.json`.
        eval_corpus: rows for the card's metrics (default: the last 10% of the corpus's rows,
            which are then held out of training).
        threads: torch threads while training (None: leave as is).
        card_extra: Markdown appended to the card.

    Returns:
        The trained SAE, as loaded back from `out_dir` (a sae-lens inference `SAE`).

    >>> import lenslab
    >>> from lenslab import tasks
    >>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
    >>> tokens = tasks.induction(model, n=64, seq_len=16, seed=0).clean_tokens
    >>> sae = train_sae(model, "blocks.0.hook_resid_post", corpus=tokens, d_sae=256,
    ...                 training_tokens=20_000, out_dir="my_sae")
    >>> sae.cfg.d_sae, sorted(p.name for p in Path("my_sae").iterdir())
    (256, ['card.md', 'cfg.json', 'metrics.json', 'runner_cfg.json', 'sae_weights.safetensors', 'sparsity.safetensors'])
    """
    if k is not None and l1 is not None:
        raise LenslabError("pass k= (TopK SAE) or l1= (standard L1 SAE), not both")
    hooks = list(model.hook_dict)
    if hook not in hooks:
        raise LenslabError(
            f"model {model_name(model)!r} has no hook {hook!r}{did_you_mean(hook, hooks)}; "
            "hook names look like 'blocks.1.hook_resid_post'"
        )
    d_in = hook_width(model, hook, None)
    if d_sae is None:
        d_sae = 4 * d_in
    if k is None and l1 is None:
        k = min(16, d_sae)
    for nm, v in (("d_sae", d_sae), ("training_tokens", training_tokens), ("batch_size_tokens", batch_size_tokens)):
        if not isinstance(v, int) or v < 1:
            raise LenslabError(f"{nm} must be a positive int, got {v!r}")
    if k is not None and not 1 <= k <= d_sae:
        raise LenslabError(f"k must be between 1 and d_sae={d_sae}, got {k}")
    if l1 is not None and l1 < 0:
        raise LenslabError(f"l1 must be >= 0, got {l1}")
    if not lr > 0:
        raise LenslabError(f"lr must be positive, got {lr}")
    if training_tokens < batch_size_tokens:
        raise LenslabError(
            f"training_tokens ({training_tokens}) must be at least batch_size_tokens ({batch_size_tokens})"
        )

    rows = corpus_tokens(model, corpus, context_size)
    if eval_corpus is None and rows.shape[0] >= 2:
        n_eval = max(1, rows.shape[0] // 10)
        rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    else:
        eval_rows = rows if eval_corpus is None else corpus_tokens(model, eval_corpus, rows.shape[1])
    ctx = int(rows.shape[1])
    exclude = excluded_tokens(model, None)

    out = Path(out_dir) if out_dir is not None else None

    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        target = out if out is not None else Path(tmp) / "sae"
        t0 = time.time()
        _run_sae_lens(
            model,
            hook,
            rows,
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            l1=l1,
            lr=lr,
            ctx=ctx,
            training_tokens=training_tokens,
            batch_size_tokens=batch_size_tokens,
            seed=seed,
            exclude=exclude,
            out=target,
        )
        minutes = (time.time() - t0) / 60
        for name in (
            CFG_FILE,
            "runner_cfg.json",
        ):  # sae-lens writes keys in set order: sort them, so a rebuild is byte-equal
            f = target / name
            if f.exists():
                d = json.loads(f.read_text())
                if "output_path" in d:
                    d["output_path"] = target.name  # not this machine's absolute path
                f.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        sae = load_folder(target, str(model_device(model)))
        if out is not None:
            metrics = sae_metrics(model, sae, eval_rows, check=False)
            write_metrics(out / "metrics.json", {"all next-token predictions": metrics})
            settings = dict(
                d_sae=d_sae,
                k=k,
                l1=l1,
                lr=lr,
                training_tokens=training_tokens,
                batch_size_tokens=batch_size_tokens,
                context_size=ctx,
                seed=seed,
            )
            (out / "card.md").write_text(
                sae_card(
                    model_name(model),
                    hook,
                    sae,
                    settings,
                    {"all next-token predictions": metrics},
                    corpus=f"{rows.shape[0]} rows of {ctx} tokens (metrics on {eval_rows.shape[0]} further rows)",
                    minutes=minutes,
                    extra=card_extra,
                )
            )
    return sae


def _run_sae_lens(
    model,
    hook,
    rows: Tensor,
    *,
    d_in,
    d_sae,
    k,
    l1,
    lr,
    ctx,
    training_tokens,
    batch_size_tokens,
    seed,
    exclude,
    out: Path,
) -> None:
    """sae-lens's `LanguageModelSAETrainingRunner` on `rows` (`[n, ctx]` token ids) in memory."""
    from datasets import Dataset  # deferred: datasets (with pyarrow) loads only when an SAE is trained
    from sae_lens import (  # deferred: sae-lens's trainer loads only when an SAE is trained
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    steps = training_tokens // batch_size_tokens
    warm = steps // 20
    decay = steps // 5
    sae_cfg = (
        TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
        if k is not None
        else StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=l1, l1_warm_up_steps=warm)
    )
    # The mixing buffer holds n_batches_in_buffer * context_size activations and must hold at
    # least one training batch (sae-lens requires it): keep four.
    n_in_buffer = max(8, math.ceil(4 * batch_size_tokens / ctx))
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=model_name(model),
        hook_name=hook,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=ctx,
        prepend_bos=False,  # rows already start with <bos> where the model uses one
        n_batches_in_buffer=n_in_buffer,
        store_batch_size_prompts=min(16, rows.shape[0]),
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=warm,
        lr_decay_steps=decay,
        dead_feature_window=max(50, min(1000, steps // 10)),
        feature_sampling_window=max(1, steps),
        exclude_special_tokens=list(exclude) or False,
        device=str(model_device(model)),
        seed=seed,
        dtype="float32",
        model_from_pretrained_kwargs={},
        checkpoint_path=None,
        n_checkpoints=0,
        output_path=str(out),
        verbose=False,
    )
    cfg.logger.log_to_wandb = False
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), quiet_sae_lens(), _keep_signal_handlers():
            torch.manual_seed(seed)
            runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
            runner.run()
    finally:
        model.train(was_training)


# --- cards -------------------------------------------------------------------------------------
def sae_card(
    model_name: str,
    hook: str,
    sae,
    settings: dict,
    metrics: dict[str, SaeMetrics],
    *,
    corpus: str,
    minutes: float,
    extra: str = "",
    title: str | None = None,
    rebuild: str | None = None,
) -> str:
    """The Markdown card of `sae`, trained on `model_name` at `hook`: what it is, its training
    (`settings`: `k` or `l1`, `training_tokens`, `batch_size_tokens`, `lr`, `context_size`, `seed`;
    the `corpus` in words; `minutes` of training) and its `metrics` (`{predictions: SaeMetrics}`, the
    first one in the reconstruction table), then `extra` Markdown. `title` and `rebuild` replace the
    default heading and rebuild command."""
    import sae_lens  # deferred: sae-lens is heavy; only its version is read, for the card

    arch = sae.cfg.architecture()
    kind = f"TopK (k={settings['k']})" if settings.get("k") is not None else f"standard ReLU + L1 (l1={settings['l1']})"
    first = next(iter(metrics.values()))
    losses = "\n".join(
        f"| {name} | {m.n_predictions:,} | {m.ce_loss_clean:.4f} | {m.ce_loss_spliced:.4f} | {m.ce_loss_zero:.4f} "
        f"| {m.loss_recovered:.3f} |"
        for name, m in metrics.items()
    )
    rebuild = rebuild or f"`lenslab sae train --model {model_name} --hook {hook} ...` with the settings above"
    return f"""# {title or f"SAE on {model_name} at {hook}"}

A {kind} sparse autoencoder (sae-lens architecture `{arch}`) reading `{hook}` of `{model_name}`:
`d_in={sae.cfg.d_in}`, `d_sae={sae.cfg.d_sae}` features. Trained with sae-lens {sae_lens.__version__}'s
`LanguageModelSAETrainingRunner` on token ids generated locally (an in-memory `datasets.Dataset`).
Load it with `lenslab.probes.sae.load_sae(...)` or `sae_lens.SAE.load_from_disk(folder)`.

## Training
- Corpus: {corpus}; padding excluded.
- {settings["training_tokens"]:,} activations, {settings["batch_size_tokens"]} per step, Adam lr {settings["lr"]}
  (warm-up 5%, constant, linear decay over the last 20%), context {settings["context_size"]}, seed {settings["seed"]}.
- {minutes:.1f} min on CPU. Rebuild: {rebuild}.

## Metrics
Measured by `lenslab.probes.sae.sae_metrics` on the saved weights ({first.n_tokens:,} activations;
`metrics.json` holds the same numbers).

| metric | value |
|---|---|
| MSE, mean over tokens of ‖x − x̂‖² | {first.mse:.4g} |
| explained variance | {first.explained_variance:.3f} |
| L0 (active features per token) | {first.l0:.2f} |
| dead features (never active on these tokens) | {first.dead_fraction:.1%} of {first.d_sae} |

Next-token loss (nats) with the SAE's reconstruction spliced in at `{hook}` and with the
activation zero-ablated there; loss recovered = (zero − spliced) / (zero − clean):

| predictions | count | clean | SAE spliced in | zero-ablated | loss recovered |
|---|---|---|---|---|---|
{losses}
{extra}"""


# --- run environment ---------------------------------------------------------------------------
@contextmanager
def _keep_signal_handlers():
    """sae-lens's runner installs SIGINT/SIGTERM handlers for checkpointing; put ours back after."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
