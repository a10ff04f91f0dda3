"""Tasks and metrics: the contract every analysis in lenslab takes.

A `Task` is what is being explained: clean and corrupt token batches of equal shape
`[batch, pos]` and answer tokens `[batch, 2]` (correct, incorrect), with the answer
predicted at the last position (as TransformerLens `patching` assumes). A metric scores
logits `[batch, pos, vocab]` to a scalar; it is a name (`logit_diff`,
`logit_diff_normalized`, `answer_prob`, `kl_to_clean`) or any callable.

>>> import lenslab
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = induction(model, n=4, seq_len=10, seed=0)
>>> task.clean_tokens.shape
torch.Size([4, 20])
>>> metric = get_metric("logit_diff", model, task)
>>> float(metric(model(task.clean_tokens))) > 0
True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lenslab import data
from lenslab._errors import LenslabError, did_you_mean

METRICS = ("logit_diff", "logit_diff_normalized", "answer_prob", "kl_to_clean")
MetricLike = str | Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Task:
    """Clean/corrupt token batches and answers; validated on construction.

    Attributes:
        clean_tokens: `[batch, pos]` int tensor.
        corrupt_tokens: `[batch, pos]` int tensor, same shape as `clean_tokens`.
        answer_tokens: `[batch, 2]` int tensor: (correct, incorrect) token id per prompt.
        clean_prompts: the clean texts, when built from text.
        corrupt_prompts: the corrupt texts, when built from text.
        labels: optional per-prompt labels (e.g. template ids).
        name: a short task name for provenance and figure titles.
        d_vocab: when given, every token id must be below it.
    """

    clean_tokens: Tensor
    corrupt_tokens: Tensor
    answer_tokens: Tensor
    clean_prompts: tuple[str, ...] | None = None
    corrupt_prompts: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    name: str = "custom"
    d_vocab: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("clean_tokens", "corrupt_tokens", "answer_tokens"):
            val = getattr(self, attr)
            if not isinstance(val, Tensor):
                try:
                    val = torch.as_tensor(val)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise LenslabError(f"{attr} must be an int tensor, got {type(val).__name__}") from exc
                object.__setattr__(self, attr, val)
            if val.is_floating_point() or val.is_complex() or val.dtype == torch.bool:
                raise LenslabError(f"{attr} must hold integer token ids, got dtype {val.dtype}")
            if val.dtype != torch.long:
                object.__setattr__(self, attr, val.long())
        clean, corrupt, ans = self.clean_tokens, self.corrupt_tokens, self.answer_tokens
        if clean.ndim != 2 or clean.shape[0] == 0 or clean.shape[1] == 0:
            raise LenslabError(f"clean_tokens must be a non-empty [batch, pos] tensor, got shape {tuple(clean.shape)}")
        if corrupt.shape != clean.shape:
            raise LenslabError(
                f"clean_tokens {tuple(clean.shape)} and corrupt_tokens {tuple(corrupt.shape)} must have "
                "the same [batch, pos] shape: every corrupt prompt must tokenize to its clean prompt's length"
            )
        if ans.ndim == 1 and ans.shape[0] == 2 and clean.shape[0] == 1:
            ans = ans[None]
            object.__setattr__(self, "answer_tokens", ans)
        if ans.ndim != 2 or ans.shape != (clean.shape[0], 2):
            raise LenslabError(
                f"answer_tokens must be [batch, 2] = [{clean.shape[0]}, 2] (correct, incorrect), "
                f"got shape {tuple(ans.shape)}"
            )
        for attr, val in (("clean_tokens", clean), ("corrupt_tokens", corrupt), ("answer_tokens", ans)):
            bad = (val < 0) | (val >= self.d_vocab) if self.d_vocab is not None else val < 0
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                bound = f"[0, {self.d_vocab})" if self.d_vocab is not None else "non-negative"
                raise LenslabError(
                    f"{attr} of prompt {row}{self._describe(row)} holds token id "
                    f"{int(val[bad][0])}, outside the vocabulary {bound}"
                )
        for attr in ("clean_prompts", "corrupt_prompts", "labels"):
            val = getattr(self, attr)
            if val is not None:
                val = tuple(val)
                object.__setattr__(self, attr, val)
                if len(val) != clean.shape[0]:
                    raise LenslabError(f"{attr} has {len(val)} entries for a batch of {clean.shape[0]}")

    def _describe(self, row: int) -> str:
        return f" ({self.clean_prompts[row]!r})" if self.clean_prompts else ""

    @property
    def batch(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean_tokens.shape[1])

    def to(self, device: str | torch.device) -> Task:
        """This task with its tensors on `device`."""
        return Task(
            clean_tokens=self.clean_tokens.to(device),
            corrupt_tokens=self.corrupt_tokens.to(device),
            answer_tokens=self.answer_tokens.to(device),
            clean_prompts=self.clean_prompts,
            corrupt_prompts=self.corrupt_prompts,
            labels=self.labels,
            name=self.name,
            d_vocab=self.d_vocab,
            meta=dict(self.meta),
        )

    def subset(self, rows: Sequence[int] | slice) -> Task:
        """The task restricted to some prompts (e.g. `task.subset([0])`)."""
        idx = list(range(self.batch))[rows] if isinstance(rows, slice) else list(rows)
        pick = (lambda t: tuple(t[i] for i in idx)) if idx else None
        return Task(
            clean_tokens=self.clean_tokens[idx],
            corrupt_tokens=self.corrupt_tokens[idx],
            answer_tokens=self.answer_tokens[idx],
            clean_prompts=pick(self.clean_prompts) if self.clean_prompts else None,
            corrupt_prompts=pick(self.corrupt_prompts) if self.corrupt_prompts else None,
            labels=pick(self.labels) if self.labels else None,
            name=self.name,
            d_vocab=self.d_vocab,
            meta=dict(self.meta),
        )

    def to_dict(self) -> dict:
        """JSON-ready description (token ids as lists), for provenance."""
        return {
            "name": self.name,
            "clean_tokens": self.clean_tokens.tolist(),
            "corrupt_tokens": self.corrupt_tokens.tolist(),
            "answer_tokens": self.answer_tokens.tolist(),
            "clean_prompts": list(self.clean_prompts) if self.clean_prompts else None,
            "corrupt_prompts": list(self.corrupt_prompts) if self.corrupt_prompts else None,
            "labels": list(self.labels) if self.labels else None,
            "d_vocab": self.d_vocab,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(
            clean_tokens=torch.tensor(d["clean_tokens"]),
            corrupt_tokens=torch.tensor(d["corrupt_tokens"]),
            answer_tokens=torch.tensor(d["answer_tokens"]),
            clean_prompts=d.get("clean_prompts"),
            corrupt_prompts=d.get("corrupt_prompts"),
            labels=d.get("labels"),
            name=d.get("name", "custom"),
            d_vocab=d.get("d_vocab"),
            meta=d.get("meta") or {},
        )


# --- constructors --------------------------------------------------------------------------


def from_tokens(
    clean_tokens: Tensor,
    corrupt_tokens: Tensor,
    answer_tokens: Tensor,
    *,
    name: str = "custom",
    d_vocab: int | None = None,
    labels: Sequence[str] | None = None,
) -> Task:
    """A Task from token ids: `[batch, pos]`, `[batch, pos]`, `[batch, 2]`."""
    return Task(
        clean_tokens=clean_tokens,
        corrupt_tokens=corrupt_tokens,
        answer_tokens=answer_tokens,
        name=name,
        d_vocab=d_vocab,
        labels=tuple(labels) if labels is not None else None,
    )


def from_prompts(
    model,
    clean: Sequence[str],
    corrupt: Sequence[str],
    answers: Sequence[tuple[str | int, str | int]],
    *,
    prepend_bos: bool = True,
    name: str = "custom",
    labels: Sequence[str] | None = None,
) -> Task:
    """A Task from the user's own prompt pairs.

    Args:
        model: the TransformerLens model whose tokenizer is used.
        clean, corrupt: prompts; all must tokenize to the same length, answer predicted next.
        answers: one (correct, incorrect) pair per prompt, each a single token (string or id).
            For BPE tokenizers mind the leading space (`" Mary"`).
    """
    clean, corrupt, answers = list(clean), list(corrupt), list(answers)
    if isinstance(clean, str) or not clean:
        raise LenslabError("clean must be a non-empty list of prompts")
    if len(corrupt) != len(clean) or len(answers) != len(clean):
        raise LenslabError(
            f"got {len(clean)} clean prompts, {len(corrupt)} corrupt prompts and {len(answers)} answer "
            "pairs: give exactly one corrupt prompt and one (correct, incorrect) pair per clean prompt"
        )
    toks_c = [_tokenize_one(model, p, prepend_bos, f"clean prompt {i}") for i, p in enumerate(clean)]
    toks_p = [_tokenize_one(model, p, prepend_bos, f"corrupt prompt {i}") for i, p in enumerate(corrupt)]
    ref_len = len(toks_c[0])
    for kind, toks, texts in (("clean", toks_c, clean), ("corrupt", toks_p, corrupt)):
        for i, (t, text) in enumerate(zip(toks, texts)):
            if len(t) != ref_len:
                raise LenslabError(
                    f"{kind} prompt {i} ({text!r}) is {len(t)} tokens long but clean prompt 0 "
                    f"({clean[0]!r}) is {ref_len}: all prompts of a Task must have the same token length "
                    "because the answer is read at the last position. Reword or split the prompts into "
                    "groups of equal length (see model.to_str_tokens)."
                )
    ans = []
    for i, pair in enumerate(answers):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise LenslabError(f"answer {i} must be a (correct, incorrect) pair, got {pair!r}")
        ans.append(
            [_answer_id(model, a, f"answer {i} ({'correct' if j == 0 else 'incorrect'})") for j, a in enumerate(pair)]
        )
    return Task(
        clean_tokens=torch.tensor(toks_c),
        corrupt_tokens=torch.tensor(toks_p),
        answer_tokens=torch.tensor(ans),
        clean_prompts=tuple(clean),
        corrupt_prompts=tuple(corrupt),
        labels=tuple(labels) if labels is not None else None,
        name=name,
        d_vocab=int(model.cfg.d_vocab),
    )


def induction(model, n: int = 16, seq_len: int = 10, seed: int = 0) -> Task:
    """Repeated random tokens; the answer is the next token of the repeat.

    Clean: `[bos] A A[:-1]` with `A` of `seq_len` random tokens, so at the last position
    (token `A[-2]`) induction predicts `A[-1]`. Corrupt: the same, except that the first
    occurrence of `A[-2]` is replaced by a fresh token, so induction has nothing to attend to
    (the previous-token and induction heads both matter). Answers: (`A[-1]`, a random token
    absent from the prompt). Shape `[n, 2 * seq_len]` (plus BOS when the model uses one).
    """
    if n < 1 or seq_len < 3:
        raise LenslabError(f"induction needs n >= 1 and seq_len >= 3, got n={n}, seq_len={seq_len}")
    pool = _content_token_ids(model)
    if len(pool) < 2 * seq_len + 2:
        raise LenslabError(f"the model's vocabulary has only {len(pool)} ordinary tokens; use a smaller seq_len")
    gen = torch.Generator().manual_seed(seed)
    bos = _bos_id(model)
    clean, corrupt, ans = [], [], []
    for _ in range(n):
        perm = pool[torch.randperm(len(pool), generator=gen)[: seq_len + 2]]
        a, fresh, wrong = perm[:seq_len], perm[seq_len], perm[seq_len + 1]
        first = a.clone()
        first_c = a.clone()
        first_c[seq_len - 2] = fresh
        head = [bos] if bos is not None else []
        clean.append(head + first.tolist() + a[:-1].tolist())
        corrupt.append(head + first_c.tolist() + a[:-1].tolist())
        ans.append([int(a[-1]), int(wrong)])
    return Task(
        clean_tokens=torch.tensor(clean),
        corrupt_tokens=torch.tensor(corrupt),
        answer_tokens=torch.tensor(ans),
        name="induction",
        d_vocab=int(model.cfg.d_vocab),
        meta={"seq_len": seq_len, "seed": seed},
    )


def ioi(model, n: int = 32, seed: int = 0, heldout: bool = False) -> Task:
    """Indirect-object-identification prompts with ABC-corrupted counterparts.

    Clean: "When Mary and John went to the store, John gave a drink to" -> (" Mary", " John").
    Corrupt: the same template with three other names (ABC), so no name is repeated.
    All prompts share one token length (templates are grouped by length). `heldout=True`
    draws names and templates never used to train `zoo/ioi-4l`.
    """

    clean, corrupt, answers, labels = data.ioi.make_ioi_prompts(model, n=n, seed=seed, heldout=heldout)
    task = from_prompts(model, clean, corrupt, answers, name="ioi-heldout" if heldout else "ioi", labels=labels)
    return task


def refusal(model, n: int = 16, seed: int = 0, split: str = "test", n_items: int = 3) -> Task:
    """Harmful-marker prompts of `lenslab.data.refusal` (the language of zoo/moe-refusal).

    Clean: "user : reverse apple bomb river assistant :" -> ("sorry", "river"): refuse vs the
    task's first answer word. Corrupt: the same prompt with the marker word replaced by a noun.
    `split="test"` draws item tuples never used in training; all prompts have `n_items` items.
    """

    clean, corrupt, answers = data.refusal.refusal_pairs(n=n, seed=seed, split=split, n_items=n_items)
    return from_prompts(model, clean, corrupt, answers, name=f"refusal-{split}")


# --- metrics -------------------------------------------------------------------------------


def logit_diff_per_prompt(last_logits: Tensor, answer_tokens: Tensor) -> Tensor:
    """`[batch, vocab]`, `[batch, 2]` -> `[batch]`: correct minus incorrect logit."""
    picked = last_logits.gather(-1, answer_tokens.to(last_logits.device))
    return picked[:, 0] - picked[:, 1]


def answer_prob_per_prompt(last_logits: Tensor, answer_tokens: Tensor) -> Tensor:
    """`[batch, vocab]`, `[batch, 2]` -> `[batch]`: softmax probability of the correct answer."""
    logp = last_logits.float().log_softmax(-1)
    return logp.gather(-1, answer_tokens[:, :1].to(logp.device))[:, 0].exp()


def kl_to_clean_per_prompt(last_logits: Tensor, clean_last_logits: Tensor) -> Tensor:
    """`[batch, vocab]` x2 -> `[batch]`: KL(clean || this) of the next-token distributions."""
    logq = last_logits.float().log_softmax(-1)
    logp = clean_last_logits.float().to(logq.device).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass(frozen=True, eq=False)
class Metric:
    """A metric bound to a task: `metric(logits[batch, pos, vocab]) -> scalar tensor`.

    Named metrics also expose `per_prompt(last_logits[batch, vocab]) -> [batch]` (the batch
    mean of which is the metric), so fast engines can compute them from the last position only.
    `clean_value` / `corrupt_value` hold the metric on the unpatched clean and corrupt runs.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    per_prompt: Callable[[Tensor], Tensor] | None = None
    clean_value: float | None = None
    corrupt_value: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        value = self.fn(logits)
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value, dtype=torch.float32)
        if value.numel() != 1:
            raise LenslabError(
                f"metric {self.name!r} must return a scalar, got shape {tuple(value.shape)}; "
                "reduce over the batch (e.g. .mean())"
            )
        if not bool(torch.isfinite(value.detach()).all()):
            raise LenslabError(
                f"metric {self.name!r} returned {float(value)}: check the model's logits for NaN/inf "
                "(e.g. float16 overflow: try dtype='float32') or the metric for a division by zero"
            )
        return value.reshape(())


