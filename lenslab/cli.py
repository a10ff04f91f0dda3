"""The `lenslab` command line: thin shell over the library.

lenslab app [--port 8501] [--host 127.0.0.1] [--model zoo/induction-2l]
lenslab models
lenslab zoo train NAME [--out DIR] [--seed 0] [--steps N]
lenslab sinks attention|massive|ablate --model M [--prompts P ...] --out FILE
lenslab sinks experts --model M [--prompts P ...] [--rule su] [--prune] --out FILE
lenslab moe inspect|rank|generate --model zoo/moe-refusal ...
lenslab steer fit|generate|eval --model zoo/steer-sentiment ...
lenslab sae train --model M --hook H --out DIR [--corpus FILE] [--d-sae N --k K ...]
lenslab sae index|lookup|export|search --model M --sae S ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lenslab._errors import LenslabError, did_you_mean


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
    env["PYTHONSAFEPATH"] = "1"  # the working directory never goes on sys.path (docs/design.md)
    env["LENSLAB_DEFAULT_MODEL"] = model
    # Streamlit always runs headless: otherwise its first run asks for an email on the terminal
    # (and exits when stdin is not one). Without --headless we open the browser ourselves.
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_main),
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
    import threading
    import time
    import urllib.request
    import webbrowser

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


def _cmd_models(args: argparse.Namespace) -> int:
    from lenslab.models import list_models

    rows = list_models()
    width = max((len(r.name) for r in rows), default=10)
    for r in rows:
        print(f"{r.name:<{width}}  {r.source:<8}  {r.summary}")
    if not any(r.source != "zoo" for r in rows):
        print("\n(no Hugging Face models in the local cache; online, any HF id such as 'gpt2' also loads)")
    return 0


def train_zoo(name: str, out_dir: str | Path | None = None, seed: int = 0, steps: int | None = None) -> Path:
    """Rebuild zoo model `name` by running its training recipe (`lenslab/zoo/train_*.py`); returns
    the output folder. `steps` overrides the recipe's number of optimiser steps (None: its own; a
    few steps make a quick, still deterministic, smoke run)."""
    import dataclasses
    import inspect

    # deferred: the recipes import the areas they measure their cards with (docs/design.md, "Layers")
    from lenslab import zoo
    from lenslab.zoo import train_induction_2l, train_ioi_4l, train_moe_refusal, train_steer_sentiment

    recipes = {
        "induction-2l": train_induction_2l,
        "ioi-4l": train_ioi_4l,
        "moe-refusal": train_moe_refusal,
        "steer-sentiment": train_steer_sentiment,
    }
    assert sorted(zoo.PREFIX + r for r in recipes) == zoo.trainable_names(), "a recipe is missing from train_zoo"
    short = name.removeprefix(zoo.PREFIX)
    if short not in recipes:
        names = zoo.trainable_names()
        raise LenslabError(
            f"no training script for {name!r}{did_you_mean(zoo.PREFIX + short, names)}; trainable: {', '.join(names)}"
        )
    if steps is not None and steps < 1:
        raise LenslabError(f"--steps must be at least 1, got {steps}")
    module = recipes[short]
    out = Path(out_dir) if out_dir is not None else zoo.ZOO_DIR / short
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if steps is not None:
        if "steps" in inspect.signature(module.train).parameters:
            kwargs["steps"] = steps
        else:  # induction-2l keeps its recipe in a frozen TrainConfig
            kwargs["config"] = dataclasses.replace(module.TrainConfig(), steps=steps)
    module.train(out, seed=seed, **kwargs)
    return out


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    out = train_zoo(args.name, out_dir=args.out, seed=args.seed, steps=args.steps)
    print(f"lenslab: wrote {args.name} to {out}")
    return 0


def _cmd_zoo_list(args: argparse.Namespace) -> int:
    from lenslab import zoo

    for e in zoo.zoo_entries():
        print(f"{e.name:<24} {e.summary}")
    return 0


def _circuit_inputs(args: argparse.Namespace):
    import lenslab
    from lenslab import tasks

    model = lenslab.load_model(args.model, device=args.device)
    task = tasks.from_spec(model, args.task, n=args.n, seed=args.seed)
    return model, task


def _cmd_circuits(args: argparse.Namespace) -> int:
    from lenslab import circuits
    from lenslab.figures import FORMATS, export

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
    model, task = _circuit_inputs(args)
    if args.circuits_command == "patch":
        result = circuits.patch(model, task, args.site, direction=args.direction, metric=args.metric, layer=args.layer)
        written = [export(result, out)]
    elif args.circuits_command == "attribute":
        results = circuits.attribute(
            model,
            task,
            args.method,
            args.site,
            metric=args.metric,
            direction=args.direction,
            layer=args.layer,
            steps=args.steps,
        )
        written = [
            export(r, out if len(results) == 1 else out.with_name(f"{out.stem}_{site}{out.suffix}"))
            for site, r in results.items()
        ]
    elif args.circuits_command == "faithfulness":
        result = circuits.faithfulness(
            model, task, args.method, args.site, metric=args.metric, layer=args.layer, steps=args.steps
        )
        print(result.to_markdown())
        written = [export(result, out)]
    elif args.method == "nodes":
        heads = circuits.patch(model, task, "z", metric=args.metric)
        mlps = None if model.cfg.attn_only else circuits.patch(model, task, "mlp_out", metric=args.metric)
        graph = circuits.CircuitGraph.from_node_scores(heads, mlps, top_k=args.top_k, threshold=args.threshold)
        written = [export(graph, out)]
    else:
        scores = circuits.attribute_edges(model, task, args.method, metric=args.metric, steps=args.steps)
        graph = circuits.CircuitGraph.from_edge_scores(scores, top_k=args.top_k, threshold=args.threshold)
        written = [export(graph, out)]
    for w in written:
        print(f"lenslab: wrote {w}")
    return 0


def _cmd_sinks(args: argparse.Namespace) -> int:
    import lenslab
    from lenslab import zoo
    from lenslab.figures import FORMATS, export
    from lenslab.probes import sinks

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
    model = lenslab.load_model(args.model, device=args.device)
    prompts = args.prompts or [zoo.default_prompt(args.model) or "The quick brown fox jumps over the lazy dog."]
    rule = sinks.MassiveRule(absolute=args.absolute or None, ratio=args.ratio or None)
    if args.sinks_command == "attention":
        result = sinks.attention_sinks(model, prompts, threshold=args.threshold)
        print(
            f"sink rate {100 * result.sink_rate:.1f}% (threshold {result.threshold:g}); sink heads {result.sink_heads()}"
        )
    elif args.sinks_command == "massive":
        result = sinks.massive_activations(model, prompts, rule=rule)
        print(f"massive dims {result.massive_dims} on positions {result.massive_positions}")
    else:
        result = sinks.ablate_massive(model, prompts, mode=args.mode, rule=rule, threshold=args.threshold)
        print(
            f"loss {result.loss_clean:.4g} -> {result.loss_ablated:.4g}; sink rate "
            f"{100 * result.sinks_clean.sink_rate:.1f}% -> {100 * result.sinks_ablated.sink_rate:.1f}%"
        )
    print(f"lenslab: wrote {export(result, out)}")
    return 0


def _cmd_sinks_experts(args: argparse.Namespace) -> int:
    import lenslab
    from lenslab import zoo
    from lenslab.figures import FORMATS, export
    from lenslab.probes import routers, sinks
    from lenslab.probes import super_experts as se

    out = Path(args.out)
    if out.suffix.lower() not in FORMATS:
        raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
    experts = [p for text in args.experts for p in routers.parse_experts(text)] if args.experts else None
    model = lenslab.load_model(args.model, device=args.device)
    prompts = args.prompts or [zoo.default_prompt(args.model) or "The quick brown fox jumps over the lazy dog."]
    if args.prune:
        rule = sinks.MassiveRule(absolute=args.absolute or None, ratio=args.ratio or None)
        result = se.ablate_super_experts(
            model,
            prompts,
            experts=experts,
            rule=args.rule,
            include_layers=args.include_layers,
            random_draws=args.random_draws,
            seed=args.seed,
            threshold=args.threshold,
            massive_rule=rule,
        )
        print(
            f"pruned {result.experts}: loss {result.loss_clean:.4g} -> {result.loss_pruned:.4g}; sink rate "
            f"{100 * result.sinks_clean.sink_rate:.1f}% -> {100 * result.sinks_pruned.sink_rate:.1f}%; massive entries "
            f"{len(result.massive_clean.massive)} -> {len(result.massive_pruned.massive)}"
        )
        if result.random:
            print(
                f"random experts ({len(result.random)} draws): loss {result.random_loss:.4g}, "
                f"sink rate {100 * result.random_sink_rate:.1f}%"
            )
    else:
        result = se.super_experts(model, prompts, rule=args.rule, include_layers=args.include_layers)
        print(
            f"super experts ({args.rule}): {', '.join(result.labels) or 'none'}; largest down_proj |output| "
            f"{max(result.profile.population().tolist(), default=0.0):.4g}"
        )
    print(f"lenslab: wrote {export(result, out)}")
    return 0


def _experts_arg(text: str) -> tuple[int, int]:
    """'L:E' (e.g. 2:5) -> (layer, expert)."""
    from lenslab.probes.routers import parse_experts

    try:
        pairs = parse_experts(text)
    except LenslabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(pairs) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one LAYER:EXPERT pair (e.g. 2:5)")
    return pairs[0]


def _prompt_list(args: argparse.Namespace, which: str) -> list[str]:
    """Prompts from --{which} or --{which}-file (one per line), else the zoo's prompt set of that name."""
    from lenslab import zoo

    given, path = getattr(args, which), getattr(args, f"{which}_file")
    if path:
        file = Path(path)
        if not file.is_file():
            raise LenslabError(f"--{which}-file {path!r} does not exist; pass a text file with one prompt per line")
        given = [line for line in file.read_text().splitlines() if line.strip()]
    if given:
        return list(given)
    sets = zoo.prompt_sets(args.model)
    if sets.get(which):
        return sets[which]
    raise LenslabError(f"no {which} prompts: pass --{which} P ... or --{which}-file FILE")


