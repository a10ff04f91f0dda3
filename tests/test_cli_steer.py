"""`lenslab steer fit|generate|eval` on zoo/steer-sentiment: presets that load and match a hand
computation, streamed side-by-side generations that match hand greedy decoding, a trade-off table
whose strength-0 row is the unsteered model, and clear errors (exit code 2)."""

from __future__ import annotations

import io
import json

import pytest
import torch

import lenslab
from lenslab import steering, zoo
from lenslab.cli import main
from lenslab.data import sentiment

MODEL = "zoo/steer-sentiment"


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return lenslab.load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def sets():
    return zoo.prompt_sets(MODEL)


def _greedy(model, prompt: str, n: int, hooks=()) -> str:
    """Hand greedy decoding (no lenslab generation code): argmax, append, decode the new text."""
    toks = model.to_tokens(prompt)
    head = model.to_string(toks[0])
    with torch.no_grad():
        for _ in range(n):
            logits = model.run_with_hooks(toks, fwd_hooks=list(hooks))[0, -1]
            toks = torch.cat([toks, logits.argmax().view(1, 1)], dim=1)
    return model.to_string(toks[0])[len(head) :]


def _last_mean(model, prompts, hook):
    with torch.no_grad():
        return torch.stack([model.run_with_cache(p, names_filter=hook)[1][hook][0, -1] for p in prompts]).mean(0)


def _fit(tmp_path, method, *extra):
    out = tmp_path / f"{method}.json"
    assert (
        main(["steer", "fit", "--model", MODEL, "--device", "cpu", "--method", method, *extra, "--out", str(out)]) == 0
    )
    return out


def test_fit_diffmean_default_sets_match_hand_means(tmp_path, model, sets, capsys):
    out = _fit(tmp_path, "diffmean", "--layer", "1")
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "diffmean.safetensors" in printed
    iv = steering.load(out)
    steering.validate(model, iv)
    (edit,) = iv.edits
    hook = "blocks.1.hook_resid_post"
    assert edit.hook == hook and edit.op == "add" and edit.strength == 1.0
    # the zoo's "positive" / "negative" prompt sets, read at the last token (tolerance: float32 sums)
    want = _last_mean(model, sets["positive"], hook) - _last_mean(model, sets["negative"], hook)
    torch.testing.assert_close(edit.vector, want, atol=1e-5, rtol=1e-5)


def test_fit_actadd_uses_the_first_prompt_of_each_set(tmp_path, model, capsys):
    out = _fit(
        tmp_path,
        "actadd",
        "--positive",
        "lovely",
        "happy",
        "--negative",
        "awful",
        "sad",
        "--layer",
        "0",
        "--strength",
        "3",
    )
    iv = steering.load(out)
    (edit,) = iv.edits
    hook = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        _, c = model.run_with_cache(model.to_tokens(["lovely", "awful"]), names_filter=hook)
    assert edit.strength == 3.0 and edit.positions == (0, 1)
    torch.testing.assert_close(edit.vector, c[hook][0] - c[hook][1], atol=1e-6, rtol=0)


def test_fit_austeer_and_lineas_from_files(tmp_path, model, sets, capsys):
    pos_file, neg_file = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos_file.write_text("\n".join(sets["positive"]) + "\n\n")
    neg_file.write_text("\n".join(sets["negative"]))
    au = steering.load(
        _fit(
            tmp_path,
            "austeer",
            "--positive-file",
            str(pos_file),
            "--negative-file",
            str(neg_file),
            "--k",
            "5",
            "--alpha",
            "3",
            "--site",
            "mlp",
        )
    )
    steering.validate(model, au)
    assert au.n_units(model) == 5 and {e.op for e in au.edits} == {"multiply"}
    assert all(e.hook.endswith("hook_mlp_out") for e in au.edits)
    assert au.provenance["positive"] == sets["positive"]  # the blank line is dropped

    li = steering.load(_fit(tmp_path, "lineas", "--steps", "15", "--lr", "0.05", "--site", "resid_post"))
    printed = capsys.readouterr().out
    steering.validate(model, li)
    assert [e.hook for e in li.edits] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    # source = the negative prompts, target = the positive ones; training lowers the loss
    assert li.provenance["source"] == sets["negative"] and li.provenance["target"] == sets["positive"]
    assert li.provenance["loss_final"] < 0.7 * li.provenance["loss_initial"], li.provenance
    assert "LinEAS loss" in printed


