"""`lenslab probe train|eval|steer` (lenslab.probes.linear, lenslab.steering.probe_steering): train
linear probes per layer with a control task, score a saved probe on fresh prompts, and steer along a
probe's direction (side by side with the unsteered model; a preset for `lenslab steer eval`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lenslab
from lenslab._errors import LenslabError
from lenslab.cli.common import add_device, add_model, add_out, add_prompt, out_path, prompt_or_default
from lenslab.figures import export

# the dataset each zoo model's planted mechanism is probed with (lenslab.probes.linear.dataset)
DEFAULT_DATA = {"zoo/steer-sentiment": "sentiment", "zoo/moe-refusal": "refusal", "zoo/ioi-4l": "ioi"}
DATA_HELP = (
    "sentiment (zoo/steer-sentiment: positive vs negative contexts), refusal (zoo/moe-refusal: harmful vs "
    'benign), ioi (zoo/ioi-4l: the indirect object\'s name), or a JSON file {"prompts": [...], "labels": [...]} '
    "(default: the model's own dataset)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="linear probes: train per layer with a control task, evaluate, steer along one")
    psub = p.add_subparsers(dest="probe_command", required=True, metavar="PROBE_COMMAND")

    pt = psub.add_parser("train", help="train a linear probe per layer (and site); accuracy, control task, selectivity")
    _data_options(pt)
    pt.add_argument(
        "--site",
        nargs="+",
        default=["resid_post"],
        help="sites of lenslab.sites.SITES (resid_post, mlp_out, attn_out, z, ...), {layer} templates or hook "
        "names (default resid_post)",
    )
    pt.add_argument("--layers", nargs="+", type=int, default=None, help="layers to probe (default: all)")
    pt.add_argument("--position", default="last", help="last (default), mean, or a token index")
    pt.add_argument("--kind", default="logistic", choices=["logistic", "linear"], help="classes or numbers")
    pt.add_argument("--test-size", type=float, default=0.25, help="share of the prompts held out (default 0.25)")
    pt.add_argument(
        "--control",
        default="prompt",
        choices=["prompt", "token", "none"],
        help="the control task's types (Hewitt & Liang): prompt (default), token at the position, none",
    )
    pt.add_argument("--C", type=float, default=1.0, help="logistic regression: inverse L2 strength (default 1)")
    pt.add_argument("--alpha", type=float, default=1.0, help="ridge regression (--kind linear): the penalty")
    pt.add_argument("--standardize", action="store_true", help="fit on features scaled to unit variance")
    pt.add_argument(
        "--save-probe",
        default=None,
        metavar="FILE.json",
        help="save one trained probe (.json + .safetensors): --probe-layer's, else the best by test accuracy",
    )
    pt.add_argument("--probe-layer", type=int, default=None, help="with --save-probe: the layer to save")
    add_out(pt, "also write the result; the extension picks the format: .json .svg .png .pdf .html", required=False)
    pt.set_defaults(func=cmd_train)

    pe = psub.add_parser("eval", help="a saved probe's accuracy on prompts it was not trained on")
    pe.add_argument("--probe", required=True, help="a probe .json from `lenslab probe train --save-probe`")
    _data_options(pe, seed=1)
    pe.set_defaults(func=cmd_eval)

    ps = psub.add_parser("steer", help="steer along a probe's direction: unsteered and steered, side by side")
    ps.add_argument("--probe", required=True, help="a probe .json from `lenslab probe train --save-probe`")
    ps.add_argument("--op", default="add", choices=["add", "project"], help="add the direction, or project it out")
    ps.add_argument("--towards", default=None, help="add: the class to steer towards (default: the second class)")
    ps.add_argument(
        "--scale",
        default="means",
        help="add: the length at strength 1: means (class-mean separation along the direction, default), "
        "std (the activations' spread along it, ITI), or a number",
    )
    ps.add_argument("--strength", type=float, default=1.0)
    add_prompt(ps)
    ps.add_argument("--max-new-tokens", type=int, default=12)
    add_out(
        ps,
        "also save the intervention as a preset .json (+ .safetensors) for `lenslab steer eval --preset`",
        required=False,
        suffixes=[".json"],
        why="a preset is a .json file (its tensors go to a .safetensors beside it)",
    )
    ps.set_defaults(func=cmd_steer)
    for sp in (pt, pe, ps):
        add_model(sp, "zoo/steer-sentiment")
        add_device(sp)


def _data_options(p: argparse.ArgumentParser, seed: int = 0) -> None:
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--n", type=int, default=64, help="prompts per class (ioi: in all) for a built-in dataset")
    p.add_argument("--seed", type=int, default=seed, help=f"the dataset's draw and the split's seed (default {seed})")


def _data(args: argparse.Namespace, model) -> tuple[list[str], list]:
    from lenslab.probes.linear import DATASETS, dataset  # deferred: keeps CLI start-up fast

    name = args.data or DEFAULT_DATA.get(args.model)
    if name is None:
        raise LenslabError(
            f"{args.model!r} has no built-in probe dataset; pass --data with one of {', '.join(DATASETS)} or a JSON "
            'file {"prompts": [...], "labels": [...]}'
        )
    if name in DATASETS:
        return dataset(model, name, n=args.n, seed=args.seed)
    path = Path(name)
    if not path.is_file():
        raise LenslabError(f"--data {name!r} is neither one of {', '.join(DATASETS)} nor an existing JSON file")
    try:
        d = json.loads(path.read_text())
        return list(d["prompts"]), list(d["labels"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LenslabError(f"{path} must be JSON with keys prompts and labels (lists of equal length): {exc}") from None


def _position(text: str) -> str | int:
    try:
        return int(text)
    except ValueError:
        return text


def cmd_train(args: argparse.Namespace) -> int:
    from lenslab.probes.linear import train_probes  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.save_probe and not args.save_probe.endswith(".json"):
        raise LenslabError(f"--save-probe {args.save_probe!r} must end in .json (its tensors go to a .safetensors)")
    model = lenslab.load_model(args.model, device=args.device)
    prompts, labels = _data(args, model)
    res = train_probes(
        model,
        prompts,
        labels,
        site=args.site,
        layers=args.layers,
        position=_position(args.position),
        kind=args.kind,
        test_size=args.test_size,
        seed=args.seed,
        control=None if args.control == "none" else args.control,
        C=args.C,
        alpha=args.alpha,
        standardize=args.standardize,
    )
    print(res.to_markdown())
    if args.save_probe:
        probe = res.probe(layer=args.probe_layer) if args.probe_layer is not None else res.probe()
        path = probe.save(args.save_probe)
        print(f"lenslab: wrote {path} and {path.with_suffix('.safetensors').name} ({probe.hook}, {probe.position})")
    if out is not None:
        print(f"lenslab: wrote {export(res, out)}")
    return 0


def _load(path: str):
    from lenslab.probes.linear import Probe  # deferred: keeps CLI start-up fast

    if not Path(path).is_file():
        raise LenslabError(
            f"--probe {path!r} does not exist; write one with `lenslab probe train --save-probe FILE.json`"
        )
    return Probe.load(path)


def cmd_eval(args: argparse.Namespace) -> int:
    probe = _load(args.probe)
    model = lenslab.load_model(args.model, device=args.device)
    prompts, labels = _data(args, model)
    value = probe.score(model, prompts, labels)
    metric = "accuracy" if probe.kind == "logistic" else "R²"
    counts = {v: labels.count(v) for v in dict.fromkeys(labels)} if probe.kind == "logistic" else {}
    chance = f"; chance (majority class) {max(counts.values()) / len(labels):.3f}" if counts else ""
    print(f"probe {probe.hook} ({probe.position}): {metric} {value:.3f} on {len(prompts)} prompts{chance}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from lenslab import steering  # deferred: keeps CLI start-up fast
    from lenslab.steering.probe_steering import probe_intervention  # deferred: keeps CLI start-up fast

    out = out_path(args)
    probe = _load(args.probe)
    try:
        scale = float(args.scale)
    except ValueError:
        scale = args.scale
    model = lenslab.load_model(args.model, device=args.device)
    iv = probe_intervention(
        probe,
        args.towards if args.op == "add" else None,
        op=args.op,
        scale=scale,
        strength=args.strength,
    )
    steering.validate(model, iv)
    prompt = prompt_or_default(args)
    print(f"prompt:    {prompt}")
    print(f"unsteered: {steering.generate(model, prompt, max_new_tokens=args.max_new_tokens)}")
    steered = steering.generate(model, prompt, iv, max_new_tokens=args.max_new_tokens)
    print(f"steered:   {steered}   [{iv.name}; strength {args.strength:g}]")
    if out is not None:
        path = steering.save(iv, out)
        print(f"lenslab: wrote {path} and {path.with_suffix('.safetensors').name}")
    return 0