def _cmd_moe(args: argparse.Namespace) -> int:
    import lenslab
    from lenslab import zoo
    from lenslab.figures import FORMATS, export
    from lenslab.probes import routers

    out = Path(args.out) if getattr(args, "out", None) else None
    if out is not None and out.suffix.lower() not in FORMATS:
        raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
    model = lenslab.load_model(args.model, device=args.device)
    if args.moe_command == "inspect":
        prompts = args.prompts or [zoo.default_prompt(args.model) or "The quick brown fox jumps over the lazy dog."]
        result = routers.route(model, prompts)
        load = result.load(fraction=True)
        for li, layer in enumerate(result.layers):
            top = torch_topk(load[li], min(3, result.n_experts))
            print(f"L{layer}: busiest experts " + ", ".join(f"e{e} {100 * v:.0f}%" for e, v in top))
        print(f"lenslab: wrote {export(result, out)}")
    elif args.moe_command == "rank":
        target, other = _prompt_list(args, "target"), _prompt_list(args, "other")
        ranking = routers.ftri_rank(model, target, other, weights=args.weights)
        for layer, expert, score in ranking.top(args.top_k):
            print(f"L{layer} e{expert}  {score:+.3f}")
        print(f"lenslab: wrote {export(ranking, out)}")
    else:
        from lenslab import steering

        off = list(args.off or [])
        if args.ranking:
            if not Path(args.ranking).is_file():
                raise LenslabError(
                    f"--ranking {args.ranking!r} does not exist; write one with `lenslab moe rank --out FILE.json`"
                )
            ranking = routers.ExpertRanking.from_json(args.ranking)
            off += [(layer, expert) for layer, expert, _ in ranking.top(args.top_k)]
        iv = steering.switch_experts(off=off, on=args.on or [], mode=args.mode, strength=args.strength)
        prompt = args.prompt or zoo.default_prompt(args.model) or "The quick brown fox"
        kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature)
        steering.validate(model, iv)
        print(f"prompt:   {prompt}")
        print(f"baseline: {steering.generate(model, prompt, **kw)}")
        label = ", ".join([f"off {l}:{e}" for l, e in off] + [f"on {l}:{e}" for l, e in (args.on or [])]) or "no switch"
        mode = f"; {args.mode}" if off else ""  # the mode only concerns experts switched off
        print(f"switched: {steering.generate(model, prompt, iv, **kw)}   [{label}{mode}]")
    return 0


