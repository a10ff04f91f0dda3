"""lenslab.circuits (see docs/ and the open issues for what lands here)."""
