"""Deprecated alias of `lenslab.inspection`'s figures, kept for one release: importing it warns.

The Model page's figures (attention_heatmap, attention_heads, logit_lens_heatmap,
predictions_bar, pos_labels) moved to `lenslab.inspection`, next to the analyses they draw;
`LogitLens.figure()` and `Predictions.figure()` draw the last two. Use
`from lenslab import inspection`.
"""

from __future__ import annotations

import warnings

from lenslab.inspection import (
    ATTENTION_SCALE,
    PROB_SCALE,
    attention_heads,
    attention_heatmap,
    logit_lens_heatmap,
    pos_labels,
    predictions_bar,
)

__all__ = [
    "ATTENTION_SCALE",
    "PROB_SCALE",
    "attention_heads",
    "attention_heatmap",
    "logit_lens_heatmap",
    "pos_labels",
    "predictions_bar",
]

warnings.warn("lenslab.plots is deprecated; use lenslab.inspection", DeprecationWarning, stacklevel=2)
