"""lenslab.circuits: exact activation patching (and, later, attribution, RelP, graphs)."""
from lenslab.circuits.patching import DIRECTIONS, SITES, Site, patch, path_patch, resolve_site
from lenslab.results import PatchResult

__all__ = ["DIRECTIONS", "SITES", "PatchResult", "Site", "patch", "path_patch", "resolve_site"]
