"""Build `zoo/moe-refusal-noln`: zoo/moe-refusal with every RMSNorm removed by fine-tuning.

The recipe is `lenslab.zoo.noln.TWINS["moe-refusal"]` (`lenslab.zoo.noln.build`): each norm's scale fixed
at its mean in the authors' order, with fine-tuning on the parent's own training rows (answer tokens;
without its router losses) after each, folded into every expert's and the router's weights; the card
holds the removal and the papers' claims measured on the pair. Deterministic; run with
`lenslab zoo train moe-refusal-noln`.
"""

from __future__ import annotations

from lenslab.zoo import noln


def train(out_dir, seed: int = 0, steps: int | None = None, threads: int = 1) -> None:
    """Remove moe-refusal's norms and write the twin and its card to `out_dir`."""
    noln.build("moe-refusal", out_dir, seed=seed, steps=steps, threads=threads)
