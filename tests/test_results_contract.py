"""Every analysis result keeps the `lenslab.results.Result` contract, proved on a real instance.

Every lenslab module is imported (the packages pyproject.toml lists; the app's page scripts,
which run Streamlit on import, and `__main__` excepted) and every subclass of `Result` is
collected. Each must have a builder in `BUILDERS` (a new result class without one fails
`test_every_result_class_has_a_builder`), which makes a real, small instance through the
library's public function on a zoo or planted model. On it: `table()` is a DataFrame with rows,
`figure()` a plotly Figure with traces, the JSON round trip gives the same data, `to_markdown()`
is a Markdown table, and `figures.export` writes JSON and HTML (and, for one class, SVG).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
import tomllib
import torch

from lenslab import figures
from lenslab.results import RESULT_KINDS, Result

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PACKAGES = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
SVG_CLASS = "Predictions"  # the one class exported to SVG too (kaleido drives Chromium: slow)


def _import_everything() -> None:
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        for info in pkgutil.iter_modules(mod.__path__):
            if info.ispkg or info.name == "__main__":
                continue
            if pkg == "lenslab.app" and (info.name.startswith("page_") or info.name == "main"):
                continue  # Streamlit scripts: they run on import
            importlib.import_module(f"{pkg}.{info.name}")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def result_classes() -> dict[str, type]:
    _import_everything()
    classes = {}
    for cls in _subclasses(Result):
        if cls.__module__.startswith("lenslab"):
            assert cls.__name__ not in classes or classes[cls.__name__] is cls, (
                f"two result classes named {cls.__name__}"
            )
            classes[cls.__name__] = cls
    return classes


# --- builders: one small real instance of each class, through the public API --------------------
class Lab:
    """Models, tasks and intermediate results the builders share, each made once."""

    def __init__(self, zoo_models, tmp: Path):
        self.zoo_models, self.tmp, self._memo = zoo_models, tmp, {}

    def memo(self, key, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # models and inputs
    @property
    def induction(self):
        return self.zoo_models("zoo/induction-2l")

    @property
    def task(self):
        from lenslab import tasks

        return self.memo("task", lambda: tasks.induction(self.induction, n=4, seq_len=4, seed=0))

    @property
    def planted(self):
        from lenslab.zoo import planted

        return self.memo("planted", planted.planted_model)

    @property
    def planted_moe(self):
        from lenslab.zoo import planted

        return self.memo("planted_moe", planted.planted_moe_model)

    @property
    def planted_tokens(self):
        from lenslab.zoo import planted

        return self.memo("planted_tokens", lambda: planted.planted_tokens(batch=4, seq_len=8))

    @property
    def moe(self):
        return self.zoo_models("zoo/moe-refusal")

    @property
    def refusal_sets(self):
        from lenslab.data import refusal

        return self.memo(
            "refusal",
            lambda: (refusal.prompts(4, "harmful", split="test")[0], refusal.prompts(4, "benign", split="test")),
        )

    @property
    def sae(self):
        from lenslab.probes.sae import list_saes, load_sae

        return self.memo("sae", lambda: load_sae(list_saes("zoo/induction-2l")[0], model=self.induction))

    @property
    def store(self):
        from lenslab.probes import features

        def make():
            path = self.tmp / "store"
            features.index(
                self.induction, self.sae, self.task.clean_tokens, path, batch_size=4, top_n=3, progress=False
            )
            return path

        return self.memo("store", make)

    @property
    def top_feature(self) -> int:
        """The feature that fires on the most indexed tokens."""
        from lenslab.probes import features

        def make():
            with features.FeatureStore(self.store) as st:
                return int(st.arrays()["n_fire"].argmax())

        return self.memo("top_feature", make)

    @property
    def sentiment(self):
        return self.zoo_models("zoo/steer-sentiment")


def _patch(lab):
    from lenslab import circuits

    return circuits.patch(lab.induction, lab.task, "resid_pre", progress=False)


def _attribution(lab):
    from lenslab import circuits

    return circuits.attribute(lab.induction, lab.task, "atp", ["resid_pre", "z"], progress=False)


def _edges(lab):
    from lenslab import circuits

    return circuits.attribute_edges(lab.induction, lab.task, "eap", progress=False)


def _graph(lab):
    from lenslab import circuits

    return circuits.CircuitGraph.from_edge_scores(build("EdgeScores", lab), top_k=5)


def _faithfulness(lab):
    from lenslab import circuits

    return circuits.faithfulness(lab.induction, lab.task, ["atp"], ["resid_pre"], progress=False)


def _logit_lens(lab):
    from lenslab import inspection

    return inspection.logit_lens(lab.induction, "t1 t2 t3 t1 t2", k=2)


def _lens_kl(lab):
    from lenslab.probes import lenses

    return lenses.lens_kl(lab.induction, None, lab.task.clean_tokens)  # the shipped tuned lens


def _predictions(lab):
    from lenslab import inspection

    return inspection.top_predictions(lab.induction, "t1 t2 t3 t1 t2", k=4)


def _sinks(lab):
    from lenslab.probes import sinks

    return sinks.attention_sinks(lab.planted, lab.planted_tokens)


def _massive(lab):
    from lenslab.probes import sinks

    return sinks.massive_activations(lab.planted, lab.planted_tokens)


def _ablation(lab):
    from lenslab.probes import sinks

    return sinks.ablate_massive(lab.planted, lab.planted_tokens, mode="zero")


def _profile(lab):
    from lenslab.probes import super_experts

    return lab.memo("profile", lambda: super_experts.profile_experts(lab.planted_moe, lab.planted_tokens))


def _super_experts(lab):
    return _profile(lab).super_experts("su")


def _se_ablation(lab):
    from lenslab.probes import super_experts

    return super_experts.ablate_super_experts(
        lab.planted_moe, lab.planted_tokens, build("SuperExperts", lab), random_draws=1
    )


def _route(lab):
    from lenslab.probes import routers

    return routers.route(lab.moe, lab.refusal_sets[0][:2])


def _ranking(lab):
    from lenslab.probes import routers

    harmful, (benign, _) = lab.refusal_sets
    return routers.ftri_rank(lab.moe, harmful[:2], benign[:2])


def _rates(lab):
    from lenslab.data import refusal
    from lenslab.steering import evaluate

    return evaluate.behaviour_rates(
        lab.moe,
        {"baseline": None},
        {"harmful": lab.refusal_sets[0][:2]},
        score=refusal.is_refusal,
        max_new_tokens=2,
        progress=False,
    )


def _switch(lab):
    from lenslab.data import refusal
    from lenslab.steering import evaluate

    harmful, (benign, answers) = lab.refusal_sets
    return evaluate.expert_switch_table(
        lab.moe,
        rank_target=harmful[:2],
        rank_other=benign[:2],
        target=harmful[2:],
        other=benign[2:],
        capability=benign[2:],
        capability_answers=answers[2:],
        score=refusal.is_refusal,
        k=1,
        n_random=1,
        max_new_tokens=2,
        progress=False,
    )


def _tradeoff(lab):
    from lenslab import steering
    from lenslab.data import sentiment
    from lenslab.steering.tradeoff import tradeoff

    model = lab.sentiment
    iv = steering.mean_difference(
        model, sentiment.prompts(4, "positive", seed=11), sentiment.prompts(4, "negative", seed=12), layers=1
    )
    return tradeoff(
        model,
        {"DiffMean": iv},
        sentiment.prompts(2, "negative", seed=99),
        sentiment.is_positive,
        strengths=(0, 1),
        max_new_tokens=2,
        progress=False,
    )


def _sae_metrics(lab):
    from lenslab.probes.sae import sae_metrics

    return sae_metrics(lab.induction, lab.sae, lab.task.clean_tokens)


def _transcoder_metrics(lab):
    from lenslab.probes import transcoders

    model = lab.zoo_models("zoo/steer-sentiment")
    tcs = transcoders.load_transcoders("zoo/steer-sentiment/per-layer", model=model)
    return transcoders.transcoder_metrics(model, tcs, ["the day was awful . the movie was", "what a nice cat ."])


def _attribution_graph(lab):
    from lenslab.probes import attribution_graph

    model = lab.zoo_models("zoo/ioi-4l")
    g = attribution_graph.attribution_graph(
        model, "When Mary and John went to the store", "zoo/ioi-4l/per-layer", max_feature_nodes=24
    )
    return attribution_graph.prune(g)


def _head_edges(lab):
    from lenslab.probes import attribution_graph, graph_heads

    model = lab.zoo_models("zoo/induction-2l")
    g = attribution_graph.attribution_graph(model, "t5 t9 t2 t7 t5", None, targets=["t9"])
    return graph_heads.head_edges(model, g)


def _graph_ablation(lab):
    from lenslab.probes import attribution_graph, graph_validation

    model = lab.zoo_models("zoo/ioi-4l")
    g = attribution_graph.attribution_graph(
        model,
        "When Mary and John went to the store, John gave a drink to",
        "zoo/ioi-4l/per-layer",
        max_feature_nodes=24,
    )
    return graph_validation.ablate_graph(model, attribution_graph.prune(g), "zoo/ioi-4l/per-layer", n_random=2)


def _node_intervention(lab):
    from lenslab.probes import attribution_graph
    from lenslab.steering import graph_interventions

    model = lab.zoo_models("zoo/ioi-4l")
    g = attribution_graph.attribution_graph(
        model, "When Mary and John went to the store, John gave a drink to", "zoo/ioi-4l/per-layer", max_feature_nodes=8
    )
    nodes = [n for n, p in zip(g.nodes, g.parsed) if p.kind == "feature"][:2]
    iv = graph_interventions.node_intervention("zoo/ioi-4l/per-layer", nodes, "clamp", factor=0.5, graph=g)
    return graph_interventions.intervention_effect(model, g, iv, k=3)


def _lookup(lab):
    from lenslab.probes import features

    return features.lookup(lab.induction, lab.sae, "t1 t2 t3 t1 t2 t3", k=3)


def _search(lab):
    from lenslab.probes import features

    return features.search(lab.store, feature=lab.top_feature)


def _dashboard(lab):
    from lenslab.probes import features

    return features.FeatureDashboard.from_store(lab.store, lab.top_feature, lab.induction, lab.sae, n_contexts=3)


def _dla(lab):
    from lenslab.probes import dla

    return dla.direct_logit_attribution(lab.induction, task=lab.task, pos=[0, -1])


def _atlas(lab):
    from lenslab.probes import atlas
    from lenslab.zoo import planted

    return atlas.activation_atlas(planted.planted_atlas_model(), planted.planted_atlas_tokens())


def _trajectory_fit(lab):
    import numpy as np

    from lenslab.probes import trajectory

    t = np.linspace(0, 1000, 12)
    return trajectory.fit_trajectory(t, trajectory.trajectory_curve(t, A=50, lam=0.1, gamma=0.02, t0=0.4, K=10))


def _checkpoint_series(lab):
    from lenslab.probes import trajectory
    from lenslab.zoo import planted

    return trajectory.measure_checkpoints(
        [lab.planted, planted.planted_model(seed=1)], lab.planted_tokens, steps=[0, 100]
    )


def _probes(lab):
    from lenslab.probes.linear import train_probes

    harmful, (benign, _) = lab.refusal_sets
    return train_probes(lab.moe, harmful + benign, ["harmful"] * len(harmful) + ["benign"] * len(benign), layers=[0, 1])


def _ln_removal(lab):
    from lenslab import tasks
    from lenslab.probes import ln_removal

    model = lab.zoo_models("zoo/ioi-4l")
    data = ln_removal.task_data(model, tasks.ioi(model, n=4, seed=0))
    return ln_removal.remove_norms(model, data, data, steps=1, batch_size=2, progress=False)[1]


def _norm_claims(lab):
    from lenslab.zoo import noln

    return noln.stored_claims("zoo/ioi-4l")  # the table measured when zoo/ioi-4l-noln was built


BUILDERS = {
    "PatchResult": _patch,
    "AttributionResult": _attribution,
    "EdgeScores": _edges,
    "CircuitGraph": _graph,
    "Faithfulness": _faithfulness,
    "LogitLens": _logit_lens,
    "LensKL": _lens_kl,
    "Predictions": _predictions,
    "SinkResult": _sinks,
    "MassiveResult": _massive,
    "AblationResult": _ablation,
    "ExpertProfile": _profile,
    "SuperExperts": _super_experts,
    "SuperExpertAblation": _se_ablation,
    "RouterResult": _route,
    "ExpertRanking": _ranking,
    "RateTable": _rates,
    "SwitchTable": _switch,
    "TradeoffResult": _tradeoff,
    "SaeMetrics": _sae_metrics,
    "TranscoderMetrics": _transcoder_metrics,
    "AttributionGraph": _attribution_graph,
    "HeadEdges": _head_edges,
    "GraphAblation": _graph_ablation,
    "NodeIntervention": _node_intervention,
    "LookupResult": _lookup,
    "SearchResult": _search,
    "FeatureDashboard": _dashboard,
    "ProbeResult": _probes,
    "DLAResult": _dla,
    "AtlasResult": _atlas,
    "TrajectoryFit": _trajectory_fit,
    "CheckpointSeries": _checkpoint_series,
    "LNRemovalResult": _ln_removal,
    "NormClaims": _norm_claims,
}


def build(name: str, lab: Lab):
    return lab.memo(("result", name), lambda: BUILDERS[name](lab))


@pytest.fixture(scope="module")
def lab(zoo_models, tmp_path_factory):
    return Lab(zoo_models, tmp_path_factory.mktemp("results_contract"))


# --- the contract ---------------------------------------------------------------------------------
def test_every_result_class_has_a_builder():
    classes = result_classes()
    missing = sorted(set(classes) - set(BUILDERS))
    assert not missing, f"result classes without a builder in tests/test_results_contract.py BUILDERS: {missing}"
    assert not set(BUILDERS) - set(classes), (
        f"builders for classes that no longer exist: {set(BUILDERS) - set(classes)}"
    )
    for name, cls in classes.items():  # each class states its own KIND, registered to it
        assert cls.__dict__.get("KIND") and RESULT_KINDS[cls.KIND] is cls, name


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_result_keeps_the_contract(name, lab, tmp_path):
    torch.manual_seed(0)
    r = build(name, lab)
    cls = result_classes()[name]
    assert type(r) is cls

    table = r.table()
    assert isinstance(table, pd.DataFrame) and len(table) >= 1, type(table)
    fig = r.figure()
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1

    text = r.to_json()
    assert json.loads(text)["kind"] == cls.KIND == r.to_dict()["kind"]
    back = cls.from_json(text)
    assert type(back) is cls and json.loads(back.to_json()) == json.loads(text)

    assert json.loads(figures.export(r, tmp_path / "r.json").read_text())["kind"] == cls.KIND
    assert "plotly" in figures.export(r, tmp_path / "r.html").read_text()
    if name == SVG_CLASS:
        root = ET.parse(figures.export(r, tmp_path / "r.svg")).getroot()
        assert root.tag.endswith("svg")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_to_markdown_is_a_markdown_table(name, lab):
    md = build(name, lab).to_markdown()
    assert isinstance(md, str) and md.startswith("|"), md[:80]