STEER_METHODS = ("diffmean", "actadd", "austeer", "lineas")


def _seeded_sentiment(seed: int, n_fit: int, n_eval: int):
    from lenslab import _sentiment

    return _sentiment.seeded_sets(seed, n_fit, n_eval)


# models whose prompts can be redrawn per seed: (seed, n_fit, n_eval) -> (positive, negative, held-out)
SEEDED_SETS = {"zoo/steer-sentiment": _seeded_sentiment}


def _steer_scores() -> dict:
    """`lenslab steer eval --score` choices: name -> (continuation text -> bool)."""
    from lenslab import _sentiment

    return {"positive": _sentiment.is_positive}


def _steer_fit(args: argparse.Namespace, model, method: str, pos: list[str], neg: list[str], seed: int):
    """Fit `method` with the fit options in `args` on positive `pos` and negative `neg` prompts."""
    from lenslab import steering

    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    if method == "diffmean":
        return steering.mean_difference(
            model, pos, neg, layers=layer, site=args.site or "resid_post", strength=args.strength
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
    site = f"blocks.{{layer}}.hook_{args.site}" if args.site in steering.SITES else args.site
    # LinEAS moves the source distribution onto the target one: source = negative, target = positive
    return steering.fit_lineas(model, neg, pos, hooks=site, config=config, strength=args.strength)


def _steer_fit_options(p: argparse.ArgumentParser) -> None:
    """The fitting options shared by `steer fit` and `steer eval --method`."""
    p.add_argument("--layer", type=int, default=None, help="diffmean / actadd: the layer (default n_layers // 2)")
    p.add_argument(
        "--site",
        default=None,
        help="diffmean: resid_post (default), resid_pre, resid_mid, attn_out, mlp_out or a hook template; "
        "actadd: resid_pre (default) or the same; austeer: resid (default), mlp, attn, neurons; "
        "lineas: a site name or hook template such as 'blocks.{layer}.hook_resid_post', every layer "
        "(default: every attn_out and mlp_out)",
    )
    p.add_argument("--k", type=int, default=16, help="austeer: units steered (default 16)")
    p.add_argument("--alpha", type=float, default=10.0, help="austeer: the scale alpha (default 10)")
    p.add_argument("--steps", type=int, default=None, help="lineas: optimiser steps (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="lineas: Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="lineas: seeds the order of source batches")
    p.add_argument(
        "--tie-break",
        default="order",
        choices=["order", "gap", "random"],
        help="austeer: how units of equal score are chosen: order (the authors' code: layer-major), gap "
        "(larger mean |P - N| first) or random (seeded by --seed)",
    )


def _load_preset(model, path: str):
    from lenslab import steering

    iv = steering.load(path)
    steering.validate(model, iv)
    return iv


def _cmd_steer(args: argparse.Namespace) -> int:
    import lenslab
    from lenslab import steering, zoo
    from lenslab.figures import FORMATS, export

    out = Path(args.out) if getattr(args, "out", None) else None
    cmd = args.steer_command
    for method in [args.method] if cmd == "fit" else (getattr(args, "method", None) or []):
        if method not in STEER_METHODS:
            raise LenslabError(
                f"--method {method!r} is not one of {', '.join(STEER_METHODS)}{did_you_mean(method, STEER_METHODS)}"
            )
    if cmd == "eval":
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
    if cmd == "fit" and out.suffix.lower() != ".json":
        raise LenslabError(f"--out {out.name!r}: a preset is a .json file (its tensors go to a .safetensors beside it)")
    if cmd == "eval":
        if out is not None and out.suffix.lower() not in FORMATS:
            raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
        scores = _steer_scores()
        if args.score not in scores:
            raise LenslabError(
                f"--score {args.score!r} is not a known scorer; choices: {', '.join(scores)}"
                f"{did_you_mean(args.score, list(scores))}"
            )
    if cmd in ("generate", "eval"):
        missing = [p for p in ((args.preset or []) if cmd == "eval" else [args.preset]) if not Path(p).is_file()]
        if missing:
            raise LenslabError(
                f"--preset {missing[0]!r} does not exist; write one with `lenslab steer fit --out FILE.json`"
            )
    model = lenslab.load_model(args.model, device=args.device)
    if cmd == "fit":
        iv = _steer_fit(
            args, model, args.method, _prompt_list(args, "positive"), _prompt_list(args, "negative"), args.seed
        )
        path = steering.save(iv, out)
        print(f"{iv.name}: {len(iv.edits)} edit(s) at {', '.join(iv.hook_names)}; {iv.n_units(model)} units")
        if args.method == "lineas":
            print(f"LinEAS loss {iv.provenance['loss_initial']:.4g} -> {iv.provenance['loss_final']:.4g}")
        print(f"lenslab: wrote {path} and {path.with_suffix('.safetensors').name}")
    elif cmd == "generate":
        iv = _load_preset(model, args.preset)
        if args.strength is not None:
            iv = iv.with_strength(args.strength)
        prompt = args.prompt or zoo.default_prompt(args.model) or "The quick brown fox"
        kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature)
        strengths = sorted(set(iv.strengths()))
        print(f"prompt:    {prompt}")
        for label, intervention in (("unsteered", None), ("steered", iv)):
            print(f"{label + ':':<10}", end="", flush=True)
            for piece in steering.stream(model, prompt, intervention, **kw):
                print(piece, end="", flush=True)
            print(
                f"   [{iv.name}; strength {', '.join(f'{s:g}' for s in strengths)}]" if intervention else "", flush=True
            )
    elif args.method:
        from lenslab.steering.tradeoff import tradeoff, tradeoff_seeds

        sets = SEEDED_SETS[args.model]
        seeds = args.seeds or [0]

        def fit(seed: int) -> dict:
            pos, neg, _ = sets(seed, args.n_fit, 0)
            return {m: _steer_fit(args, model, m, pos, neg, seed) for m in args.method}

        def held_out(seed: int) -> list[str]:
            return sets(seed, 0, args.n_eval)[2]

        kw = dict(strengths=args.strengths, max_new_tokens=args.max_new_tokens, progress=False)
        score = _steer_scores()[args.score]
        result = (
            tradeoff_seeds(model, fit, held_out, score, seeds=seeds, **kw)
            if len(seeds) > 1
            else tradeoff(model, fit(seeds[0]), held_out(seeds[0]), score, **kw)
        )
        print(result.to_markdown())
        if out is not None:
            print(f"lenslab: wrote {export(result, out)}")
    else:
        from lenslab.steering.tradeoff import tradeoff

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
        result = tradeoff(
            model,
            ivs,
            prompts,
            _steer_scores()[args.score],
            strengths=args.strengths,
            max_new_tokens=args.max_new_tokens,
            progress=False,
        )
        print(result.to_markdown())
        if out is not None:
            print(f"lenslab: wrote {export(result, out)}")
    return 0


