"""`lenslab norms atlas|fit|trajectory|remove|compare` (lenslab.probes.atlas, lenslab.probes.trajectory,
lenslab.probes.ln_removal, lenslab.zoo.noln): the activation-maxima atlas of a model, the
five-parameter fit of a massive-activation trajectory read from a CSV or measured on a series of
checkpoints (trajectory), removing a model's norms by
fine-tuning, and the LN-free papers' claims measured on a model and its norm-free twin."""

from __future__ import annotations

import argparse
from pathlib import Path

import lenslab
from lenslab._errors import LenslabError
from lenslab.cli.common import add_device, add_model, add_out, add_prompts, out_path, prompts_or_default
from lenslab.figures import export


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("norms", help="activation maxima: the atlas of every hook, and their trajectory over training")
    ssub = s.add_subparsers(dest="norms_command", required=True, metavar="NORMS_COMMAND")

    sa = ssub.add_parser(
        "atlas",
        help="max |a| at every hook (embeddings, residual streams, attention/MLP outputs, gates, final norm), "
        "where it sits, the median and the INT8 absmax error",
    )
    add_model(sa, "zoo/ioi-4l")
    add_prompts(sa)
    sa.add_argument("--kinds", nargs="+", default=None, metavar="KIND", help="hook kinds to read (default all)")
    sa.add_argument("--top-k", type=int, default=5, help="largest entries kept per hook")
    sa.add_argument("--batch-size", type=int, default=None, help="at most this many prompts per forward pass")
    add_device(sa)
    add_out(sa)
    sa.set_defaults(func=cmd_atlas)

    sf = ssub.add_parser(
        "fit",
        help="fit A·exp(-λx)·log(x) + K, x = γt + t0 (Gallego-Feliciano et al.) to a step,value CSV",
    )
    sf.add_argument("--csv", required=True, help="a CSV of step,value rows (a header row is skipped)")
    sf.add_argument("--label", default=None, help="what the values are (default: the CSV's value header, or 'value')")
    sf.add_argument("--max-nfev", type=int, default=500, help="evaluation budget of the fit (SciPy's default)")
    add_out(sf)
    sf.set_defaults(func=cmd_fit)

    st = ssub.add_parser(
        "trajectory",
        help="massive activations over training: the top |a| and the sink rate of every checkpoint of a series, "
        "and the five-parameter fit",
    )
    st.add_argument(
        "--checkpoints",
        required=True,
        metavar="FOLDER",
        help="a folder of checkpoints (step{N}/ sub-folders, e.g. from `lenslab zoo train NAME --checkpoints DIR`) "
        "or a zoo series (zoo/norm-study/pre-2l)",
    )
    add_prompts(st, "prompts (default: the first checkpoint's default prompt)")
    st.add_argument(
        "--metric", default="top_magnitude", choices=["top_magnitude", "sink_rate"], help="the series to fit"
    )
    st.add_argument("--threshold", type=float, default=0.3, help="sink threshold epsilon in (0, 1)")
    st.add_argument("--max-nfev", type=int, default=2000, help="evaluation budget of the fit")
    add_device(st, default="cpu")
    add_out(st, "output file for the series (.json, or a figure: .svg .png .pdf .html)", required=False)
    st.set_defaults(func=cmd_trajectory)

    sr = ssub.add_parser(
        "remove",
        help="remove every LayerNorm/RMSNorm by fixing its scale and fine-tuning (Heimersheim 2024; Baroni et al. "
        "2025); writes a norm-free model folder",
    )
    add_model(sr)
    sr.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        help="fine-tune and evaluate on these texts (next-token loss); default: the zoo model's built-in corpus",
    )
    sr.add_argument("--steps", type=int, default=20, help="fine-tuning steps after each norm is fixed (0: none)")
    sr.add_argument("--batch-size", type=int, default=32, help="rows per fine-tuning step")
    sr.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    sr.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning batches")
    add_device(sr, default="cpu")
    add_out(
        sr,
        "folder to write the norm-free model to (config.json, model.safetensors, card.md, removal.json)",
        suffixes=None,
        why="",
    )
    sr.set_defaults(func=cmd_remove)

    sc = ssub.add_parser(
        "compare",
        help="the LN-free papers' claims on a model and its norm-free twin: DLA vs the exact direct effect, AtP vs "
        "exact patching, the planted mechanism",
    )
    add_model(sc, "zoo/ioi-4l", help="the model with norms (default zoo/ioi-4l)")
    sc.add_argument(
        "--free",
        default=None,
        help="its norm-free twin (a folder from `lenslab norms remove`, or a name); default the zoo twin <model>-noln",
    )
    sc.add_argument("--task", default=None, help="task of the attribution rows (default: the model's built-in task)")
    sc.add_argument(
        "--stored",
        action="store_true",
        help="print the table measured when the zoo twin was built instead of measuring again",
    )
    add_out(
        sc, "write the table to this .json", required=False, suffixes=(".json",), why="the table is written as JSON"
    )
    sc.set_defaults(func=cmd_compare)


