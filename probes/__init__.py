"""lenslab.probes (see docs/ and the open issues for what lands here)."""

if __name__ != "lenslab.probes":  # imported as top-level `probes`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `probes`, or a clear error
