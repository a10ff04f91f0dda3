"""lenslab.circuits: exact activation patching (and, later, attribution, RelP, graphs)."""
from lenslab.circuits.patching import DIRECTIONS, SITES, Site, patch, path_patch, resolve_site
from lenslab.circuits.attribution import METHODS, attribute
from lenslab.results import PatchResult

__all__ = ["DIRECTIONS", "METHODS", "attribute", "SITES", "PatchResult", "Site", "patch", "path_patch", "resolve_site"]
