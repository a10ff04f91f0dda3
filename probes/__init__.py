"""lenslab.probes: reading what a model computes, from its activations and its routing.

One job per module (import them by name; this package re-exports nothing):

- `lenslab.probes.sinks`: attention sinks (`attention_sinks`, Gu et al.), massive activations
  (`massive_activations`, Sun et al.) and ablating them (`ablate_massive`).
- `lenslab.probes.super_experts`: the MoE experts whose down-projections write the massive
  activations (Su et al.): `profile_experts`, `super_experts`, `prune_experts`,
  `ablate_super_experts`.
- `lenslab.probes.atlas`: the activation-maxima atlas: max |a| at every hook, where it sits, the
  median and the INT8 absmax error (`activation_atlas`, `AtlasResult`).
- `lenslab.probes.trajectory`: massive activations and sinks over training checkpoints
  (`measure_checkpoints`) and their five-parameter fit (`fit_trajectory`, Gallego-Feliciano et al.).
- `lenslab.probes.ln_removal`: remove every LayerNorm / RMSNorm by fine-tuning with fixed scales,
  one norm group at a time, folded into an LN-free model (`remove_norms`, `LNRemovalResult`).
- `lenslab.probes.dla`: direct logit attribution of every head, MLP (or neuron), embedding and
  bias toward a token, a logit difference, a task's answers or a direction
  (`direct_logit_attribution`, `DLAResult`).
- `lenslab.probes.lenses`: the logit lens and the tuned lens (Belrose et al.) with one Result
  (`logit_lens`, `tuned_lens` -> `LogitLens`), tuned-lens translators (`TunedLens`,
  `load_tuned_lens`), `train_tuned_lens`, and the KL per layer of both (`lens_kl` -> `LensKL`).
- `lenslab.probes.linear`: linear probes per layer and site (scikit-learn's logistic or ridge
  regression) with a split by prompt and a Hewitt & Liang control task: `train_probes`,
  `ProbeResult`, `Probe` (save / load; its direction steers through `lenslab.steering.probe_steering`).
- `lenslab.probes.routers`: which experts each token picks and with what gate weight (`route`),
  and how often each expert is chosen over a corpus (`expert_load`).
- `lenslab.probes.sae`: sparse autoencoders with sae-lens, the public face of its modules:
  `lenslab.probes.sae_load` (`load_sae`, `check_sae`, the zoo's SAEs),
  `lenslab.probes.sae_splice` (`splice_hooks`, `zero_hooks`), `lenslab.probes.sae_measure`
  (`sae_metrics`, `corpus_tokens`) and `lenslab.probes.sae_train` (`train_sae`, `sae_card`).
- `lenslab.probes.transcoders`: transcoders (MLP input -> MLP output; ReLU, JumpReLU, TopK, skip)
  and cross-layer transcoders, trained, loaded from circuit-tracer's layouts, spliced in place of
  the MLPs (`train_transcoders`, `train_clt`, `load_transcoders`, `replacement_hooks`, `TranscoderMetrics`).
- `lenslab.probes.attribution_graph`: circuit-tracer's attribution graphs through transcoders: direct
  effects among features, errors, tokens and logits (`attribution_graph`, `prune`, `AttributionGraph`).
- `lenslab.probes.graph_heads`: an attribution graph's edges split by the attention head each path
  crosses last, plus a residual part (`head_edges`, `HeadEdges`).
- `lenslab.probes.graph_files`: a graph as circuit-tracer's / Neuronpedia's graph JSON (`graph_file`,
  `write_graph_file`).
- `lenslab.probes.graph_validation`: ablating a graph's features in the live model against random
  features of the same number (`ablate_graph`, `GraphAblation`).
- `lenslab.probes.features` (a package): SAE features over a corpus: a SQLite feature store
  (`index`, `FeatureStore`), per-token `lookup`, `FeatureDashboard` and `search`.
- `lenslab.probes.zoo_saes`: a deprecated alias of `lenslab.zoo.train_saes` (the zoo SAEs'
  recipes), for one release.

What these tools know of the zoo lives in the zoo: the planted models the detectors are tested on
in `lenslab.zoo.planted`, the zoo models' built-in corpora in `lenslab.zoo.corpora`, the recipes
of the zoo's SAEs in `lenslab.zoo.train_saes` and of its tuned lenses in `lenslab.zoo.train_lenses`.
"""

if __name__ != "lenslab.probes":  # imported as top-level `probes`: the repository root is on sys.path
    import os as _os
    import runpy as _runpy

    _shadow = _os.path.join(_os.path.dirname(__file__), _os.pardir, "lenslab", "_shadow.py")
    _runpy.run_path(_shadow)["hand_over"](__name__, __file__)  # the installed `probes`, or a clear error
