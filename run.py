#!/usr/bin/env python3
"""lenslab quickstart: the only two commands a fresh clone needs.

    python3 run.py app     # install what is missing, open the app on the bundled zoo model
    python3 run.py test    # install what is missing (dev extras, Chromium), run the whole test suite

Everything goes into ./.venv (created on first use), installed from the committed lock
`requirements-lock.txt` (exact versions that passed the whole suite), so a release upstream
cannot break these commands. Installs are skipped when pyproject.toml and the lock have not
changed since the last install. Extra arguments after `test` go to pytest
(e.g. `python3 run.py test -k zoo -x`); after `app` they go to `lenslab app`
(e.g. `--port 8600`). `python3 run.py cli ...` runs any `lenslab` command.

Drift, before users see it:

    python3 run.py test --latest   # a separate ./.venv-latest with the newest versions pyproject allows
    python3 run.py lock            # write ./.venv-latest's versions into requirements-lock.txt

Every process runs with PYTHONSAFEPATH=1: the repository root is never on sys.path, so the
card folders (kernels/, app/, ...) cannot shadow installed distributions of the same name.

Environment:
    LENSLAB_TORCH   pip requirement used for torch instead of the lock's pin
                    (e.g. "torch" for the newest release; a CUDA build is several GB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK = ROOT / "requirements-lock.txt"
LOCKED_VENV = ROOT / ".venv"
LATEST_VENV = ROOT / ".venv-latest"
DEFAULT_TORCH = "torch==2.13.0"  # the CPU build lies on this project's machines; the lock pins the same
VENV_ENV = "LENSLAB_RUNPY_VENV"  # set for children: a nested `run.py app` uses the parent's venv as it is
ENV = {
    "HF_HUB_OFFLINE": "1",  # without it a failed hub lookup retries for ~25 s
    "WANDB_MODE": "disabled",  # sae-lens pulls in wandb
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "PYTHONSAFEPATH": "1",  # never the repository root on sys.path (docs/design.md, "Card folders and sys.path")
}
DEBIAN_TEST_PACKAGES = {"chromium": "/usr/bin/chromium", "poppler-utils": "/usr/bin/pdftoppm"}


def say(msg: str) -> None:
    print(f"[run.py] {msg}", flush=True)


def sh(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, **kw)


def python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip_install(py: Path, args: list[str]) -> None:
    """`pip install -q ARGS`, dropping pip's warnings about unreachable extra index folders
    (some machines configure index locations that do not exist); everything else is shown."""
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "is ignored: it is neither a file nor a directory" not in line:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def lock_pins() -> dict[str, str]:
    """{normalised name: 'name==version'} from requirements-lock.txt."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name = line.split("==", 1)[0].strip()
            pins[name.lower().replace("_", "-")] = line
    return pins


def ensure_venv(extras: str, latest: bool = False) -> Path:
    """Create/refresh the venv for `extras` ('' or '[dev]'); return its python.

    Locked (default): every package at the lock's version (pip constraints), torch at its pin
    unless LENSLAB_TORCH says otherwise. Latest: a separate venv where every dependency is
    upgraded to the newest version pyproject allows (torch stays at LENSLAB_TORCH or the pin).
    """
    if os.environ.get(VENV_ENV):  # started by run.py itself (the browser test): that venv is ready
        return python_in(Path(os.environ[VENV_ENV]))
    venv_dir = LATEST_VENV if latest else LOCKED_VENV
    py = python_in(venv_dir)
    if not py.exists():
        say(f"creating {venv_dir}")
        venv.create(venv_dir, with_pip=True)
    torch_req = os.environ.get("LENSLAB_TORCH")
    pins = {} if latest else lock_pins()
    if torch_req:
        pins.pop("torch", None)
    torch_req = torch_req or pins.get("torch", DEFAULT_TORCH)
    recipe = (f"latest {torch_req}" if latest else LOCK.read_text() + torch_req).encode()
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + recipe).hexdigest()
    stamps = [venv_dir / f".lenslab-installed{extras or '-base'}"]
    if extras == "[dev]":
        stamps.append(venv_dir / ".lenslab-installed-base")  # dev includes everything the app needs
    if stamps[0].exists() and stamps[0].read_text() == digest:
        return py
    constraints: list[str] = []
    if pins:
        locked = venv_dir / "lock-constraints.txt"
        locked.write_text("\n".join(pins.values()) + "\n")
        constraints = ["-c", str(locked)]
    say(f"installing {torch_req} (CPU build where one is available)")
    pip_install(py, [torch_req, *constraints])
    what = "the newest allowed versions" if latest else f"the versions in {LOCK.name}"
    say(f"installing lenslab{extras} in editable mode with {what} (a minute or two the first time)")
    # torch is named again so that --upgrade keeps it at torch_req (a newer torch is a CUDA build of several GB)
    upgrade = ["--upgrade", "--upgrade-strategy", "eager", torch_req] if latest else []
    pip_install(py, [*upgrade, *constraints, "-e", f"{ROOT}{extras}"])
    if extras == "[dev]":
        # LXT is the reference for the RelP rule tests; its model patches need names transformers 5
        # removed and its dependencies pull in a CUDA torchvision, so only the package itself goes in.
        pip_install(py, ["--no-deps", "lxt==2.1"])
    for stamp in stamps:
        stamp.write_text(digest)
    return py


