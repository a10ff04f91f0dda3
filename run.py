#!/usr/bin/env python3
"""lenslab quickstart: the only two commands a fresh clone needs.

    python3 run.py app     # install what is missing, open the app on the bundled zoo model
    python3 run.py test    # install what is missing (dev extras, Chromium), run the whole test suite

Everything goes into ./.venv (created on first use). Installs are skipped when
pyproject.toml has not changed since the last install. Extra arguments after `test`
go to pytest (e.g. `python3 run.py test -k zoo -x`); after `app` they go to
`lenslab app` (e.g. `--port 8600`). `python3 run.py cli ...` runs any `lenslab` command.

Environment:
    LENSLAB_TORCH   pip requirement used for torch when the venv has none
                    (default "torch==2.13.0"; e.g. "torch" for the newest release).
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
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",  # without it a failed hub lookup retries for ~25 s
    "WANDB_MODE": "disabled",  # sae-lens pulls in wandb
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
DEBIAN_TEST_PACKAGES = {"chromium": "/usr/bin/chromium", "poppler-utils": "/usr/bin/pdftoppm"}


def say(msg: str) -> None:
    print(f"[run.py] {msg}", flush=True)


def sh(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, **kw)


def pip_install(args: list[str]) -> None:
    """`pip install -q ARGS`, dropping pip's warnings about unreachable extra index folders
    (some machines configure index locations that do not exist); everything else is shown."""
    cmd = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "is ignored: it is neither a file nor a directory" not in line:
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def ensure_venv(extras: str) -> None:
    if not PY.exists():
        say(f"creating {VENV}")
        venv.create(VENV, with_pip=True)
    stamp = VENV / f".lenslab-installed{extras or '-base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    have_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        torch_req = os.environ.get("LENSLAB_TORCH", "torch==2.13.0")
        say(f"installing {torch_req} (CPU build where one is available)")
        pip_install([torch_req])
    say(f"installing lenslab{extras} in editable mode (a minute or two the first time)")
    pip_install(["-e", f"{ROOT}{extras}"])
    if extras == "[dev]":
        # LXT is the reference for the RelP rule tests; its model patches need names transformers 5
        # removed and its dependencies pull in a CUDA torchvision, so only the package itself goes in.
        pip_install(["--no-deps", "lxt==2.1"])
    stamp.write_text(digest)


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
    env = dict(os.environ, **OFFLINE_ENV)
    if cmd == "app":
        ensure_venv("")
        return subprocess.call([str(PY), "-m", "lenslab.cli", "app", *rest], env=env)
    if cmd == "cli":
        ensure_venv("")
        return subprocess.call([str(PY), "-m", "lenslab.cli", *rest], env=env)
    if cmd == "test":
        ensure_venv("[dev]")
        ensure_debian_packages()
        code = subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)
        if code == 5:
            say("pytest collected no tests: that is a failure")
            return 1
        return code
    print(f"unknown command {cmd!r}: use `app`, `test` or `cli`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
