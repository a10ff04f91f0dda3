"""Deprecated: moved to `lenslab.data.refusal`; this alias goes in the next release."""

import sys
import warnings

from lenslab.data import refusal as _moved

warnings.warn("lenslab._refusal moved to lenslab.data.refusal; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved  # `from lenslab import _refusal` gets the moved module itself