def torch_topk(values, k: int) -> list[tuple[int, float]]:
    import torch

    top = torch.topk(values, k)
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices)]


def _cmd_sae_train(args: argparse.Namespace) -> int:
    """`lenslab sae train` (lenslab.probes.sae): a zoo model's built-in corpus and recipe, or --corpus FILE."""
    from lenslab.probes import sae as S
    from lenslab.probes import zoo_saes

    settings = {k: getattr(args, k) for k in ("d_sae", "k", "l1", "lr", "training_tokens", "batch_size_tokens", "seed")}
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.corpus is None:
        if args.context_size is not None:
            raise LenslabError("--context-size applies to --corpus FILE; the zoo corpora have their own row length")
        sae, metrics = zoo_saes.build_zoo_sae(args.model, args.hook, args.out, device=args.device, **settings)
    else:
        import lenslab
        from lenslab.probes.features import read_corpus

        model = lenslab.load_model(args.model, device=args.device)
        sae = S.train_sae(
            model,
            args.hook,
            corpus=read_corpus(args.corpus),
            out_dir=args.out,
            context_size=args.context_size,
            threads=args.threads,
            **settings,
        )
        metrics = S.read_metrics(args.out)
    for name, m in metrics.items():
        print(
            f"{name}: loss recovered {m.loss_recovered:.3f}, explained variance {m.explained_variance:.3f}, "
            f"L0 {m.l0:.1f}, dead {m.dead_fraction:.1%} (clean {m.ce_loss_clean:.4f}, spliced {m.ce_loss_spliced:.4f}, "
            f"zero-ablated {m.ce_loss_zero:.4f})"
        )
    print(
        f"lenslab: wrote a {sae.cfg.architecture()} SAE ({sae.cfg.d_in} -> {sae.cfg.d_sae}) for {args.hook} to {args.out} "
        "(card.md, metrics.json, sae-lens files)"
    )
    return 0


