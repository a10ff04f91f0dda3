"""The Model page's analyses as plain functions: tokenization, attention patterns, logit lens,
next-token predictions, and a model card.

Everything here takes a TransformerLens model (`HookedTransformer`, or a `TransformerBridge`,
which exposes the same hook names) and a prompt string, runs one forward pass, and returns
tensors or small frozen dataclasses. Figures for these results live in `lenslab.plots`.

The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") reads each layer's
residual stream as if it were the last one: apply the final LayerNorm (recomputing its
statistics for that layer's residual) and the unembedding, and see which token the model
"would" predict so far. It is what TransformerLens's
`cache.accumulated_resid(apply_ln=True)` followed by the unembedding computes.

>>> import lenslab
>>> from lenslab import lens
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> lens.attention_patterns(model, "t1 t2 t3 t1 t2").shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenslab import zoo
from lenslab._errors import LenslabError
from lenslab.toolbox import model_name

__all__ = [
    "LogitLens",
    "Prediction",
    "Tokenized",
    "attention_patterns",
    "logit_lens",
    "model_card",
    "model_name",
    "tokenize",
    "top_predictions",
]


@dataclass(frozen=True, eq=False)
class Tokenized:
    """A prompt as the model sees it.

    Attributes:
        ids: `[pos]` int token ids (with the BOS token the model prepends, if any).
        str_tokens: one string per position.
        model: the model's name.
    """

    ids: Int[Tensor, " pos"]
    str_tokens: list[str]
    model: str

    def rows(self) -> list[dict]:
        """One dict per position: `{"pos", "token", "id"}` (for tables)."""
        return [
            {"pos": i, "token": t, "id": int(x)} for i, (t, x) in enumerate(zip(self.str_tokens, self.ids.tolist()))
        ]

    def __len__(self) -> int:
        return len(self.str_tokens)


def _tokens(model, text: str) -> Int[Tensor, "1 pos"]:
    """Validate `text` and tokenize it to `[1, pos]` on the model's device."""
    if not isinstance(text, str) or not text.strip():
        raise LenslabError("the prompt is empty: type some text for the model to read")
    if getattr(model, "tokenizer", None) is None:
        raise LenslabError(f"model {model_name(model)!r} has no tokenizer, so it cannot read text; load one that has")
    try:
        tokens = model.to_tokens(text, truncate=False)  # TransformerLens truncates silently otherwise
    except TypeError:  # a model whose to_tokens has no `truncate`
        tokens = model.to_tokens(text)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        raise LenslabError(
            f"the prompt is {tokens.shape[-1]} tokens but {model_name(model)!r} reads at most {n_ctx}: shorten it"
        )
    return tokens


def tokenize(model, text: str) -> Tokenized:
    """Tokenize `text` as the model does (including its BOS token).

    >>> tok = tokenize(model, "t1 t2 t3")
    >>> tok.str_tokens[0] == model.tokenizer.bos_token
    True
    """
    tokens = _tokens(model, text)
    str_tokens = list(model.to_str_tokens(tokens[0]))
    return Tokenized(ids=tokens[0].detach().cpu(), str_tokens=[str(s) for s in str_tokens], model=model_name(model))


