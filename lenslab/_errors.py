"""User-facing errors: every message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LenslabError(ValueError):
    """Raised at lenslab's boundary for bad input; the message says what to do instead."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
