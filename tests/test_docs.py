"""The documentation site: builds offline with `mkdocs build --strict`, has a page per zoo card.

Strict mode turns every warning into a failure: a broken link, a nav entry without a page, a
mkdocstrings reference to something that does not exist.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lenslab_docs_hooks", ROOT / "docs" / "_hooks.py")
_hooks = importlib.util.module_from_spec(_spec)  # docs/_hooks.py: the zoo-page generator
_spec.loader.exec_module(_hooks)


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        env=env,
        cwd=config.parent,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _text(path: Path) -> str:
    assert path.exists(), f"{path} was not built"
    return path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_site_has_the_main_pages(site):
    for page in [
        "index.html",
        "getting-started/index.html",
        "tasks/index.html",
        "app/index.html",
        "design/index.html",
        "zoo/index.html",
        "api/index.html",
    ]:
        assert (site / page).exists(), page
    start = _text(site / "getting-started" / "index.html")
    for command in ["python3 run.py app", "python3 run.py test", "lenslab zoo train", "HF_HUB_OFFLINE"]:
        assert command in start, command
    contract = _text(site / "tasks" / "index.html")
    for name in ["logit_diff_normalized", "answer_prob", "kl_to_clean", "per_prompt", "from_tokens"]:
        assert name in contract, name


@pytest.mark.slow
def test_site_has_a_page_per_zoo_model_from_its_card(site):
    from lenslab import zoo

    overview = _text(site / "zoo" / "index.html")
    for name in zoo.zoo_names():
        short = name.removeprefix("zoo/")
        page = _text(site / "zoo" / short / "index.html")
        card = zoo.read_card(name)
        # the card's first paragraph line appears on the page (the page is built from the card)
        line = next(ln for ln in card.splitlines() if ln.strip() and not ln.startswith(("#", "|", "-", "`", "!", "<")))
        words = [w for w in line.split() if w.isalpha()][:4]
        assert all(w in page for w in words), (name, words)
        assert f'load_model("{name}")' in html.unescape(re.sub(r"<[^>]+>", "", page))  # code is highlighted
        assert f'href="{short}/"' in overview, f"zoo overview does not link {short}"


@pytest.mark.slow
def test_api_pages_come_from_docstrings(site):
    top = _text(site / "api" / "lenslab" / "index.html")
    assert "load_model" in top and "Load a model by name" in top  # the docstring's first line
    tasks = _text(site / "api" / "tasks" / "index.html")
    for name in ["Task", "from_prompts", "induction", "ioi", "get_metric", "Metric"]:
        assert f'id="lenslab.tasks.{name}"' in tasks, name
    assert '<span class="gp">&gt;&gt;&gt; </span>' in tasks  # the module's doctest is rendered as code
    assert 'id="lenslab.zoo.zoo_names"' in _text(site / "api" / "zoo" / "index.html")
    inspection = _text(site / "api" / "inspection" / "index.html")
    for name in ["attention_patterns", "logit_lens", "top_predictions", "attention_heatmap", "LogitLens"]:
        assert f'id="lenslab.inspection.{name}"' in inspection, name


@pytest.mark.slow
def test_site_needs_no_network(site):
    index = _text(site / "index.html")
    assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_link(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lenslab").symlink_to(ROOT / "lenslab", target_is_directory=True)
    (tmp_path / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)  # the included tables
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    proc = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stdout + proc.stderr


def test_card_links_are_rewritten_for_the_site(tmp_path, monkeypatch):
    folder = tmp_path / "lenslab" / "zoo" / "toy-1l"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"lenslab_summary": "a toy"}')
    (folder / "attn.png").write_bytes(b"png")
    (folder / "card.md").write_text(
        "# toy-1l\n\nSee [the script](../train_toy_1l.py), ![attention](attn.png), "
        "[web](https://example.com) and [below](#checks).\n\n```\n[kept](x.md)\n```\n\n## Checks\n"
    )
    monkeypatch.setattr(_hooks, "ROOT", tmp_path)
    monkeypatch.setattr(_hooks, "ZOO_DIR", tmp_path / "lenslab" / "zoo")
    assert _hooks.zoo_cards() == [("toy-1l", folder / "card.md")]
    page = _hooks.render_card("toy-1l", folder / "card.md")
    assert page.startswith("# toy-1l\n")
    assert "the script (`lenslab/zoo/train_toy_1l.py`)" in page
    assert "![attention](toy-1l/attn.png)" in page
    assert "[web](https://example.com)" in page and "[below](#checks)" in page
    assert "[kept](x.md)" in page  # code blocks are left alone
    assert 'load_model("zoo/toy-1l")' in page and "a toy." in page
    table = _hooks.zoo_table()
    assert "| `zoo/toy-1l` | a toy |" in table and "[card](toy-1l.md)" in table


def test_api_sources_join_the_mapped_folders(tmp_path, monkeypatch):
    (tmp_path / "lenslab").mkdir()
    (tmp_path / "lenslab" / "__init__.py").write_text('"""core"""\n')
    (tmp_path / "lenslab" / "tasks.py").write_text("")
    (tmp_path / "circuits").mkdir()
    (tmp_path / "circuits" / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "lenslab" = "lenslab", "lenslab.circuits" = "circuits", '
        '"lenslab.kernels" = "kernels" }\n'
    )
    monkeypatch.setattr(_hooks, "ROOT", tmp_path)
    monkeypatch.setattr(_hooks, "API_SRC", tmp_path / "build" / "docs-api")
    src = _hooks.mirror_sources() / "lenslab"
    assert sorted(p.name for p in src.iterdir()) == ["__init__.py", "circuits", "tasks.py"]  # kernels/ absent
    assert not (src / "__init__.py").is_symlink() and (src / "circuits").resolve() == tmp_path / "circuits"
    (tmp_path / "lenslab" / "tasks.py").unlink()
    (tmp_path / "lenslab" / "__init__.py").write_text('"""core, changed"""\n')
    _hooks.mirror_sources()
    assert sorted(p.name for p in src.iterdir()) == ["__init__.py", "circuits"]
    assert (src / "__init__.py").read_text() == '"""core, changed"""\n'


def test_doctests_are_fenced_as_code():
    import markdown

    md = markdown.Markdown(extensions=[_hooks.DoctestExtension(), "pymdownx.superfences"])
    html = md.convert("Intro.\n\n>>> x = 1\n>>> x + 1\n2\n\nAfter.\n\n```python\n>>> kept\n```\n")
    assert "<blockquote>" not in html
    assert html.count('<span class="gp">&gt;&gt;&gt; </span>') == 2  # two prompts, one fenced block
    assert '<span class="go">2</span>' in html and "<p>After.</p>" in html
    assert html.count("<pre>") == 2  # the existing fence is left as it was
