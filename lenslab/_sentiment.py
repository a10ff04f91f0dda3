"""Deprecated: moved to `lenslab.data.sentiment`; this alias goes in the next release."""

import sys
import warnings

from lenslab.data import sentiment as _moved

warnings.warn(
    "lenslab._sentiment moved to lenslab.data.sentiment; import it from there", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved  # `from lenslab import _sentiment` gets the moved module itself
