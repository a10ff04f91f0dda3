"""Numbers the README and docs/*.md state that have no natural home in one model's test file.

Each is either recomputed here (committed zoo weights, the documented seeds, one thread: greedy
decoding gives exact counts) or checked against the stored measurement that another test
recomputes (named at each check), so a doc cannot drift from what the code measures.
Tolerance: a printed number equals the measurement rounded to its printed digits, plus 2e-5
relative slack for float32 sums reordered on another CPU.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import zoo
from lenslab.data import refusal

ROOT = Path(__file__).resolve().parents[1]
MOE = "zoo/moe-refusal"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _doc(name: str) -> str:
    return (ROOT / name).read_text()


@pytest.fixture(scope="module")
def moe():
    return lenslab.load_model(MOE, device="cpu")


# --- docs/experts.md ------------------------------------------------------------------------------
def test_experts_doc_drop_rows_quote_the_card(doc_numbers):
    """The drop rows of docs/experts.md's switch table are the card's (which
    tests/test_zoo_moe_refusal.py recomputes), at the digits each prints."""
    card = doc_numbers.table(zoo.read_card(MOE), "| switch | refusal, held-out harmful")
    card = {r[0]: r[1:] for r in card}
    doc = {r[0]: r[1:] for r in doc_numbers.table(_doc("docs/experts.md"), "| switch (k = 4) |")}
    pairs = {
        "baseline": "baseline",
        "top-4 off (drop, MoTE's suppress)": "top-4 off",
        "top-4 forced on": "top-4 on",
        "random-4 off, drop (5 draws, mean ± std)": "random-4 off",
    }
    for doc_row, card_row in pairs.items():
        for d, c in zip(doc[doc_row], card[card_row], strict=True):
            for dv, cv in zip(d.split(" ± "), c.split(" ± "), strict=True):
                assert doc_numbers.close(float(cv.rstrip("%")), dv), (doc_row, d, c)
    assert "(each +4.48 selections per prompt" in _doc("docs/experts.md") and "L1e2 (+4.48)" in zoo.read_card(MOE)


@pytest.mark.slow
def test_experts_doc_mask_rows_and_finer_switches_are_measured(moe, doc_numbers):
    """The mask rows (a second `mote_table` in mask mode, same seeds and draws) and the table of
    finer switches (drop mode, the same 200 + 200 held-out prompts), every cell."""
    from lenslab.steering import evaluate as ev
    from lenslab.steering import switch_experts

    doc = _doc("docs/experts.md")
    table = ev.mote_table(moe, n_eval=200, k=4, n_random=5, seed=0, mode="mask", progress=False)
    rows = {r[0]: r[1:] for r in doc_numbers.table(doc, "| switch (k = 4) |")}
    for doc_row, row in (
        ("top-4 off (mask: next expert enters)", "top-4 off"),
        ("random-4 off, mask (same draws)", "random-4 off"),
    ):
        r = table.rows.index(row)
        for c, (column, cell) in enumerate(zip(table.columns, rows[doc_row], strict=True)):
            scale = 1.0 if column == "perplexity" else 100.0
            mean, _, std = cell.partition(" ± ")
            assert doc_numbers.close(scale * float(table.mean[r, c]), mean), (doc_row, column, cell)
            if std:
                assert doc_numbers.close(scale * float(table.std[r, c]), std), (doc_row, column, cell)

    harmful, _ = refusal.prompts(200, "harmful", "test", seed=0)
    benign, answers = refusal.prompts(200, "benign", "test", seed=0)
    l1, l2 = [(1, 2), (1, 5)], [(2, 3), (2, 6)]
    ivs = {
        "L1e2 off": switch_experts(off=[(1, 2)]),
        "L1e2 + L1e5 off (layer 1 pair)": switch_experts(off=l1),
        "L2e3 + L2e6 off (layer 2 pair)": switch_experts(off=l2),
        "all four off at strength 0.5": switch_experts(off=l1 + l2, strength=0.5),
        "L1e2 + L1e5 forced on": switch_experts(on=l1),
        "L2e3 + L2e6 forced on": switch_experts(on=l2),
    }
    texts = ev.continuations(moe, ivs, {"h": harmful, "b": benign}, max_new_tokens=10, progress=False)
    rows = doc_numbers.table(doc, "| switch | refusal, harmful | refusal, benign | exact match, benign |")
    assert [r[0] for r in rows] == list(ivs)
    for name, ref_h, ref_b, acc in rows:
        h, b = texts[name]["h"], texts[name]["b"]
        assert doc_numbers.close(100 * sum(map(refusal.is_refusal, h)) / 200, ref_h), (
            name,
            ref_h,
        )  # L1 pair: 32 of 200
        assert doc_numbers.close(100 * sum(map(refusal.is_refusal, b)) / 200, ref_b), (name, ref_b)
        exact = sum(refusal.normalize(t) == a for t, a in zip(b, answers)) / 200
        assert doc_numbers.close(100 * exact, acc), (name, acc)


def _console(doc: str, command: str) -> list[str]:
    """The output lines printed under `$ <command>` in a console block of `doc`."""
    lines = doc.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("$ " + command))
    while lines[i].endswith("\\"):
        i += 1
    out = []
    for line in lines[i + 1 :]:
        if line.startswith(("$ ", "```")) or not line.strip():
            break
        out.append(line)
    return out


@pytest.mark.slow
def test_experts_doc_cli_outputs_are_measured(tmp_path, capsys):
    """`lenslab moe inspect` and `rank` print exactly what docs/experts.md shows (routing and
    selection counts are discrete; the rank scores are multiples of 1/8), and the app section
    quotes the same ranking (+5.0, then L3e0 at +2.875)."""
    from lenslab.cli import main

    doc = _doc("docs/experts.md")
    prompts = ["user : reverse apple bomb river assistant :", "user : reverse apple stone river assistant :"]
    assert (
        main(
            [
                "moe",
                "inspect",
                "--model",
                MOE,
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "routing.json"),
                "--prompts",
                *prompts,
            ]
        )
        == 0
    )
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L")]
    assert printed == [line for line in _console(doc, "lenslab moe inspect") if line.startswith("L")]
    ranking = tmp_path / "refusal_experts.json"
    assert main(["moe", "rank", "--model", MOE, "--device", "cpu", "--top-k", "6", "--out", str(ranking)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L")]
    assert printed == [line for line in _console(doc, "lenslab moe rank") if line.startswith("L")]
    assert "L1e2, L1e5, L2e3, L2e6 at +5.0, then L3e0 at +2.875" in doc and "L3 e0  +2.875" in printed
    assert "+5.0 selections per prompt each, next L3e0 at +2.875" in " ".join(doc.split())  # the notebook paragraph


# --- README ---------------------------------------------------------------------------------------
def test_readme_quotes_the_cards(doc_numbers):
    """README numbers are the cards' (each card recomputed by its tests/test_zoo_*.py)."""
    readme = _doc("README.md")
    moe_rows = {r[0]: r[1:] for r in doc_numbers.table(zoo.read_card(MOE), "| switch | refusal, held-out harmful")}
    base, off, rand = moe_rows["baseline"][0], moe_rows["top-4 off"][0], moe_rows["random-4 off"][0].split(" ± ")[0]
    assert (base, off, rand) == ("100.0%", "0.0%", "99.7%")
    assert "top-4 off: refusals 100% -> 0% with capability unchanged; random-4 off: 99.7%" in readme
    assert moe_rows["top-4 off"][2] == moe_rows["baseline"][2]  # capability unchanged
    ioi = doc_numbers.table(zoo.read_card("zoo/ioi-4l"), "| split | prompts | accuracy |")
    assert f"{ioi[0][2]} accuracy on fresh prompts, {ioi[1][2]} on held-out names and templates" in readme
    sent = {r[0]: r[1:] for r in doc_numbers.table(zoo.read_card("zoo/steer-sentiment"), "| context |")}
    assert f"({sent['positive'][0]} / {sent['negative'][1]})" in readme
    # "loss recovered 0.97-1.00": the range of the shipped SAEs' loss recovered (all and objective)
    lo, hi = re.search(r"loss recovered (\d\.\d\d)-(\d\.\d\d)", readme).groups()
    values = [
        m["loss_recovered"]
        for p in (ROOT / "lenslab" / "zoo").glob("*/saes/*/metrics.json")
        for m in json.loads(p.read_text()).values()
    ]
    assert len(values) == 8
    assert f"{min(values):.2f}" == lo and min(f"{max(values):.2f}", "1.00") == hi, (values, lo, hi)
    assert "4 layers, 8 experts, top-2" in readme and "4 layers, d_model 128" in readme


