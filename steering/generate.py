"""Side-by-side generation: the same prompt and seed, unsteered and steered.

Generation runs without a KV cache, so every forward pass sees the whole sequence and an edit's
positions ("prompt", "generated", explicit indices) mean the same at every step.

>>> import lenslab
>>> from lenslab.steering import actadd, generate
>>> model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
>>> iv = actadd(model, "the day was lovely .", "the day was awful .", layer=1)
>>> prompt = "the day was awful . the movie was"
>>> generate(model, prompt, max_new_tokens=3), generate(model, prompt, iv, max_new_tokens=3)
(' bitter. the', ' lovely. the')
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lenslab._errors import LenslabError
from lenslab.steering.edit_hooks import apply
from lenslab.steering.intervention import Intervention
from lenslab.toolbox import model_device


def stream(
    model,
    prompt: str,
    intervention: Intervention | None = None,
    *,
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
) -> Iterator[str]:
    """Yield the continuation piece by piece, one per token (greedy when `temperature` is 0).

    The pieces join to the decoded continuation.

    >>> for piece in stream(model, "the day was awful . the movie was", max_new_tokens=3):
    ...     print(repr(piece))
    ' bitter'
    '.'
    ' the'
    """
    if not isinstance(prompt, str) or not prompt:
        raise LenslabError("prompt must be a non-empty string")
    if max_new_tokens < 0 or temperature < 0:
        raise LenslabError(f"max_new_tokens and temperature must be >= 0 (got {max_new_tokens}, {temperature})")
    device = model_device(model)
    tokens = model.to_tokens(prompt).to(device)  # [1, prompt_len]
    prompt_len = tokens.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eos = getattr(model.tokenizer, "eos_token_id", None) if model.tokenizer is not None else None
    text = ""
    head = model.to_string(tokens[0])  # the continuation is what decoding adds after the prompt
    with torch.no_grad(), apply(model, intervention, prompt_len=prompt_len):
        for _ in range(max_new_tokens):
            logits = model(tokens)[0, -1].float()  # [d_vocab]
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))
            tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
            if stop_at_eos and eos is not None and nxt == eos:
                return
            full = model.to_string(tokens[0])
            new = full[len(head) :] if full.startswith(head) else model.to_string(tokens[0, prompt_len:])
            piece, text = new[len(text) :] if new.startswith(text) else new, new
            yield piece


def generate(
    model,
    prompt: str,
    intervention: Intervention | None = None,
    *,
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> str:
    """The continuation of `prompt` (text after it), steered by `intervention` if given.

    Call twice with the same `seed`, with and without the intervention, for a side-by-side view.

    >>> generate(model, "the day was awful . the movie was", max_new_tokens=3)
    ' bitter. the'
    >>> generate(model, "the day was awful . the movie was", max_new_tokens=3, temperature=1.0, seed=1)   # sampled
    ' new. what'
    """
    pieces = list(
        stream(
            model, prompt, intervention, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_k=top_k
        )
    )
    return "".join(pieces)
