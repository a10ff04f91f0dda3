"""Every `>>>` example in the library's docstrings runs as a doctest.

Modules are imported through the installed `lenslab` namespace (`lenslab.circuits.patching`,
never the card folders). Function docstrings that use `model` without loading it get the zoo
model their module docstring loads (`MODEL_OF`). Examples run in a temporary working directory
(some write presets, feature stores, SAE folders). An example that cannot run offline on a CPU
carries `# doctest: +SKIP` and says why (docs/design.md, "Code blocks in the docs"); `SKIPPED`
counts them, so a new skip is a decision, not an accident.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import tomllib

PACKAGES = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Function docstrings continue the module docstring's `model`: module -> the zoo model it loads.
MODEL_OF = {
    "lenslab.inspection": "zoo/induction-2l",
    "lenslab.probes.routers": "zoo/moe-refusal",
    "lenslab.probes.sae": "zoo/induction-2l",
    "lenslab.steering.austeer": "zoo/steer-sentiment",
    "lenslab.steering.baselines": "zoo/steer-sentiment",
    "lenslab.steering.generate": "zoo/steer-sentiment",
    "lenslab.steering.lineas": "zoo/steer-sentiment",
}
SKIPPED = 0  # examples marked `# doctest: +SKIP` (each says why); every other example runs

pytestmark = pytest.mark.usefixtures("one_thread")


def _modules_with_examples() -> dict[str, Path]:
    """Module name -> source file, for every module whose source has a `>>>` (found without importing:
    the app's pages are Streamlit scripts that run on import)."""
    out = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        names = [pkg] + [
            f"{pkg}.{m.name}"
            for m in pkgutil.iter_modules(spec.submodule_search_locations)
            if not m.ispkg and m.name != "__main__"
        ]
        for name in names:
            origin = Path(importlib.util.find_spec(name).origin)
            if ">>>" in origin.read_text(encoding="utf-8"):
                out[name] = origin
    return out


MODULES = _modules_with_examples()


def _tests(name: str):
    mod = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(mod, name) if t.examples]


def _skipped(example: doctest.Example) -> bool:
    return example.options.get(doctest.SKIP, False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_docstring_examples(name, zoo_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tests = _tests(name)
    globs = {}
    if name in MODEL_OF:  # the `model` a reader of the module docstring has in hand
        assert f'load_model("{MODEL_OF[name]}"' in (importlib.import_module(name).__doc__ or ""), name
        globs["model"] = zoo_models(MODEL_OF[name])
    runner, failures = doctest.DocTestRunner(optionflags=FLAGS), []
    for t in tests:
        t.globs.update({k: v for k, v in globs.items() if k not in t.globs})
        runner.run(t, out=failures.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(failures)


def test_every_example_is_in_a_docstring_doctest_finds():
    """A `>>>` outside a docstring (a comment, a plain string) would never run: count them all."""
    found = runnable = 0
    for name, path in MODULES.items():
        lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if re.match(r"\s*>>>", line))
        examples = [e for t in _tests(name) for e in t.examples]
        assert len(examples) == lines, f"{name}: {lines} `>>>` lines, {len(examples)} examples found by doctest"
        found += len(examples)
        runnable += sum(not _skipped(e) for e in examples)
    assert found >= 200 and found - runnable == SKIPPED, (found, runnable, SKIPPED)
