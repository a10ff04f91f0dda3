"""How word-level are the features of zoo/english-4l's SAE (docs/features.md)?

    python benchmarks/english_sae_features.py   # about 1 minute on one CPU thread

Runs the model on 256 windows of 128 tokens of its committed held-out text (`heldout.txt`, never
trained on; `train_english_4l.windows(..., seed=2000, split="heldout")`), encodes
`blocks.2.hook_resid_post` with the shipped SAE and, for every feature with at least 20 positive
activations, takes its 20 largest: the share of them that fall on one token string (case and leading
space ignored) says whether a feature is a token/word feature or groups several words. Writes
benchmarks/results/english_sae_features.{md,json}; docs/features.md includes the Markdown verbatim.
Deterministic.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch

import lenslab
from lenslab.probes import sae as S
from lenslab.zoo import train_english_4l as en

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAE = "zoo/english-4l/blocks.2.hook_resid_post"
TOP = 20
EXAMPLES = (280, 953, 7, 232, 84, 798, 1179)  # printed with their top tokens and one context


def measure(model, sae) -> dict:
    """Per live feature: its top-`TOP` activations' token strings; summary shares."""
    rows = en.windows(model, 256, seed=2000, split="heldout")
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=hook)
        acts = sae.encode(cache[hook]).reshape(-1, sae.cfg.d_sae)  # [tokens, d_sae]
    strs = model.to_str_tokens(rows.reshape(-1))
    features = {}
    for f in range(acts.shape[1]):
        values, idx = acts[:, f].topk(TOP)
        if (values > 0).sum() < TOP:
            continue
        words = collections.Counter(strs[j].strip().lower() for j in idx.tolist())
        j = int(idx[0])
        features[f] = {
            "top_words": words.most_common(3),
            "one_word_share": words.most_common(1)[0][1] / TOP,
            "context": "".join(strs[max(0, j - 6) : j]).replace("\n", " ") + "[" + strs[j] + "]",
        }
    shares = torch.tensor([v["one_word_share"] for v in features.values()])
    return {
        "sae": SAE,
        "tokens": int(acts.shape[0]),
        "live": int((acts > 0).any(0).sum()),
        "d_sae": int(acts.shape[1]),
        "with_top": len(features),
        "share_all_one_word": float((shares >= 1.0).float().mean()),
        "share_90": float((shares >= 0.9).float().mean()),
        "share_50": float((shares >= 0.5).float().mean()),
        "features": features,
    }


def markdown(r: dict) -> str:
    lines = [
        f"On {r['tokens']:,} held-out tokens, {r['live']:,} of the {r['d_sae']:,} features fire; {r['with_top']:,} fire "
        f"at least {TOP} times. Of those, the {TOP} largest activations fall on one token string for "
        f"{r['share_all_one_word']:.0%} of the features, on one string at least 90% of the time for {r['share_90']:.0%}, "
        f"and at least half the time for {r['share_50']:.0%}.",
        "",
        f"| feature | one-string share of its top {TOP} | most frequent tokens (count) | strongest context |",
        "|---|---|---|---|",
    ]
    for f in EXAMPLES:
        v = r["features"].get(f) or r["features"][str(f)]
        words = ", ".join(f"`{w}` ({n})" for w, n in v["top_words"])
        ctx = v["context"].replace("|", "\\|").replace("<bos>", "⟨bos⟩")
        lines.append(f"| {f} | {v['one_word_share']:.2f} | {words} | {ctx} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    model = lenslab.load_model("zoo/english-4l", device="cpu")
    sae = S.load_sae(SAE, model=model)
    r = measure(model, sae)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "english_sae_features.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / "english_sae_features.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
