"""`python -m lenslab.cli`: the `lenslab` command."""

import sys

from lenslab.cli import main

sys.exit(main())
