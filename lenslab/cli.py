"""The `lenslab` command line: thin shell over the library.

    lenslab app [--port 8501] [--host 127.0.0.1] [--model zoo/induction-2l]
    lenslab models
    lenslab zoo train NAME [--out DIR] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lenslab._errors import LenslabError


def _cmd_app(args: argparse.Namespace) -> int:
    from lenslab import zoo

    app_main = Path(__file__).resolve().parent.parent / "app" / "main.py"
    if not app_main.exists():  # installed wheel: lenslab/app is a package directory
        import lenslab.app

        app_main = Path(lenslab.app.__file__).resolve().parent / "main.py"
    model = args.model or zoo.default_model()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env["LENSLAB_DEFAULT_MODEL"] = model
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(app_main),
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--server.headless", "true" if args.headless else "false",
        "--browser.gatherUsageStats", "false",
    ]
    print(f"lenslab: opening the app at http://{args.host}:{args.port} with {model} (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from lenslab.models import list_models

    rows = list_models()
    width = max((len(r.name) for r in rows), default=10)
    for r in rows:
        print(f"{r.name:<{width}}  {r.source:<8}  {r.summary}")
    if not any(r.source != "zoo" for r in rows):
        print("\n(no Hugging Face models in the local cache; online, any HF id such as 'gpt2' also loads)")
    return 0


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    from lenslab import zoo

    out = zoo.train(args.name, out_dir=args.out, seed=args.seed)
    print(f"lenslab: wrote {args.name} to {out}")
    return 0


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from lenslab import zoo

    for e in zoo.zoo_entries():
        print(f"{e.name:<24} {e.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lenslab", description="lenslab: mechanistic-interpretability and steering workbench")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("app", help="open the Streamlit workbench in the browser")
    a.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument("--model", default=None, help="model selected at start (default: the zoo's induction-2l)")
    a.add_argument("--headless", action="store_true", help="do not open a browser window")
    a.set_defaults(func=_cmd_app)

    m = sub.add_parser("models", help="list zoo models and locally cached Hugging Face models")
    m.set_defaults(func=_cmd_models)

    z = sub.add_parser("zoo", help="the model zoo: list or rebuild models")
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=_cmd_zoo_list)
    zt = zsub.add_parser("train", help="rebuild a zoo model with its training script (deterministic)")
    zt.add_argument("name", help="e.g. induction-2l or zoo/ioi-4l")
    zt.add_argument("--out", default=None, help="output folder (default: overwrite the zoo's own folder)")
    zt.add_argument("--seed", type=int, default=0)
    zt.set_defaults(func=_cmd_zoo_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LenslabError as exc:
        print(f"lenslab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
