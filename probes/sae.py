"""Sparse autoencoders (SAEs) with sae-lens: load, check against a model, train offline, measure.

An SAE (Bricken et al. 2023, "Towards Monosemanticity"; Cunningham et al. 2023,
arXiv:2309.08600) reads one activation `x` `[d_in]` at a hook point and writes it as a sparse,
non-negative code `f = encode(x)` `[d_sae]` (the *features*) and a reconstruction
`x_hat = f @ W_dec + b_dec`. A TopK SAE (Gao et al. 2024, arXiv:2406.04093) keeps the `k` largest
pre-activations per token; a standard SAE uses a ReLU and an L1 penalty on `f`.

lenslab does not re-implement any of it: SAEs are sae-lens `SAE` objects (`StandardSAE`,
`TopKSAE`, ...), loaded with `SAE.from_pretrained` / `SAE.load_from_disk` and trained with
sae-lens's `LanguageModelSAETrainingRunner`. This module is the public face of what a workbench
needs around them; each job lives in its own module and is re-exported here:

- `load_sae`: one entry point for a sae-lens release + SAE id (real `SAE.from_pretrained`: works
  online or from the local Hugging Face cache), a folder saved by sae-lens, or a zoo SAE
  (`"zoo/ioi-4l/blocks.2.hook_resid_post"`); with `model=`, `check_sae` runs first.
  (`lenslab.probes.sae_load`)
- `check_sae`: the SAE's hook point exists in the model and `d_in` equals that hook's width.
  (`lenslab.probes.sae_load`)
- `list_saes` / `read_sae_card` / `zoo_sae_path`: the zoo's shipped SAEs
  (`lenslab/zoo/<model>/saes/<hook>/`). (`lenslab.probes.sae_load`)
- `splice_hooks`: TransformerLens forward hooks that replace the activation by the SAE's
  reconstruction (what `sae_metrics` uses; usable with `model.run_with_hooks` / `model.hooks`).
  (`lenslab.probes.sae_splice`)
- `sae_metrics`: MSE, explained variance, next-token loss clean / with the SAE spliced in /
  with the activation zero-ablated, the loss recovered, L0 and the dead-feature fraction;
  `corpus_tokens` makes the token rows it and `train_sae` read; `read_metrics` reads an SAE's
  `metrics.json`. (`lenslab.probes.sae_measure`)
- `train_sae`: sae-lens's runner on an in-memory `datasets.Dataset` of token ids made locally
  (no hub dataset, no wandb), deterministic for a seed; writes the sae-lens folder, `card.md` and
  `metrics.json`. (`lenslab.probes.sae_train`)
- The recipes and corpora of the shipped zoo SAEs are `lenslab.zoo.train_saes`
  (`lenslab sae train --model zoo/ioi-4l --hook blocks.2.hook_resid_post --out DIR`).

>>> import lenslab
>>> from lenslab.probes.sae import load_sae
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> sae = load_sae("zoo/induction-2l/blocks.0.hook_resid_post", model=model)
>>> sae.cfg.d_in, sae.cfg.d_sae
(64, 1024)
"""

from __future__ import annotations

from lenslab.probes.sae_load import SAES_DIR, check_sae, list_saes, load_sae, read_sae_card, zoo_sae_path
from lenslab.probes.sae_measure import SaeMetrics, corpus_tokens, read_metrics, sae_metrics
from lenslab.probes.sae_splice import splice_hooks
from lenslab.probes.sae_train import train_sae

__all__ = [
    "SAES_DIR",
    "SaeMetrics",
    "check_sae",
    "corpus_tokens",
    "list_saes",
    "load_sae",
    "read_metrics",
    "read_sae_card",
    "sae_metrics",
    "splice_hooks",
    "train_sae",
    "zoo_sae_path",
]
