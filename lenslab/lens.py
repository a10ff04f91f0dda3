"""Deprecated alias of `lenslab.inspection`, kept for one release: importing it warns.

The Model page's analyses (tokenize, attention_patterns, logit_lens, top_predictions,
model_card) moved to `lenslab.inspection`, where `LogitLens` and the `Predictions` that
`top_predictions` returns are results (`table()`, `figure()`, JSON) and their figures are drawn.
Use `from lenslab import inspection`.
"""

from __future__ import annotations

import warnings

from lenslab.inspection import (
    LogitLens,
    Prediction,
    Predictions,
    Tokenized,
    attention_patterns,
    config_summary,
    logit_lens,
    logit_lens_logits,
    model_card,
    model_name,
    tokenize,
    top_predictions,
)

__all__ = [
    "LogitLens",
    "Prediction",
    "Predictions",
    "Tokenized",
    "attention_patterns",
    "config_summary",
    "logit_lens",
    "logit_lens_logits",
    "model_card",
    "model_name",
    "tokenize",
    "top_predictions",
]

warnings.warn("lenslab.lens is deprecated; use lenslab.inspection", DeprecationWarning, stacklevel=2)
