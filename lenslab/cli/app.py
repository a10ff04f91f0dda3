"""`lenslab app`: start the Streamlit workbench (`lenslab.app`) on a model."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

from lenslab import zoo


def add_commands(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("app", help="open the Streamlit workbench in the browser")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument(
        "--model", default=None, help="model selected at start (default: zoo/english-4l, else zoo/induction-2l)"
    )
    a.add_argument("--headless", action="store_true", help="do not open a browser window")
    a.set_defaults(func=cmd_app)


def app_main() -> Path:
    """The Streamlit script: app/main.py of this checkout, else the installed lenslab/app/main.py."""
    here = Path(__file__).resolve().parents[2] / "app" / "main.py"
    if here.exists():
        return here
    spec = importlib.util.find_spec("lenslab.app")  # locates the package without importing it
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "main.py"


def cmd_app(args: argparse.Namespace) -> int:
    model = args.model or zoo.default_model()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONSAFEPATH"] = "1"  # the working directory never goes on sys.path (docs/design.md)
    env["LENSLAB_DEFAULT_MODEL"] = model
    # Streamlit always runs headless: otherwise its first run asks for an email on the terminal
    # (and exits when stdin is not one). Without --headless we open the browser ourselves.
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_main()),
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button: this is a local workbench
    ]
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}"
    print(f"lenslab: the app is at {url} with {model} (Ctrl+C to stop)", flush=True)
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        if not args.headless:
            _open_browser_when_up(proc, url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0


def _open_browser_when_up(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Open `url` in the user's browser once the server answers (in a thread; no browser, no error)."""

    def wait_and_open() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    webbrowser.open(url)
                    return
            except OSError:
                time.sleep(0.5)

    threading.Thread(target=wait_and_open, daemon=True).start()
