"""Pre-LN vs Peri-LN vs Post-LN: one small model trained three ways, and what each does to the residual stream.

Kim et al. 2025 ("Peri-LN: Revisiting Layer Normalization in the Transformer Architecture",
arXiv 2502.02732) claim that normalising each sub-layer's output as well as its input (Peri-LN,
`x + Norm(F(Norm(x)))`) keeps the hidden-state variance from growing layer over layer as it does
under Pre-LN (whose residual stream is free to carry massive activations), and gives steadier
gradients than both Pre-LN and Post-LN. `run_study` tests that at CPU scale: the same
`HookedTransformer` (`StudyConfig`) built three ways (`lenslab.zoo.norm_variants`), with the
same seed (so the same initial weights wherever the variants share a parameter), the same data
in the same order, the same optimiser and schedule, each saving log-spaced checkpoints
(`lenslab.zoo.checkpoints`). Per variant it reports:

- the gradient norm (all parameters, before clipping) at every step, and per block at the
  checkpoint steps;
- the hidden-state variance by layer (the variance of every entry of the embedding output and of
  each `blocks.{l}.hook_resid_post`, on held-out rows) at every checkpoint; its growth is the last
  layer's over the embedding's;
- the atlas's max |a| by layer at the end (`lenslab.probes.atlas`);
- the massive-activation trajectory over the checkpoints (`trajectory.measure_checkpoints`) and
  its five-parameter fit, or why the fit means nothing.

The corpus is zoo/english-4l's (Debian `fortunes` and `wordnet-base`, needed to train); the
held-out rows it is measured on come from the committed `lenslab/zoo/english-4l/heldout.txt`,
so the committed checkpoints can be re-measured on any clone. Run it with
`python -m lenslab.probes.norm_study OUT_DIR` (docs/norms.md, "Pre-LN vs Peri-LN vs Post-LN").
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lenslab._errors import LenslabError
from lenslab.probes import atlas, trajectory
from lenslab.zoo import checkpoints, norm_variants

DEFAULT_PROMPT = "The weather was terrible and the food was awful, so I felt"  # english-4l's

__all__ = ["StudyConfig", "eval_rows", "hidden_variance", "run_study", "train_variant"]


@dataclass(frozen=True)
class StudyConfig:
    """The model, data and training recipe every variant shares."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 128
    vocab: int = 384  # byte-level BPE trained on the training split (`bpe_tokenizer`)
    steps: int = 400
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    bos_rows: bool = True  # every row starts at a document's <bos> (else anywhere in the stream)
    n_checkpoints: int = 10
    n_eval_rows: int = 16
    seed: int = 0
    normalization_type: str = "LN"

    def model_config(self, d_vocab: int, name: str):
        from transformer_lens import (
            HookedTransformerConfig,  # deferred: transformer_lens loads only when a model is built
        )

        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            d_vocab=d_vocab,
            act_fn="gelu_new",
            normalization_type=self.normalization_type,
            positional_embedding_type="standard",
            model_name=name,
            seed=self.seed,
            default_prepend_bos=True,
        )


# --- data -----------------------------------------------------------------------------------------
def corpus(cfg: StudyConfig):
    """`(tokenizer, train stream [n_tokens])`: a byte-level BPE of `cfg.vocab` trained on english-4l's
    training split, and the split packed with `<bos>` before each document (needs the Debian packages)."""
    from lenslab.zoo import train_english_4l  # deferred: the corpus code loads only for a study run

    train_docs, _ = train_english_4l.documents()
    tok = train_english_4l.bpe_tokenizer(train_docs, vocab_size=cfg.vocab)
    return tok, train_english_4l.pack(tok, train_docs).long()


