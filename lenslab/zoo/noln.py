"""LN-free twins of the zoo's text models, and the papers' interpretability claims on each pair.

Baroni et al. (2025, "Transformers Don't Need LayerNorm at Inference Time") and Heimersheim (2024)
claim three things of a model whose norms were removed by fine-tuning; `claims(original, free)`
measures them on a pair and returns a `NormClaims` table:

(a) direct logit attribution equals the exact direct effect (path patching into the logits,
    `circuits.path_patch(..., "logits")`) without norms, and not with them: the largest gap over
    the heads, DLA with `norm="none"` on the LN-free model and `norm="frozen"` on the original;
(b) attribution patching (AtP) agrees better, but not perfectly, with exact activation patching:
    Pearson / Spearman over each site's grid (`circuits.faithfulness`);
(c) the planted mechanism still works: each parent's own numbers (IOI accuracy, kept
    sentiment, held-out loss).

(a) and (b) use the parent's own task: IOI for ioi-4l; for steer-sentiment and english-4l a
"sentiment swap" (positive prompts against the same prompts with each positive word made
negative; "great" vs "awful", " good" vs " bad" next): english-4l has no planted task, and the
claims are about attribution, not about the task.

`build(parent, out_dir)` makes the twin `zoo/<parent>-noln` of steer-sentiment or english-4l with `probes.ln_removal.remove_norms` on the parent's own training distribution
(`TWINS`), then writes its card with the removal and the claims table. zoo/ioi-4l-noln was built
earlier by `train_ioi_4l_noln`, with the same procedure; its claims come from here too.
zoo/induction-2l has no twin: its shortformer positions are added after ln1, which no folded
norm-free HookedTransformer can express (`probes.ln_removal` says so and stops).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenslab import circuits, models, tasks, zoo
from lenslab._errors import LenslabError
from lenslab.probes import dla, ln_removal
from lenslab.results import Result, provenance

__all__ = ["TWINS", "NormClaims", "Twin", "build", "claims", "mechanism", "stored_claims", "twin_of", "write_card"]

SITES = ("z", "attn_out", "mlp_out")
CLAIM_SEED = 1  # seed of the task prompts of (a) and (b)
CLAIM_N = 32


@dataclass(frozen=True, kw_only=True)
class Twin:
    """How the LN-free twin of a zoo model is made (`remove_norms` arguments) and what it is scored on."""

    parent: str  # short zoo name, e.g. "steer-sentiment"
    data: Callable  # (model, seed) -> (train LMData, held-out LMData): the parent's training distribution
    steps: int = 30  # fine-tuning steps per norm
    batch: int = 32
    lr: float = 1e-4
    freeze: tuple[str, ...] = ("embed.", "unembed.")
    task: Callable | None = None  # model -> (spec, Task) of the attribution rows; None: the built-in task
    weights_dtype: torch.dtype = torch.float32  # how the twin's weights are stored (the parent's way)

    @property
    def name(self) -> str:
        return f"{self.parent}-noln"


def _ioi_data(model, seed: int):
    from lenslab.zoo import train_ioi_4l_noln  # deferred: the IOI recipe loads only for its twin

    return train_ioi_4l_noln.data(model)


def _sentiment_data(model, seed: int):
    """steer-sentiment's training rows (`<bos>` + one document, padded); every real next token scored."""
    import random  # deferred: only the sentiment twin draws documents

    from lenslab.zoo import train_steer_sentiment as parent  # deferred: the recipe loads only for its twin

    def rows(n: int, s: int) -> ln_removal.LMData:
        toks = parent.training_rows(model.tokenizer, random.Random(s), n)
        valid = toks != model.tokenizer.pad_token_id
        targets = valid.clone()
        targets[:, 0] = False
        return ln_removal.LMData(toks, targets, valid)

    return rows(4096, 70_000 + seed), rows(1024, 80_000 + seed)


