"""lenslab.circuits: find circuits.

- `patch` / `path_patch`: exact activation patching (the reference), at every granularity.
- `attribute`: AtP, AtP*, RelP, integrated gradients on the same grids.
- `faithfulness`: each method's correlation with exact patching.
- `attribute_edges` / `patch_edge`: EAP and EAP-IG edge scores and the real edge intervention.
- `CircuitGraph`: a circuit as data (JSON) and as an interactive figure.
"""

if __name__ != "lenslab.circuits":  # imported as top-level `circuits`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `circuits`, or a clear error
else:
    from lenslab.circuits.attribution import METHODS, AttributionResult, attribute
    from lenslab.circuits.edges import EdgeScores, attribute_edges, node_names, patch_edge
    from lenslab.circuits.faithfulness import Faithfulness, faithfulness, pearson, spearman
    from lenslab.circuits.graph import CircuitGraph
    from lenslab.circuits.patching import DIRECTIONS, SITES, Site, batched_patch, patch, path_patch, resolve_site
    from lenslab.results import PatchResult

    __all__ = [
        "DIRECTIONS",
        "METHODS",
        "SITES",
        "AttributionResult",
        "CircuitGraph",
        "EdgeScores",
        "Faithfulness",
        "PatchResult",
        "Site",
        "attribute",
        "attribute_edges",
        "batched_patch",
        "faithfulness",
        "node_names",
        "patch",
        "patch_edge",
        "path_patch",
        "pearson",
        "resolve_site",
        "spearman",
    ]