# --- docs/features.md -----------------------------------------------------------------------------
def test_features_doc_sae_table_quotes_the_stored_metrics(doc_numbers):
    """docs/features.md's table equals each shipped SAE's cfg.json and metrics.json (which
    tests/probes/test_sae.py::test_shipped_sae_matches_its_card recomputes, rel 1e-4)."""
    rows = doc_numbers.table(_doc("docs/features.md"), "| SAE | d_in → d_sae |")
    assert len(rows) == 4
    for name, dims, k, ev, dead, rec_all, rec_obj, _ in rows:
        model, hook = name.strip("`").rsplit("/", 1)
        folder = ROOT / "lenslab" / "zoo" / model.removeprefix("zoo/") / "saes" / hook
        cfg = json.loads((folder / "cfg.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        first = metrics["all next-token predictions"]
        objective = next(v for key, v in metrics.items() if key.startswith("objective"))
        assert dims == f"{cfg['d_in']} → {cfg['d_sae']}" and int(k) == cfg["k"], name
        assert doc_numbers.close(first["explained_variance"], ev), (name, first["explained_variance"])
        assert doc_numbers.close(100 * first["dead_fraction"], dead), (name, first["dead_fraction"])
        assert doc_numbers.close(first["loss_recovered"], rec_all), (name, first["loss_recovered"])
        assert doc_numbers.close(objective["loss_recovered"], rec_obj), (name, objective["loss_recovered"])


# --- docs/sinks.md --------------------------------------------------------------------------------
# Every number of the page is recomputed here on the planted models, the zoo models and the tiny
# random checkpoints; the planted models are bit-reproducible in float32 on one thread, the rest
# get the float32 slack of `doc_numbers.close`.
def _rows(doc: str, header: str) -> dict[str, list[str]]:
    """The first table under `header` as {first cell: other cells}, escaped pipes (\\|) kept in a
    cell as "|", bold marks dropped."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [
            c.strip().replace("\\|", "|").replace("**", "") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))
        ]
        rows[cells[0]] = cells[1:]
    return rows


def _span(text: str) -> tuple[str, str]:
    """The two ends of a printed range "a–b" (en dash or hyphen)."""
    lo, hi = re.fullmatch(r"\s*([-\d.]+)\s*[–-]\s*([-\d.]+)\s*", text).groups()
    return lo, hi


def _in_span(doc_numbers, values, text: str) -> bool:
    """min and max of `values` print as the range `text`."""
    lo, hi = _span(text)
    return doc_numbers.close(min(values), lo) and doc_numbers.close(max(values), hi)


def _uniform(t: int) -> float:
    """alpha_0 of a head that attends uniformly over T tokens: H_T / T."""
    return sum(1 / (i + 1) for i in range(t)) / t


def test_sinks_doc_uniform_alpha_values(doc_numbers):
    doc = " ".join(_doc("docs/sinks.md").split())
    quoted = re.search(r"alpha_0 = H_T / T \(([^)]*)\)", doc).group(1)
    pairs = re.findall(r"([\d.]+) at T = (\d+)", quoted)
    assert [int(t) for _, t in pairs] == [8, 15, 32, 64]
    for printed, t in pairs:
        assert doc_numbers.close(_uniform(int(t)), printed), (t, printed)


@pytest.fixture(scope="module")
def planted_sinks():
    from lenslab.probes import sinks
    from lenslab.zoo import planted

    model, toks = planted.planted_model(), planted.planted_tokens(4, 32)
    return (
        sinks.attention_sinks(model, toks),
        sinks.massive_activations(model, toks),
        sinks.ablate_massive(model, toks, mode="zero"),
        sinks.ablate_massive(model, toks, mode="mean"),
    )


def test_sinks_doc_planted_table_is_measured(planted_sinks, doc_numbers):
    s, m, zero, mean = planted_sinks
    rows = _rows(_doc("docs/sinks.md"), "| | found |")  # the first such table: the dense planted model
    heads = rows["sink heads (ε = 0.3)"][0]
    assert s.sink_heads() == [(1, 0)] and "exactly L1H0" in heads
    a0 = s.attn_to_first
    assert doc_numbers.close(float(a0[1, 0]), re.search(r"alpha_0 = ([\d.]+)", heads).group(1))
    other = re.search(r"three heads ([\d.]+) = H_32 / 32", heads).group(1)
    assert all(doc_numbers.close(float(a0[l, h]), other) for l, h in ((0, 0), (0, 1), (1, 1)))
    assert doc_numbers.close(_uniform(32), other)
    assert doc_numbers.close(100 * s.sink_rate, re.match(r"([\d.]+) %", rows["sink rate"][0]).group(1))
    cell = rows["massive entries (default rule)"][0]
    assert {(e["layer"], e["dim"], e["pos"]) for e in m.massive} == {(0, 7, 0), (1, 7, 0)} and len(m.massive) == 8
    assert "exactly dim 7 at position 0, in both layer outputs, all 4 samples" in cell
    assert all(doc_numbers.close(e["value"], re.search(r"value (\d+)", cell).group(1)) for e in m.massive)
    # each entry over the median |a| of its own hidden state: 20 988-22 403, printed to the hundred
    lo, hi = (int(x.replace(" ", "")) for x in re.search(r"([\d ]+)–([\d ]+) × the median", cell).groups())
    ratios = [e["ratio"] for e in m.massive]
    assert abs(min(ratios) - lo) <= 50 and abs(max(ratios) - hi) <= 50, ratios
    cell = rows["zero ablation at layer 0"][0]
    assert zero.layer == 0
    rates = re.search(r"sink rate ([\d.]+) % → ([\d.]+) %", cell).groups()
    assert doc_numbers.close(100 * zero.sinks_clean.sink_rate, rates[0]) and doc_numbers.close(
        100 * zero.sinks_ablated.sink_rate, rates[1]
    )
    a = re.search(r"alpha_0 of L1H0 ([\d.]+) → ([\d.]+)", cell).groups()
    assert doc_numbers.close(float(zero.sinks_clean.attn_to_first[1, 0]), a[0])
    assert doc_numbers.close(float(zero.sinks_ablated.attn_to_first[1, 0]), a[1])
    loss = re.search(r"loss ([\d.]+) → ([\d.]+)", cell).groups()
    assert doc_numbers.close(zero.loss_clean, loss[0]) and doc_numbers.close(
        zero.loss_ablated, loss[1]
    )  # 2.1231 -> 2.1274
    assert rows["mean ablation"][0].startswith("sink rate and loss unchanged")
    assert mean.sinks_ablated.sink_rate == mean.sinks_clean.sink_rate and mean.loss_ablated == mean.loss_clean


def _sink_numbers(name: str):
    from lenslab import tasks
    from lenslab.probes import sinks

    model = lenslab.load_model(name, device="cpu")
    task = tasks.induction(model, n=16, seq_len=20) if "induction" in name else tasks.ioi(model, n=16)
    toks = task.clean_tokens
    s = sinks.attention_sinks(model, toks)
    m = sinks.massive_activations(model, toks)
    m10 = sinks.massive_activations(model, toks, rule=sinks.MassiveRule(absolute=None, ratio=10))
    return toks.shape[1], s, m, m10


def test_sinks_doc_zoo_table_is_measured(doc_numbers):
    """The zoo table and the prose under it (ioi-4l's layer-1 heads at 0.28-0.33, value-weighted 2.0-2.2)."""
    doc = _doc("docs/sinks.md")
    rows = _rows(doc, "| model | alpha_0 per head (by layer) |")
    for name in ("zoo/induction-2l", "zoo/ioi-4l"):
        per_layer, rate, massive, largest = rows[name]
        t, s, m, m10 = _sink_numbers(name)
        a0 = s.attn_to_first
        spans = re.findall(r"L(\d) ([\d.]+–[\d.]+)", per_layer)
        assert [int(l) for l, _ in spans] == list(range(a0.shape[0])), name
        for l, span in spans:
            assert _in_span(doc_numbers, a0[int(l)].tolist(), span), (name, l, a0[int(l)].tolist(), span)
        uniform = re.search(r"uniform over (\d+) tokens: ([\d.]+)", per_layer).groups()
        assert int(uniform[0]) == t and doc_numbers.close(_uniform(t), uniform[1]), (name, t)
        assert doc_numbers.close(100 * s.sink_rate, re.match(r"([\d.]+) %", rate).group(1)), (name, s.sink_rate)
        heads = re.findall(r"L(\d)H(\d)", rate)
        assert s.sink_heads() == [(int(l), int(h)) for l, h in heads], name
        assert massive == "none" and m.massive == [] and m10.massive == [], name
        assert "none at ratio 10 either" in largest
        ratios = (m.top_values[:, 0].abs() / m.medians).tolist()
        if name == "zoo/ioi-4l":  # "5–7 in every layer"
            assert _in_span(doc_numbers, ratios, re.match(r"([\d–]+) in every layer", largest).group(1)), ratios
            sink_heads = s.sink_heads()
            at = re.search(r"sit at ([\d.–]+) \(the layer's four heads ([\d.–]+)\)", " ".join(doc.split())).groups()
            assert _in_span(doc_numbers, [float(a0[l, h]) for l, h in sink_heads], at[0]) and _in_span(
                doc_numbers, a0[1].tolist(), at[1]
            )
            vw = s.value_weighted[..., 0]
            assert _in_span(
                doc_numbers,
                [float(vw[l, h]) for l, h in sink_heads],
                re.search(r"value-weighted alpha_0\s+\(([\d.–]+)\)", doc).group(1),
            )
            assert float(vw.max()) == max(float(vw[l, h]) for l, h in sink_heads)  # "the largest in the model"
        else:  # "6.2 (L0), 8.4 (L1)"
            printed = re.findall(r"([\d.]+) \(L(\d)\)", largest)
            assert [int(l) for _, l in printed] == [0, 1]
            assert all(doc_numbers.close(ratios[int(l)], v) for v, l in printed), ratios


@pytest.fixture(scope="module")
def planted_moe():
    from lenslab.probes import sinks
    from lenslab.probes import super_experts as se
    from lenslab.zoo import planted

    model, toks = planted.planted_moe_model(), planted.planted_tokens(4, 32)
    prof = se.profile_experts(model, toks)
    return (
        prof,
        {r: prof.super_experts(r) for r in se.RULES},
        sinks.massive_activations(model, toks),
        sinks.attention_sinks(model, toks),
        se.ablate_super_experts(model, toks, random_draws=5),
    )


def test_sinks_doc_planted_moe_table_is_measured(planted_moe, doc_numbers):
    prof, found, m, s, ab = planted_moe
    doc = _doc("docs/sinks.md")
    start = doc.index("### Validation: a planted MoE model")
    rows = _rows(doc[start:], "| | found |")
    cell = rows["output_max of expert (0, 2)"][0]
    v = re.match(r"([\d.]+) \(= 10 · silu\(10\) · 10\), channel (\d+), position (\d+)", cell).groups()
    assert doc_numbers.close(prof.value(0, 2), v[0]) and doc_numbers.close(10 * 10 / (1 + math.exp(-10)) * 10, v[0])
    assert (int(prof.channel[0, 2]), int(prof.pos[0, 2])) == (int(v[1]), int(v[2]))
    assert doc_numbers.close(float(prof.input_max[0, 2]), re.search(r"input_max ([\d.]+)", cell).group(1))
    others = [float(prof.output_max[l, e]) for l in range(2) for e in range(4) if (l, e) != (0, 2)]
    assert _in_span(doc_numbers, others, re.search(r"output_max ([\d.–]+)", rows["every other expert"][0]).group(1)), (
        others
    )
    key = next(k for k in rows if k.startswith("super experts, rule su"))
    bars = re.search(r"\((\d+) values; bars P99.5 = ([\d.]+), ⌊max / 10⌋ = (\d+)\)", key).groups()
    su = found["su"]
    assert su.population == int(bars[0])
    assert doc_numbers.close(su.thresholds["percentile"], bars[1]) and su.thresholds["floor_max_over_times"] == float(
        bars[2]
    )
    assert su.labels == found["p99.5"].labels == ["L0e2"] and "exactly L0e2; also under p99.5" in rows[key][0]
    assert (
        found["mean+3std"].experts == found["50xmean"].experts == []
        and "none under mean+3std or 50xmean" in rows[key][0]
    )
    cell = rows["massive activations (default rule)"][0]
    assert {(e["layer"], e["dim"], e["pos"], e["sample"]) for e in m.massive} == {
        (l, 7, 0, b) for l in range(2) for b in range(4)
    }
    assert "exactly dim 7 at position 0, both layer outputs, all 4 samples" in cell
    assert all(doc_numbers.close(e["value"], re.search(r"samples: ([\d.]+)", cell).group(1)) for e in m.massive)
    cell = rows["attention sinks"][0]
    assert s.sink_heads() == [(1, 0)] and doc_numbers.close(
        float(s.attn_to_first[1, 0]), re.search(r"alpha_0 = ([\d.]+)", cell).group(1)
    )
    assert doc_numbers.close(100 * s.sink_rate, re.search(r"sink rate ([\d.]+) %", cell).group(1))
    cell = rows["pruning L0e2"][0]
    assert ab.experts == [(0, 2)]
    n = re.search(r"massive entries (\d+) → (\d+)", cell).groups()
    assert (len(ab.massive_clean.massive), len(ab.massive_pruned.massive)) == tuple(map(int, n))
    big = re.search(r"largest \|a\| ([\d.]+) → ([\d.]+)", cell).groups()
    assert doc_numbers.close(float(ab.massive_clean.top_values.abs().max()), big[0])
    assert doc_numbers.close(float(ab.massive_pruned.top_values.abs().max()), big[1])
    rates = re.search(r"sink rate ([\d.]+) % → ([\d.]+) %", cell).groups()
    assert doc_numbers.close(100 * ab.sinks_clean.sink_rate, rates[0]) and doc_numbers.close(
        100 * ab.sinks_pruned.sink_rate, rates[1]
    )
    uniform = re.search(r"alpha_0 of L1H0 → ([\d.]+) = uniform", cell).group(1)
    assert doc_numbers.close(float(ab.sinks_pruned.attn_to_first[1, 0]), uniform)
    loss = re.search(r"loss ([\d.]+) → ([\d.]+)", cell).groups()
    assert doc_numbers.close(ab.loss_clean, loss[0]) and doc_numbers.close(ab.loss_pruned, loss[1])  # 2.1268 -> 2.1291
    key = next(k for k in rows if k.startswith("pruning 1 random other expert"))
    assert len(ab.random) == int(re.search(r"\((\d+) draws\)", key).group(1))
    cell = rows[key][0]
    assert all(r["n_massive"] == int(re.match(r"massive entries (\d+)", cell).group(1)) for r in ab.random)
    assert all(
        doc_numbers.close(100 * r["sink_rate"], re.search(r"sink rate ([\d.]+) %", cell).group(1)) for r in ab.random
    )
    assert all(doc_numbers.close(r["max_abs"], re.search(r"largest \|a\| ([\d.]+)", cell).group(1)) for r in ab.random)
    assert _in_span(doc_numbers, [r["loss"] for r in ab.random], re.search(r"loss ([\d.–]+)", cell).group(1))


def test_sinks_doc_moe_refusal_table_is_measured(moe, doc_numbers):
    """docs/sinks.md, zoo/moe-refusal: the super-expert profile, kurtosis, massive activations,
    sinks and the pruning comparison (5 random draws, seed 0) on its 16 example prompts."""
    from lenslab.probes import sinks
    from lenslab.probes import super_experts as se

    doc = _doc("docs/sinks.md")
    start = doc.index("### zoo/moe-refusal")
    rows = _rows(doc[start:], "| | found |")
    sets = zoo.prompt_sets(MOE)
    prompts = [p for ps in sets.values() for p in ps]
    assert len(prompts) == 16 and '(`zoo.prompt_sets("zoo/moe-refusal")`: 8 harmful, 8 benign; 23 experts' in doc
    prof = se.profile_experts(moe, prompts)
    pop = prof.population()
    assert pop.numel() == 23 and prof.cutoff == 3
    found = {r: prof.super_experts(r) for r in se.RULES}
    key = next(k for k in rows if k.startswith("super experts (su;"))
    bars = re.search(r"bars P99.5 = ([\d.]+), ⌊max / 10⌋ = (\d+)", key).groups()
    assert doc_numbers.close(found["su"].thresholds["percentile"], bars[0])
    assert found["su"].thresholds["floor_max_over_times"] == float(bars[1])
    cell = rows[key][0]
    assert (
        found["su"].labels == found["p99.5"].labels == found["mean+3std"].labels == ["L1e5"]
        and not found["50xmean"].experts
    )
    v = re.match(
        r"L1e5: output_max ([\d.]+) on the harmful marker word \"(\w+)\" \(position (\d+)\), channel (\d+)", cell
    ).groups()
    assert doc_numbers.close(prof.value(1, 5), v[0])
    assert (prof.token_labels[1][5], int(prof.pos[1, 5]), int(prof.channel[1, 5])) == (v[1], int(v[2]), int(v[3]))
    assert doc_numbers.close(
        found["mean+3std"].thresholds["mean_plus_std"], re.search(r"mean\+3std \(bar ([\d.]+)\)", cell).group(1)
    )
    cell = rows["next largest"][0]
    for label, value, token in re.findall(r"L(\d+e\d+) ([\d.]+)(?: \(on \"(\w+)\"\))?", cell):
        l, e = map(int, label.split("e"))
        assert doc_numbers.close(prof.value(l, e), value), (label, prof.value(l, e))
        if token:
            assert prof.token_labels[l][e] == token, label
    ranked = sorted(((float(prof.output_max[l, e]), f"L{l}e{e}") for l in range(3) for e in range(8)), reverse=True)
    assert [lab for _, lab in ranked[1:4]] == re.findall(r"L\d+e\d+", cell)[:3]  # the next three, in order
    assert doc_numbers.close(float(pop.median()), re.search(r"median ([\d.]+)", cell).group(1))
    assert doc_numbers.close(float(pop.max() / pop.median()), re.search(r"max / median ([\d.]+)", cell).group(1))
    kurt = re.findall(r"L(\d) ([−\d.]+)", rows["kurtosis of output_max per layer"][0])
    assert [int(l) for l, _ in kurt] == [0, 1, 2, 3]
    assert all(doc_numbers.close(float(prof.kurtosis()[int(l)]), k.replace("−", "-")) for l, k in kurt), prof.kurtosis()
    m = sinks.massive_activations(moe, prompts)
    ratios = (m.top_values[:, 0].abs() / m.medians).tolist()
    printed = re.search(
        r"none; largest \|a\| / median per layer output ([\d., ]+)$", rows["massive activations (default rule)"][0]
    ).group(1)
    assert m.massive == [] and all(doc_numbers.close(r, p) for r, p in zip(ratios, printed.split(", "), strict=True)), (
        ratios
    )
    s = sinks.attention_sinks(moe, prompts)
    cell = rows["attention sinks"][0]
    assert doc_numbers.close(100 * s.sink_rate, re.search(r"sink rate ([\d.]+) %", cell).group(1))
    assert s.sink_heads() == [(int(l), int(h)) for l, h in re.findall(r"L(\d)H(\d)", cell)]
    ab = se.ablate_super_experts(moe, prompts, found["su"], random_draws=5)
    cell = rows["pruning L1e5"][0]
    rates = re.search(r"sink rate ([\d.]+) % → ([\d.]+) %", cell).groups()
    assert doc_numbers.close(100 * ab.sinks_clean.sink_rate, rates[0]) and doc_numbers.close(
        100 * ab.sinks_pruned.sink_rate, rates[1]
    )
    big = re.search(r"largest \|a\| ([\d.]+) → ([\d.]+)", cell).groups()
    assert doc_numbers.close(float(ab.massive_clean.top_values.abs().max()), big[0])
    assert doc_numbers.close(float(ab.massive_pruned.top_values.abs().max()), big[1])
    assert ab.massive_clean.massive == ab.massive_pruned.massive == [] and "no massive entries before or after" in cell
    key = next(k for k in rows if k.startswith("pruning 1 random other expert"))
    assert len(ab.random) == int(re.search(r"\((\d+) draws\)", key).group(1))
    cell = rows[key][0]
    assert _in_span(
        doc_numbers, [100 * r["sink_rate"] for r in ab.random], re.search(r"sink rate ([\d.–]+) %", cell).group(1)
    ), ab.random
    assert _in_span(
        doc_numbers, [r["max_abs"] for r in ab.random], re.search(r"largest \|a\| ([\d.–]+)", cell).group(1)
    ), ab.random
    benign = se.profile_experts(moe, sets["other"])
    cell = rows["benign prompts only"][0]
    assert int(benign.tokens[1, 5]) == 0 and cell.startswith("L1e5 receives no token")
    flagged = benign.super_experts("su")
    label, value = re.search(r"su flags (L\d+e\d+) \(([\d.]+)\)", cell).groups()
    assert flagged.labels == [label] and doc_numbers.close(flagged.values[0], value)


@pytest.mark.slow
def test_sinks_doc_tiny_random_moe_table_is_measured(tiny_moe_dir, doc_numbers):
    """docs/sinks.md, the tiny random checkpoints (tests/conftest.py, seed 0, random biases and
    norm weights) on 16 samples of BOS + 31 tokens drawn with torch.Generator seed 0."""
    from lenslab.probes import sinks
    from lenslab.probes import super_experts as se

    doc = _doc("docs/sinks.md")
    start = doc.index("### Tiny random real-architecture models")
    rows = _rows(doc[start:], "| model (loaded as) |")
    assert (
        "16 samples of 32 random tokens (`torch.randint(4, 64, (16, 31))`, generator seed 0) with the BOS (id 0) first"
        in " ".join(doc[start:].split())
    )
    ids = torch.cat(
        [
            torch.zeros(16, 1, dtype=torch.long),
            torch.randint(4, 64, (16, 31), generator=torch.Generator().manual_seed(0)),
        ],
        1,
    )
    rule = sinks.MassiveRule(absolute=None, ratio=20)
    archs = {
        "Mixtral (HookedTransformer)": "mixtral",
        "OLMoE (HookedTransformer)": "olmoe",
        "Qwen2-MoE (TransformerBridge)": "qwen2_moe",
        "Qwen3-MoE (TransformerBridge)": "qwen3_moe",
    }
    assert list(rows) == list(archs)
    sizes, ratios = [], []
    for row, arch in archs.items():
        flags, out_max, ratio, others, pruned, rand = rows[row]
        model = lenslab.load_model(str(tiny_moe_dir(arch)), device="cpu")
        assert type(model).__name__ == row.split("(")[1].rstrip(")")
        prof = se.profile_experts(model, ids)
        found = prof.super_experts("su")
        pop = prof.population()
        ab = se.ablate_super_experts(model, ids, found, random_draws=5, massive_rule=rule)
        measured = dict(
            flags=found.labels,
            out=found.values,
            ratio=float(pop.max() / pop.median()),
            others=(prof.super_experts("mean+3std").labels, prof.super_experts("50xmean").labels),
            loss=(ab.loss_clean, ab.loss_pruned),
            rate=(ab.sinks_clean.sink_rate, ab.sinks_pruned.sink_rate),
            big=(float(ab.massive_clean.top_values.abs().max()), float(ab.massive_pruned.top_values.abs().max())),
            massive=(len(ab.massive_clean.massive), len(ab.massive_pruned.massive)),
            rand=[r["loss"] for r in ab.random],
        )
        sizes.append(pop.numel())
        ratios.append(measured["ratio"])
        ((l, e),) = found.experts
        assert flags == (f"L{l} shared" if e == se.SHARED else f"L{l}e{e}"), (row, measured)
        assert doc_numbers.close(found.values[0], out_max) and doc_numbers.close(measured["ratio"], ratio), (
            row,
            measured,
        )
        assert others == "none" and measured["others"] == ([], []), (row, measured)
        n = r"([\d.]+)"
        p = re.fullmatch(f"{n} → {n}, {n} % → {n} %, {n} → {n}", pruned).groups()
        loss, rate, big = p[0:2], p[2:4], p[4:6]
        assert all(doc_numbers.close(v, p) for v, p in zip(measured["loss"], loss)), (row, measured)
        assert all(doc_numbers.close(100 * v, p) for v, p in zip(measured["rate"], rate)), (row, measured)
        assert all(doc_numbers.close(v, p) for v, p in zip(measured["big"], big)), (row, measured)
        assert measured["massive"] == (0, 0)  # not even at 20x the median
        printed = rand.split("–")
        assert _in_span(doc_numbers, measured["rand"], rand if len(printed) == 2 else f"{rand}–{rand}"), (row, measured)
    prose = " ".join(doc[start:].split())
    assert _in_span(doc_numbers, ratios, re.search(r"output_max is within ([\d.–]+)× of the median", prose).group(1)), (
        ratios
    )
    assert _in_span(doc_numbers, sizes, re.search(r"artefact described above \(([\d–]+) values", prose).group(1)), sizes


# --- docs/features.md (measured numbers besides the SAE table) ------------------------------------
def test_features_doc_induction_loss_quotes_the_stored_metrics(doc_numbers):
    """ "7.06 nats against ln 300 = 5.70": the clean loss over all predictions of induction-2l's SAE
    card (metrics.json, recomputed rel 1e-4 by tests/probes/test_sae.py) and chance over its vocabulary."""
    doc = " ".join(_doc("docs/features.md").split())
    nats, vocab, chance = re.search(r"\(([\d.]+) nats against ln (\d+) = ([\d.]+)\)", doc).groups()
    folder = ROOT / "lenslab" / "zoo" / "induction-2l" / "saes" / "blocks.0.hook_resid_post"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert doc_numbers.close(metrics["all next-token predictions"]["ce_loss_clean"], nats)
    from lenslab.tasks import _content_token_ids

    # chance: uniform over the model's ordinary tokens (its random blocks draw from them; d_vocab adds 4 specials)
    assert len(_content_token_ids(lenslab.load_model("zoo/induction-2l", device="cpu"))) == int(vocab)
    assert doc_numbers.close(math.log(int(vocab)), chance)


@pytest.mark.slow
def test_features_doc_steering_numbers_are_measured(tmp_path, doc_numbers):
    """The f149 paragraph, the search example and the tied-ness median of docs/features.md,
    recomputed as notebooks/03_features.ipynb computes them (256 documents, greedy decoding)."""
    from lenslab import steering
    from lenslab.data import sentiment
    from lenslab.probes import features
    from lenslab.probes.sae import list_saes, load_sae
    from lenslab.steering import features as fs

    doc = " ".join(_doc("docs/features.md").split())
    model = lenslab.load_model("zoo/steer-sentiment", device="cpu")
    sae = load_sae(list_saes("zoo/steer-sentiment")[0], model=model)
    tied = (sae.W_dec.detach() * sae.W_enc.detach().T).sum(-1)  # W_dec[f] . W_enc[:, f]
    assert doc_numbers.close(
        float(tied.median()), re.search(r"steer-sentiment: median ([\d.]+) over its features", doc).group(1)
    )
    store = features.index(model, sae, features.corpus_for(model, 256), tmp_path / "s", progress=False)
    hits = features.search(store, token="terrible", k=5)
    by_share = features.search(store, token="terrible", k=1, by="share")
    search = re.search(
        r"top 5 \"terrible\" features by maximum fire on ([\d-]+) % of all tokens; by share, "
        r"the first has density ([\d.]+) %",
        doc,
    ).groups()
    assert _in_span(doc_numbers, [100 * h.density for h in hits.hits], search[0]), hits.table()
    assert doc_numbers.close(100 * by_share.hits[0].density, search[1]), by_share.table()
    neg = hits.features[0]
    para = re.search(
        r"the feature that fires most on \"terrible\" \(f(\d+): (\d+) of its (\d+) firings on negative "
        r"words, (\d+) on positive ones",
        doc,
    ).groups()
    ids = lambda words: [int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words]
    neg_ids, pos_ids = ids(sentiment.NEGATIVE), ids(sentiment.POSITIVE)
    on = [sum(n for _, f, n, _, _ in store.token_table(w) if f == neg) for w in (neg_ids, pos_ids)]
    assert (neg, on[0], store.stats(neg).n_fire, on[1]) == tuple(map(int, para)), (neg, on, store.stats(neg).n_fire)
    clamp = fs.clamp_feature(sae, neg, round(2 * store.stats(neg).max_act))  # "twice its maximum"

    def neg_minus_pos(prompts, iv=None):
        with torch.no_grad(), steering.apply(model, iv):
            p = torch.stack([model(q)[0, -1].softmax(-1) for q in prompts])
        return float((p[:, neg_ids].sum(1) - p[:, pos_ids].sum(1)).mean())

    negative, positive = sentiment.prompts(16, "negative"), sentiment.prompts(16, "positive")
    printed = re.search(
        r"from ([+−][\d.]+) to ([+−][\d.]+), clamping it to twice its maximum on 16 positive prompts "
        r"from ([+−][\d.]+) to ([+−]\d\.\d+)",
        doc,
    ).groups()
    measured = (
        neg_minus_pos(negative),
        neg_minus_pos(negative, fs.ablate_feature(sae, neg)),
        neg_minus_pos(positive),
        neg_minus_pos(positive, clamp),
    )
    assert all(doc_numbers.close(v, p.replace("−", "-")) for v, p in zip(measured, printed, strict=True)), measured
    prompt = "the movie was terrible . the book was"
    strongest = features.lookup(model, sae, prompt, k=16).union
    _, cache = model.run_with_cache(prompt, names_filter=[sae.cfg.metadata.hook_name])
    fire = int((sae.encode(cache[sae.cfg.metadata.hook_name][0]) > 0).any(0).sum())
    base = steering.generate(model, prompt, max_new_tokens=10)
    movers = sum(
        steering.generate(model, prompt, fs.ablate_feature(sae, f), max_new_tokens=10) != base for f in strongest
    )
    counts = re.search(
        r"Of the (\d+) strongest features on the prompt \((\d+) fire somewhere on it\), (\d+) change", doc
    ).groups()
    assert (len(strongest), fire, movers) == tuple(map(int, counts))


# --- docs/experts.md: notebook 05's load figure ---------------------------------------------------
def test_experts_doc_planted_load_is_measured(moe, doc_numbers):
    """ "each planted expert 22.8% of its layer's selections vs 0.0%": notebook 05's expert load on
    40 held-out harmful and 40 held-out benign prompts (seed 0); routing is discrete."""
    from lenslab.probes import routers

    doc = " ".join(_doc("docs/experts.md").split())
    h, b = re.search(
        r"benign prompts \(each planted expert ([\d.]+)% of its layer's selections vs ([\d.]+)%\)", doc
    ).groups()
    planted = [
        tuple(p)
        for p in json.loads((zoo.zoo_path(MOE) / "config.json").read_text())["lenslab_mechanism"]["refusal_experts"]
    ]
    load_h = routers.expert_load(moe, refusal.prompts(40, "harmful", "test", seed=0)[0], fraction=True)
    load_b = routers.expert_load(moe, refusal.prompts(40, "benign", "test", seed=0)[0], fraction=True)
    assert len(planted) == 4
    for l, e in planted:
        assert doc_numbers.close(100 * float(load_h[l, e]), h) and doc_numbers.close(100 * float(load_b[l, e]), b), (
            l,
            e,
        )