def cmd_atlas(args: argparse.Namespace) -> int:
    from lenslab.probes import atlas  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    result = atlas.activation_atlas(
        model, prompts_or_default(args), kinds=args.kinds, top_k=args.top_k, batch_size=args.batch_size
    )
    g = result.global_max()
    c = result.correlation
    r = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    print(
        f"{len(result.hooks)} hooks ({len(result.skipped)} skipped); max |a| {g['max_abs']:.4g} at {g['hook']} "
        f"(sample {g['sample']}, position {g['pos']} {g['token']!r}, channel {g['channel']}), "
        f"{r(g['ratio'], '.4g')} x its median; INT8 relative RMSE vs max |a|: "
        f"Pearson {r(c.get('pearson'))}, Spearman {r(c.get('spearman'))}"
    )
    print(f"lenslab: wrote {export(result, out)}")
    return 0


def read_series(path: str | Path) -> tuple[list[float], list[float], str | None]:
    """`(steps, values, value header or None)` from a CSV file of step,value rows
    (`lenslab.probes.trajectory.read_series`)."""
    from lenslab.probes import trajectory  # deferred: keeps CLI start-up fast

    file = Path(path)
    if not file.is_file():
        raise LenslabError(f"--csv {str(path)!r} does not exist; pass a CSV of step,value rows")
    return trajectory.read_series(file.read_text(), file.name)


def cmd_fit(args: argparse.Namespace) -> int:
    from lenslab.probes import trajectory  # deferred: keeps CLI start-up fast

    out = out_path(args)
    steps, values, header = read_series(args.csv)
    fit = trajectory.fit_trajectory(
        steps, values, label=args.label or header or "value", max_nfev=args.max_nfev, source=str(args.csv)
    )
    p, se = fit.params, fit.stderr
    fmt = lambda k: f"{k} {p[k]:.5g}" + ("" if se[k] is None else f" ± {se[k]:.2g}")
    print(
        ", ".join(fmt(k) for k in trajectory.PARAMS)
        + f"; R² {fit.r2:.4f}, RMSE {fit.rmse:.4g}"
        + ("" if fit.converged else " (did not converge)")
    )
    print(f"lenslab: wrote {export(fit, out)}")
    return 0


def cmd_trajectory(args: argparse.Namespace) -> int:
    from lenslab import zoo  # deferred: keeps CLI start-up fast
    from lenslab.probes import trajectory  # deferred: keeps CLI start-up fast
    from lenslab.zoo import checkpoints  # deferred: keeps CLI start-up fast

    out = out_path(args)
    folder = checkpoints.series_path(args.checkpoints)
    prompts = list(args.prompts) if args.prompts else None
    if prompts is None:
        first = min(
            (p for p in folder.iterdir() if (p / "config.json").is_file()),
            key=lambda p: (trajectory.checkpoint_step(p.name) is None, trajectory.checkpoint_step(p.name) or 0, p.name),
            default=None,
        )
        prompts = [(first and zoo.default_prompt(str(first))) or zoo.GENERIC_PROMPT]
    series = trajectory.measure_checkpoints(folder, prompts, threshold=args.threshold, device=args.device)
    print(series.table().to_string(index=False))
    label = series.METRICS[args.metric]
    if len(series.steps) < trajectory.MIN_POINTS:
        print(f"({label}: {len(series.steps)} checkpoints; the five-parameter fit needs {trajectory.MIN_POINTS})")
    else:
        fit = series.fit(args.metric, max_nfev=args.max_nfev)
        p, se = fit.params, fit.stderr
        fmt = lambda k: f"{k} {p[k]:.5g}" + ("" if se[k] is None else f" ± {se[k]:.2g}")
        print(
            f"fit of the {label}: "
            + ", ".join(fmt(k) for k in trajectory.PARAMS)
            + f"; R² {fit.r2:.4f}, RMSE {fit.rmse:.4g}"
            + ("" if fit.converged else " (did not converge)")
        )
    if out is not None:
        print(f"lenslab: wrote {export(series, out)}")
    return 0


