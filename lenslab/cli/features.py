"""`lenslab sae train` (lenslab.probes.sae) and `lenslab sae index|lookup|export|search|convert`
(lenslab.probes.features): train a sparse autoencoder, index a corpus through it (here or on a Ray
cluster), read its features back, and convert a SQLite store of the first format."""

from __future__ import annotations

import argparse
import time

import lenslab
from lenslab._errors import LenslabError
from lenslab.cli.common import add_device, add_model, add_out, add_ray, group, out_path, ray_cluster
from lenslab.figures import FORMATS, export


def add_commands(sub: argparse._SubParsersAction) -> None:
    sasub = group(sub, "sae")
    sat = sasub.add_parser(
        "train", help="train an SAE with sae-lens's trainer, offline, on a zoo model's built-in corpus or --corpus FILE"
    )
    add_model(sat)
    sat.add_argument("--hook", required=True, help="hook point, e.g. blocks.2.hook_resid_post")
    add_out(sat, "output folder (sae-lens files, card.md, metrics.json)", suffixes=None)
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
    add_device(sat, "cpu", "default cpu (the shipped SAEs were trained there)")
    sat.set_defaults(func=cmd_train)

    si = sasub.add_parser(
        "index",
        help="run a model + SAE over a corpus once: feature statistics and top contexts "
        "in a store folder of Parquet tables (resumes an interrupted run; --ray: in parts on a Ray cluster)",
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
    si.add_argument(
        "--part-size",
        type=int,
        default=None,
        help="prompts per part: the unit of resumption and of work on --ray (default 64 batches)",
    )
    si.add_argument("--no-resume", action="store_true", help="start over even if --out holds a partial store")
    add_out(si, "the store folder, e.g. ioi_store", suffixes=None)
    add_ray(si, resume=False)
    si.set_defaults(func=cmd_index)
    sl = sasub.add_parser("lookup", help="the top-k SAE features of each token of a prompt")
    sl.add_argument("--prompt", required=True)
    sl.add_argument("--k", type=int, default=5)
    add_out(sl, "also write the result: .json or a figure (.html .svg .png .pdf)", required=False)
    sl.set_defaults(func=cmd_lookup)
    for sp in (si, sl):
        add_model(sp)
        sp.add_argument(
            "--sae", default=None, help="the SAE: a folder saved by sae-lens, or a source probes.sae.load_sae accepts"
        )
        add_device(sp)

    sx = sasub.add_parser(
        "export", help="one feature's dashboard from a store: standalone .html or .json (Neuronpedia-like fields)"
    )
    sx.add_argument("--store", required=True, help="a store from `lenslab sae index`")
    sx.add_argument("--feature", type=int, required=True)
    add_out(
        sx,
        ".html, .json, or a figure format (.svg .png .pdf)",
        why="use .html (standalone dashboard), .json (Neuronpedia-like fields) "
        f"or a figure format ({', '.join(FORMATS)})",
    )
    sx.add_argument("--n-contexts", type=int, default=None, help="contexts shown (default: all stored)")
    sx.add_argument("--model", default=None, help="with --sae: compute the logit effects now (default: those stored)")
    sx.add_argument("--sae", default=None)
    add_device(sx)
    sx.set_defaults(func=cmd_export)

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
    add_out(ss, "also write the result: .json or a figure format", required=False)
    ss.set_defaults(func=cmd_search)

    sc = sasub.add_parser(
        "convert", help="rewrite a SQLite feature store (the first format) as a store folder, numbers unchanged"
    )
    sc.add_argument("old", help="the SQLite store, e.g. ioi.sqlite")
    sc.add_argument("new", help="the store folder to write (must not exist)")
    sc.set_defaults(func=cmd_convert)


def cmd_train(args: argparse.Namespace) -> int:
    """`lenslab sae train`: a zoo model's built-in corpus and recipe, or --corpus FILE."""
    from lenslab.probes import sae as S  # deferred: keeps CLI start-up fast
    from lenslab.probes.features import read_corpus  # deferred: keeps CLI start-up fast
    from lenslab.zoo import train_saes as zoo_saes  # deferred: keeps CLI start-up fast

    out = out_path(args)
    settings = {k: getattr(args, k) for k in ("d_sae", "k", "l1", "lr", "training_tokens", "batch_size_tokens", "seed")}
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.corpus is None:
        if args.context_size is not None:
            raise LenslabError("--context-size applies to --corpus FILE; the zoo corpora have their own row length")
        sae, metrics = zoo_saes.build_zoo_sae(args.model, args.hook, out, device=args.device, **settings)
    else:
        model = lenslab.load_model(args.model, device=args.device)
        sae = S.train_sae(
            model,
            args.hook,
            corpus=read_corpus(args.corpus),
            out_dir=out,
            context_size=args.context_size,
            threads=args.threads,
            **settings,
        )
        metrics = S.read_metrics(out)
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


def _model_and_sae(args: argparse.Namespace):
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    model = lenslab.load_model(args.model, device=args.device)
    if not args.sae:
        raise LenslabError(
            "pass --sae: a folder saved by sae-lens (or a zoo SAE name once `lenslab sae train` made one)"
        )
    return model, F.open_sae(args.sae, model)


def cmd_index(args: argparse.Namespace) -> int:
    """`lenslab sae index`: feature statistics and top contexts of a corpus in a store folder."""
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    out = out_path(args)
    cluster = ray_cluster(args)
    model, sae = _model_and_sae(args)
    corpus = F.corpus_for(model, args.n_docs) if args.corpus == "zoo" else F.read_corpus(args.corpus)
    before = 0
    if out.is_dir() and not args.no_resume and F.is_store(out):
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
        part_size=args.part_size,
        resume=not args.no_resume,
        sae_source=args.sae,
        cluster=cluster,
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
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    """`lenslab sae lookup`: the top-k features of each token of --prompt."""
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model, sae = _model_and_sae(args)
    res = F.lookup(model, sae, args.prompt, k=args.k)
    print(res.to_text())
    if out is not None:
        print(f"lenslab: wrote {export(res, out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`lenslab sae export`: one feature's dashboard from a store."""
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device) if args.model else None
    sae = F.open_sae(args.sae, model) if args.sae else None
    dash = F.FeatureDashboard.from_store(args.store, args.feature, model, sae, n_contexts=args.n_contexts)
    path = dash.save(out)
    print(
        f"feature {dash.feature}: density {dash.density:.3%}, max {dash.max_act:.4g}, {len(dash.contexts)} contexts; "
        f"promotes {', '.join(repr(t) for t, _ in dash.pos_logits[:5])}"
    )
    print(f"lenslab: wrote {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """`lenslab sae search`: features most active on a token or substring, or one feature's summary."""
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    out = out_path(args)
    res = F.search(args.store, token=args.token, substring=args.substring, feature=args.feature, k=args.k, by=args.by)
    print(res.to_text())
    if out is not None:
        print(f"lenslab: wrote {export(res, out)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`lenslab sae convert OLD NEW`: a SQLite store of the first format rewritten as a store folder."""
    from lenslab.probes import features as F  # deferred: keeps CLI start-up fast

    with F.convert(args.old, args.new) as store:
        print(store.describe())
    print(f"lenslab: wrote {args.new}")
    return 0
