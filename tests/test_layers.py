"""The layers of docs/design.md, enforced: import-linter's contracts (pyproject.toml) and ruff.

import-linter (grimp) finds a package's modules by walking its folder, but the card folders
(circuits/, kernels/, ...) are mapped into `lenslab` by setuptools `package-dir`, so the test
builds the installed layout from pyproject's own mapping in a temporary folder and runs the
contracts there. Every import counts, function-local ones included.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def _installed_layout(dest: Path) -> Path:
    """Copy every .py of the distribution to `dest` as it is installed (package-dir mapping)."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, folder in mapping.items():
        if "." in package and mapping.get(package.rsplit(".", 1)[0]) == package.replace(".", "/"):
            continue
        for f in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in f.parts:
                continue
            target = dest / package.replace(".", "/") / f.relative_to(ROOT / folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    return dest


def _tool(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(
            f"{name} is not installed in this environment: it is in the dev extra (python3 run.py test installs it)"
        )
    return str(exe)


def test_import_contracts_hold(tmp_path):
    layout = _installed_layout(tmp_path / "src")
    assert (layout / "lenslab" / "kernels" / "batched.py").exists() and (layout / "lenslab" / "sites.py").exists()
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = subprocess.run(
        [_tool("lint-imports"), "--no-cache", str(tmp_path / "pyproject.toml")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(layout), "PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    n = len(PYPROJECT["tool"]["importlinter"]["contracts"])
    assert f"Contracts: {n} kept, 0 broken." in out, out


def test_every_core_module_is_in_the_core_contract():
    """A new module in lenslab/ must be placed: in the core contract's sources or in a layer."""
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["type"] == "forbidden")
    layered = {
        m.strip()
        for c in contracts
        if c["type"] == "layers"
        for layer in c["layers"]
        for m in layer.replace("|", ":").split(":")
    }
    placed = {m.removeprefix("lenslab.") for m in core["source_modules"]} | layered | {"__init__", "__main__"}
    modules = {p.stem for p in (ROOT / "lenslab").glob("*.py")} | {
        p.name for p in (ROOT / "lenslab").iterdir() if (p / "__init__.py").exists()
    }
    assert modules - placed == set(), f"unplaced lenslab modules: {sorted(modules - placed)}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    """`ruff check` and `ruff format --check` with pyproject's configuration (fix: `ruff check --fix .`,
    `ruff format .`)."""
    proc = subprocess.run([_tool("ruff"), *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_kernels_batched_patch_is_a_deprecated_alias():
    from lenslab import circuits, kernels

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = kernels.batched_patch
    assert alias is circuits.batched_patch
    assert any(
        issubclass(w.category, DeprecationWarning) and "lenslab.circuits.batched_patch" in str(w.message)
        for w in caught
    )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = kernels.nope