def freeze(py: Path) -> list[str]:
    """`pip freeze` of a venv without lenslab itself: 'name==version' lines, sorted."""
    out = subprocess.run(
        [str(py), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = (ln.split("+", 1)[0] for ln in out.splitlines() if "==" in ln and not ln.startswith("-e"))
    return sorted(lines, key=str.lower)  # local labels dropped: torch==2.13.0 matches 2.13.0+cpu


def drift(py: Path) -> list[str]:
    """Lines 'name: locked -> installed' for every package whose version differs from the lock."""
    pins = lock_pins()
    rows = []
    for line in freeze(py):
        name, version = line.split("==", 1)
        locked = pins.pop(name.lower().replace("_", "-"), None)
        if locked is None:
            rows.append(f"{name}: (not locked) -> {version}")
        elif locked.split("==", 1)[1] != version:
            rows.append(f"{name}: {locked.split('==', 1)[1]} -> {version}")
    rows += [f"{p.split('==')[0]}: {p.split('==')[1]} -> (not installed)" for p in pins.values()]
    return rows


def write_lock() -> int:
    py = python_in(LATEST_VENV)
    if not py.exists():
        print(
            "no ./.venv-latest yet: run `python3 run.py test --latest` first (the lock records a tested set)",
            file=sys.stderr,
        )
        return 2
    lines = freeze(py)
    header = [
        "# lenslab's lock: the exact versions `python3 run.py app|test` install (as pip constraints).",
        "# Generated by `python3 run.py lock` from ./.venv-latest after `python3 run.py test --latest` passed;",
        "# refresh it on purpose, never by hand. pyproject.toml keeps the lower bounds for other installs.",
        f"# Python {sys.version.split()[0]} on {sys.platform}.",
    ]
    LOCK.write_text("\n".join(header + lines) + "\n")
    say(f"wrote {len(lines)} pins to {LOCK.name}")
    return 0


def ensure_debian_packages() -> None:
    missing = [p for p, path in DEBIAN_TEST_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        say(f"cannot install {missing} (needs apt-get as root): browser/PDF tests will fail")
        return
    say(f"installing Debian packages {missing}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], env=env)
    sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    env = dict(os.environ, **ENV)
    if cmd in {"app", "cli"}:
        py = ensure_venv("")
        env[VENV_ENV] = str(py.parent.parent)
        return subprocess.call([str(py), "-m", "lenslab.cli", *(["app"] if cmd == "app" else []), *rest], env=env)
    if cmd == "test":
        latest = bool(rest) and rest[0] == "--latest"
        rest = rest[1:] if latest else rest
        py = ensure_venv("[dev]", latest=latest)
        ensure_debian_packages()
        if latest:
            changed = drift(py)
            say(f"{len(changed)} packages differ from {LOCK.name}" + (":" if changed else ""))
            for row in changed:
                print(f"    {row}", flush=True)
        env[VENV_ENV] = str(py.parent.parent)
        code = subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT, env=env)
        if code == 5:
            say("pytest collected no tests: that is a failure")
            return 1
        if latest:
            say("the newest versions " + ("pass: `python3 run.py lock` records them" if code == 0 else "fail (above)"))
        return code
    if cmd == "lock":
        return write_lock()
    print(f"unknown command {cmd!r}: use `app`, `test`, `cli` or `lock`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