def _swap_task(model, lexicon, answers: tuple[str, str], seed: int) -> tasks.Task:
    """CLAIM_N positive prompts of one token length against the same prompts with every positive word
    made negative (`lexicon`: `lenslab.data.sentiment` or `.english`; pairs of equal length only);
    `answers`: (positive, negative) one-token answers at the last position."""
    import re  # deferred: only the sentiment twins' tasks swap words
    from collections import Counter  # deferred: only the sentiment twins' tasks group prompts

    swap = dict(zip(lexicon.POSITIVE, lexicon.NEGATIVE))
    pairs = []
    for p in lexicon.prompts(20 * CLAIM_N, "positive", seed=seed):
        q = re.sub(r"[A-Za-z]+", lambda m: swap.get(m.group(0), m.group(0)), p)
        n = model.to_tokens(p).shape[1]
        if q != p and model.to_tokens(q).shape[1] == n:
            pairs.append((n, p, q))
    modal = Counter(n for n, _, _ in pairs).most_common(1)[0][0]
    pairs = [(p, q) for n, p, q in pairs if n == modal][:CLAIM_N]  # a Task's prompts share one length
    return tasks.from_prompts(
        model, [p for p, _ in pairs], [q for _, q in pairs], [answers] * len(pairs), name="sentiment swap"
    )


def _sentiment_task(model) -> tuple[str, tasks.Task]:
    """steer-sentiment's: its review prompts, "great" vs "awful" at the adjective slot."""
    from lenslab.data import sentiment  # deferred: only the sentiment twin's task needs the lexicon

    return "sentiment swap", _swap_task(model, sentiment, ("great", "awful"), 6000 + CLAIM_SEED)


def _english_task(model) -> tuple[str, tasks.Task]:
    """english-4l's: its steering prompts (`lenslab.data.english`), " good" vs " bad" next."""
    from lenslab.data import english  # deferred: only the English twin's task needs the lexicon

    return "sentiment swap", _swap_task(model, english, (" good", " bad"), 6000 + CLAIM_SEED)