def eval_rows(tokenizer, n_rows: int, n_ctx: int) -> torch.Tensor:
    """`[n_rows, n_ctx]` held-out token rows, each starting at a document's `<bos>`, from the committed
    `lenslab/zoo/english-4l/heldout.txt` in `tokenizer` (the first documents with `n_ctx` tokens after
    their `<bos>` in the packed stream)."""
    from lenslab.zoo import train_english_4l  # deferred: the corpus code loads only for a study run

    stream = train_english_4l.pack(tokenizer, train_english_4l.heldout_docs()).long()
    bos = int(tokenizer.bos_token_id)
    starts = [int(i) for i in (stream == bos).nonzero()[:, 0] if i + n_ctx <= len(stream)][:n_rows]
    if len(starts) < n_rows:
        raise LenslabError(f"the held-out text has only {len(starts)} rows of {n_ctx} tokens; ask for fewer")
    return torch.stack([stream[s : s + n_ctx] for s in starts])


def _batches(cfg: StudyConfig, stream: torch.Tensor):
    """The training rows `[batch, n_ctx + 1]` of every step, drawn from one seeded generator: the same
    for every variant."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.bos_rows:
        bos_at = (stream == stream[0]).nonzero()[:, 0]  # the stream starts with <bos>
        bos_at = bos_at[bos_at + cfg.n_ctx + 1 <= len(stream)]
    for _ in range(cfg.steps):
        if cfg.bos_rows:
            starts = bos_at[torch.randint(len(bos_at), (cfg.batch,), generator=gen)]
        else:
            starts = torch.randint(0, len(stream) - cfg.n_ctx - 1, (cfg.batch,), generator=gen)
        yield torch.stack([stream[s : s + cfg.n_ctx + 1] for s in starts.tolist()])


# --- training -------------------------------------------------------------------------------------
def build(cfg: StudyConfig, tokenizer, variant: str):
    """A freshly initialised `variant` model (the same initial weights for every variant of a seed)."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice
        model = HookedTransformer(cfg.model_config(len(tokenizer), f"norm-study-{variant}"), tokenizer=tokenizer)
    model.to("cpu", print_details=False)
    return norm_variants.apply_norm_variant(model, variant)


def _block_norms(model) -> list[float]:
    """The gradient norm of each block's parameters: `[n_layers]`."""
    return [
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in b.parameters() if p.grad is not None])))
        for b in model.blocks
    ]


def train_variant(cfg: StudyConfig, tokenizer, stream: torch.Tensor, variant: str, out: Path) -> dict:
    """Train one variant, saving its log-spaced checkpoints to `out/step{N}/` (float16); returns the
    training log: per-step loss and gradient norm, per-checkpoint block gradient norms, seconds."""
    model = build(cfg, tokenizer, variant)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))),
    )
    save = checkpoints.CheckpointSaver.for_run(
        out,
        cfg.steps,
        tokenizer,
        f"norm-study {variant}",
        cfg.n_checkpoints,
        weights_dtype=torch.float16,
        extra={"norm_study": {**asdict(cfg), "variant": variant}, "default_prompt": DEFAULT_PROMPT},
    )
    losses, grad_norms, block_norms = [], [], {}
    t0 = time.time()
    model.train()
    for step, rows in enumerate(_batches(cfg, stream)):
        save(model, step)
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step in save.steps:
            block_norms[step] = _block_norms(model)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        grad_norms.append(float(norm))
    save(model, cfg.steps)
    return {
        "loss": losses,
        "grad_norm": grad_norms,
        "block_grad_norm": {str(k): v for k, v in block_norms.items()},
        "seconds": time.time() - t0,
    }


# --- measurements ---------------------------------------------------------------------------------
@torch.no_grad()
def hidden_variance(model, rows: torch.Tensor) -> list[float]:
    """The variance of every entry of the embedding output (`blocks.0.hook_resid_pre`) and of each
    `blocks.{l}.hook_resid_post` on `rows`: `[n_layers + 1]`, the hidden states' variance by depth."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(rows, names_filter=lambda n: n in names)
    return [float(cache[n].float().var()) for n in names]


def _fit(series) -> dict:
    """The five-parameter fit of the top magnitude, with any warning it raised (a fit that did not
    converge, or whose covariance could not be estimated)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", trajectory.FitWarning)
        fit = series.fit("top_magnitude")
    return {
        "params": fit.params,
        "stderr": fit.stderr,
        "r2": fit.r2,
        "rmse": fit.rmse,
        "converged": fit.converged,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, trajectory.FitWarning)],
    }


