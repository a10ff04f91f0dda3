"""SAE features: a feature store (Parquet tables queried with DuckDB), per-token lookup, feature dashboards and search.

`index(model, sae, corpus, path)` runs a model and a sae-lens SAE over a corpus once (in this
process, or in parts on a Ray cluster with `cluster=`) and writes per-feature statistics and
top-activating contexts to a store folder; `FeatureStore` reads it back (a SQLite store of the
first format too; `convert` rewrites one as a folder).
`lookup` shows the top features of each token of a prompt, `FeatureDashboard` one feature (contexts
with per-token highlighting, activation histogram, density, logit effects; JSON and standalone HTML
exports) and `search` finds features by token, substring or id.

This package re-exports every public name of its modules, one job each:

- `lenslab.probes.features.store`: the store's layout and its exact merge (in its module
  docstring), `FeatureStore`, `FeatureStats`, `Context`, `convert`.
- `lenslab.probes.features.indexing`: `index`, building a store over a corpus in parts (an
  interrupted run resumes; `cluster=` runs the parts on Ray workers, with the same result).
- `lenslab.probes.features.token_lookup`: `lookup` -> `LookupResult`.
- `lenslab.probes.features.dashboard`: `FeatureDashboard` (figure, JSON, standalone HTML page).
- `lenslab.probes.features.searching`: `search` -> `SearchResult` of `FeatureHit`s.
- `lenslab.probes.features.corpora`: `read_corpus`, and `corpus_for` (a zoo model's built-in corpus,
  from `lenslab.zoo.corpora`).
- `lenslab.probes.features.plumbing`: `feature_acts`, `logit_effects`, model and SAE identities.
"""

from __future__ import annotations

from lenslab.probes.features.corpora import corpus_for, read_corpus
from lenslab.probes.features.dashboard import FeatureDashboard
from lenslab.probes.features.indexing import index
from lenslab.probes.features.plumbing import (
    LOGIT_BINS,
    LOGIT_K,
    feature_acts,
    logit_effects,
    model_identity,
    open_sae,
    sae_hash,
    sae_identity,
)
from lenslab.probes.features.searching import SEARCH_ORDERS, FeatureHit, SearchResult, search
from lenslab.probes.features.store import (
    FORMAT,
    HIST_EDGES,
    SCHEMA_VERSION,
    Context,
    FeatureStats,
    FeatureStore,
    convert,
    is_store,
)
from lenslab.probes.features.token_lookup import LookupResult, lookup

__all__ = [
    "FORMAT",
    "HIST_EDGES",
    "LOGIT_BINS",
    "LOGIT_K",
    "SCHEMA_VERSION",
    "SEARCH_ORDERS",
    "Context",
    "FeatureDashboard",
    "FeatureHit",
    "FeatureStats",
    "FeatureStore",
    "LookupResult",
    "SearchResult",
    "convert",
    "corpus_for",
    "feature_acts",
    "index",
    "is_store",
    "logit_effects",
    "lookup",
    "model_identity",
    "open_sae",
    "read_corpus",
    "sae_hash",
    "sae_identity",
    "search",
]

_open_sae = open_sae  # the name `lenslab sae ...` (lenslab.cli) and benchmarks/sae_index.py call; same function