def check_metric(metric: MetricLike) -> None:
    """A LenslabError unless `metric` is a bound `Metric`, a callable or a name in `METRICS`."""
    if isinstance(metric, Metric) or callable(metric):
        return
    if not isinstance(metric, str) or metric not in METRICS:
        raise LenslabError(
            f"metric {metric!r} is not one of {', '.join(METRICS)}{did_you_mean(str(metric), METRICS)}; "
            "or pass a callable f(logits[batch, pos, vocab]) -> scalar"
        )


def get_metric(metric: MetricLike, model, task: Task, *, last: tuple[Tensor, Tensor] | None = None) -> Metric:
    """Bind a metric name or callable to `task` (running clean and corrupt once for baselines).

    `last`: the clean and corrupt last-position logits `([batch, vocab], [batch, vocab])`, float32,
    when the caller already has them (the batched patching engine computes them from its own
    cached runs, see `logits_of_last`); a named metric then runs no forward of its own.
    """
    check_metric(metric)
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        m = Metric(name=getattr(metric, "__name__", "custom"), fn=metric)
        with torch.no_grad():
            clean_value = float(m(model(task.clean_tokens)))
            corrupt_value = float(m(model(task.corrupt_tokens)))
        return Metric(name=m.name, fn=metric, clean_value=clean_value, corrupt_value=corrupt_value)
    if last is not None:
        clean_last, corrupt_last = last
    else:
        with torch.no_grad():
            clean_last, corrupt_last = last_logits(model, task.clean_tokens), last_logits(model, task.corrupt_tokens)
    ans = task.answer_tokens.to(clean_last.device)
    if metric == "logit_diff":
        per = lambda last: logit_diff_per_prompt(last, ans)
    elif metric == "answer_prob":
        per = lambda last: answer_prob_per_prompt(last, ans)
    elif metric == "kl_to_clean":
        per = lambda last: kl_to_clean_per_prompt(last, clean_last)
    else:
        ld_clean = float(logit_diff_per_prompt(clean_last, ans).mean())
        ld_corrupt = float(logit_diff_per_prompt(corrupt_last, ans).mean())
        if abs(ld_clean - ld_corrupt) < 1e-6:
            raise LenslabError(
                f"logit_diff_normalized is undefined: the clean and corrupt logit differences are equal "
                f"({ld_clean:.4g}); the corruption does not change the answer. Use metric='logit_diff'"
            )
        per = lambda last: (logit_diff_per_prompt(last, ans) - ld_corrupt) / (ld_clean - ld_corrupt)
    fn = lambda logits: per(logits[:, -1]).mean()
    return Metric(
        name=metric,
        fn=fn,
        per_prompt=per,
        clean_value=float(per(clean_last).mean()),
        corrupt_value=float(per(corrupt_last).mean()),
    )


