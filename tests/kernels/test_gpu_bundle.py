"""benchmarks/prepare_gpu_bundle.py: the bundle the GPU session carries holds transformer-lens and
the missing part of its closure, never torch/triton/transformers, stays under 60 MiB, and imports
(with lenslab from the working tree) in an interpreter that sees only the bundle and the packages
the GPU image has."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def P(load_benchmark):
    """benchmarks/prepare_gpu_bundle.py, loaded from its file."""
    return load_benchmark("prepare_gpu_bundle")


def test_closure_never_takes_what_the_gpu_has(P):
    dists = P.closure(["transformer-lens"])
    names = set(dists)
    assert "transformer-lens" in names and "datasets" in names  # transformer-lens imports datasets at import
    assert not names & {"torch", "triton", "transformers", "numpy", "pandas", "pyarrow", "wandb"}
    assert all(not n.startswith("nvidia-") for n in names)
    # the portable test: transformer-lens is py3-none-any; multiprocess ships one wheel per Python version
    assert P.portable(md.distribution("transformer-lens"))
    if "multiprocess" in names:
        assert not P.portable(md.distribution("multiprocess"))
    assert not P.portable(md.distribution("torch"))


def test_lenslab_tree_maps_package_dirs(P, tmp_path):
    (tmp_path / "tree.py").write_text(P.LENSLAB_TREE)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tree; m = tree.mapping(sys.argv[2]); "
        "print(m['lenslab.kernels'], m['lenslab.circuits'], m['lenslab'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(ROOT)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(ROOT / "kernels"), str(ROOT / "circuits"), str(ROOT / "lenslab")]


@pytest.mark.slow
def test_bundle_builds_and_imports_in_isolation(P, tmp_path):
    """Build without network (this interpreter's multiprocess is copied, with a warning) and run the
    isolated check: a fresh venv, PYTHONPATH = bundle + links to the GPU image's packages only."""
    out = tmp_path / "bundle"
    report = P.build(out, ["transformer-lens"], fetch=False, local_version_dir=True)
    assert (out / "site" / "transformer_lens" / "__init__.py").is_file()
    assert (out / "site" / "sitecustomize.py").is_file() and (out / "MANIFEST.txt").is_file()
    for banned in ("torch", "triton", "transformers", "wandb", "numpy"):
        assert not (out / "site" / banned).exists(), banned
    assert report["bytes"] < P.MAX_BUNDLE
    assert any(c.startswith("transformer-lens==") for c in report["copied"])
    stdout = P.check(out)
    assert "BUNDLE-OK" in stdout and str(out / "site" / "transformer_lens") in stdout