def removal_data(model, name: str, prompts: list[str] | None, seed: int):
    """`(train, heldout)` for `lenslab norms remove`: the given prompts (both), an IOI zoo model's
    task prompts with their answers (its training loss), or a zoo model's built-in corpus."""
    from lenslab import tasks, zoo  # deferred: keeps CLI start-up fast
    from lenslab.probes import ln_removal  # deferred: keeps CLI start-up fast
    from lenslab.zoo import corpora  # deferred: keeps CLI start-up fast

    if prompts:
        data = ln_removal.lm_data(model, prompts)
        return data, data
    if zoo.default_prompts(name).task == "ioi" and name.startswith(zoo.PREFIX):
        train = [tasks.ioi(model, n=32, seed=seed + s) for s in range(40)]
        held = [tasks.ioi(model, n=32, seed=30_000 + seed + s) for s in range(8)]
        return ln_removal.task_data(model, train), ln_removal.task_data(model, held)
    train = corpora.corpus_for(model, n=256, seed=seed)
    held = corpora.corpus_for(model, n=64, seed=seed + 10_000)
    return ln_removal.lm_data(model, train), ln_removal.lm_data(model, held)


def cmd_remove(args: argparse.Namespace) -> int:
    from lenslab import zoo  # deferred: keeps CLI start-up fast
    from lenslab.probes import ln_removal  # deferred: keeps CLI start-up fast

    out = out_path(args)
    if args.steps < 0:
        raise LenslabError(f"--steps must be 0 or more, got {args.steps}")
    model = lenslab.load_model(args.model, device=args.device)
    ln_removal.norm_names(model)  # a model without norms (or one this cannot handle) fails here, before any data
    train, held = removal_data(model, args.model, args.prompts, args.seed)
    free, result = ln_removal.remove_norms(
        model, train, held, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    card = (
        f"# {args.model} without normalisation\n\nMade by `lenslab norms remove --model {args.model} --steps "
        f"{args.steps} --seed {args.seed}` (lenslab.probes.ln_removal).\n\n{result.to_markdown()}\n"
    )
    extra = {"default_prompt": zoo.default_prompts(args.model).prompt, "ln_removal": result.to_dict()}
    zoo.save_hooked(free, model.tokenizer, out, summary=f"{args.model} without normalisation", card=card, extra=extra)
    result.to_json(out / "removal.json")
    print(
        f"held-out loss {result.loss_original:.4f} with norms, {result.loss_final:.4f} without ({result.loss_gap:+.4f}); "
        f"{len(result.stages)} norms removed, {result.tokens_used} fine-tuning tokens"
    )
    print(f"lenslab: wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lenslab.zoo import noln  # deferred: keeps CLI start-up fast

    out = out_path(args)
    free = args.free or noln.twin_of(args.model)
    if free is None:
        raise LenslabError(
            f"{args.model} has no norm-free twin in the zoo: make one with `lenslab norms remove --model {args.model} "
            "--out DIR` and pass --free DIR"
        )
    table = noln.stored_claims(args.model) if args.stored and not args.free else None
    if args.stored and table is None:
        raise LenslabError(
            f"no stored table for {args.model}: --stored reads a zoo twin's card; drop --stored to measure"
        )
    if table is None:
        table = noln.claims(args.model, free, task=args.task)
    print(table.to_markdown())
    if out:
        table.to_json(out)
        print(f"lenslab: wrote {out}")
    return 0