def measure_variant(folder: Path, rows: torch.Tensor) -> dict:
    """Everything the study reports of one variant's checkpoint folder (see the module docstring)."""
    import lenslab  # deferred: the package's loader, only when a series is measured

    steps = sorted(int(p.name.removeprefix("step")) for p in folder.glob("step*") if (p / "config.json").is_file())
    variance = {}
    for s in steps:
        variance[str(s)] = hidden_variance(lenslab.load_model(str(folder / f"step{s}"), device="cpu"), rows)
    final = lenslab.load_model(str(folder / f"step{steps[-1]}"), device="cpu")
    at = atlas.activation_atlas(final, rows, kinds=["embed", "resid_pre", "resid_post", "attn_out", "mlp_out"])
    series = trajectory.measure_checkpoints(folder, rows)
    return {
        "steps": steps,
        "variance_by_layer": variance,
        "variance_growth": variance[str(steps[-1])][-1] / variance[str(steps[-1])][0],
        "atlas_max_by_hook": {h["hook"]: h["max_abs"] for h in at.hooks},
        "atlas_ratio_by_hook": {h["hook"]: h["ratio"] for h in at.hooks},
        "series": series.to_dict(),
        "fit": _fit(series),
    }


SERIES_CONFIG = StudyConfig(n_layers=2, d_model=64, d_mlp=128, n_ctx=128, steps=400, batch=8, n_checkpoints=8)
"""The committed checkpoint series (`lenslab/zoo/norm-study/pre-2l/`): small enough to ship (8
float16 checkpoints of 123k parameters, about 2 MB), the Pre-LN variant."""


def _compact(log: dict) -> dict:
    """The training log with its per-step lists rounded to 5 significant digits (the JSON stays small)."""
    r = lambda xs: [float(f"{x:.5g}") for x in xs]
    return {**log, "loss": r(log["loss"]), "grad_norm": r(log["grad_norm"])}


def run_study(
    out: str | Path,
    cfg: StudyConfig = StudyConfig(),
    variants=norm_variants.VARIANTS,
    series_cfg: StudyConfig | None = SERIES_CONFIG,
    threads: int = 1,
) -> dict:
    """Train and measure every variant of `cfg` (checkpoints in `out/<variant>/step{N}/`) and the
    Pre-LN variant of `series_cfg` (`out/pre-{n_layers}l/`, the committed series); the results go to
    `out/results.json` (also returned). `cfg` and `series_cfg` must share the vocabulary (one tokenizer)."""
    out = Path(out)
    if series_cfg is not None and series_cfg.vocab != cfg.vocab:
        raise LenslabError(f"series_cfg.vocab ({series_cfg.vocab}) must equal cfg.vocab ({cfg.vocab}): one tokenizer")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.time()
        tok, stream = corpus(cfg)
        results = {"config": asdict(cfg), "train_tokens": len(stream), "variants": {}}
        runs = [(v, cfg, out / v) for v in variants]
        if series_cfg is not None:
            runs.append(("pre", series_cfg, out / f"pre-{series_cfg.n_layers}l"))
            results["series_config"] = asdict(series_cfg)
        for v, c, folder in runs:
            log = train_variant(c, tok, stream, v, folder)
            entry = {"training": _compact(log), **measure_variant(folder, eval_rows(tok, c.n_eval_rows, c.n_ctx))}
            if c is cfg:
                results["variants"][v] = entry
            else:
                results["series"] = entry
            print(
                json.dumps({"run": folder.name, "s": round(time.time() - t0), "loss": round(log["loss"][-1], 4)}),
                flush=True,
            )
        results["seconds"] = time.time() - t0
    finally:
        torch.set_num_threads(old)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the checkpoints and results.json")
    p.add_argument("--variants", nargs="+", default=list(norm_variants.VARIANTS), choices=norm_variants.VARIANTS)
    for f, v in asdict(StudyConfig()).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        p.add_argument(f"--{f.replace('_', '-')}", type=kind, default=v)
    args = p.parse_args(argv)
    cfg = replace(StudyConfig(), **{f: getattr(args, f) for f in asdict(StudyConfig())})
    run_study(args.out, cfg, args.variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