class _Writes(io.StringIO):
    """stdout that remembers each write (to see streaming piece by piece)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_generate_streams_unsteered_and_steered(tmp_path, model, sets, monkeypatch, capsys):
    preset = _fit(tmp_path, "diffmean", "--layer", "1")
    capsys.readouterr()
    prompt = sets["negative"][1]
    n = 8
    buf = _Writes()
    monkeypatch.setattr("sys.stdout", buf)
    assert (
        main(
            [
                "steer",
                "generate",
                "--model",
                MODEL,
                "--device",
                "cpu",
                "--preset",
                str(preset),
                "--prompt",
                prompt,
                "--max-new-tokens",
                str(n),
            ]
        )
        == 0
    )
    monkeypatch.undo()
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"prompt:    {prompt}"
    plain, steered = lines[1].removeprefix("unsteered:"), lines[2].removeprefix("steered:").lstrip(" ")
    assert lines[1].startswith("unsteered:") and lines[2].startswith("steered:")
    want_plain = _greedy(model, prompt, n)
    assert plain == want_plain
    iv = steering.load(preset)
    vec = iv.edits[0].vector

    def add(act, hook):
        return act + vec

    want_steered = _greedy(model, prompt, n, [("blocks.1.hook_resid_post", add)])
    assert steered.startswith(want_steered.lstrip(" ")) and steered.endswith("[mean difference; strength 1]")
    assert steered != plain
    # the planted concept: the negative context continues negatively, steering makes it positive
    assert sentiment.counts(want_plain)[0] == 0 and sentiment.is_positive(want_steered), (want_plain, want_steered)
    # streamed: the steered continuation arrives in one write per token, not all at once
    writes = [w for w in buf.writes if w]
    i = writes.index("steered:  ")
    assert "".join(writes[i + 1 : i + 1 + n]) == want_steered

    assert (
        main(
            [
                "steer",
                "generate",
                "--model",
                MODEL,
                "--device",
                "cpu",
                "--preset",
                str(preset),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "4",
                "--strength",
                "0",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].removeprefix("steered:").lstrip(" ").startswith(lines[1].removeprefix("unsteered:").lstrip(" "))
    assert "strength 0" in lines[2]


def test_eval_table_starts_at_the_unsteered_baseline(tmp_path, model, sets, capsys):
    dm = _fit(tmp_path, "diffmean", "--layer", "1")
    au = _fit(tmp_path, "austeer", "--alpha", "5")
    capsys.readouterr()
    prompts = sets["negative"][:4]
    out = tmp_path / "tradeoff.json"
    assert (
        main(
            [
                "steer",
                "eval",
                "--model",
                MODEL,
                "--device",
                "cpu",
                "--preset",
                str(dm),
                str(au),
                "--prompts",
                *prompts,
                "--strengths",
                "0",
                "1",
                "--max-new-tokens",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| method | strength |") and f"wrote {out}" in printed
    from lenslab.steering.tradeoff import TradeoffResult

    res = TradeoffResult.from_json(out)
    data = json.loads(out.read_text())
    assert data["kind"] == "TradeoffResult"
    assert res.methods() == ["mean difference", "austeer resid k=16"]
    baseline = [_greedy(model, p, 6) for p in prompts]
    rate0 = sum(sentiment.is_positive(t) for t in baseline) / len(baseline)
    for m in res.methods():
        r0 = res.row(m, 0)
        assert r0["concept_rate"] == rate0 == 0.0
        assert res.examples[m]["0"] == baseline[: len(res.examples[m]["0"])]
        assert f"| {m} | 0 | {r0['units']} | 0.00 [0.00, 0.00] |" in printed  # rate [95% bootstrap interval]
    r_dm, r_au = res.row("mean difference", 0), res.row("austeer resid k=16", 0)
    assert {k: v for k, v in r_dm.items() if k not in ("method", "units")} == {
        k: v for k, v in r_au.items() if k not in ("method", "units")
    }
    # DiffMean at layer 1, strength 1 flips these negative contexts (measured 1.00)
    assert res.row("mean difference", 1)["concept_rate"] >= 0.75


def test_eval_uses_the_zoo_prompt_set_by_default(tmp_path, capsys):
    dm = _fit(tmp_path, "diffmean", "--layer", "1")
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "eval",
                "--model",
                MODEL,
                "--device",
                "cpu",
                "--preset",
                str(dm),
                "--strengths",
                "0",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3  # header, rule, one row


def test_eval_refits_per_seed_and_reports_the_spread(tmp_path, capsys):
    """`eval --method M --seeds ...` refits on each seed's own prompts and evaluates on its held-out ones;
    the rows are the means and standard deviations of the per-seed runs, and seed 0 alone is one tradeoff()."""
    import statistics

    from lenslab import steering
    from lenslab.steering.tradeoff import TradeoffResult, tradeoff

    out = tmp_path / "seeds.json"
    common = [
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--method",
        "diffmean",
        "--layer",
        "1",
        "--n-fit",
        "8",
        "--n-eval",
        "6",
        "--strengths",
        "0",
        "1",
        "--max-new-tokens",
        "4",
    ]
    assert main(["steer", "eval", *common, "--seeds", "0", "1", "2", "--out", str(out)]) == 0
    assert "concept rate (mean ± std)" in capsys.readouterr().out
    res = TradeoffResult.from_json(out)
    assert res.n_seeds() == 3 and len(res.per_seed) == 3 * 2
    r1 = res.row("diffmean", 1)
    rates = [r["concept_rate"] for r in res.per_seed if r["strength"] == 1]
    assert r1["concept_rate"] == pytest.approx(statistics.fmean(rates)) and r1["concept_rate_std"] == pytest.approx(
        statistics.stdev(rates)
    )
    model = lenslab.load_model(MODEL, device="cpu")
    pos, neg, held = sentiment.seeded_sets(0, 8, 6)
    one = tradeoff(
        model,
        {"diffmean": steering.mean_difference(model, pos, neg, layers=1)},
        held,
        sentiment.is_positive,
        strengths=[0, 1],
        max_new_tokens=4,
        progress=False,
    )
    seed0 = [r for r in res.per_seed if r["seed"] == 0]
    assert [r["concept_rate"] for r in seed0] == [r["concept_rate"] for r in one.rows]
    assert [r["perplexity"] for r in seed0] == pytest.approx([r["perplexity"] for r in one.rows], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "--preset", "PRESET", "--method", "diffmean"],
            "pass either --preset FILE ... (evaluate fitted presets) or --method",
        ),
        (["eval"], "pass either --preset FILE"),
        (
            ["eval", "--preset", "PRESET", "--seeds", "0", "1"],
            "--seeds refits the methods on fresh prompts: use it with --method",
        ),
        (["eval", "--method", "diffmean", "--model", "zoo/ioi-4l"], "which 'zoo/ioi-4l' does not have"),
        (["eval", "--method", "difmean"], "--method 'difmean' is not one of"),
        (
            ["fit", "--method", "diffmeen", "--out", "x.json"],
            "--method 'diffmeen' is not one of diffmean, actadd, austeer, lineas, probe (did you mean 'diffmean'?)",
        ),
        (["fit", "--method", "diffmean", "--out", "x.pdf"], "a preset is a .json file"),
        (["fit", "--method", "lineas", "--positive-file", "/no/such.txt", "--out", "x.json"], "does not exist"),
        (["generate", "--preset", "/no/such/preset.json"], "--preset '/no/such/preset.json' does not exist"),
        (["eval", "--preset", "/no/such/preset.json"], "does not exist; write one with `lenslab steer fit"),
        (
            ["eval", "--preset", "PRESET", "--score", "toxic"],
            "--score 'toxic' is not a known scorer; choices: positive",
        ),
        (["eval", "--preset", "PRESET", "--prompt-set", "upbeat"], "has no prompt set 'upbeat'; it has"),
        (["eval", "--preset", "PRESET", "--out", "t.docx"], "the extension picks the format"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    if "PRESET" in argv:
        preset = _fit(tmp_path, "diffmean", "--layer", "1")
        argv = [str(preset) if a == "PRESET" else a for a in argv]
    capsys.readouterr()
    assert main(["steer", *argv, *([] if "--model" in argv else ["--model", MODEL]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: ") and message in err and "Traceback" not in err, err


def test_preset_for_another_model_is_refused(tmp_path, tiny_zoo_dir, capsys):
    preset = _fit(tmp_path, "diffmean", "--layer", "1")  # d_model 96; the tiny model's is different
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "generate",
                "--model",
                str(tiny_zoo_dir),
                "--device",
                "cpu",
                "--preset",
                str(preset),
                "--prompt",
                "t1 t2",
            ]
        )
        == 2
    )
    assert "lenslab: error: " in capsys.readouterr().err
