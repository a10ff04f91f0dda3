"""Numbers the README and docs/*.md state that have no natural home in one model's test file.

Each is either recomputed here (committed zoo weights, the documented seeds, one thread: greedy
decoding gives exact counts) or checked against the stored measurement that another test
recomputes (named at each check), so a doc cannot drift from what the code measures.
Tolerance: a printed number equals the measurement rounded to its printed digits, plus 2e-5
relative slack for float32 sums reordered on another CPU.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import _refusal, zoo

ROOT = Path(__file__).resolve().parents[1]
MOE = "zoo/moe-refusal"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _close_to_printed(measured: float, printed: str) -> bool:
    printed = printed.strip().rstrip("%")
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(measured - float(printed)) <= 0.5 * 10 ** -decimals + 2e-5 * max(1.0, abs(measured))


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _doc(name: str) -> str:
    return (ROOT / name).read_text()


@pytest.fixture(scope="module")
def moe():
    return lenslab.load_model(MOE, device="cpu")


# --- docs/experts.md ------------------------------------------------------------------------------
def test_experts_doc_drop_rows_quote_the_card():
    """The drop rows of docs/experts.md's switch table are the card's (which
    tests/test_zoo_moe_refusal.py recomputes), rounded as printed (58025.130 -> 58025)."""
    card = _table(zoo.read_card(MOE), "| switch | refusal, held-out harmful")
    card = {r[0]: r[1:] for r in card}
    doc = {r[0]: r[1:] for r in _table(_doc("docs/experts.md"), "| switch (k = 4) |")}
    pairs = {"baseline": "baseline", "top-4 off (drop, MoTE's suppress)": "top-4 off", "top-4 forced on": "top-4 on",
             "random-4 off, drop (5 draws, mean ± std)": "random-4 off"}
    for doc_row, card_row in pairs.items():
        for d, c in zip(doc[doc_row], card[card_row], strict=True):
            for dv, cv in zip(d.split(" ± "), c.split(" ± "), strict=True):
                assert _close_to_printed(float(cv.rstrip("%")), dv), (doc_row, d, c)
    assert "(each +4.48 selections per prompt" in _doc("docs/experts.md") and "L1e2 (+4.48)" in zoo.read_card(MOE)


@pytest.mark.slow
def test_experts_doc_mask_rows_and_finer_switches_are_measured(moe):
    """The mask rows (a second `mote_table` in mask mode, same seeds and draws) and the table of
    finer switches (drop mode, the same 200 + 200 held-out prompts), every cell."""
    from lenslab.steering import evaluate as ev
    from lenslab.steering import switch_experts

    doc = _doc("docs/experts.md")
    table = _refusal.mote_table(moe, n_eval=200, k=4, n_random=5, seed=0, mode="mask", progress=False)
    rows = {r[0]: r[1:] for r in _table(doc, "| switch (k = 4) |")}
    for doc_row, row in (("top-4 off (mask: next expert enters)", "top-4 off"), ("random-4 off, mask (same draws)", "random-4 off")):
        r = table.rows.index(row)
        for c, (column, cell) in enumerate(zip(table.columns, rows[doc_row], strict=True)):
            scale = 1.0 if column == "perplexity" else 100.0
            mean, _, std = cell.partition(" ± ")
            assert _close_to_printed(scale * float(table.mean[r, c]), mean), (doc_row, column, cell)
            if std:
                assert _close_to_printed(scale * float(table.std[r, c]), std), (doc_row, column, cell)

    harmful, _ = _refusal.prompts(200, "harmful", "test", seed=0)
    benign, answers = _refusal.prompts(200, "benign", "test", seed=0)
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
    rows = _table(doc, "| switch | refusal, harmful | refusal, benign | exact match, benign |")
    assert [r[0] for r in rows] == list(ivs)
    for name, ref_h, ref_b, acc in rows:
        h, b = texts[name]["h"], texts[name]["b"]
        assert _close_to_printed(100 * sum(map(_refusal.is_refusal, h)) / 200, ref_h), (name, ref_h)  # L1 pair: 32 of 200
        assert _close_to_printed(100 * sum(map(_refusal.is_refusal, b)) / 200, ref_b), (name, ref_b)
        exact = sum(_refusal.normalize(t) == a for t, a in zip(b, answers)) / 200
        assert _close_to_printed(100 * exact, acc), (name, acc)


def _console(doc: str, command: str) -> list[str]:
    """The output lines printed under `$ <command>` in a console block of `doc`."""
    lines = doc.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("$ " + command))
    while lines[i].endswith("\\"):
        i += 1
    out = []
    for line in lines[i + 1:]:
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
    assert main(["moe", "inspect", "--model", MOE, "--device", "cpu", "--out", str(tmp_path / "routing.json"),
                 "--prompts", *prompts]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L")]
    assert printed == [line for line in _console(doc, "lenslab moe inspect") if line.startswith("L")]
    ranking = tmp_path / "refusal_experts.json"
    assert main(["moe", "rank", "--model", MOE, "--device", "cpu", "--top-k", "6", "--out", str(ranking)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L")]
    assert printed == [line for line in _console(doc, "lenslab moe rank") if line.startswith("L")]
    assert "L1e2, L1e5, L2e3, L2e6 at +5.0, then L3e0 at +2.875" in doc and "L3 e0  +2.875" in printed
    assert "+5.0 selections per prompt each, next L3e0 at +2.875" in " ".join(doc.split())  # the notebook paragraph


# --- README ---------------------------------------------------------------------------------------
def test_readme_quotes_the_cards():
    """README numbers are the cards' (each card recomputed by its tests/test_zoo_*.py)."""
    readme = _doc("README.md")
    moe_rows = {r[0]: r[1:] for r in _table(zoo.read_card(MOE), "| switch | refusal, held-out harmful")}
    base, off, rand = moe_rows["baseline"][0], moe_rows["top-4 off"][0], moe_rows["random-4 off"][0].split(" ± ")[0]
    assert (base, off, rand) == ("100.0%", "0.0%", "99.7%")
    assert "top-4 off: refusals 100% -> 0% with capability unchanged; random-4 off: 99.7%" in readme
    assert moe_rows["top-4 off"][2] == moe_rows["baseline"][2]  # capability unchanged
    ioi = _table(zoo.read_card("zoo/ioi-4l"), "| split | prompts | accuracy |")
    assert f"{ioi[0][2]} accuracy on fresh prompts, {ioi[1][2]} on held-out names and templates" in readme
    sent = {r[0]: r[1:] for r in _table(zoo.read_card("zoo/steer-sentiment"), "| context |")}
    assert f"({sent['positive'][0]} / {sent['negative'][1]})" in readme
    # "loss recovered 0.97-1.00": the range of the shipped SAEs' loss recovered (all and objective)
    lo, hi = re.search(r"loss recovered (\d\.\d\d)-(\d\.\d\d)", readme).groups()
    values = [m["loss_recovered"] for p in (ROOT / "lenslab" / "zoo").glob("*/saes/*/metrics.json")
              for m in json.loads(p.read_text()).values()]
    assert len(values) == 6
    assert f"{min(values):.2f}" == lo and min(f"{max(values):.2f}", "1.00") == hi, (values, lo, hi)
    assert "4 layers, 8 experts, top-2" in readme and "4 layers, d_model 128" in readme