def _cmd_sae_features(args: argparse.Namespace) -> int:
    """`lenslab sae index|lookup|export|search` (lenslab.probes.features)."""
    import time

    import lenslab
    from lenslab.figures import FORMATS, export
    from lenslab.probes import features as F

    cmd = args.sae_command
    out = Path(args.out) if getattr(args, "out", None) else None
    if cmd == "export":
        if out.suffix.lower() not in FORMATS:
            raise LenslabError(
                f"--out {out.name!r}: use .html (standalone dashboard), .json (Neuronpedia-like fields) "
                f"or a figure format ({', '.join(FORMATS)})"
            )
        model = lenslab.load_model(args.model, device=args.device) if args.model else None
        sae = F._open_sae(args.sae, model) if args.sae else None
        dash = F.FeatureDashboard.from_store(args.store, args.feature, model, sae, n_contexts=args.n_contexts)
        path = dash.save(out)
        print(
            f"feature {dash.feature}: density {dash.density:.3%}, max {dash.max_act:.4g}, {len(dash.contexts)} contexts; "
            f"promotes {', '.join(repr(t) for t, _ in dash.pos_logits[:5])}"
        )
        print(f"lenslab: wrote {path}")
        return 0
    if cmd == "search":
        res = F.search(
            args.store, token=args.token, substring=args.substring, feature=args.feature, k=args.k, by=args.by
        )
        print(res.table())
        if out is not None:
            print(f"lenslab: wrote {export(res, out)}")
        return 0
    if out is not None and cmd == "lookup" and out.suffix.lower() not in FORMATS:
        raise LenslabError(f"--out {out.name!r}: the extension picks the format, one of {', '.join(FORMATS)}")
    model = lenslab.load_model(args.model, device=args.device)
    if not args.sae:
        raise LenslabError(
            "pass --sae: a folder saved by sae-lens (or a zoo SAE name once `lenslab sae train` made one)"
        )
    sae = F._open_sae(args.sae, model)
    if cmd == "index":
        corpus = F.corpus_for(model, args.n_docs) if args.corpus == "zoo" else F.read_corpus(args.corpus)
        before = 0
        if out.exists() and not args.no_resume:
            with F.FeatureStore(out) as old:
                before = old.total_tokens
        t0 = time.perf_counter()
        store = F.index(
            model,
            sae,
            corpus,
            out,
            batch_size=args.batch_size,
            context_size=args.context_size,
            top_n=args.top_n,
            resume=not args.no_resume,
            sae_source=args.sae,
        )
        dt = time.perf_counter() - t0
        alive = int((store.arrays()["n_fire"] > 0).sum())
        print(store.describe())
        done = store.total_tokens - before
        print(
            f"{alive} of {store.d_sae} features fire; {done} tokens indexed this run"
            + (f" ({done / dt:,.0f} tokens/s, {dt:.1f} s)" if done else " (the store was already complete)")
        )
        store.close()
        print(f"lenslab: wrote {out}")
    else:
        res = F.lookup(model, sae, args.prompt, k=args.k)
        print(res.table())
        if out is not None:
            print(f"lenslab: wrote {export(res, out)}")
    return 0


