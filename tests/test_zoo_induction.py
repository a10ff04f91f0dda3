"""The committed `zoo/induction-2l` weights hold a real induction circuit.

Measured independently of the training script: attention patterns from `run_with_cache`
on fresh repeated random sequences, at a repeat length used in training and at two never
used (one inside, one beyond the trained range), so a fixed-offset head cannot pass.
"""

from __future__ import annotations

import json

import pytest
import torch

import lenslab
from lenslab import tasks, zoo

NAME = "zoo/induction-2l"


@pytest.fixture(scope="module")
def model():
    return lenslab.load_model(NAME, device="cpu")


@pytest.fixture(scope="module")
def meta():
    return json.loads((zoo.zoo_path(NAME) / "config.json").read_text())


def _head(label: str) -> tuple[int, int]:
    layer, head = label.removeprefix("L").split("H")
    return int(layer), int(head)


def _repeated(model, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """`[n, 1 + 2 * seq_len]`: `<bos> A A`, `A` distinct random ordinary tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        perm = torch.randperm(300, generator=gen)[:seq_len]
        a = " ".join(f"t{int(i)}" for i in perm)
        rows.append(model.to_tokens(f"{a} {a}")[0])
    return torch.stack(rows)


def test_card_config_and_script(meta):
    from lenslab.zoo import train_induction_2l

    assert callable(train_induction_2l.train)
    card = zoo.read_card(NAME)
    assert "induction" in card and "Verification" in card
    mech = meta["mechanism"]
    assert len(mech["induction_heads"]) >= 1 and len(mech["previous_token_heads"]) >= 1
    assert _head(mech["induction_heads"][0])[0] == 1 and _head(mech["previous_token_heads"][0])[0] == 0
    assert meta["cfg"]["attn_only"] is True and meta["cfg"]["n_layers"] == 2
    assert meta["cfg"]["positional_embedding_type"] == "shortformer"
    assert zoo.default_prompt(NAME) == meta["default_prompt"]
    size = (zoo.zoo_path(NAME) / "model.safetensors").stat().st_size
    assert size < 5_000_000


@pytest.mark.parametrize("seq_len", [10, 13, 27])  # 10 trained; 13 and 27 never used in training
def test_induction_mechanism(model, meta, seq_len):
    li, hi = _head(meta["mechanism"]["induction_heads"][0])
    lp, hp = _head(meta["mechanism"]["previous_token_heads"][0])
    toks = _repeated(model, seq_len, n=32, seed=100 + seq_len)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    # induction: second copy of A[j] (pos 1+seq_len+j) -> A[j+1] in the first copy (pos 2+j)
    q = torch.arange(seq_len + 1, 2 * seq_len + 1)
    ind = cache["pattern", li][:, hi][:, q, q - seq_len + 1].mean()
    assert ind > 0.5, f"induction head L{li}H{hi} attention {ind:.3f}"
    # previous token: every position after <bos> -> position - 1
    qp = torch.arange(1, toks.shape[1])
    prev = cache["pattern", lp][:, hp][:, qp, qp - 1].mean()
    assert prev > 0.3, f"previous-token head L{lp}H{hp} attention {prev:.3f}"
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")
    first = nll[:, 1:seq_len].mean()
    repeated = nll[:, seq_len + 1 : 2 * seq_len].mean()
    assert first > 5.0  # unpredictable: chance is ln 300 = 5.7
    assert repeated < 0.2 * first, f"repeated-half loss {repeated:.3f} vs first-half {first:.3f}"


def test_every_listed_induction_head_on_unseen_length(model, meta):
    toks = _repeated(model, 13, n=32, seed=7)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    q = torch.arange(14, 27)
    for label in meta["mechanism"]["induction_heads"]:
        layer, head = _head(label)
        score = cache["pattern", layer][:, head][:, q, q - 12].mean()
        assert score > 0.5, f"{label} induction attention {score:.3f}"


def test_induction_task_logit_diff(model):
    task = tasks.induction(model, n=32, seq_len=10, seed=3)
    m = tasks.get_metric("logit_diff", model, task)
    assert m.clean_value > 5.0
    assert m.corrupt_value < 0.3 * m.clean_value


def test_default_prompt_is_predicted(model, meta):
    words = meta["default_prompt"].split()
    half = len(words) // 2
    assert words[:half] == words[half:]
    toks = model.to_tokens(meta["default_prompt"])
    with torch.no_grad():
        pred = model(toks)[0, :-1].argmax(-1)
    # inside the repeat (after its first token) every next token is predicted
    assert torch.equal(pred[half + 1 :], toks[0, half + 2 :])


# --- the card's numbers, recomputed with the training script's own measurement and seeds ---------
# (tolerance: tests/conftest.py DocNumbers, the printed digits)


@pytest.fixture(scope="module")
def verified(model):
    from lenslab.zoo import train_induction_2l

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_induction_2l.verify(model, train_induction_2l.TrainConfig())
    finally:
        torch.set_num_threads(before)


def test_card_verification_table_is_measured(verified, doc_numbers):
    rows = doc_numbers.table(zoo.read_card(NAME), "| repeat length L |")
    assert [int(r[0].split()[0]) for r in rows] == [10, 13, 27]
    for row in rows:
        m = verified["per_len"][int(row[0].split()[0])]
        ind, prev = m["L1"]["induction"], m["L0"]["prev_token"]
        measured = [
            ind[0],
            max(ind[1:]),
            prev[2],
            m["loss_first_half"],
            m["loss_repeated_half"],
            m["loss_repeated_half"] / m["loss_first_half"],
        ]
        for got, printed in zip(measured, row[1:], strict=True):
            assert doc_numbers.close(got, printed), (row[0], got, printed)


def test_card_all_heads_and_task_logit_diffs_are_measured(verified, doc_numbers):
    import re

    card = zoo.read_card(NAME)
    at10 = verified["per_len"][10]
    text = re.search(r"layer 1 induction\s+(.*?); layer 0 previous-token (.*?)\. Chance", card, re.S)
    ind = dict(re.findall(r"H(\d): (\d\.\d+)", text.group(1)))
    prev = dict(re.findall(r"H(\d): (\d\.\d+)", text.group(2)))
    assert sorted(ind) == sorted(prev) == ["0", "1", "2", "3"]
    for h in range(4):
        assert doc_numbers.close(at10["L1"]["induction"][h], ind[str(h)]), (h, ind)
        assert doc_numbers.close(at10["L0"]["prev_token"][h], prev[str(h)]), (h, prev)
    # the head lists of config.json / the card: every head past its bar, strongest first
    order = lambda xs, bar: [h for h in sorted(range(4), key=lambda h: -xs[h]) if xs[h] > bar]
    mech = json.loads((zoo.zoo_path(NAME) / "config.json").read_text())["mechanism"]
    assert mech["induction_heads"] == [f"L1H{h}" for h in order(at10["L1"]["induction"], 0.5)]
    assert mech["previous_token_heads"] == [f"L0H{h}" for h in order(at10["L0"]["prev_token"], 0.3)]
    assert "L1H0, L1H2, L1H1, L1H3" in card and "L0H2, L0H3, L0H1, L0H0" in card
    rows = doc_numbers.table(card, "| seq_len | clean | corrupt |")
    assert [r[0] for r in rows] == ["10", "20"]
    for seq_len, clean, corrupt in rows:
        got = verified["task_logit_diff"][int(seq_len)]
        assert doc_numbers.close(got["clean"], clean) and doc_numbers.close(got["corrupt"], corrupt), (seq_len, got)


def test_card_config_numbers(model, meta):
    card = zoo.read_card(NAME)
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters" in card, n_params  # 76,976
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_ctx) == (2, 64, 4, 16, 64)
    assert "2 layers, `d_model=64`" in card and "4 heads of `d_head=16`" in card and "`n_ctx=64`" in card
    tr = meta["training"]
    assert f"Final training loss {tr['final_train_loss']:.3f}" in card  # 0.502, logged by the training run
    assert (tr["lr"], tr["weight_decay"], tr["batch"], tr["steps"], tr["warmup"], tr["seed"]) == (
        0.003,
        0.01,
        64,
        1600,
        100,
        0,
    )
    assert "ln 300 = 5.70" in card and f"{torch.log(torch.tensor(300.0)):.2f}" == "5.70"
