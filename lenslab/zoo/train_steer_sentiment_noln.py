"""Build `zoo/steer-sentiment-noln`: zoo/steer-sentiment with every LayerNorm removed by fine-tuning.

The recipe is `lenslab.zoo.noln.TWINS["steer-sentiment"]` (`lenslab.zoo.noln.build`): each norm's scale fixed
at its mean in the authors' order, with fine-tuning on the parent's own training distribution after
each; the card holds the removal and the papers' claims measured on the pair. Deterministic; run
with `lenslab zoo train steer-sentiment-noln`.
"""

from __future__ import annotations

from lenslab.zoo import noln


def train(out_dir, seed: int = 0, steps: int | None = None, threads: int = 1) -> None:
    """Remove steer-sentiment's norms and write the twin and its card to `out_dir`."""
    noln.build("steer-sentiment", out_dir, seed=seed, steps=steps, threads=threads)
