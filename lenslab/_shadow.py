"""What a card folder does when it is imported under its bare name (`kernels`, `app`, ...).

lenslab's areas live in top-level folders (`app/ circuits/ kernels/ probes/ steering/`) that
setuptools maps to `lenslab.*`. Their bare names are also distributions on the package index
(`kernels` is a hard dependency of transformers since 5.25). A process whose `sys.path` holds
the repository root (`python -m ...`, `python -c`, a REPL started in the root) would import our
folder in their place. Every process the project starts runs with the root off `sys.path`
(`PYTHONSAFEPATH=1`); this file is the safety net for the rest (docs/design.md,
"Card folders and sys.path").

`hand_over(name, file)` replaces the half-imported folder in `sys.modules` by the installed
distribution of that name, found on `sys.path` without the repository root, so that
`import kernels` from transformers gets Hugging Face's `kernels`. Where no such distribution is
installed it raises an ImportError that says what happened and how to fix it.

This file imports nothing but the standard library: it runs while another package (say
transformers) is half imported. The card folders load it by path, never as `lenslab._shadow`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _same_dir(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:
        return False


def hand_over(name: str, file: str) -> None:
    """Make `import <name>` give the installed distribution `<name>`, not lenslab's folder.

    Args:
        name: the bare name the folder was imported as (`kernels`).
        file: the folder's `__init__.py` (its parent's parent is the repository root).

    Raises:
        ImportError: no distribution `<name>` is installed; the message names the fix.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
    search = [p for p in sys.path if not _same_dir(p, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"'{name}' was imported from lenslab's source folder {os.path.dirname(os.path.abspath(file))}, "
            f"because the repository root {root} is on sys.path (python -m / -c or a REPL started there). "
            f"lenslab's folder is `lenslab.{name}`: write `import lenslab.{name}`. No other distribution named "
            f"'{name}' is installed. To keep the root off sys.path, set PYTHONSAFEPATH=1 (Python >= 3.11) or "
            "start Python from another directory.",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds after this file ran
    spec.loader.exec_module(module)
