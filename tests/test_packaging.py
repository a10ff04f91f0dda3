"""Packaging: the wheel maps the card's folders into `lenslab.*` and installs nothing else at top level.

"Not importable at top level" means: not from *this repository or this wheel*. Distributions with the
same names exist on the package index (transformers depends on Hugging Face's `kernels`), so a
top-level `kernels` may well be importable; it must never be one of ours."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("app", "circuits", "probes", "steering", "kernels")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (whl,) = out.glob("lenslab-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lenslab"}, tops
    for area in AREAS:
        assert f"lenslab/{area}/__init__.py" in names, area
    # zoo weights, tokenizers and cards ship with the wheel: every file of each model's folder
    # (english-4l's heldout.txt and LICENSES.md too: its corpus and licences travel with it)
    for zoo_dir in (ROOT / "lenslab" / "zoo").glob("*/model.safetensors"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "card.md"):
            assert f"lenslab/zoo/{zoo_dir.parent.name}/{f}" in names
        for f in zoo_dir.parent.iterdir():
            if f.is_file():
                assert f"lenslab/zoo/{zoo_dir.parent.name}/{f.name}" in names, f
    # the zoo's SAEs (lenslab/zoo/<model>/saes/<hook>/) ship too, every file of each
    sae_files = [p for p in (ROOT / "lenslab" / "zoo").glob("*/saes/*/*") if p.is_file()]
    assert any(p.name == "sae_weights.safetensors" for p in sae_files)
    for p in sae_files:
        assert "lenslab/" + p.relative_to(ROOT / "lenslab").as_posix() in names, p
    # and their tuned lenses (lenslab/zoo/<model>/lenses/tuned/)
    lens_files = [p for p in (ROOT / "lenslab" / "zoo").glob("*/lenses/*/*") if p.is_file()]
    assert any(p.name == "translators.safetensors" for p in lens_files)
    for p in lens_files:
        assert "lenslab/" + p.relative_to(ROOT / "lenslab").as_posix() in names, p
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "lenslab = lenslab.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


@pytest.mark.slow
def test_wheel_installs_only_lenslab(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == [
        "lenslab"
    ]
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]);"
        "import lenslab.circuits, lenslab.app, lenslab.kernels;"
        "assert lenslab.circuits.__file__.startswith(sys.argv[1]), lenslab.circuits.__file__;"
        f"specs = [importlib.util.find_spec(a) for a in {AREAS!r}];"
        "ours = [s.origin for s in specs if s is not None and (s.origin or '').startswith(sys.argv[1])];"
        "assert not ours, ours"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, cwd=tmp_path)


def test_editable_install_maps_areas(tmp_path):
    """In the dev (editable) install, `lenslab.app` is ./app and no top-level name resolves to one of our
    folders (a top-level `kernels` may exist: Hugging Face's)."""
    code = (
        "import importlib.util, lenslab.app, lenslab.kernels, pathlib, sys;"
        "root = pathlib.Path(sys.argv[1]);"
        "assert pathlib.Path(lenslab.app.__file__).parent == root / 'app', lenslab.app.__file__;"
        f"specs = [importlib.util.find_spec(a) for a in {AREAS!r}];"
        "ours = [s.origin for s in specs if s is not None and pathlib.Path(s.origin or '/').parent.parent == root];"
        "assert not ours, f'top-level area importable from the repository: {ours}'"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, cwd=tmp_path)
