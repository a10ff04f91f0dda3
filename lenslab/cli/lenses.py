"""`lenslab lens logit|tuned|kl|train` (lenslab.probes.lenses): the logit lens and the tuned lens of
a prompt, their KL per layer on a corpus, and training a tuned lens."""

from __future__ import annotations

import argparse

import lenslab
from lenslab._errors import LenslabError
from lenslab.cli.common import add_device, add_model, add_out, add_prompt, out_path, prompt_or_default
from lenslab.figures import export

LENS_HELP = (
    "the tuned lens: a folder (lenslab's translators.safetensors or tuned-lens's params.pt, with config.json), "
    "a zoo model name, or a tuned-lens Hub id such as gpt2 (online); default: the zoo model's shipped lens"
)
CORPUS_HELP = (
    "documents: .txt (one per line), .json (strings or token-id lists) or .jsonl; default: the zoo model's "
    "built-in corpus (`lenslab.zoo.corpora.corpus_for`)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("lens", help="the logit lens and the tuned lens: each layer's next-token prediction")
    ssub = s.add_subparsers(dest="lens_command", required=True, metavar="LENS_COMMAND")
    for cmd, hlp in (
        ("logit", "the logit lens of a prompt: final norm + unembedding of every layer's residual stream"),
        ("tuned", "the tuned lens of a prompt: each layer's trained affine translator first (Belrose et al.)"),
    ):
        sp = ssub.add_parser(cmd, help=hlp)
        add_model(sp, "zoo/ioi-4l")
        add_prompt(sp)
        sp.add_argument("--k", type=int, default=5, help="top tokens kept per layer and position (default 5)")
        if cmd == "tuned":
            sp.add_argument("--lens", default=None, help=LENS_HELP)
        add_device(sp)
        add_out(sp, "also write the result: .json or a figure (.html .svg .png .pdf)", required=False)
        sp.set_defaults(func=cmd_read)

    sk = ssub.add_parser("kl", help="KL per layer from the model's output to the logit lens and the tuned lens")
    add_model(sk, "zoo/ioi-4l")
    sk.add_argument("--lens", default=None, help=LENS_HELP)
    sk.add_argument("--corpus", default=None, help=CORPUS_HELP)
    sk.add_argument("--n-docs", type=int, default=256, help="documents of the zoo corpus (default 256)")
    sk.add_argument("--seed", type=int, default=2000, help="seed of the zoo corpus (default 2000: the cards' held-out)")
    add_device(sk)
    add_out(sk, "also write the result: .json or a figure (.html .svg .png .pdf)", required=False)
    sk.set_defaults(func=cmd_kl)

    st = ssub.add_parser(
        "train", help="train a tuned lens (tuned-lens's recipe, scaled down) on a zoo model's corpus or --corpus FILE"
    )
    add_model(st)
    add_out(st, "output folder (config.json, translators.safetensors; card.md for zoo recipes)", suffixes=None)
    st.add_argument("--corpus", default=None, help=CORPUS_HELP + " and recipe (rebuilds the shipped lens exactly)")
    st.add_argument("--steps", type=int, default=None, help="SGD steps (default 250)")
    st.add_argument("--tokens-per-step", type=int, default=None, help="corpus tokens per step (default 2048)")
    st.add_argument("--lr", type=float, default=None, help="learning rate, tuned-lens's lr_scale (default 1.0)")
    st.add_argument("--seed", type=int, default=None, help="orders the rows (default 0)")
    st.add_argument("--threads", type=int, default=1, help="--corpus: torch threads while training (default 1)")
    add_device(st, "cpu", "default cpu (the shipped lenses were trained there)")
    st.set_defaults(func=cmd_train)


def cmd_read(args: argparse.Namespace) -> int:
    """`lenslab lens logit|tuned`: each layer's top prediction at the last position, and --out."""
    from lenslab.probes import lenses  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    prompt = prompt_or_default(args)
    if args.lens_command == "logit":
        result = lenses.logit_lens(model, prompt, k=args.k)
    else:
        result = lenses.tuned_lens(model, prompt, args.lens, k=args.k)
    print(f"{result.lens} lens of {result.model} on {prompt!r}; top prediction after the last token, per layer:")
    for li, label in enumerate(result.layer_labels):
        print(f"  {label:>10}: {result.top_tokens[li][-1][0]!r} (p={float(result.top_probs[li, -1, 0]):.3f})")
    if out is not None:
        print(f"lenslab: wrote {export(result, out)}")
    return 0


def cmd_kl(args: argparse.Namespace) -> int:
    """`lenslab lens kl`: KL per layer of both lenses on a corpus."""
    from lenslab.probes import lenses  # deferred: keeps CLI start-up fast
    from lenslab.probes.features import read_corpus  # deferred: keeps CLI start-up fast
    from lenslab.zoo.corpora import corpus_for  # deferred: keeps CLI start-up fast

    out = out_path(args)
    model = lenslab.load_model(args.model, device=args.device)
    corpus = corpus_for(model, args.n_docs, args.seed) if args.corpus is None else read_corpus(args.corpus)
    result = lenses.lens_kl(model, args.lens, corpus, progress=True)
    print(f"KL(model output || lens) in nats on {result.n_tokens:,} tokens of {result.model}:")
    print(result.to_markdown())
    if out is not None:
        print(f"lenslab: wrote {export(result, out)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`lenslab lens train`: a zoo model's corpus and recipe, or --corpus FILE."""
    from lenslab.probes import lenses  # deferred: keeps CLI start-up fast
    from lenslab.probes.features import read_corpus  # deferred: keeps CLI start-up fast
    from lenslab.zoo import train_lenses  # deferred: keeps CLI start-up fast

    out = out_path(args)
    settings = {k: getattr(args, k) for k in ("steps", "tokens_per_step", "lr", "seed")}
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.corpus is None:
        if not args.model.startswith("zoo/") and "zoo/" + args.model not in train_lenses.MODELS:
            raise LenslabError(f"{args.model!r} has no built-in corpus: pass --corpus FILE (documents to train on)")
        lens, kl = train_lenses.build_zoo_lens(args.model, out, device=args.device, **settings)
        print(kl.to_markdown())
    else:
        model = lenslab.load_model(args.model, device=args.device)
        lens = lenses.train_tuned_lens(model, read_corpus(args.corpus), out_dir=out, threads=args.threads, **settings)
    print(
        f"lenslab: wrote a tuned lens ({lens.n_layers} translators of width {lens.d_model}) to {args.out}; "
        f"read with `lenslab lens tuned --model {args.model} --lens {args.out}`"
    )
    return 0
