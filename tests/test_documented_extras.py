"""Documented features that had no test: `lenslab zoo train` determinism,
`lenslab sinks ablate`, RelP's `attn_rule="ah"`, `tasks.from_spec` with a file, the per-prompt
metrics, and the feature index with `resume=False`."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenslab
from lenslab import circuits, tasks, zoo
from lenslab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = zoo.word_tokenizer([f"t{i}" for i in range(40)])


def _randomize(model: HookedTransformer, seed: int) -> HookedTransformer:
    """Random biases and norm weights: zero biases / unit LayerNorm weights hide sign and offset bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_U", ".b", ".w")):
                base = 1.0 if name.endswith(".w") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ln_attn_model():
    """2-layer attention-only model with LayerNorm: under RelP's rules with the pattern detached
    (AH-rule) and the LayerNorm scale detached (LN-rule) it is affine in every residual stream."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=24,
        n_ctx=32,
        d_head=6,
        n_heads=4,
        d_vocab=len(TOK),
        attn_only=True,
        normalization_type="LN",
        seed=5,
    )
    m = _randomize(HookedTransformer(cfg, tokenizer=TOK), 5)
    m.cfg.model_name = "test"
    return m


# --- lenslab zoo train ---------------------------------------------------------------------------


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_zoo_train_is_bit_identical_for_one_seed(tmp_path, capsys):
    """Three optimiser steps of induction-2l (the cheapest script) twice with seed 0: the saved
    weights are byte-for-byte equal; seed 1 gives other weights."""
    from safetensors.torch import load_file

    runs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / tag
        assert main(["zoo", "train", "induction-2l", "--out", str(out), "--seed", str(seed), "--steps", "3"]) == 0
        runs[tag] = out / "model.safetensors"
        assert f"wrote induction-2l to {out}" in capsys.readouterr().out
    assert _sha(runs["a"]) == _sha(runs["b"])
    assert _sha(runs["a"]) != _sha(runs["c"])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["training"]["seed"] == 0
    # the model trained: its weights moved away from seed 0's initialisation (3 AdamW steps at lr ramp)
    a, c = load_file(runs["a"]), load_file(runs["c"])
    assert set(a) == set(c) and all(a[k].shape == c[k].shape for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert lenslab.load_model(str(tmp_path / "a"), device="cpu").cfg.n_layers == 2


def test_zoo_train_steps_must_be_positive(capsys):
    assert main(["zoo", "train", "induction-2l", "--out", "unused", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


# --- lenslab sinks ablate ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """`planted.planted_model` saved as a zoo folder: a word tokenizer whose BOS is token 0, the
    token that carries the planted massive activation (1000 in dimension 7)."""
    from lenslab.zoo import planted

    tok = zoo.word_tokenizer(["a", "b", "c", "d"])  # 4 special tokens + 4 words = the model's vocab of 8
    assert tok.bos_token_id == planted.PLANTED["bos"] and len(tok) == 8
    out = tmp_path_factory.mktemp("planted")
    zoo.save_hooked(planted.planted_model(), tok, out, summary="planted sink", card="# planted\n")
    return out


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_cli_sinks_ablate_equals_the_library(planted_dir, tmp_path, capsys, mode):
    from lenslab.probes import sinks

    # 31 words + BOS: the unplanted heads spread ~H_32/32 = 0.13 < 0.3 on the first token, so only L1H0 is a sink
    prompts = [" ".join("abcd"[(i * k) % 4] for i in range(31)) for k in (1, 3)]
    out = tmp_path / "ablate.json"
    assert (
        main(
            [
                "sinks",
                "ablate",
                "--model",
                str(planted_dir),
                "--prompts",
                *prompts,
                "--mode",
                mode,
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    model = lenslab.load_model(str(planted_dir), device="cpu")
    ref = sinks.ablate_massive(
        model, prompts, mode=mode, rule=sinks.MassiveRule(absolute=100.0, ratio=1000.0), threshold=0.3
    )
    assert got["mode"] == mode and got["layer"] == ref.layer == 0 and got["dims"] == ref.dims == [7]
    assert len(got["entries"]) == 2  # position 0 of each prompt
    assert got["loss_clean"] == pytest.approx(ref.loss_clean, abs=1e-6)
    assert got["loss_ablated"] == pytest.approx(ref.loss_ablated, abs=1e-6)
    assert got["sink_rate_clean"] == pytest.approx(ref.sinks_clean.sink_rate) == pytest.approx(0.25)
    assert got["sink_rate_ablated"] == pytest.approx(ref.sinks_ablated.sink_rate)
    assert f"loss {ref.loss_clean:.4g} -> {ref.loss_ablated:.4g}" in printed
    # independent loss: TransformerLens's own mean next-token loss, with and without the zeroing
    toks = model.to_tokens(prompts)
    with torch.no_grad():
        clean = float(model(toks, return_type="loss"))
        zeroed = lambda r, hook: torch.cat([r[:, :1].index_fill(-1, torch.tensor([7]), 0.0), r[:, 1:]], 1)
        ablated = float(
            model.run_with_hooks(toks, return_type="loss", fwd_hooks=[("blocks.0.hook_resid_post", zeroed)])
        )
    assert got["loss_clean"] == pytest.approx(clean, abs=1e-5)
    if mode == "zero":
        assert got["loss_ablated"] == pytest.approx(ablated, abs=1e-5)
        assert got["sink_rate_ablated"] == 0.0  # the planted sink goes with its massive activation
    else:  # both entries are 1000: their mean changes nothing
        assert got["loss_ablated"] == pytest.approx(clean, abs=1e-5)
        assert got["sink_rate_ablated"] == pytest.approx(0.25)


# --- RelP attn_rule="ah" -------------------------------------------------------------------------


def _frozen_patch(model, task, layer, pos, base_cache):
    """Exact patching of resid_pre[layer][:, pos] (source -> base, the denoise direction) with every
    attention pattern and LayerNorm scale frozen at the base run's values: the model RelP-ah
    linearises. Returns metric(patched) - metric(base), both under the same freeze."""
    bound = tasks.get_metric("logit_diff", model, task)
    _, src = model.run_with_cache(task.clean_tokens, names_filter=lambda n: n == f"blocks.{layer}.hook_resid_pre")
    frozen = [(n, lambda a, hook: base_cache[hook.name]) for n in base_cache]

    def put(r, hook):
        r = r.clone()
        r[:, pos] = src[hook.name][:, pos]
        return r

    with torch.no_grad():
        base = bound(model.run_with_hooks(task.corrupt_tokens, fwd_hooks=frozen))
        patched = bound(
            model.run_with_hooks(task.corrupt_tokens, fwd_hooks=frozen + [(f"blocks.{layer}.hook_resid_pre", put)])
        )
    return float(patched - base)


def test_relp_ah_rule_equals_patching_with_frozen_patterns(ln_attn_model):
    model = ln_attn_model
    task = tasks.induction(model, n=3, seq_len=5, seed=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            task.corrupt_tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_scale"))
        )
    base_cache = {k: v.clone() for k, v in cache.items()}
    ah = circuits.attribute(model, task, "relp", "resid_pre", attn_rule="ah", progress=False)["resid_pre"].scores
    plain = circuits.attribute(model, task, "relp", "resid_pre", progress=False)["resid_pre"].scores
    ref = torch.tensor(
        [[_frozen_patch(model, task, l, p, base_cache) for p in range(task.seq_len)] for l in range(model.cfg.n_layers)]
    )
    assert ah.shape == ref.shape == (2, task.seq_len)
    assert ref.abs().max() > 0.02  # the comparison is not between zeros
    assert (ah - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    # without the rule, RelP keeps the softmax's gradient and misses the frozen-pattern reference
    assert (plain - ref).abs().max() > 2e-3  # measured 5e-3, 50x the tolerance above


# --- tasks.from_spec with a file, per-prompt metrics --------------------------------------------


def test_from_spec_file_equals_the_in_memory_task(ln_attn_model, tmp_path):
    spec = {
        "clean": ["t1 t2 t3 t1 t2", "t5 t6 t7 t5 t6"],
        "corrupt": ["t1 t2 t9 t1 t2", "t5 t6 t8 t5 t6"],
        "answers": [["t3", "t9"], ["t7", "t8"]],
    }
    path = tmp_path / "my_task.json"
    path.write_text(json.dumps(spec))
    from_file = tasks.from_spec(ln_attn_model, str(path))
    direct = tasks.from_prompts(ln_attn_model, spec["clean"], spec["corrupt"], [tuple(a) for a in spec["answers"]])
    assert from_file.name == "my_task"
    assert torch.equal(from_file.clean_tokens, direct.clean_tokens)
    assert torch.equal(from_file.corrupt_tokens, direct.corrupt_tokens)
    assert torch.equal(from_file.answer_tokens, direct.answer_tokens)
    ids = lambda words: [TOK.convert_tokens_to_ids(w) for w in words]
    assert from_file.answer_tokens.tolist() == [ids(["t3", "t9"]), ids(["t7", "t8"])]
    assert from_file.clean_tokens[0].tolist() == [TOK.bos_token_id, *ids("t1 t2 t3 t1 t2".split())]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clean": spec["clean"]}))
    with pytest.raises(lenslab.LenslabError, match="must be JSON with keys clean, corrupt"):
        tasks.from_spec(ln_attn_model, str(bad))


@pytest.mark.parametrize("name", ["logit_diff", "logit_diff_normalized", "answer_prob", "kl_to_clean"])
def test_per_prompt_metrics_are_hand_computed_and_average_to_the_metric(ln_attn_model, name):
    model = ln_attn_model
    t = tasks.induction(model, n=5, seq_len=6, seed=2)
    with torch.no_grad():
        clean, corrupt = model(t.clean_tokens)[:, -1], model(t.corrupt_tokens)[:, -1]
        mixed = 0.5 * (clean + corrupt)  # a third set of logits, neither clean nor corrupt
    rows, c, i = torch.arange(5), t.answer_tokens[:, 0], t.answer_tokens[:, 1]
    ld = lambda z: (z[rows, c] - z[rows, i]).double()

    def hand(z):
        if name == "logit_diff":
            return ld(z)
        if name == "logit_diff_normalized":
            lc, lx = ld(clean).mean(), ld(corrupt).mean()
            return (ld(z) - lx) / (lc - lx)
        if name == "answer_prob":
            return z.double().softmax(-1)[rows, c]
        p, q = clean.double().softmax(-1), z.double().softmax(-1)
        return (p * (p.log() - q.log())).sum(-1)

    m = tasks.get_metric(name, model, t)
    for z in (clean, corrupt, mixed):
        per = m.per_prompt(z)
        assert per.shape == (5,)
        assert torch.allclose(per.double(), hand(z), atol=1e-5, rtol=1e-4)
        full = torch.cat([torch.randn(5, 2, z.shape[-1]), z[:, None]], 1)  # the metric reads the last position
        assert float(m(full)) == pytest.approx(float(hand(z).mean()), abs=1e-5)
    assert m.clean_value == pytest.approx(float(hand(clean).mean()), abs=1e-5)
    assert m.corrupt_value == pytest.approx(float(hand(corrupt).mean()), abs=1e-5)
    assert float(hand(mixed).std()) > 1e-3  # prompts differ: a mean-only bug would show


# --- feature index with resume=False -------------------------------------------------------------


def _dump(path) -> dict:
    from lenslab.probes.features import FeatureStore
    from lenslab.probes.features.store import SCHEMA

    with FeatureStore(path) as st:
        out = {t: sorted((tuple(map(repr, r.values())) for r in st.table(t).to_pylist()), key=repr) for t in SCHEMA}
        out["meta"] = sorted((k, repr(v)) for k, v in st.meta.items() if k != "created")  # a timestamp
    return out


def test_feature_index_resume_false_rebuilds_from_scratch(ln_attn_model, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from lenslab.probes import features as F

    model = ln_attn_model
    cfg = StandardSAEConfig(
        d_in=model.cfg.d_model, d_sae=16, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre", model_name="test")
    )
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"t{int(j)}" for j in torch.randint(0, 40, (9,), generator=g)) for _ in range(12)]
    stale_docs = [" ".join(f"t{int(j)}" for j in torch.randint(0, 40, (7,), generator=g)) for _ in range(10)]
    fresh, path = tmp_path / "fresh", tmp_path / "store"
    F.index(model, sae, docs, fresh, batch_size=4, top_n=3, progress=False).close()

    def stop(b):
        if b == 1:
            raise RuntimeError("interrupted")

    # a partial store of another corpus with other settings, then resume=False over it
    with pytest.raises(RuntimeError):
        F.index(model, sae, stale_docs, path, batch_size=2, top_n=2, progress=False, on_batch=stop)
    stale = _dump(path)
    assert stale["corpus"] and stale["contexts"]
    with pytest.raises(lenslab.LenslabError, match="batch_size=2"):  # resume=True refuses the mismatch
        F.index(model, sae, docs, path, batch_size=4, top_n=3, progress=False)
    F.index(model, sae, docs, path, batch_size=4, top_n=3, resume=False, progress=False).close()
    rebuilt, ref = _dump(path), _dump(fresh)
    assert rebuilt == ref  # every table, the meta included, as the fresh build
    with F.FeatureStore(path) as st:
        assert st.complete and st.n_indexed == len(docs)
    stale_rows = set(stale["corpus"])
    assert not stale_rows & set(rebuilt["corpus"])  # no prompt of the old corpus is left
