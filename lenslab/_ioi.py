"""Deprecated: moved to `lenslab.data.ioi`; this alias goes in the next release."""

import sys
import warnings

from lenslab.data import ioi as _moved

warnings.warn("lenslab._ioi moved to lenslab.data.ioi; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved  # `from lenslab import _ioi` gets the moved module itself
