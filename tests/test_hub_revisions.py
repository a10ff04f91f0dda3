"""Revisions of Hugging Face hub models: `load_model(name, revision=...)`, `"name@revision"`,
TransformerLens's `checkpoint_index=`/`checkpoint_value=`, and `trajectory.checkpoint_revisions`
for `measure_checkpoints` over Pythia's training checkpoints (branches step0 ... step143000).

The hub is unreachable here: two tiny random GPT-NeoX checkpoints are placed in a temporary
Hugging Face cache as the revisions step1000 and step2000 of "EleutherAI/pythia-70m" (the cache
layout `huggingface_hub.snapshot_download` reads offline: refs/<revision> -> snapshots/<commit>/),
which is exactly what an online user's cache holds after the first download. Oracle: each
revision's own Hugging Face model; the two revisions' logits differ by far more than ATOL, so a
loader that read the wrong one fails.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import lenslab
from lenslab import models
from lenslab._errors import LenslabError
from lenslab.probes import sinks, trajectory

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = "EleutherAI/pythia-70m"
ATOL = 1e-5


def cache_repo(cache: Path, repo_id: str, files: Path, revision: str = "main") -> Path:
    """Place `files` in `cache` as Hugging Face's cache holds repo `repo_id` at `revision`."""
    sha = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = shutil.copytree(files, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def checkpoints(tiny_moe_dir, randomize_params, tmp_path_factory):
    """{"step1000": folder, "step2000": folder}: tiny GPT-NeoX models of seeds 0 and 1."""
    from transformers import AutoModelForCausalLM

    from lenslab import zoo

    root = tmp_path_factory.mktemp("pythia_revs")
    out = {}
    for seed, rev in enumerate(("step1000", "step2000")):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(tiny_moe_dir.config("pythia"))
        hf.config.architectures = [type(hf).__name__]
        randomize_params(hf, seed=seed)
        hf.save_pretrained(root / rev)
        zoo.word_tokenizer(tiny_moe_dir.WORDS).save_pretrained(root / rev)
        out[rev] = root / rev
    return out


@pytest.fixture
def hub_cache(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for rev, folder in checkpoints.items():
        cache_repo(cache, REPO, folder, revision=rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def references(checkpoints):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    out = {}
    for rev, folder in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            out[rev] = hf(ids).logits
    assert (out["step1000"] - out["step2000"]).abs().max() > 100 * ATOL
    return ids, out


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize(
    "how, rev",
    [
        (dict(revision="step1000"), "step1000"),
        (dict(revision="step2000"), "step2000"),
        (dict(checkpoint_value=2000), "step2000"),
        (dict(checkpoint_index=11), "step1000"),  # Pythia's list: 0, 1, 2, 4, ..., 512, then 1000 (index 11)
    ],
    ids=["revision-1000", "revision-2000", "checkpoint_value", "checkpoint_index"],
)
def test_revision_reaches_the_loader(hub_cache, references, how, rev):
    ids, ref = references
    model = lenslab.load_model(REPO, device="cpu", **how)
    assert lenslab.model_name(model) == f"{REPO}@{rev}"
    torch.testing.assert_close(logits(model, ids), ref[rev], atol=ATOL, rtol=0)


def test_revision_in_the_name_round_trips(hub_cache, references):
    """`"id@revision"` is what the model is named, and loading that name gives the same weights."""
    ids, ref = references
    model = lenslab.load_model(f"{REPO}@step2000", device="cpu")
    again = lenslab.load_model(lenslab.model_name(model), device="cpu")
    torch.testing.assert_close(logits(again, ids), ref["step2000"], atol=ATOL, rtol=0)


def test_revision_not_in_the_cache_offline(hub_cache):
    with pytest.raises(LenslabError) as err:
        lenslab.load_model(REPO, device="cpu", revision="step3000")
    msg = str(err.value)
    assert "at revision 'step3000'" in msg and "cached revisions of it: step1000, step2000" in msg
    assert "HF_HUB_OFFLINE=1" in msg


def test_revision_that_does_not_exist_online(hub_cache, monkeypatch):
    """Online, the hub answers 'no such revision': the error names it and how revisions look."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RevisionNotFoundError

    from lenslab import _hf

    def no_revision(*args, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
        raise RevisionNotFoundError("Revision Not Found", response=response)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_hf, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_revision)
    with pytest.raises(LenslabError, match=r"has no revision 'step999'.*step143000"):
        lenslab.load_model(REPO, device="cpu", revision="step999")


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(checkpoint_value=1234),
            r"checkpoint_value=1234 is not a checkpoint of EleutherAI/pythia-70m; the nearest are 1000 and 2000 \(it has 154",
        ),
        (dict(checkpoint_index=154), r"checkpoint_index=154 is out of range: .* has 154 checkpoints"),
        (dict(revision="step1000", checkpoint_value=1000), "give one of revision, checkpoint_value, not several"),
        (dict(revision=""), "revision must be a branch, tag or commit name"),
    ],
)
def test_bad_checkpoint_arguments(kw, message):
    with pytest.raises(LenslabError, match=message):
        lenslab.load_model(REPO, device="cpu", **kw)


def test_name_revision_and_keyword_together():
    with pytest.raises(LenslabError, match="not several"):
        lenslab.load_model(f"{REPO}@step1000", device="cpu", revision="step2000")


def test_checkpoint_index_for_a_model_without_a_checkpoint_list():
    with pytest.raises(LenslabError, match="no checkpoint list lenslab knows.*pass revision="):
        lenslab.load_model("gpt2", device="cpu", checkpoint_index=3)


def test_revision_of_a_zoo_model_or_a_folder_is_refused(checkpoints):
    with pytest.raises(LenslabError, match="is a zoo model"):
        lenslab.load_model("zoo/induction-2l", revision="step1000")
    with pytest.raises(LenslabError, match="is a local folder"):
        lenslab.load_model(str(checkpoints["step1000"]), checkpoint_value=1000)


def test_checkpoint_revision_names():
    assert models.checkpoint_revision(REPO, value=0) == "step0"
    assert models.checkpoint_revision("pythia-70m", index=-1) == "step143000"  # an alias
    assert models.checkpoint_revision("EleutherAI/pythia-70m-v0", index=0) == "step1000"  # v0's list starts at 1000
    assert models.checkpoint_revision("stanford-crfm/alias-gpt2-small-x21", value=10) == "checkpoint-10"


def test_checkpoint_revisions_names_and_errors():
    assert trajectory.checkpoint_revisions(REPO, [1000, 2000]) == [f"{REPO}@step1000", f"{REPO}@step2000"]
    assert trajectory.checkpoint_revisions(REPO, revisions=["step1", "v2"]) == [f"{REPO}@step1", f"{REPO}@v2"]
    assert [trajectory.checkpoint_step(n) for n in trajectory.checkpoint_revisions(REPO, [0, 143000])] == [0, 143000]
    with pytest.raises(LenslabError, match="one of the two"):
        trajectory.checkpoint_revisions(REPO)
    with pytest.raises(LenslabError, match="nearest are"):
        trajectory.checkpoint_revisions(REPO, [1500])
    with pytest.raises(LenslabError, match="without a revision"):
        trajectory.checkpoint_revisions(f"{REPO}@step1000", [0])


def test_measure_checkpoints_over_revisions(hub_cache, checkpoints):
    """A model name and its revisions are a checkpoint series: each revision is loaded, the steps
    come from the revision names, and every value equals measuring that revision's folder."""
    prompts = torch.randint(4, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    series = trajectory.measure_checkpoints(trajectory.checkpoint_revisions(REPO, [2000, 1000]), prompts, device="cpu")
    assert series.steps == [1000, 2000]
    assert series.names == [f"{REPO}@step1000", f"{REPO}@step2000"]
    for i, rev in enumerate(("step1000", "step2000")):
        model = lenslab.load_model(str(checkpoints[rev]), device="cpu")
        m = sinks.massive_activations(model, prompts, top_k=1)
        assert series.top_magnitude[i] == pytest.approx(float(m.top_values[:, 0].abs().max()), abs=1e-5)
        rate = sinks.attention_sinks(model, prompts, threshold=series.threshold).sink_rate
        assert series.sink_rate[i] == pytest.approx(rate, abs=1e-9)
    assert series.top_magnitude[0] != pytest.approx(series.top_magnitude[1], abs=1e-3)