# --- helpers -------------------------------------------------------------------------------


def last_logits(model, tokens: Tensor) -> Tensor:
    """Logits at the last position, `[batch, vocab]` (float32), without materialising
    `[batch, pos, vocab]`: the blocks run on every position, the final norm and unembedding on
    the last one only. Falls back to a full forward for models without `stop_at_layer`."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    if isinstance(model, HookedTransformer):
        return logits_of_last(model, model(tokens, stop_at_layer=model.cfg.n_layers)[:, -1])
    return model(tokens)[:, -1].float()


def logits_of_last(model, resid: Tensor) -> Tensor:
    """The final norm and unembedding of a HookedTransformer's last-position residual
    `[batch, d_model]` (e.g. `blocks.{n_layers-1}.hook_resid_post[:, -1]`) -> float32 logits `[batch, vocab]`."""
    resid = resid[:, None]
    if hasattr(model, "ln_final"):  # models without normalization have none
        resid = model.ln_final(resid)
    return model.unembed(resid)[:, 0].float()


def _tokenize_one(model, text: str, prepend_bos: bool, what: str) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise LenslabError(f"{what} is empty: every prompt needs text")
    toks = model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and unk == getattr(model.tokenizer, "bos_token_id", None):
        unk = None  # GPT-2 style: unk is <|endoftext|>, the BOS token itself, and BPE has no unknown words
    if unk is not None and unk in toks and (getattr(model.tokenizer, "unk_token", None) not in text):
        words = model.to_str_tokens(text, prepend_bos=prepend_bos)
        raise LenslabError(
            f"{what} ({text!r}) contains words outside the model's vocabulary (tokenized as {words}); "
            "use words the model knows (see its card)"
        )
    return toks


def _answer_id(model, ans: str | int, what: str) -> int:
    if isinstance(ans, int):
        if not 0 <= ans < model.cfg.d_vocab:
            raise LenslabError(f"{what} token id {ans} is outside the vocabulary [0, {model.cfg.d_vocab})")
        return ans
    toks = model.to_tokens(ans, prepend_bos=False)[0].tolist()
    if len(toks) != 1:
        pieces = model.to_str_tokens(ans, prepend_bos=False)
        raise LenslabError(
            f"{what} {ans!r} is {len(toks)} tokens {pieces}, not one: answers must be single tokens "
            "(for BPE models try a leading space, e.g. ' Mary')"
        )
    return int(toks[0])


def _bos_id(model) -> int | None:
    tok = model.tokenizer
    if tok is None or tok.bos_token_id is None or not getattr(model.cfg, "default_prepend_bos", True):
        return None
    return int(tok.bos_token_id)


def _content_token_ids(model) -> Tensor:
    """Ids of ordinary (non-special) tokens in the model's vocabulary."""
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) if model.tokenizer is not None else set()
    ids = [i for i in range(int(model.cfg.d_vocab)) if i not in special]
    return torch.tensor(ids)


