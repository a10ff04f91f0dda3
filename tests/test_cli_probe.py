"""`lenslab probe train|eval|steer` on zoo/steer-sentiment: the printed table and the written result
equal `train_probes` called directly, a saved probe scores and steers as the library does, `steer
eval --method probe` puts probes next to the other methods, and errors are one line with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from lenslab import steering
from lenslab.cli import main
from lenslab.probes.linear import Probe, ProbeResult, dataset, train_probes
from lenslab.steering.probe_steering import probe_intervention

MODEL = "zoo/steer-sentiment"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(zoo_models):
    return zoo_models(MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe_cli")
    probe, out = tmp / "probe.json", tmp / "probes.json"
    args = ["probe", "train", "--model", MODEL, "--device", "cpu", "--layers", "0", "1", "--n", "32"]
    assert main([*args, "--save-probe", str(probe), "--probe-layer", "1", "--out", str(out)]) == 0
    return probe, out


def test_train_writes_what_train_probes_computes(model, trained, capsys):
    probe_path, out = trained
    res = ProbeResult.from_json(out)
    want = train_probes(model, *dataset(model, "sentiment", n=32, seed=0), layers=[0, 1])
    assert res.rows == want.rows
    probe = Probe.load(probe_path)
    assert probe.hook == "blocks.1.hook_resid_post" and torch.equal(probe.weight, want.probes[1].weight)
    assert probe_path.with_suffix(".safetensors").is_file()


def test_train_prints_the_table_and_reads_a_json_dataset(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"prompts": ["the day was lovely", "the day was awful"] * 4, "labels": ["p", "n"] * 4}))
    assert main(["probe", "train", "--data", str(data), "--layers", "1", "--test-size", "0", "--control", "none"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| site | layer | hook |") and "| resid_post | 1 | blocks.1.hook_resid_post |" in out


def test_eval_scores_the_saved_probe_on_fresh_prompts(model, trained, capsys):
    probe_path, _ = trained
    assert main(["probe", "eval", "--probe", str(probe_path), "--n", "16", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    acc = Probe.load(probe_path).score(model, *dataset(model, "sentiment", n=16, seed=1))
    assert f"accuracy {acc:.3f} on 32 prompts; chance (majority class) 0.500" in out


def test_steer_prints_both_continuations_and_writes_a_preset(model, trained, tmp_path, capsys):
    probe_path, _ = trained
    preset = tmp_path / "probe_preset.json"
    prompt = "the day was awful . the movie was"
    args = ["probe", "steer", "--probe", str(probe_path), "--strength", "1.5", "--prompt", prompt]
    assert main([*args, "--max-new-tokens", "5", "--out", str(preset)]) == 0
    out = capsys.readouterr().out.splitlines()
    iv = probe_intervention(Probe.load(probe_path), strength=1.5)
    assert out[1] == f"unsteered: {steering.generate(model, prompt, max_new_tokens=5)}"
    assert out[2].startswith(f"steered:   {steering.generate(model, prompt, iv, max_new_tokens=5)}   [")
    assert steering.load(preset).edits == iv.edits
    assert main(["probe", "steer", "--probe", str(probe_path), "--op", "project", "--max-new-tokens", "2"]) == 0
    assert "projected out" in capsys.readouterr().out


def test_steer_eval_takes_probe_as_a_method(capsys):
    args = ["steer", "eval", "--method", "diffmean", "probe", "--layer", "1", "--n-fit", "8", "--n-eval", "4"]
    assert main([*args, "--strengths", "0", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "| probe | 0 | 96 |" in out and "| diffmean | 1 | 96 |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["probe", "train", "--data", "sentimnet"], "--data 'sentimnet' is neither one of sentiment, refusal, ioi"),
        (["probe", "train", "--model", "zoo/induction-2l"], "'zoo/induction-2l' has no built-in probe dataset"),
        (
            ["probe", "train", "--site", "resid_pots", "--n", "4"],
            "'resid_pots' is neither a site of lenslab.sites.SITES",
        ),
        (["probe", "train", "--save-probe", "p.safetensors"], "--save-probe 'p.safetensors' must end in .json"),
        (["probe", "eval", "--probe", "missing.json"], "--probe 'missing.json' does not exist"),
        (["probe", "steer", "--probe", "missing.json"], "--probe 'missing.json' does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenslab: error: ") and message in err and "Traceback" not in err