def _refusal_data(model, seed: int):
    """moe-refusal's training rows (half benign tasks, half harmful prompts with the refusal); the
    answer tokens are scored, as in its training (without its router losses)."""
    from lenslab.zoo import train_moe_refusal as parent  # deferred: the recipe loads only for its twin

    def rows(n: int, s: int) -> ln_removal.LMData:
        ids, mask, route = parent.Rows(model.tokenizer, s).batch([("benign", False), ("harmful", False)] * (n // 2))
        targets = torch.zeros_like(mask)
        targets[:, 1:] = mask[:, :-1]  # mask[:, p]: position p predicts token p + 1
        return ln_removal.LMData(ids, targets, route >= 0)

    return rows(2048, 70_000 + seed), rows(512, 80_000 + seed)


def _english_data(model, seed: int):
    """Windows of english-4l's training split (needs the Debian corpus) and of its committed held-out text."""
    from lenslab.zoo import train_english_4l as parent  # deferred: the recipe loads only for its twin

    return (
        ln_removal.lm_data(model, parent.windows(model, 4096, 70_000 + seed, split="train")),
        ln_removal.lm_data(model, parent.windows(model, 256, 80_000 + seed)),
    )


TWINS = {
    "ioi-4l": Twin(parent="ioi-4l", data=_ioi_data),
    "steer-sentiment": Twin(parent="steer-sentiment", data=_sentiment_data, lr=3e-4, task=_sentiment_task),
    "moe-refusal": Twin(parent="moe-refusal", data=_refusal_data),
    "english-4l": Twin(
        parent="english-4l", data=_english_data, batch=16, weights_dtype=torch.float16, task=_english_task
    ),
}


def twin_of(name: str) -> str | None:
    """The zoo name of the LN-free twin of zoo model `name` if it is built, else None."""
    short = name.removeprefix(zoo.PREFIX)
    if short not in TWINS:
        return None
    twin = zoo.PREFIX + TWINS[short].name
    return twin if twin in zoo.zoo_names() else None


def stored_claims(name: str) -> NormClaims | None:
    """The claims table measured when zoo model `name`'s twin was built (its config.json), or None."""
    twin = twin_of(name)
    if twin is None:
        return None
    meta = json.loads((zoo.zoo_path(twin) / "config.json").read_text())
    return NormClaims.from_dict(meta["claims"]) if "claims" in meta else None


# --- (c) the planted mechanisms ----------------------------------------------------------------
def mechanism(model, parent: str) -> dict[str, float]:
    """The numbers that say `parent`'s planted mechanism works, measured on `model` (the parent or its twin)."""
    if parent == "ioi-4l":
        from lenslab.zoo import train_ioi_4l  # deferred: each parent's recipe loads only for it

        e = train_ioi_4l.evaluate(model, heldout=True)
        return {"held-out IOI accuracy": e["accuracy"], "held-out mean logit diff (IO − S)": e["mean_logit_diff"]}
    if parent == "steer-sentiment":
        from lenslab.zoo import train_steer_sentiment  # deferred: each parent's recipe loads only for it

        e = train_steer_sentiment.evaluate(model, continuations=False)
        return {
            "next word positive after positive context": e["positive"]["next_word"]["positive"],
            "next word negative after negative context": e["negative"]["next_word"]["negative"],
            "next word neutral after neutral context": e["neutral"]["next_word"]["neutral"],
        }
    if parent == "moe-refusal":
        from lenslab.zoo import train_moe_refusal  # deferred: each parent's recipe loads only for it

        e = train_moe_refusal.evaluate(model, n=60)["test"]
        return {
            "held-out refusal rate, harmful prompts": e["baseline"]["refusal_harmful"],
            "held-out refusal rate, benign prompts": e["baseline"]["refusal_benign"],
            "held-out task accuracy, benign prompts": e["baseline"]["accuracy_benign"],
            "refusal rate, harmful, planted experts off": e["planted off"]["refusal_harmful"],
        }
    if parent == "english-4l":
        from lenslab.zoo import train_english_4l  # deferred: each parent's recipe loads only for it

        return {
            "held-out loss (nats/token)": round(
                train_english_4l.heldout_loss(model, train_english_4l.token_stream(model)), 4
            )
        }
    raise LenslabError(f"no planted-mechanism measure for {parent!r}; known: {', '.join(TWINS)}")


# --- (a) and (b) ---------------------------------------------------------------------------------
def dla_gap(model, task: tasks.Task, norm: str) -> tuple[float, float]:
    """Max over heads of |DLA - exact direct effect|, in logits, and the largest |exact direct effect|
    of a head (the scale the gap is read against).

    DLA: clean minus corrupt contribution of each head at the last position (prompt mean) onto the
    logit difference; the exact direct effect: path patching each head's output into the logits
    only (denoising, `circuits.path_patch(model, task, "logits")`) minus the corrupt run's metric.
    """
    swap = tasks.Task(
        clean_tokens=task.corrupt_tokens,
        corrupt_tokens=task.clean_tokens,
        answer_tokens=task.answer_tokens,
        d_vocab=task.d_vocab,
    )
    a = dla.direct_logit_attribution(model, task=task, norm=norm)
    b = dla.direct_logit_attribution(model, task=swap, norm=norm)
    n_l, n_h = model.cfg.n_layers, model.cfg.n_heads
    heads = [a.index(f"L{l}H{h}") for l in range(n_l) for h in range(n_h)]
    d = (a.scores[:, -1, heads] - b.scores[:, -1, heads]).mean(0).reshape(n_l, n_h)
    pp = circuits.path_patch(model, task, "logits", progress=False)
    exact = pp.scores - pp.corrupt_value
    return float((d - exact).abs().max()), float(exact.abs().max())


def _attribution_claims(model, task: tasks.Task) -> dict[str, float]:
    norm = "none" if model.cfg.normalization_type is None else "frozen"
    gap, scale = dla_gap(model, task, norm)
    out = {"max abs(DLA − exact direct effect)": gap, "largest abs(exact direct effect) of a head": scale}
    sites = [s for s in SITES if not (s == "mlp_out" and model.cfg.attn_only)]
    faith = circuits.faithfulness(model, task, ["atp"], sites, progress=False).table()
    for row in faith.to_dict("records"):
        out[f"AtP vs exact patching, {row['site']}: Pearson"] = float(row["pearson"])
        out[f"AtP vs exact patching, {row['site']}: Spearman"] = float(row["spearman"])
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class NormClaims(Result):
    """The papers' claims measured on a model and its LN-free twin (`claims`).

    Attributes:
        original, free: the two models' names.
        task: the task of the attribution rows (a `tasks.from_spec` spec, CLAIM_N prompts, seed CLAIM_SEED).
        rows: measurement -> {"original": value, "free": value}, in the order measured.
    """

    KIND = "NormClaims"
    original: str
    free: str
    task: str
    rows: dict[str, dict[str, float]]
    provenance: dict = field(default_factory=dict)

    def value(self, label: str, which: str) -> float:
        """One cell: `which` is "original" or "free"."""
        if label not in self.rows:
            raise LenslabError(f"no row {label!r}; rows: {', '.join(self.rows)}")
        return self.rows[label][which]

    def table(self):
        """One row per measurement: original, LN-free, difference."""
        import pandas as pd  # deferred: pandas loads only when a table is asked for

        return pd.DataFrame(
            [
                {
                    "measurement": k,
                    self.original: v["original"],
                    self.free: v["free"],
                    "difference": v["free"] - v["original"],
                }
                for k, v in self.rows.items()
            ]
        )

    def to_markdown(self) -> str:
        lines = [f"| LN-free vs original | {self.original} | {self.free} |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['original'])} | {_fmt(v['free'])} |" for k, v in self.rows.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "original": self.original,
            "free": self.free,
            "task": self.task,
            # a list, not a dict: the measurements keep their order in a JSON written with sorted keys
            "rows": [{"measurement": k, **v} for k, v in self.rows.items()],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NormClaims:
        if d.get("kind") != cls.KIND:
            raise LenslabError(f"not a {cls.KIND} JSON (kind={d.get('kind')!r})")
        rows = {r["measurement"]: {"original": float(r["original"]), "free": float(r["free"])} for r in d["rows"]}
        return cls(
            original=d["original"], free=d["free"], task=d["task"], rows=rows, provenance=d.get("provenance") or {}
        )

    def figure(self):
        """The attribution rows (DLA gap, AtP correlations) as grouped bars, original vs LN-free."""
        import plotly.graph_objects as go  # deferred: plotly loads only when a figure is drawn

        from lenslab import figures  # deferred: figures load only when a figure is drawn

        keys = [k for k in self.rows if k.startswith(("max abs(DLA", "AtP"))]
        fig = go.Figure()
        for which, name in (("original", self.original), ("free", self.free)):
            fig.add_bar(x=keys, y=[self.rows[k][which] for k in keys], name=name)
        fig.update_layout(barmode="group", height=420, width=900, xaxis_tickangle=-20)
        return figures.style(fig, f"LN-free vs original: {self.original} / {self.free}")


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def claims(original, free, *, parent: str | None = None, task: str | None = None) -> NormClaims:
    """Measure (a) DLA vs the exact direct effect, (b) AtP vs exact patching and (c) the planted
    mechanism on `original` (with norms) and `free` (without), loaded models or zoo names.

    Args:
        parent: the zoo model whose mechanism numbers (c) to measure (default: `original`'s name,
            if it is one of `TWINS`; otherwise (c) is left out).
        task: a `tasks.from_spec` spec for (a) and (b); default the parent's own claims task
            (`Twin.task`: the "sentiment swap" of steer-sentiment and english-4l), else the model's
            built-in task. It is built once, with `original`'s tokenizer, which a twin shares.
    """
    original = models.load_model(original, device="cpu") if isinstance(original, str) else original
    free = models.load_model(free, device="cpu") if isinstance(free, str) else free
    if free.cfg.normalization_type is not None:
        raise LenslabError(
            f"the LN-free model has normalization_type={free.cfg.normalization_type!r}: pass a model without norms "
            "(made by `lenslab norms remove` or a zoo *-noln twin) as the second model"
        )
    name_o, name_f = (m.cfg.model_name for m in (original, free))
    parent = parent or (name_o.removeprefix(zoo.PREFIX) if name_o.removeprefix(zoo.PREFIX) in TWINS else None)
    own = TWINS[parent].task if parent else None
    if task is None and own is not None:
        task, built = own(original)
    else:
        task = task or (zoo.default_prompts(zoo.PREFIX + parent).task if parent else "induction")
        built = tasks.from_spec(original, task, n=CLAIM_N, seed=CLAIM_SEED)
    # one Task for both: a model and its norm-free twin share their tokenizer
    ro, rf = _attribution_claims(original, built), _attribution_claims(free, built)
    if parent:
        ro.update(mechanism(original, parent))
        rf.update(mechanism(free, parent))
    rows = {k: {"original": float(ro[k]), "free": float(rf[k])} for k in ro}
    return NormClaims(
        original=name_o,
        free=name_f,
        task=task,
        rows=rows,
        provenance=provenance(free, None, method="zoo.noln.claims", original=name_o, parent=parent, seed=CLAIM_SEED),
    )


# --- building a twin ----------------------------------------------------------------------------
def build(parent: str, out_dir, *, seed: int = 0, steps: int | None = None, threads: int = 1) -> NormClaims:
    """Remove the norms of zoo model `parent` (`TWINS[parent]`'s recipe) and write the twin, with
    its card (removal stages, losses, the claims table) and config.json (`ln_removal`, `claims`)."""
    if parent not in TWINS or parent == "ioi-4l":
        known = [p for p in TWINS if p != "ioi-4l"]
        raise LenslabError(
            f"no LN-free twin recipe for {parent!r} here (ioi-4l's is `lenslab zoo train ioi-4l-noln`); known: {', '.join(known)}"
        )
    twin = TWINS[parent]
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    model = models.load_model(zoo.PREFIX + parent, device="cpu")
    train, held = twin.data(model, seed)
    steps = twin.steps if steps is None else steps
    t0 = time.time()
    free, result = ln_removal.remove_norms(
        model, train, held, steps=steps, batch_size=twin.batch, lr=twin.lr, seed=seed, freeze=twin.freeze
    )
    removal = result.to_dict()
    removal.pop("provenance")
    removal.update(steps_per_stage=steps, batch=twin.batch, lr=twin.lr, seed=seed, seconds=round(time.time() - t0))
    _, base = ln_removal.remove_norms(model, train, held, steps=0, batch_size=twin.batch, progress=False)
    removal["loss_no_finetuning"] = base.loss_final
    free.cfg.model_name = twin.name
    summary = f"zoo/{parent} with every norm removed by fine-tuning (no normalisation)"
    extra = {"default_prompt": zoo.default_prompts(zoo.PREFIX + parent).prompt, "ln_removal": removal}
    zoo.save_hooked(
        free,
        model.tokenizer,
        out_dir,
        summary=summary,
        card="(pending evaluation)\n",
        extra=extra,
        weights_dtype=twin.weights_dtype,
    )
    print(json.dumps({"loss_gap": result.loss_gap, "seconds": removal["seconds"]}), flush=True)
    return write_card(parent, out_dir)


def write_card(parent: str, out_dir) -> NormClaims:
    """Measure the claims on the twin of `parent` saved in `out_dir` and (re)write its card.md and
    config.json's `claims` (the weights are not touched)."""
    twin, out_dir = TWINS[parent], Path(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    saved = zoo.load_hooked(out_dir, torch.device("cpu"), torch.float32)
    saved.cfg.model_name = zoo.PREFIX + twin.name
    original = models.load_model(zoo.PREFIX + parent, device="cpu")
    table = claims(original, saved, parent=parent)
    meta["claims"] = table.to_dict()
    sets = zoo.prompt_sets(zoo.PREFIX + parent)  # the parent's steering sets: the twin's defaults name them
    if sets:
        meta["prompt_sets"] = sets
    (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    norm = "RMSNorm" if str(original.cfg.normalization_type).startswith("RMS") else "LayerNorm"
    (out_dir / "card.md").write_text(_card(twin, meta["ln_removal"], table, norm))
    return table


def _stored(twin: Twin) -> str:
    if twin.weights_dtype == torch.float32:
        return ""
    return (
        f" The weights are stored in {str(twin.weights_dtype).removeprefix('torch.')}, as the parent's; these"
        " losses are the float32 model's, the table below is measured on the stored weights."
    )


def _card(twin: Twin, removal: dict, table: NormClaims, norm: str = "LayerNorm") -> str:
    rows = "\n".join(
        f"| {s['stage']} | {next(iter(s['scales'].values())):.4f} | {s['loss_before']:.5f} | {s['loss_fixed']:.5f} | "
        f"{s['loss_after']:.5f} | {s['tokens']} |"
        for s in removal["stages"]
    )
    gap = removal["loss_final"] - removal["loss_original"]
    gap0 = removal["loss_no_finetuning"] - removal["loss_original"]
    return f"""# zoo/{twin.name}

zoo/{twin.parent} with every {norm} removed, by the fine-tuning procedure of Heimersheim (2024, "You
can remove GPT2's LayerNorm by fine-tuning") and Baroni et al. (2025, "Transformers Don't Need
LayerNorm at Inference Time"). Built by `lenslab zoo train {twin.name}` (`lenslab.zoo.noln.build`,
seed {removal["seed"]}) with `lenslab.probes.ln_removal`.

## Config
zoo/{twin.parent}'s architecture and tokenizer with `normalization_type = None`: no norm module. Each
norm's fixed scale is folded with its weight, bias and centring into the weights that read it, so
the model is exactly what the fine-tuned model computed with fixed scales. DLA with `norm="none"`
is its exact decomposition.

## Removal
Stages in the authors' order (ln2 block by block where there are MLPs, ln1 block by block,
ln_final); per stage the scale (mean over the fine-tuning rows' real tokens, earlier norms fixed),
then {removal["steps_per_stage"]} AdamW steps (lr {removal["lr"]}, batch {removal["batch"]}, embeddings and
unembedding frozen) on the parent's own training loss and distribution (`lenslab.zoo.noln.TWINS`).
Held-out loss ({removal["heldout_tokens"]} held-out target tokens): before the stage, with the norm fixed,
and after fine-tuning.

| stage | fixed scale | loss before | loss fixed | loss after | fine-tuning tokens |
|---|---|---|---|---|---|
{rows}

Held-out loss: {removal["loss_original"]:.5f} with {norm}, {removal["loss_final"]:.5f} without
(gap {gap:+.5f}), after {removal["tokens_used"]} fine-tuning tokens ({removal["seconds"]} s on one
CPU thread). The same removal without fine-tuning (the measured scales folded, `steps=0`):
{removal["loss_no_finetuning"]:.5f} (gap {gap0:+.5f}).{_stored(twin)}

## The papers' claims on this pair
`lenslab.zoo.noln.claims` on task `{table.task}` ({CLAIM_N} prompts, seed {CLAIM_SEED}) and the
parent's own mechanism numbers (`lenslab norms compare --model zoo/{twin.parent}`):

{table.to_markdown()}

## How it was verified
`tests/test_norms_claims.py` re-measures this table from the committed weights (within 1e-3)
and checks the claims: DLA equals the exact direct effect without norms (to 1e-4).
"""
