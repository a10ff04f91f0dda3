"""lenslab.circuits: exact activation patching (and, later, attribution, RelP, graphs)."""
from lenslab.circuits.patching import DIRECTIONS, SITES, Site, patch, path_patch, resolve_site
from lenslab.circuits.attribution import METHODS, attribute
from lenslab.circuits.faithfulness import Faithfulness, faithfulness, pearson, spearman
from lenslab.results import PatchResult

__all__ = ["DIRECTIONS", "METHODS", "Faithfulness", "attribute", "faithfulness", "pearson", "spearman", "SITES", "PatchResult", "Site", "patch", "path_patch", "resolve_site"]
