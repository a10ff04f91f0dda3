"""lenslab.app: the Streamlit workbench (thin pages over the library)."""

if __name__ != "lenslab.app":  # imported as top-level `app`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `app`, or a clear error
