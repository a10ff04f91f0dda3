"""mkdocs hooks: the zoo pages are generated from the committed model cards.

For every `lenslab/zoo/<name>/card.md` this adds a page `zoo/<name>.md` (the card, with a header
saying how to load the model and which files it has), appends it to the "Model zoo" nav section,
and fills the `<!-- zoo-table -->` marker of `zoo/index.md` with one row per model. So the site
always shows the cards as committed, for whichever zoo models exist.

It also builds `build/docs-api/lenslab/`, a tree of symlinks that joins `lenslab/` with the
folders pyproject.toml maps into the namespace (`circuits/` -> `lenslab.circuits`, ...), so that
mkdocstrings finds every `::: lenslab.<module>` from source, as the installed package has it.

Docstrings hold bare `>>>` examples (STYLE.md); Markdown would read them as nested quotes, so a
small Markdown extension fences each run of `>>>` lines (with its output) as `pycon` code.

Links in a card are rewritten so the strict build accepts them: images and other small files
beside the card are copied next to its page; links to other repository files become code spans
naming the repository path (the site has no copy of the source tree).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
ZOO_DIR = ROOT / "lenslab" / "zoo"
ZOO_SECTION = "Model zoo"
TABLE_MARKER = "<!-- zoo-table -->"
API_SRC = ROOT / "build" / "docs-api"  # git-ignored; mkdocs.yml points mkdocstrings here
ASSET_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp"}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")

log = logging.getLogger("mkdocs.hooks.zoo")


def zoo_cards() -> list[tuple[str, Path]]:
    """(short name, card path) for every zoo folder with a card.md, sorted by name."""
    return [(p.parent.name, p) for p in sorted(ZOO_DIR.glob("*/card.md"))]


def _meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _rewrite_links(text: str, short: str, folder: Path) -> str:
    def fix(m: re.Match) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            return m.group(0)  # absolute URL or in-page anchor
        path, _, anchor = target.partition("#")
        local = (folder / path).resolve()
        if local.suffix.lower() in ASSET_SUFFIXES and local.parent == folder.resolve() and local.exists():
            return f"{bang}[{label}]({short}/{local.name}{title})"
        try:
            shown = local.relative_to(ROOT).as_posix()
        except ValueError:
            shown = path
        return f"{label} (`{shown}`)" if label and label.strip("`") != shown else f"`{shown}`"

    out, in_fence = [], False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(fix, line))
    return "".join(out)


def render_card(short: str, card: Path) -> str:
    """The Markdown of the zoo page for `short` (e.g. 'induction-2l')."""
    folder = card.parent
    text = _rewrite_links(card.read_text(encoding="utf-8"), short, folder)
    lines = text.splitlines()
    title_idx = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), None)
    if title_idx is None:
        head, body = f"# zoo/{short}", lines
    else:
        head, body = lines[title_idx], lines[:title_idx] + lines[title_idx + 1 :]
    meta = _meta(folder)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    rows = "\n".join(f"| `{p.name}` | {_size(p.stat().st_size)} |" for p in files)
    script = ZOO_DIR / f"train_{short.replace('-', '_')}.py"
    rebuild = (
        f"Rebuild it with `lenslab zoo train {short}` (script `lenslab/zoo/{script.name}`)."
        if script.exists()
        else "No training script is committed for it."
    )
    summary = meta.get("lenslab_summary", "")
    header = f"""{head}

!!! info "zoo/{short}"
    {(summary.rstrip(".") + ". ") if summary else ""}This page is generated from the model card
    `lenslab/zoo/{short}/card.md`. {rebuild}

    ```python
    import lenslab
    model = lenslab.load_model("zoo/{short}")
    ```

