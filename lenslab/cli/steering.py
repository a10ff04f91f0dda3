"""`lenslab steer fit|generate|eval` (lenslab.steering): fit an intervention preset, generate with it,
measure concept rate against fluency across strengths (lenslab.steering.tradeoff); and
`lenslab moe generate`: generation with MoE experts switched off or forced on."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import lenslab
from lenslab import zoo
from lenslab._errors import LenslabError, did_you_mean
from lenslab.cli.common import (
    MOE_MODEL_HELP,
    add_device,
    add_model,
    add_out,
    add_prompt,
    add_prompt_set,
    add_ray,
    group,
    out_path,
    prompt_list,
    prompt_or_default,
    ray_cluster,
)
from lenslab.data import SENTIMENT_DATA, sentiment_data
from lenslab.figures import export
from lenslab.sites import resolve_site

STEER_METHODS = ("diffmean", "actadd", "austeer", "lineas", "probe")
LAYER_METHODS = ("diffmean", "actadd", "probe")  # the methods fitted at one layer (--layer, --layers)


# models whose prompts can be redrawn per seed: (seed, n_fit, n_eval) -> (positive, negative, held-out);
# each model's sentiment data module (`lenslab.data.sentiment_data`) gives them and its scorer
SEEDED_SETS = {name: data.seeded_sets for name, data in SENTIMENT_DATA.items()}

# `lenslab steer eval --score` choices: name -> (model name -> (continuation text -> bool))
STEER_SCORES = {"positive": lambda model: sentiment_data(model).is_positive}


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_moe_generate(group(sub, "moe"))

    st = sub.add_parser("steer", help="steering: fit an intervention preset, generate with it, evaluate the trade-off")
    stsub = st.add_subparsers(dest="steer_command", required=True, metavar="STEER_COMMAND")
    sf = stsub.add_parser("fit", help="fit a steering intervention from positive and negative prompts; save a preset")
    sf.add_argument(
        "--method",
        required=True,
        metavar="METHOD",
        help=f"{', '.join(STEER_METHODS)}. diffmean: mean activation of the positive minus the negative "
        "prompts; actadd: the first positive and first negative prompt as the contrast pair (added "
        "at the generated prompt's first positions, so keep them short); austeer: the k most "
        "sign-consistent units (paired prompts); lineas: affine maps that move the negative "
        "prompts' activations (source) onto the positive ones' (target); probe: the direction of a logistic "
        "probe trained on positive vs negative prompts (lenslab.steering.probe_steering)",
    )
    for which in ("positive", "negative"):
        add_prompt_set(sf, which)
    _fit_options(sf)
    sf.add_argument("--strength", type=float, default=1.0, help="the preset's strength (default 1)")
    add_out(
        sf,
        "preset .json (its tensors go to a .safetensors file beside it)",
        suffixes=[".json"],
        why="a preset is a .json file (its tensors go to a .safetensors beside it)",
    )
    sf.set_defaults(func=cmd_fit)

    sg = stsub.add_parser("generate", help="the prompt's continuation unsteered and steered (same seed), streamed")
    sg.add_argument("--preset", required=True, help="a preset .json from `lenslab steer fit`")
    add_prompt(sg)
    sg.add_argument("--strength", type=float, default=None, help="rescale the preset (default: its saved strength)")
    sg.add_argument("--max-new-tokens", type=int, default=20)
    sg.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    sg.add_argument("--seed", type=int, default=0)
    sg.set_defaults(func=cmd_generate)

    se_ = stsub.add_parser("eval", help="concept rate against fluency across strengths, one line per preset or method")
    se_.add_argument("--preset", nargs="+", default=None, help="one or more preset .json files")
    se_.add_argument(
        "--method",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"instead of presets: refit these methods ({', '.join(STEER_METHODS)}) on each seed's fitting "
        "prompts and evaluate on its held-out prompts (models with seeded prompt sets: "
        f"{', '.join(SENTIMENT_DATA)})",
    )
    se_.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="with --method: two or more seeds give mean ± std across refits (default: seed 0 only)",
    )
    se_.add_argument(
        "--n-fit", type=int, default=32, help="with --method: fitting prompts per class and seed (default 32)"
    )
    se_.add_argument("--n-eval", type=int, default=40, help="with --method: held-out prompts per seed (default 40)")
    _fit_options(se_)
    se_.set_defaults(strength=1.0)
    se_.add_argument("--prompts", nargs="+", default=None, help="evaluation prompts (default: --prompt-set)")
    se_.add_argument(
        "--prompt-set", default="negative", help="the zoo model's prompt set to evaluate on (default negative)"
    )
    se_.add_argument("--strengths", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0])
    se_.add_argument(
        "--score",
        default="positive",
        help="the concept scorer: positive (more positive than negative sentiment words of the model's "
        "lexicon: lenslab.data.english.is_positive for zoo/english-4l, else lenslab.data.sentiment.is_positive)",
    )
    se_.add_argument("--max-new-tokens", type=int, default=12)
    se_.add_argument(
        "--layers",
        nargs="+",
        type=int,
        default=None,
        help=f"with --method ({', '.join(LAYER_METHODS)}) and one seed: fit each method at each of these layers "
        "and sweep methods x layers x strengths (lenslab.steering.tradeoff_sweep; the fits run in the --ray workers)",
    )
    add_out(
        se_,
        "also write the result; the extension picks the format: .json .svg .png .pdf .html",
        required=False,
    )
    add_ray(se_)
    se_.set_defaults(func=cmd_eval)
    for sp in (sf, sg, se_):
        add_model(sp, "zoo/steer-sentiment")
        add_device(sp)


def _fit_options(p: argparse.ArgumentParser) -> None:
    """The fitting options shared by `steer fit` and `steer eval --method`."""
    p.add_argument(
        "--layer", type=int, default=None, help="diffmean / actadd / probe: the layer (default n_layers // 2)"
    )
    p.add_argument(
        "--site",
        default=None,
        help="a site of the one registry (lenslab.sites.SITES: resid_pre, resid_mid, resid_post, attn_out, "
        "mlp_out, z, mlp_neuron, ...) or a hook template; diffmean: resid_post (default); actadd: resid_pre "
        "(default); austeer: resid (default), or its own names mlp, attn (= z), neurons (= mlp_neuron); "
        "lineas: a site name or hook template such as 'blocks.{layer}.hook_resid_post', every layer "
        "(default: every attn_out and mlp_out)",
    )
    p.add_argument("--k", type=int, default=16, help="austeer: units steered (default 16)")
    p.add_argument("--alpha", type=float, default=10.0, help="austeer: the scale alpha (default 10)")
    p.add_argument("--steps", type=int, default=None, help="lineas: optimiser steps (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="lineas: Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="lineas: seeds the order of source batches")
    p.add_argument(
        "--C",
        type=float,
        default=1.0,
        help="probe: the logistic regression's inverse L2 strength (default 1; small C tends to DiffMean's direction)",
    )
    p.add_argument(
        "--tie-break",
        default="order",
        choices=["order", "gap", "random"],
        help="austeer: how units of equal score are chosen: order (the authors' code: layer-major), gap "
        "(larger mean |P - N| first) or random (seeded by --seed)",
    )


def _check_methods(methods: list[str]) -> None:
    for method in methods:
        if method not in STEER_METHODS:
            raise LenslabError(
                f"--method {method!r} is not one of {', '.join(STEER_METHODS)}{did_you_mean(method, STEER_METHODS)}"
            )


def _fit(args: argparse.Namespace, model, method: str, pos: list[str], neg: list[str], seed: int):
    """Fit `method` with the fit options in `args` on positive `pos` and negative `neg` prompts."""
    from lenslab import steering  # deferred: keeps CLI start-up fast

    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    if method == "diffmean":
        return steering.mean_difference(
            model, pos, neg, layers=layer, site=args.site or "resid_post", strength=args.strength
        )
    if method == "probe":
        from lenslab.steering.probe_steering import probe_steering  # deferred: keeps CLI start-up fast

        return probe_steering(
            model, pos, neg, layers=layer, site=args.site or "resid_post", C=args.C, strength=args.strength
        )
    if method == "actadd":
        return steering.actadd(
            model, pos[0], neg[0], layer=layer, site=args.site or "resid_pre", strength=args.strength
        )
    if method == "austeer":
        return steering.austeer(
            model,
            pos,
            neg,
            k=args.k,
            alpha=args.alpha,
            site=args.site or "resid",
            strength=args.strength,
            tie_break=args.tie_break,
            seed=seed,
        )
    cfg = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    config = steering.LineasConfig(**cfg, seed=seed, progress=False)
    site = args.site
    if site and not site.startswith("blocks."):  # a site name of the one registry -> its hook template
        site = resolve_site(site).hook
    # LinEAS moves the source distribution onto the target one: source = negative, target = positive
    return steering.fit_lineas(model, neg, pos, hooks=site, config=config, strength=args.strength)


def fit_at_layer(args: argparse.Namespace, method: str, pos: list[str], neg: list[str], seed: int, model, layer: int):
    """`_fit` with `--layer` set to `layer`: the `(model, layer) -> Intervention` that `steer eval
    --layers` hands `tradeoff_sweep` (bound with `functools.partial`, so Ray workers can unpickle it)."""
    return _fit(argparse.Namespace(**{**vars(args), "layer": layer}), model, method, pos, neg, seed)


def _load_preset(model, path: str):
    from lenslab import steering  # deferred: keeps CLI start-up fast

    iv = steering.load(path)
    steering.validate(model, iv)
    return iv


def _check_presets(paths: list[str]) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise LenslabError(
            f"--preset {missing[0]!r} does not exist; write one with `lenslab steer fit --out FILE.json`"
        )


def cmd_fit(args: argparse.Namespace) -> int:
    from lenslab import steering  # deferred: keeps CLI start-up fast

    _check_methods([args.method])
    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    iv = _fit(args, model, args.method, prompt_list(args, "positive"), prompt_list(args, "negative"), args.seed)
    path = steering.save(iv, out)
    print(f"{iv.name}: {len(iv.edits)} edit(s) at {', '.join(iv.hook_names)}; {iv.n_units(model)} units")
    if args.method == "lineas":
        print(f"LinEAS loss {iv.provenance['loss_initial']:.4g} -> {iv.provenance['loss_final']:.4g}")
    print(f"lenslab: wrote {path} and {path.with_suffix('.safetensors').name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _check_presets([args.preset])
    model = lenslab.load_model(args.model, device=args.device)
    iv = _load_preset(model, args.preset)
    if args.strength is not None:
        iv = iv.with_strength(args.strength)
    prompt = prompt_or_default(args)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature)
    print_side_by_side(model, prompt, iv, **kw)
    return 0


def print_side_by_side(model, prompt: str, iv, **kw) -> None:
    """Print the prompt, then its continuation unsteered and steered by `iv` (same seed), streamed
    token by token (`lenslab.steering.stream`; `kw` are its options)."""
    from lenslab import steering  # deferred: keeps CLI start-up fast

    strengths = sorted(set(iv.strengths()))
    print(f"prompt:    {prompt}")
    for label, intervention in (("unsteered", None), ("steered", iv)):
        print(f"{label + ':':<10}", end="", flush=True)
        for piece in steering.stream(model, prompt, intervention, **kw):
            print(piece, end="", flush=True)
        print(f"   [{iv.name}; strength {', '.join(f'{s:g}' for s in strengths)}]" if intervention else "", flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from lenslab.steering.tradeoff import tradeoff, tradeoff_seeds, tradeoff_sweep  # deferred: CLI start-up

    _check_methods(args.method or [])
    if bool(args.preset) == bool(args.method):
        raise LenslabError(
            "pass either --preset FILE ... (evaluate fitted presets) or --method M ... "
            "(refit on each seed's prompts; with --seeds)"
        )
    if args.preset and args.seeds:
        raise LenslabError(
            "--seeds refits the methods on fresh prompts: use it with --method, not --preset "
            "(a preset is already fitted; its table shows a bootstrap interval over the prompts)"
        )
    if args.method and args.model not in SEEDED_SETS:
        raise LenslabError(
            f"--method refits on seeded prompt sets, which {args.model!r} does not have (models "
            f"with them: {', '.join(SEEDED_SETS)}); fit presets with `lenslab steer fit` and pass "
            "--preset"
        )
    if args.layers and not args.method:
        raise LenslabError("--layers sweeps the layer a method is fitted at: use it with --method, not --preset")
    if args.layers and (args.seeds or [0])[1:]:
        raise LenslabError("--layers sweeps one seed's fits: drop --seeds, or run one sweep per seed")
    bad = [m for m in (args.method or []) if args.layers and m not in LAYER_METHODS]
    if bad:
        raise LenslabError(
            f"--layers: {', '.join(bad)} choose their own units across layers; sweep layers with "
            f"{', '.join(LAYER_METHODS)}"
        )
    out = out_path(args)
    cluster = ray_cluster(args)
    if args.score not in STEER_SCORES:
        raise LenslabError(
            f"--score {args.score!r} is not a known scorer; choices: {', '.join(STEER_SCORES)}"
            f"{did_you_mean(args.score, list(STEER_SCORES))}"
        )
    _check_presets(args.preset or [])
    model = lenslab.load_model(args.model, device=args.device)
    score = STEER_SCORES[args.score](args.model)
    kw = dict(
        strengths=args.strengths,
        max_new_tokens=args.max_new_tokens,
        progress=cluster is not None,
        cluster=cluster,
        resume=args.resume,
    )
    if args.method and args.layers:
        seed = (args.seeds or [0])[0]
        pos, neg, held_out = SEEDED_SETS[args.model](seed, args.n_fit, args.n_eval)
        fits = {m: partial(fit_at_layer, args, m, pos, neg, seed) for m in args.method}
        result = tradeoff_sweep(model, fits, args.layers, held_out, score, **kw)
    elif args.method:
        sets = SEEDED_SETS[args.model]
        seeds = args.seeds or [0]

        def fit(seed: int) -> dict:
            pos, neg, _ = sets(seed, args.n_fit, 0)
            return {m: _fit(args, model, m, pos, neg, seed) for m in args.method}

        def held_out(seed: int) -> list[str]:
            return sets(seed, 0, args.n_eval)[2]

        result = (
            tradeoff_seeds(model, fit, held_out, score, seeds=seeds, **kw)
            if len(seeds) > 1
            else tradeoff(model, fit(seeds[0]), held_out(seeds[0]), score, **kw)
        )
    else:
        if args.prompts:
            prompts = list(args.prompts)
        else:
            sets = zoo.prompt_sets(args.model)
            if not sets.get(args.prompt_set):
                have = f"; it has {', '.join(sets)}" if sets else ""
                raise LenslabError(
                    f"{args.model!r} has no prompt set {args.prompt_set!r}{have}; pass --prompts P ... "
                    f"or --prompt-set NAME"
                )
            prompts = sets[args.prompt_set]
        ivs: dict = {}
        for path in args.preset:
            iv = _load_preset(model, path)
            name = iv.name or Path(path).stem
            ivs[name if name not in ivs else f"{name} ({Path(path).stem})"] = iv
        result = tradeoff(model, ivs, prompts, score, **kw)
    print(result.to_markdown())
    if out is not None:
        print(f"lenslab: wrote {export(result, out)}")
    return 0


# --- `lenslab moe generate`: expert switching (lenslab.steering.experts) -----------------------


def experts_arg(text: str) -> tuple[int, int]:
    """'L:E' (e.g. 2:5) -> (layer, expert); an argparse type."""
    from lenslab.probes.routers import parse_experts  # deferred: keeps CLI start-up fast

    try:
        pairs = parse_experts(text)
    except LenslabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(pairs) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one LAYER:EXPERT pair (e.g. 2:5)")
    return pairs[0]


def _add_moe_generate(esub: argparse._SubParsersAction) -> None:
    eg = esub.add_parser("generate", help="generate with experts switched off or forced on, next to the baseline")
    add_prompt(eg)
    eg.add_argument("--off", nargs="+", type=experts_arg, default=None, metavar="L:E", help="experts to switch off")
    eg.add_argument("--on", nargs="+", type=experts_arg, default=None, metavar="L:E", help="experts to force on")
    eg.add_argument("--ranking", default=None, help="a ranking JSON from `lenslab moe rank`: switch off its --top-k")
    eg.add_argument("--top-k", type=int, default=10)
    eg.add_argument(
        "--mode",
        default="drop",
        choices=["drop", "mask"],
        help="drop: remove from the top-k and renormalise (MoTE); mask: the next expert enters",
    )
    eg.add_argument("--strength", type=float, default=1.0)
    eg.add_argument("--max-new-tokens", type=int, default=12)
    eg.add_argument("--temperature", type=float, default=0.0)
    eg.add_argument("--seed", type=int, default=0)
    add_model(eg, "zoo/moe-refusal", MOE_MODEL_HELP)
    add_device(eg)
    eg.set_defaults(func=cmd_moe_generate)


def cmd_moe_generate(args: argparse.Namespace) -> int:
    from lenslab import steering  # deferred: keeps CLI start-up fast
    from lenslab.probes import routers  # deferred: keeps CLI start-up fast

    model = lenslab.load_model(args.model, device=args.device)
    off = list(args.off or [])
    if args.ranking:
        if not Path(args.ranking).is_file():
            raise LenslabError(
                f"--ranking {args.ranking!r} does not exist; write one with `lenslab moe rank --out FILE.json`"
            )
        ranking = routers.ExpertRanking.from_json(args.ranking)
        off += [(layer, expert) for layer, expert, _ in ranking.top(args.top_k)]
    iv = steering.switch_experts(off=off, on=args.on or [], mode=args.mode, strength=args.strength)
    prompt = prompt_or_default(args)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature)
    steering.validate(model, iv)
    print(f"prompt:   {prompt}")
    print(f"baseline: {steering.generate(model, prompt, **kw)}")
    label = ", ".join([f"off {l}:{e}" for l, e in off] + [f"on {l}:{e}" for l, e in (args.on or [])]) or "no switch"
    mode = f"; {args.mode}" if off else ""  # the mode only concerns experts switched off
    print(f"switched: {steering.generate(model, prompt, iv, **kw)}   [{label}{mode}]")
    return 0
