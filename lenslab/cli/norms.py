"""`lenslab norms atlas|fit` (lenslab.probes.atlas, lenslab.probes.trajectory): the activation-maxima
atlas of a model, and the five-parameter fit of a massive-activation trajectory read from a CSV."""

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
        help="fit A·exp(-λx)·log(x) + K, x = γ(t - t0) (Gallego-Feliciano et al.) to a step,value CSV",
    )
    sf.add_argument("--csv", required=True, help="a CSV of step,value rows (a header row is skipped)")
    sf.add_argument("--label", default=None, help="what the values are (default: the CSV's value header, or 'value')")
    sf.add_argument("--max-nfev", type=int, default=2000, help="evaluation budget of the fit")
    add_out(sf)
    sf.set_defaults(func=cmd_fit)


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