??? note "Files in `lenslab/zoo/{short}/`"
    | file | size |
    |---|---|
{_indent(rows, 4)}
"""
    return header + "\n" + "\n".join(body).strip() + "\n"


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + ln for ln in text.splitlines())


def zoo_table() -> str:
    """A Markdown table: one row per zoo model card, linking to its page."""
    rows = ["| model | what it has | weights | page |", "|---|---|---|---|"]
    for short, card in zoo_cards():
        weights = card.parent / "model.safetensors"
        size = _size(weights.stat().st_size) if weights.exists() else "(not built)"
        summary = _meta(card.parent).get("lenslab_summary", "").replace("|", "\\|")
        rows.append(f"| `zoo/{short}` | {summary} | {size} | [card]({short}.md) |")
    if len(rows) == 2:
        return "The zoo has no models yet: build one with `lenslab zoo train induction-2l`."
    return "\n".join(rows)


def package_dirs() -> dict[str, Path]:
    """`{"lenslab.circuits": ROOT / "circuits", ...}` from pyproject's `[tool.setuptools] package-dir`."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib

        mapping = tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    except ImportError:  # Python 3.10: read the inline table
        line = next((ln for ln in text.splitlines() if ln.startswith("package-dir")), "")
        mapping = dict(re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', line))
    return {mod: ROOT / folder for mod, folder in mapping.items()}


def mirror_sources() -> Path:
    """Refresh `build/docs-api/lenslab/`: symlinks to `lenslab/*` and to the mapped folders."""
    dest = API_SRC / "lenslab"
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "lenslab").iterdir() if p.name != "__pycache__"}
    for mod, folder in package_dirs().items():
        parts = mod.split(".")
        if len(parts) == 2 and parts[0] == "lenslab" and folder.is_dir():
            wanted[parts[1]] = folder
    # griffe resolves a symlinked __init__.py to its real folder, where circuits/ is absent: copy it
    init = wanted.pop("__init__.py")
    copy = dest / "__init__.py"
    if copy.is_symlink() or not copy.is_file() or copy.read_bytes() != init.read_bytes():
        copy.unlink(missing_ok=True)
        copy.write_bytes(init.read_bytes())
    for entry in dest.iterdir():
        if entry.name == "__init__.py":
            continue
        if entry.name not in wanted or not entry.is_symlink() or entry.resolve() != wanted[entry.name].resolve():
            if entry.is_symlink() or entry.is_file():
                entry.unlink(missing_ok=True)
    for name, target in wanted.items():
        link = dest / name
        if not link.is_symlink():
            try:
                link.symlink_to(target, target_is_directory=target.is_dir())
            except FileExistsError:  # a concurrent build made it
                pass
    return API_SRC


class _DoctestFences(Preprocessor):
    """Wrap each doctest run (`>>>` lines, `...` continuations, output up to a blank line) in a fence."""

    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        fence: str | None = None  # the marker of the fenced block we are in
        in_test = False
        test_indent = ""
        for line in lines:
            stripped = line.lstrip()
            indent = line[: len(line) - len(stripped)]
            if in_test and not stripped:
                out.append(f"{test_indent}```")
                in_test = False
            if not in_test and fence is None and stripped.startswith(">>>"):
                test_indent = indent
                out.append(f"{indent}```pycon")
                in_test = True
            elif not in_test and stripped.startswith(("```", "~~~")):
                marker = stripped[:3]
                fence = marker if fence is None else (None if stripped.startswith(fence) else fence)
            out.append(line)
        if in_test:
            out.append(f"{test_indent}```")
        return out


class DoctestExtension(Extension):
    """Markdown extension: fence bare doctest examples (used for pages and docstrings alike)."""

    def extendMarkdown(self, md) -> None:
        md.preprocessors.register(_DoctestFences(md), "lenslab_doctest_fences", 40)


# --- mkdocs events -------------------------------------------------------------------------


@event_priority(100)  # before mkdocstrings' on_config, which reads its search paths
def on_config(config, **kwargs):
    """Append one nav entry per zoo card to the "Model zoo" section; refresh the API sources."""
    mirror_sources()
    config.markdown_extensions.append(DoctestExtension())  # before mkdocstrings copies the list
    nav = config.get("nav") or []
    for item in nav:
        if isinstance(item, dict) and ZOO_SECTION in item and isinstance(item[ZOO_SECTION], list):
            section = item[ZOO_SECTION]
            listed = {next(iter(e.values())) if isinstance(e, dict) else e for e in section}
            for short, _ in zoo_cards():
                if f"zoo/{short}.md" not in listed:
                    section.append({f"zoo/{short}": f"zoo/{short}.md"})
            break
    else:
        log.warning("mkdocs.yml nav has no %r section: the zoo pages are not listed", ZOO_SECTION)
    return config


def on_files(files: Files, config, **kwargs) -> Files:
    """Generate zoo/<name>.md from each card, and copy the card's images beside it."""
    for short, card in zoo_cards():
        files.append(File.generated(config, f"zoo/{short}.md", content=render_card(short, card)))
        for asset in sorted(card.parent.iterdir()):
            if asset.suffix.lower() in ASSET_SUFFIXES:
                files.append(File.generated(config, f"zoo/{short}/{asset.name}", abs_src_path=str(asset)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """Fill the zoo overview table."""
    if TABLE_MARKER in markdown:
        markdown = markdown.replace(TABLE_MARKER, zoo_table())
    return markdown
