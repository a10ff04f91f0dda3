"""The LN-free papers' interpretability claims, measured on each zoo model and its norm-free twin
(`lenslab.zoo.noln.claims`): re-measured from the committed weights they equal the table stored in the
twin's config.json (shown on its card, the app page and `lenslab norms compare --stored`), and the
claims hold:

(a) DLA equals the exact direct effect (path patching into the logits) without norms, not with them;
(b) AtP's agreement with exact activation patching (Pearson / Spearman over each site's grid);
(c) the planted mechanism still works (each parent's own numbers).

zoo/ioi-4l's pair is also the table "LN-free vs original" in docs/norms.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lenslab import zoo
from lenslab.zoo import noln

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = Path(__file__).resolve().parents[1] / "docs" / "norms.md"
DLA = "max abs(DLA − exact direct effect)"
PAIRS = [p for p in noln.TWINS if zoo.PREFIX + p in zoo.zoo_names()]


@pytest.fixture(scope="module")
def measured(zoo_models):
    out = {}
    for parent in PAIRS:
        twin = noln.twin_of(parent)
        assert twin is not None, (
            f"zoo/{parent} has a twin recipe but no built twin: run `lenslab zoo train {parent}-noln`"
        )
        out[parent] = noln.claims(zoo_models(zoo.PREFIX + parent), zoo_models(twin), parent=parent)
    return out


def test_every_text_model_with_a_recipe_has_its_twin_committed():
    assert sorted(PAIRS) == ["english-4l", "ioi-4l", "moe-refusal", "steer-sentiment"]
    assert all(noln.twin_of(p) for p in PAIRS)


@pytest.mark.parametrize("parent", PAIRS)
def test_the_stored_table_is_what_the_weights_give(measured, parent):
    stored, now = noln.stored_claims(parent), measured[parent]
    assert stored is not None and list(stored.rows) == list(now.rows)
    for label, cells in stored.rows.items():
        for which in ("original", "free"):
            assert now.value(label, which) == pytest.approx(cells[which], abs=1e-3), (label, which)


@pytest.mark.parametrize("parent", PAIRS)
def test_dla_is_exact_only_without_norms(measured, parent):
    t = measured[parent]
    scale = t.value("largest abs(exact direct effect) of a head", "original")
    # float round-off without norms; with them, off by a visible share of the largest direct effect
    assert t.value(DLA, "free") < 1e-4 < 0.05 * scale < t.value(DLA, "original")


def test_the_planted_mechanisms_survive(measured):
    ioi, sent, eng = measured["ioi-4l"], measured["steer-sentiment"], measured["english-4l"]
    assert ioi.value("held-out IOI accuracy", "free") > 0.9
    assert ioi.value("held-out mean logit diff (IO − S)", "free") > 10
    for kind in ("positive after positive", "negative after negative"):
        assert sent.value(f"next word {kind} context", "free") > 0.85, kind
    loss = "held-out loss (nats/token)"
    assert eng.value(loss, "free") - eng.value(loss, "original") < 0.25  # measured 0.199 (0.10 on the first english-4l)
    moe = measured["moe-refusal"]  # refuses harmful prompts, not benign ones, and not with its refusal experts off
    assert moe.value("held-out refusal rate, harmful prompts", "free") > 0.95
    assert moe.value("held-out refusal rate, benign prompts", "free") < 0.05
    assert moe.value("held-out task accuracy, benign prompts", "free") > 0.85
    assert moe.value("refusal rate, harmful, planted experts off", "free") < 0.05


def test_ioi_atp_tracks_exact_patching_better_without_norms(measured):
    t = measured["ioi-4l"]
    for site in ("z", "attn_out", "mlp_out"):
        label = f"AtP vs exact patching, {site}: Pearson"
        assert t.value(label, "free") > t.value(label, "original"), site


def test_the_ln_free_table_in_docs_norms(measured, doc_numbers):
    rows = doc_numbers.table(DOC.read_text(), "| LN-free vs original |")
    by = {r[0].split(" (")[0]: r[1:] for r in rows}
    t = measured["ioi-4l"]
    for col, which in enumerate(("original", "free")):
        assert doc_numbers.close(t.value(DLA, which), by[DLA][col])
        for site in ("z", "attn_out", "mlp_out"):
            r, rho = (c.strip() for c in by[f"AtP vs exact patching, {site}"][col].split("/"))
            assert doc_numbers.close(t.value(f"AtP vs exact patching, {site}: Pearson", which), r), site
            assert doc_numbers.close(t.value(f"AtP vs exact patching, {site}: Spearman", which), rho), site
        assert doc_numbers.pct(t.value("held-out IOI accuracy", which), by["held-out IOI accuracy"][col])
        assert doc_numbers.close(
            t.value("held-out mean logit diff (IO − S)", which), by["held-out mean logit diff"][col]
        )


def test_the_twins_table_in_docs_norms(doc_numbers):
    """docs/norms.md's table of the twins prints each stored removal and DLA gap (no re-measuring)."""
    import json
    import re

    rows = doc_numbers.table(DOC.read_text(), "| twin | fine-tuning |")
    assert sorted(r[0] for r in rows) == sorted(f"zoo/{p}-noln" for p in PAIRS)
    for twin, _, losses, dla, _ in rows:
        parent = twin.removeprefix("zoo/").removesuffix("-noln")
        removal = json.loads((zoo.zoo_path(twin) / "config.json").read_text())["ln_removal"]
        before, after, none = re.match(r"(\S+) → (\S+) \((\S+)\)", losses).groups()
        assert doc_numbers.close(removal["loss_original"], before), twin
        assert doc_numbers.close(removal["loss_final"], after), twin
        assert doc_numbers.close(removal["loss_no_finetuning"], none), twin
        t = noln.stored_claims(zoo.PREFIX + parent)
        orig, free, scale = re.match(r"(\S+) → (\S+) \((\S+)\)", dla).groups()
        assert doc_numbers.close(t.value(DLA, "original"), orig), twin
        assert doc_numbers.close(t.value(DLA, "free"), free), twin
        assert doc_numbers.close(t.value("largest abs(exact direct effect) of a head", "original"), scale), twin