BUILTIN_TASKS = ("ioi", "ioi-heldout", "induction", "refusal", "refusal-train")


def from_spec(model, spec: str, *, n: int = 16, seed: int = 0, seq_len: int = 10) -> Task:
    """A Task from a short spec, as the CLI and the app take it.

    `spec` is one of `BUILTIN_TASKS` ("ioi", "ioi-heldout", "induction", "refusal" (held-out
    items), "refusal-train"), or the path of a JSON file
    `{"clean": [...], "corrupt": [...], "answers": [[correct, incorrect], ...]}`.
    """
    builders = {
        "ioi": lambda: ioi(model, n=n, seed=seed),
        "ioi-heldout": lambda: ioi(model, n=n, seed=seed, heldout=True),
        "induction": lambda: induction(model, n=n, seq_len=seq_len, seed=seed),
        "refusal": lambda: refusal(model, n=n, seed=seed, split="test"),
        "refusal-train": lambda: refusal(model, n=n, seed=seed, split="train"),
    }
    if spec in builders:
        return builders[spec]()
    path = Path(spec)
    if not path.exists():
        raise LenslabError(
            f"task {spec!r} is not one of {', '.join(BUILTIN_TASKS)}{did_you_mean(spec, BUILTIN_TASKS)} "
            "and no such JSON file exists"
        )
    try:
        d = json.loads(path.read_text())
        return from_prompts(model, d["clean"], d["corrupt"], [tuple(a) for a in d["answers"]], name=path.stem)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LenslabError(
            f"{path} must be JSON with keys clean, corrupt (lists of prompts) and answers "
            f"(list of [correct, incorrect]): {exc}"
        ) from exc