def _pattern_hooks(model) -> list[str]:
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def attention_patterns(model, text: str) -> Float[Tensor, "layer head query_pos key_pos"]:
    """Attention probabilities of every head on `text`: `[layer, head, query_pos, key_pos]`.

    Row `[l, h, q]` is head `h` of layer `l`'s distribution over key positions when attending
    from position `q`; rows sum to 1 and are zero above the diagonal (causal mask). Read from the
    `blocks.{l}.attn.hook_pattern` hooks, on CPU in float32.

    >>> attention_patterns(model, "t1 t2 t3").sum(-1).allclose(torch.tensor(1.0))
    True
    """
    tokens = _tokens(model, text)
    names = _pattern_hooks(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    missing = [n for n in names if n not in cache]
    if missing:
        raise LenslabError(
            f"model {model_name(model)!r} exposes no attention pattern hooks ({missing[0]}); "
            "it may not be a standard attention model"
        )
    return torch.stack([cache[n][0].detach().float().cpu() for n in names])


@dataclass(frozen=True, eq=False)
class LogitLens:
    """The logit lens of one prompt: what each layer's residual stream predicts at each position.

    Rows ("layers") are the residual stream before each block (`0_pre`, `1_pre`, ...) and after
    the last one (`final_post`), as in TransformerLens's `accumulated_resid` labels; the last
    row is the model's own output.

    Attributes:
        top_ids: `[layer, pos, k]` ids of the k most probable next tokens.
        top_probs: `[layer, pos, k]` their probabilities (softmax over the vocabulary).
        top_tokens: `[layer][pos][k]` their strings.
        final_prob: `[layer, pos]` probability each layer gives to the token the full model
            predicts at that position (the last row's top-1).
        layer_labels: one label per row, e.g. `["0_pre", "1_pre", "final_post"]`.
        str_tokens: the prompt's tokens, one per position.
        model: the model's name.
    """

    top_ids: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_tokens: list[list[list[str]]]
    final_prob: Float[Tensor, "layer pos"]
    layer_labels: list[str]
    str_tokens: list[str]
    model: str

    @property
    def k(self) -> int:
        return self.top_ids.shape[-1]


@torch.no_grad()
def logit_lens_logits(model, text: str) -> tuple[Float[Tensor, "layer pos d_vocab"], list[str]]:
    """Logits read from every residual stream: `ln_final` (recomputed per layer), then unembed.

    Returns `([n_layers + 1, pos, d_vocab] logits, labels)`; row `n_layers` equals the model's
    logits. Float32 on CPU.
    """
    tokens = _tokens(model, text)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    resid = torch.stack([cache[n] for n in names])  # [layer, 1, pos, d_model]
    ln_final = getattr(model, "ln_final", None)
    out = []
    for r in resid:  # ln_final recomputes the normalisation statistics of each layer's residual
        x = ln_final(r) if ln_final is not None else r
        out.append(model.unembed(x)[0].float().cpu())
    labels = [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    return torch.stack(out), labels


def logit_lens(model, text: str, k: int = 5) -> LogitLens:
    """Top-k next-token predictions of every layer's residual stream at every position.

    Args:
        model: a TransformerLens model.
        text: the prompt (BOS is prepended as the model does).
        k: how many top tokens to keep per layer and position.

    >>> ll = logit_lens(model, "t1 t2 t3 t1 t2", k=3)
    >>> ll.top_ids.shape == (model.cfg.n_layers + 1, len(ll.str_tokens), 3)
    True
    """
    k = _check_k(model, k)
    logits, labels = logit_lens_logits(model, text)
    probs = logits.softmax(-1)  # [layer, pos, vocab]
    top_probs, top_ids = probs.topk(k, dim=-1)
    final_top = top_ids[-1, :, 0]  # [pos]
    final_prob = probs.gather(-1, final_top[None, :, None].expand(probs.shape[0], -1, 1))[..., 0]
    tok = model.tokenizer
    top_tokens = [[[_tok_str(tok, i) for i in pos_ids] for pos_ids in layer_ids] for layer_ids in top_ids.tolist()]
    return LogitLens(
        top_ids=top_ids,
        top_probs=top_probs,
        top_tokens=top_tokens,
        final_prob=final_prob,
        layer_labels=labels,
        str_tokens=tokenize(model, text).str_tokens,
        model=model_name(model),
    )


class Prediction(NamedTuple):
    """One candidate next token."""

    token: str
    id: int
    prob: float
    logit: float


@torch.no_grad()
def top_predictions(model, text: str, k: int = 10) -> list[Prediction]:
    """The k most probable next tokens after `text`: `(token, id, prob, logit)`, best first.

    >>> preds = top_predictions(model, "t1 t2 t3 t1 t2", k=3)
    >>> preds[0].prob >= preds[1].prob >= preds[2].prob
    True
    """
    k = _check_k(model, k)
    tokens = _tokens(model, text)
    logits = model(tokens, return_type="logits")[0, -1].float().cpu()  # [vocab]
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k)
    return [
        Prediction(_tok_str(model.tokenizer, i), int(i), float(p), float(logits[i]))
        for p, i in zip(top_p.tolist(), top_i.tolist())
    ]


def model_card(model) -> str:
    """Markdown describing the model: the zoo card for zoo models, a config summary otherwise."""

    name = model_name(model)
    card = ""
    if name.startswith(zoo.PREFIX):
        try:
            card = zoo.read_card(name).strip()
        except LenslabError:
            card = ""
    else:
        local = Path(name).expanduser() / "card.md"
        if local.is_file():
            card = local.read_text().strip()
    return card + "\n\n" + config_summary(model) if card else f"### {name}\n\n" + config_summary(model)


def config_summary(model) -> str:
    """A Markdown table of the model's main config fields (layers, widths, heads, vocabulary...)."""
    cfg = model.cfg
    fields = [
        ("architecture", "original_architecture"),
        ("layers", "n_layers"),
        ("d_model", "d_model"),
        ("heads", "n_heads"),
        ("d_head", "d_head"),
        ("key/value heads", "n_key_value_heads"),
        ("d_mlp", "d_mlp"),
        ("attention only", "attn_only"),
        ("experts", "num_experts"),
        ("experts per token", "experts_per_token"),
        ("context", "n_ctx"),
        ("vocabulary", "d_vocab"),
        ("activation", "act_fn"),
        ("normalization", "normalization_type"),
        ("positional embedding", "positional_embedding_type"),
        ("dtype", "dtype"),
        ("device", "device"),
    ]
    rows = []
    for label, attr in fields:
        v = getattr(cfg, attr, None)
        if v is None or (attr == "d_mlp" and getattr(cfg, "attn_only", False)):
            continue
        rows.append(f"| {label} | `{v}` |")
    return "| config | value |\n|---|---|\n" + "\n".join(rows)


def _check_k(model, k: int) -> int:
    vocab = int(model.cfg.d_vocab_out if getattr(model.cfg, "d_vocab_out", -1) > 0 else model.cfg.d_vocab)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise LenslabError(f"k must be a positive integer (how many top tokens to show), got {k!r}")
    return min(k, vocab)


def _tok_str(tokenizer, i: int) -> str:
    """Readable string of one token id (keeps leading spaces; shows special tokens as themselves)."""
    s = tokenizer.decode([int(i)])
    return s if s != "" else tokenizer.convert_ids_to_tokens(int(i)) or json.dumps(s)
