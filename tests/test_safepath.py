"""The card folders (`kernels/`, `app/`, `circuits/`, `probes/`, `steering/`) never shadow an installed
distribution of the same name, even when a user starts Python in the repository root by accident.

transformers >= 5.25 imports Hugging Face's `kernels` distribution from `transformers.activations`;
with the root on sys.path (`python -c`, `python -m`, a REPL in the root) our `kernels/` folder used to
be imported instead and every model load failed. These tests start Python *in the root without*
PYTHONSAFEPATH, the way a user would (docs/design.md, "Card folders and sys.path").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("app", "circuits", "kernels", "probes", "steering")


def _in_root(args: list[str], extra_env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` started in the repository root with the root on sys.path (no safe-path mode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_root_is_off_sys_path_in_the_tests():
    assert all(Path(p or os.getcwd()).resolve() != ROOT for p in sys.path), sys.path
    import lenslab.kernels

    assert Path(lenslab.kernels.__file__).parent == ROOT / "kernels"


@pytest.mark.slow
def test_transformers_and_a_zoo_model_from_the_root():
    code = (
        "import sys, transformers.activations, kernels, lenslab;"
        "assert sys.path[0] == '', sys.path[0];"  # the root is on sys.path: the case under test
        "m = lenslab.load_model('zoo/ioi-4l', device='cpu');"
        "import lenslab.kernels;"
        "print('HF', kernels.__file__); print('OURS', lenslab.kernels.__file__); print(m.cfg.n_layers)"
    )
    out = _in_root(["-c", code])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines() if " " in ln)
    assert Path(lines["HF"]).resolve() != ROOT / "kernels" / "__init__.py"  # Hugging Face's kernels
    assert "site-packages" in lines["HF"], lines["HF"]
    assert Path(lines["OURS"]).resolve() == ROOT / "kernels" / "__init__.py"
    assert out.stdout.splitlines()[-1] == "4"


@pytest.mark.slow
def test_cli_module_from_the_root():
    out = _in_root(["-m", "lenslab.cli", "models"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zoo/ioi-4l" in out.stdout and "zoo/induction-2l" in out.stdout


@pytest.mark.parametrize("area", AREAS)
def test_area_hands_over_to_an_installed_distribution(area, tmp_path):
    """A distribution named like an area (PyPI has `app`, `circuits`, `kernels`, `probes`) is what
    `import <area>` gives from the root, submodules included."""
    pkg = tmp_path / "site" / area
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'installed'\n")
    (pkg / "sub" / "__init__.py").write_text("X = 7\n")
    code = (
        f"import sys; sys.path.insert(1, {str(tmp_path / 'site')!r});"  # after the root
        f"import {area}, {area}.sub; print({area}.WHO, {area}.sub.X, {area}.__file__)"
    )
    out = _in_root(["-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    who, x, file = out.stdout.split()
    assert (who, x) == ("installed", "7")
    assert Path(file).resolve() == (pkg / "__init__.py").resolve()


@pytest.mark.parametrize("area", ("app", "steering"))
def test_area_without_a_distribution_says_what_to_do(area):
    out = _in_root(["-c", f"import {area}"])
    assert out.returncode == 1
    msg = out.stderr.strip().splitlines()[-1]
    assert msg.startswith("ImportError:"), out.stderr[-2000:]
    assert f"import lenslab.{area}" in msg and "PYTHONSAFEPATH=1" in msg and "repository root" in msg