def _sae_subparsers(sub):
    """The `lenslab sae` sub-command group, created once (train in probes.sae; index, lookup,
    export, search in probes.features)."""
    if "sae" in sub.choices:
        return next(a for a in sub.choices["sae"]._actions if isinstance(a, argparse._SubParsersAction))
    sa = sub.add_parser("sae", help="sparse autoencoders: train, index a corpus, look up features, dashboards, search")
    return sa.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lenslab", description="lenslab: mechanistic-interpretability and steering workbench"
    )
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
    zt.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default: the script's recipe; a few for a smoke run)"
    )
    zt.set_defaults(func=_cmd_zoo_train)

    c = sub.add_parser("circuits", help="activation patching, attribution, faithfulness, circuit graphs")
    csub = c.add_subparsers(dest="circuits_command", required=True, metavar="CIRCUITS_COMMAND")

    def common(sp, site_help: str, many_sites: bool) -> None:
        sp.add_argument("--model", default="zoo/ioi-4l", help="zoo name, HF id or local dir (default zoo/ioi-4l)")
        sp.add_argument(
            "--task", default="ioi", help="ioi, ioi-heldout, induction, or a JSON file {clean, corrupt, answers}"
        )
        sp.add_argument("--n", type=int, default=16, help="prompts for a built-in task (default 16)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument(
            "--metric", default="logit_diff", help="logit_diff, logit_diff_normalized, answer_prob, kl_to_clean"
        )
        sp.add_argument("--device", default="auto")
        sp.add_argument(
            "--out", required=True, help="output file; the extension picks the format: .json .svg .png .pdf .html"
        )
        if site_help:
            sp.add_argument("--site", nargs="+" if many_sites else None, required=True, help=site_help)
            sp.add_argument("--layer", type=int, default=None, help="MLP layer for --site mlp_neuron")

    cp = csub.add_parser("patch", help="exact activation patching of one site")
    common(
        cp,
        "resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, z_by_pos, q, k, v, q_by_pos, ..., pattern, mlp_neuron",
        False,
    )
    cp.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    ca = csub.add_parser("attribute", help="AtP / AtP* / RelP / IG attribution of one or more sites")
    common(ca, "one or more sites (one output file per site when several)", True)
    ca.add_argument("--method", required=True, choices=["atp", "atp*", "relp", "ig"])
    ca.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    ca.add_argument("--steps", type=int, default=10, help="interpolation steps for ig")
    cf = csub.add_parser("faithfulness", help="correlation of attribution methods with exact patching")
    common(cf, "sites to compare", True)
    cf.add_argument("--method", nargs="+", default=["atp", "relp"], choices=["atp", "atp*", "relp", "ig"])
    cf.add_argument("--steps", type=int, default=10)
    cg = csub.add_parser("graph", help="circuit graph from EAP / EAP-IG edge scores, or from exact node patching")
    common(cg, "", False)
    cg.add_argument(
        "--method",
        default="eap-ig",
        choices=["eap", "eap-ig", "nodes"],
        help="eap / eap-ig: edges; nodes: top heads and MLPs by exact patching (no edges)",
    )
    cg.add_argument("--steps", type=int, default=5, help="interpolation steps for eap-ig")
    cg.add_argument("--top-k", type=int, default=20)
    cg.add_argument("--threshold", type=float, default=None)
    for sp in (cp, ca, cf, cg):
        sp.set_defaults(func=_cmd_circuits)

    s = sub.add_parser("sinks", help="attention sinks and massive activations")
    ssub = s.add_subparsers(dest="sinks_command", required=True, metavar="SINKS_COMMAND")
    for cmd, hlp in (
        ("attention", "per-head attention to the first token and the sink rate (Gu et al.)"),
        ("massive", "the largest residual entries per layer and the massive ones (Sun et al.)"),
        ("ablate", "set the massive activations to zero or their mean: loss and sink rate"),
    ):
        sp = ssub.add_parser(cmd, help=hlp)
        sp.add_argument("--model", default="zoo/ioi-4l", help="zoo name, HF id or local dir (default zoo/ioi-4l)")
        sp.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the model's default prompt)")
        sp.add_argument("--threshold", type=float, default=0.3, help="sink threshold epsilon in (0, 1)")
        sp.add_argument("--absolute", type=float, default=100.0, help="massive if |a| > this (0: no absolute bar)")
        sp.add_argument(
            "--ratio", type=float, default=1000.0, help="... and |a| >= this x the median (0: no ratio bar)"
        )
        sp.add_argument("--mode", default="mean", choices=["mean", "zero"], help="ablate: the value set")
        sp.add_argument("--device", default="auto")
        sp.add_argument(
            "--out", required=True, help="output file; the extension picks the format: .json .svg .png .pdf .html"
        )
        sp.set_defaults(func=_cmd_sinks)

    sx = ssub.add_parser(
        "experts",
        help="MoE super experts (Su et al.): max |down_proj output| per expert, "
        "the outliers, and (--prune) pruning them vs random experts",
    )
    sx.add_argument("--model", default="zoo/moe-refusal", help="a MoE model: zoo name, HF id or local dir")
    sx.add_argument(
        "--prompts", nargs="+", default=None, help="calibration prompts (default: the model's default prompt)"
    )
    sx.add_argument(
        "--rule",
        default="su",
        choices=["su", "p99.5", "mean+3std", "50xmean"],
        help="su: > P99.5 and > floor(max / 10) (Su et al.)",
    )
    sx.add_argument(
        "--include-layers", type=float, default=0.75, help="rules consider layers l < round(this x n_layers)"
    )
    sx.add_argument("--prune", action="store_true", help="prune the super experts; loss, sinks, massive activations")
    sx.add_argument(
        "--experts",
        nargs="+",
        default=None,
        metavar="L:E",
        help="with --prune: prune these instead of the super experts (L:-1 is a shared expert)",
    )
    sx.add_argument("--random-draws", type=int, default=5, help="with --prune: random control sets")
    sx.add_argument("--seed", type=int, default=0)
    sx.add_argument("--threshold", type=float, default=0.3, help="sink threshold epsilon in (0, 1)")
    sx.add_argument("--absolute", type=float, default=100.0, help="massive if |a| > this (0: no absolute bar)")
    sx.add_argument("--ratio", type=float, default=1000.0, help="... and |a| >= this x the median (0: no ratio bar)")
    sx.add_argument("--device", default="auto")
    sx.add_argument(
        "--out", required=True, help="output file; the extension picks the format: .json .svg .png .pdf .html"
    )
    sx.set_defaults(func=_cmd_sinks_experts)

    e = sub.add_parser("moe", help="Mixture-of-Experts: router inspection, fTRI expert ranking, expert switching")
    esub = e.add_subparsers(dest="moe_command", required=True, metavar="MOE_COMMAND")
    ei = esub.add_parser("inspect", help="chosen experts per token and layer, and the expert load")
    ei.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the model's default prompt)")
    er = esub.add_parser("rank", help="fTRI (MoTE): rank (layer, expert) by target-class minus other-class usage")
    for which in ("target", "other"):
        er.add_argument(
            f"--{which}",
            nargs="+",
            default=None,
            help=f"{which} prompts (default: the zoo model's '{which}' prompt set)",
        )
        er.add_argument(f"--{which}-file", default=None, help=f"{which} prompts, one per line")
    er.add_argument("--weights", action="store_true", help="sum gate weights instead of counting selections")
    er.add_argument("--top-k", type=int, default=10)
    eg = esub.add_parser("generate", help="generate with experts switched off or forced on, next to the baseline")
    eg.add_argument("--prompt", default=None, help="prompt (default: the model's default prompt)")
    eg.add_argument("--off", nargs="+", type=_experts_arg, default=None, metavar="L:E", help="experts to switch off")
    eg.add_argument("--on", nargs="+", type=_experts_arg, default=None, metavar="L:E", help="experts to force on")
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
    for sp in (ei, er, eg):
        sp.add_argument("--model", default="zoo/moe-refusal", help="a MoE model: zoo name, HF id or local dir")
        sp.add_argument("--device", default="auto")
        if sp is not eg:
            sp.add_argument(
                "--out", required=True, help="output file; the extension picks the format: .json .svg .png .pdf .html"
            )
        sp.set_defaults(func=_cmd_moe)

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
        "prompts' activations (source) onto the positive ones' (target)",
    )
    for which in ("positive", "negative"):
        sf.add_argument(
            f"--{which}",
            nargs="+",
            default=None,
            help=f"{which} prompts (default: the zoo model's '{which}' prompt set)",
        )
        sf.add_argument(f"--{which}-file", default=None, help=f"{which} prompts, one per line")
    _steer_fit_options(sf)
    sf.add_argument("--strength", type=float, default=1.0, help="the preset's strength (default 1)")
    sf.add_argument("--out", required=True, help="preset .json (its tensors go to a .safetensors file beside it)")
    sg = stsub.add_parser("generate", help="the prompt's continuation unsteered and steered (same seed), streamed")
    sg.add_argument("--preset", required=True, help="a preset .json from `lenslab steer fit`")
    sg.add_argument("--prompt", default=None, help="prompt (default: the model's default prompt)")
    sg.add_argument("--strength", type=float, default=None, help="rescale the preset (default: its saved strength)")
    sg.add_argument("--max-new-tokens", type=int, default=20)
    sg.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    sg.add_argument("--seed", type=int, default=0)
    se_ = stsub.add_parser("eval", help="concept rate against fluency across strengths, one line per preset or method")
    se_.add_argument("--preset", nargs="+", default=None, help="one or more preset .json files")
    se_.add_argument(
        "--method",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"instead of presets: refit these methods ({', '.join(STEER_METHODS)}) on each seed's fitting "
        "prompts and evaluate on its held-out prompts (models with seeded prompt sets: "
        "zoo/steer-sentiment)",
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
    _steer_fit_options(se_)
    se_.set_defaults(strength=1.0)
    se_.add_argument("--prompts", nargs="+", default=None, help="evaluation prompts (default: --prompt-set)")
    se_.add_argument(
        "--prompt-set", default="negative", help="the zoo model's prompt set to evaluate on (default negative)"
    )
    se_.add_argument("--strengths", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0])
    se_.add_argument(
        "--score",
        default="positive",
        help="the concept scorer: positive (lenslab._sentiment.is_positive: "
        "more positive than negative sentiment words)",
    )
    se_.add_argument("--max-new-tokens", type=int, default=12)
    se_.add_argument(
        "--out", default=None, help="also write the result; the extension picks the format: .json .svg .png .pdf .html"
    )
    for sp in (sf, sg, se_):
        sp.add_argument(
            "--model", default="zoo/steer-sentiment", help="zoo name, HF id or local dir (default zoo/steer-sentiment)"
        )
        sp.add_argument("--device", default="auto")
        sp.set_defaults(func=_cmd_steer)

    # `lenslab sae train` (lenslab.probes.sae); index|lookup|export|search (lenslab.probes.features) follow
    sat = _sae_subparsers(sub).add_parser(
        "train", help="train an SAE with sae-lens's trainer, offline, on a zoo model's built-in corpus or --corpus FILE"
    )
    sat.add_argument("--model", required=True, help="zoo name, HF id or local dir")
    sat.add_argument("--hook", required=True, help="hook point, e.g. blocks.2.hook_resid_post")
    sat.add_argument("--out", required=True, help="output folder (sae-lens files, card.md, metrics.json)")
    sat.add_argument(
        "--corpus",
        default=None,
        help="documents: .txt (one per line), .json (strings or token-id lists) "
        "or .jsonl; default: the zoo model's built-in corpus and recipe "
        "(rebuilds the shipped SAEs exactly)",
    )
    sat.add_argument(
        "--d-sae", type=int, default=None, help="features (default: the recipe's, else 4 x the hook width)"
    )
    sat.add_argument("--k", type=int, default=None, help="TopK SAE with k active features (default 16)")
    sat.add_argument("--l1", type=float, default=None, help="a standard ReLU + L1 SAE with this coefficient instead")
    sat.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 4e-3)")
    sat.add_argument("--training-tokens", type=int, default=None, help="activations trained on (default 300000)")
    sat.add_argument("--batch-size-tokens", type=int, default=None, help="activations per step (default 512)")
    sat.add_argument(
        "--context-size", type=int, default=None, help="--corpus: tokens per row (default: longest document)"
    )
    sat.add_argument("--seed", type=int, default=None, help="default 0")
    sat.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    sat.add_argument("--device", default="cpu", help="default cpu (the shipped SAEs were trained there)")
    sat.set_defaults(func=_cmd_sae_train)
    # --- end of `lenslab sae train` ---

    sasub = _sae_subparsers(sub)
    si = sasub.add_parser(
        "index",
        help="run a model + SAE over a corpus once: feature statistics and top contexts "
        "in a SQLite store (resumes an interrupted run)",
    )
    si.add_argument(
        "--corpus",
        default="zoo",
        help="'zoo' (the zoo model's built-in corpus) or a file: .txt (one "
        "document per line), .json (list of strings or token-id lists), .jsonl",
    )
    si.add_argument("--n-docs", type=int, default=512, help="documents of the zoo corpus (default 512)")
    si.add_argument("--batch-size", type=int, default=16)
    si.add_argument("--context-size", type=int, default=64, help="documents are truncated to this many tokens")
    si.add_argument("--top-n", type=int, default=20, help="contexts kept per feature")
    si.add_argument("--no-resume", action="store_true", help="start over even if --out holds a partial store")
    si.add_argument("--out", required=True, help="the store, e.g. store.sqlite")
    sl = sasub.add_parser("lookup", help="the top-k SAE features of each token of a prompt")
    sl.add_argument("--prompt", required=True)
    sl.add_argument("--k", type=int, default=5)
    sl.add_argument("--out", default=None, help="also write the result: .json or a figure (.html .svg .png .pdf)")
    for sp in (si, sl):
        sp.add_argument("--model", required=True, help="zoo name, HF id or local dir")
        sp.add_argument(
            "--sae", default=None, help="the SAE: a folder saved by sae-lens, or a source probes.sae.load_sae accepts"
        )
        sp.add_argument("--device", default="auto")
        sp.set_defaults(func=_cmd_sae_features, sae_command="index" if sp is si else "lookup")
    sx_ = sasub.add_parser(
        "export", help="one feature's dashboard from a store: standalone .html or .json (Neuronpedia-like fields)"
    )
    sx_.add_argument("--store", required=True, help="a store from `lenslab sae index`")
    sx_.add_argument("--feature", type=int, required=True)
    sx_.add_argument("--out", required=True, help=".html, .json, or a figure format (.svg .png .pdf)")
    sx_.add_argument("--n-contexts", type=int, default=None, help="contexts shown (default: all stored)")
    sx_.add_argument("--model", default=None, help="with --sae: compute the logit effects now (default: those stored)")
    sx_.add_argument("--sae", default=None)
    sx_.add_argument("--device", default="auto")
    sx_.set_defaults(func=_cmd_sae_features, sae_command="export")
    ss = sasub.add_parser("search", help="features most active on a token or substring, or one feature's summary")
    sq = ss.add_mutually_exclusive_group(required=True)
    sq.add_argument("--token", default=None)
    sq.add_argument("--substring", default=None)
    sq.add_argument("--feature", type=int, default=None)
    ss.add_argument("--store", required=True)
    ss.add_argument("--k", type=int, default=10)
    ss.add_argument(
        "--by",
        default="max",
        choices=["max", "mean", "share"],
        help="rank by the maximum or mean activation on the matched tokens, or by share: the fraction of "
        "the feature's firing tokens that are matched (token-specific features first)",
    )
    ss.add_argument("--out", default=None, help="also write the result: .json or a figure format")
    ss.set_defaults(func=_cmd_sae_features, sae_command="search")
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
