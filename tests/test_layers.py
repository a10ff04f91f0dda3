"""The layers of docs/design.md, enforced: import-linter's contracts (pyproject.toml) and ruff.

import-linter (grimp) finds a package's modules by walking its folder, but the card folders
(circuits/, kernels/, ...) are mapped into `lenslab` by setuptools `package-dir`, so the test
builds the installed layout from pyproject's own mapping in a temporary folder and runs the
contracts there. Every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
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


# --- habits the contracts cannot see: deferred imports, private names, cycles ----------------


def _library_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the distribution."""
    out = {}
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for f in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in f.parts:
                continue
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


MODULES = _library_modules()


def _function_local_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def test_function_local_imports_are_deferred_on_purpose():
    """An import inside a function hides a dependency from the layer contracts' readers: it is
    allowed only for a deliberately deferred import (a heavy third-party module, a deprecated
    alias, the CLI's start-up time), which says so in a `# deferred: <reason>` comment."""
    bad = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in _function_local_imports(ast.parse("\n".join(lines))):
            text = " ".join(lines[node.lineno - 1 : node.end_lineno])
            if "# deferred:" not in text:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "function-local imports without a '# deferred: <reason>' comment:\n" + "\n".join(bad)


def _is_module(name: str) -> bool:
    return name in MODULES


def test_no_private_name_is_used_across_modules():
    """`_name`s stay inside their module (private modules such as `lenslab._errors` may be imported,
    equinox style; a helper another module needs gets a public name)."""
    bad = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        modules_bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lenslab"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if _is_module(full):
                        modules_bound[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lenslab") and a.asname:
                        modules_bound[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules_bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not _is_module(f"{modules_bound[node.value.id]}.{node.attr}")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def _imported_modules(name: str, path: Path) -> set[str]:
    """The distribution's modules that `name` imports (deprecated aliases left out)."""
    lines = path.read_text().splitlines()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if "deprecated alias" in " ".join(lines[node.lineno - 1 : node.end_lineno]):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
            continue
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""]).strip(
                "."
            )
        for a in node.names:
            full = f"{base}.{a.name}"
            out.add(full if full in MODULES else base)
    return (out & MODULES.keys()) - {name}


def test_no_import_cycles():
    """No module imports itself back through others (Tarjan's strongly connected components over
    every import, function-local ones included; deprecated aliases, marked so, left out)."""
    graph = {name: _imported_modules(name, path) for name, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"