# --- docs/features.md -----------------------------------------------------------------------------
def test_features_doc_sae_table_quotes_the_stored_metrics():
    """docs/features.md's table equals each shipped SAE's cfg.json and metrics.json (which
    tests/probes/test_sae.py::test_shipped_sae_matches_its_card recomputes, rel 1e-4)."""
    rows = _table(_doc("docs/features.md"), "| SAE | d_in → d_sae |")
    assert len(rows) == 3
    for name, dims, k, ev, dead, rec_all, rec_obj, _ in rows:
        model, hook = name.strip("`").rsplit("/", 1)
        folder = ROOT / "lenslab" / "zoo" / model.removeprefix("zoo/") / "saes" / hook
        cfg = json.loads((folder / "cfg.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        first = metrics["all next-token predictions"]
        objective = next(v for key, v in metrics.items() if key.startswith("objective"))
        assert dims == f"{cfg['d_in']} → {cfg['d_sae']}" and int(k) == cfg["k"], name
        assert _close_to_printed(first["explained_variance"], ev), (name, first["explained_variance"])
        assert _close_to_printed(100 * first["dead_fraction"], dead), (name, first["dead_fraction"])
        assert _close_to_printed(first["loss_recovered"], rec_all), (name, first["loss_recovered"])
        assert _close_to_printed(objective["loss_recovered"], rec_obj), (name, objective["loss_recovered"])
