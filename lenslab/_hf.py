"""Hugging Face loading (hub ids and local checkpoints) into TransformerLens models.

One path for both sources: a hub id is first resolved to a local snapshot folder (the HF cache;
when online, only config, tokenizer and weights are downloaded), then every folder is loaded
the same way:

- checkpoints TransformerLens's `HookedTransformer` can convert (GPT-2, GPT-Neo/J, Pythia,
  OPT, Bloom, Llama, Mistral, Mixtral, OLMoE, Qwen2/3, Phi-3, and official ids such as Gemma)
  become a `HookedTransformer`, built with TransformerLens's own config and weight converters
  and *no* weight processing (no LayerNorm folding, no centering): logits equal Hugging Face's;
- everything else the bridge supports (Qwen2-MoE, Qwen3-MoE, local Gemma/OLMo/Phi folders,
  ...) becomes a `TransformerBridge` in compatibility mode without weight processing:
  HookedTransformer hook names (`blocks.0.attn.hook_z`), Hugging Face numerics.

docs/design.md ("HookedTransformer and TransformerBridge") explains the choice.

Checkpoints in the published LN-free format (every norm's epsilon 1e12, lenslab._noln) become a
`HookedTransformer` without norms (`normalization_type` None), the neutralised norms folded into
the weights. A hub id may name a revision (a branch, tag or commit: Pythia's `step1000`), which
is downloaded and cached like `main`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from lenslab import _noln, _offload, zoo
from lenslab._errors import LenslabError, did_you_mean

logger = logging.getLogger(__name__)

# Causal-LM architectures whose weights TransformerLens converts into a HookedTransformer
# (transformer_lens.loading_from_pretrained.get_pretrained_state_dict), without remote code.
HOOKED_ARCHITECTURES = frozenset(
    {
        "GPT2LMHeadModel",
        "GPTNeoForCausalLM",
        "GPTJForCausalLM",
        "GPTNeoXForCausalLM",
        "OPTForCausalLM",
        "BloomForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "Olmo3ForCausalLM",
        "OlmoeForCausalLM",
        "ApertusForCausalLM",
        "GptOssForCausalLM",
    }
)
# HookedTransformer registers rotary/positional tables of size n_ctx in every layer; configs
# that advertise 128K positions would allocate gigabytes. TransformerLens caps its own
# long-context presets at 2K-8K for the same reason.
MAX_HOOKED_CTX = 8192
# Files fetched from the hub besides the weights: configs, tokenizer, shard indexes.
_META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]
# Substrings that make TransformerLens's config converter pick an architecture from the *name*
# (a path like /models/llama-tiny would bypass the folder's config.json).
_NAME_TRIGGERS = ("llama", "gemma")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


# --- public entry points (called by lenslab.models.load_model) ------------------------------


def load_hf_id(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    placement: tuple | None = None,
    revision: str | None = None,
):
    """Load Hugging Face hub model `name` (from the cache, or downloaded when online).

    `placement` is `(device_map, max_memory, offload_folder)` for a model split across devices
    (`lenslab._offload`); None loads it whole onto `device`. `revision`: a branch, tag or commit
    of the repo (Pythia's training checkpoints are branches `step0` ... `step143000`); None: main."""
    repo_id = _official_name(name) or name
    folder = _snapshot(repo_id, asked=name, revision=revision)
    tl_name = repo_id if _official_name(repo_id) == repo_id else None
    return _load_folder(folder, device, dtype, tl_name=tl_name, placement=placement, revision=revision)


def load_hf_dir(folder: str | Path, device: torch.device, dtype: torch.dtype, placement: tuple | None = None):
    """Load a local directory holding a Hugging Face config, tokenizer and safetensors weights
    (`placement` as in `load_hf_id`)."""
    folder = Path(folder).expanduser().resolve()
    return _load_folder(folder, device, dtype, tl_name=None, placement=placement)


def backend_for(architecture: str) -> str:
    """'hooked' (HookedTransformer) or 'bridge' (TransformerBridge) for an HF architecture name.

    >>> backend_for("GPT2LMHeadModel"), backend_for("Qwen2MoeForCausalLM")
    ('hooked', 'bridge')
    """
    if architecture in HOOKED_ARCHITECTURES:
        return "hooked"
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,  # deferred: transformer_lens loads only when a model is built
    )
    from transformer_lens.utilities.architectures import (  # deferred: transformer_lens loads only when a model is built
        MASKED_LM_ARCHITECTURES,
        SEQ2SEQ_ARCHITECTURES,
    )

    if architecture in MASKED_LM_ARCHITECTURES | SEQ2SEQ_ARCHITECTURES:
        raise LenslabError(
            f"architecture {architecture!r} is not a decoder-only language model; lenslab's tasks and "
            "analyses predict the next token, so load a causal LM (GPT-2, Llama, Qwen, OLMoE, ...)"
        )

    if architecture in SUPPORTED_ARCHITECTURES:
        return "bridge"
    raise LenslabError(
        f"architecture {architecture!r} is supported neither by TransformerLens's HookedTransformer "
        f"nor by its TransformerBridge{did_you_mean(architecture, [*HOOKED_ARCHITECTURES, *SUPPORTED_ARCHITECTURES])}; "
        "pick a model of a supported architecture (see transformer_lens.supported_models)"
    )


def checkpoint_revision(name: str, *, index: int | None = None, value: int | None = None) -> str:
    """The hub revision of a training checkpoint of `name`, by position in its checkpoint list
    (`index`, negative counts from the end) or by step (`value`), as TransformerLens's
    `from_pretrained(checkpoint_index=, checkpoint_value=)` reads them: Pythia's `step{N}` branches
    (154 of them; -v0 models: 143), Stanford CRFM's `checkpoint-{N}`.

    >>> checkpoint_revision("EleutherAI/pythia-70m", value=1000), checkpoint_revision("pythia-70m", index=-1)
    ('step1000', 'step143000')
    """
    import transformer_lens.loading_from_pretrained as loading  # deferred: transformer_lens loads only when a model is built

    if (index is None) == (value is None):
        raise LenslabError(
            "pass one of checkpoint_index= (position in the checkpoint list) or checkpoint_value= (step)"
        )
    official = _official_name(name) or name
    if official.startswith("EleutherAI/pythia"):
        labels, template = (loading.PYTHIA_V0_CHECKPOINTS if "v0" in official else loading.PYTHIA_CHECKPOINTS), "step{}"
    elif official.startswith("stanford-crfm/"):
        labels, template = loading.STANFORD_CRFM_CHECKPOINTS, "checkpoint-{}"
    else:
        raise LenslabError(
            f"{name!r} has no checkpoint list lenslab knows (Pythia's step revisions, Stanford CRFM's "
            "checkpoint-N revisions): pass revision='<branch, tag or commit>' instead of checkpoint_index/checkpoint_value"
        )
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not -len(labels) <= index < len(labels):
            raise LenslabError(
                f"checkpoint_index={index!r} is out of range: {official} has {len(labels)} checkpoints "
                f"(index 0 = step {labels[0]}, -1 = step {labels[-1]})"
            )
        return template.format(labels[index])
    if isinstance(value, bool) or not isinstance(value, int) or value not in labels:
        near = ""
        if isinstance(value, int) and not isinstance(value, bool):
            around = [
                max((s for s in labels if s < value), default=None),
                min((s for s in labels if s > value), default=None),
            ]
            near = "; the nearest are " + " and ".join(str(s) for s in around if s is not None)
        raise LenslabError(
            f"checkpoint_value={value!r} is not a checkpoint of {official}{near} "
            f"(it has {len(labels)}: {', '.join(map(str, labels[:4]))}, ..., {labels[-1]})"
        )
    return template.format(value)


def cached_model_ids() -> list[str]:
    """Model ids in the local Hugging Face cache that `load_model` can open offline.

    Only repos with a cached config.json and weights count (SAE repos, tokenizer-only repos
    and interrupted downloads are left out).
    """
    try:
        from huggingface_hub import constants, scan_cache_dir  # deferred: huggingface_hub loads only for hub access

        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # no cache dir yet, or an unreadable one
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name for f in rev.files}
            if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
                out.append(repo.repo_id)
                break
    return sorted(out)


# --- hub ids -> local snapshot folders ---------------------------------------------------------


def _official_name(name: str) -> str | None:
    """TransformerLens's official HF id for `name` (also resolves aliases like 'gpt2-small')."""
    from transformer_lens.supported_models import (  # deferred: transformer_lens loads only when a model is built
        MODEL_ALIASES,
        OFFICIAL_MODEL_NAMES,
    )

    if name in OFFICIAL_MODEL_NAMES:
        return name
    lower = name.lower()
    for official, aliases in MODEL_ALIASES.items():
        if lower == official.lower() or lower in (a.lower() for a in aliases):
            return official
    return None


def _snapshot(repo_id: str, asked: str, revision: str | None = None) -> Path:
    """Local folder with config, tokenizer and weights of `repo_id` (at `revision`, None: main);
    a clear error otherwise.

    With HF_HUB_OFFLINE=1 this only looks in the cache (instant); online it downloads what is
    missing. A failed connection also falls back to the cache without retries.
    """
    from huggingface_hub import constants, snapshot_download  # deferred: huggingface_hub loads only for hub access
    from huggingface_hub.errors import (  # deferred: huggingface_hub loads only for hub access
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = constants.HF_HUB_CACHE
    offline = bool(constants.HF_HUB_OFFLINE) or not _hub_reachable()

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache, local_files_only=offline
            )
        )

    try:
        folder = fetch(_META_PATTERNS)
        if not (folder / "config.json").exists():
            if offline:
                raise LocalEntryNotFoundError(f"no config.json in the cached snapshot of {repo_id}")
            raise LenslabError(
                f"Hugging Face repo {repo_id!r} has no config.json: it is not a transformers model "
                "lenslab can load (GGUF, adapters and SAE repos are not models)"
            )
        for weights in _weight_candidates(folder):
            if all((folder / w).exists() for w in weights):
                return folder
            folder = fetch(weights)
            if all((folder / w).exists() for w in weights):
                return folder
    except HFValidationError as exc:
        why = "it is not a zoo model, an existing local directory or a valid Hugging Face id"
        raise _unknown_name(asked, why) from exc
    except GatedRepoError as exc:
        raise LenslabError(
            f"Hugging Face model {repo_id!r} is gated: accept its license on huggingface.co and set "
            "HF_TOKEN (or run `hf auth login`), then try again"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise _unknown_name(asked, "no such model on the Hugging Face Hub") from exc
    except RevisionNotFoundError as exc:
        rev = revision or "main"
        fix = (
            "pass an existing branch, tag or commit (Pythia: step0, step1, ..., step512, step1000, ..., step143000)"
            if revision
            else "pass revision=<branch>"
        )
        raise LenslabError(f"Hugging Face model {repo_id!r} has no revision {rev!r}: {fix}") from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        if offline or isinstance(exc, LocalEntryNotFoundError):
            raise _offline_error(asked, repo_id, cache, revision) from exc
        raise LenslabError(
            f"downloading {repo_id!r} from the Hugging Face Hub failed ({type(exc).__name__}: {exc}); "
            "check the network and try again"
        ) from exc
    if offline:
        raise _offline_error(asked, repo_id, cache, revision)
    raise LenslabError(
        f"Hugging Face model {repo_id!r} has no weights lenslab can read (model.safetensors, "
        "sharded safetensors or pytorch_model.bin)"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint opens within `timeout` seconds.

    Without it a dead network can stall huggingface_hub's requests and retries; with it an
    unreachable hub costs at most `timeout` and the cache is used. Behind a proxy the hub is
    not probed (huggingface_hub's own requests go through the proxy).
    """

    from huggingface_hub import constants  # deferred: huggingface_hub loads only for hub access

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _weight_candidates(folder: Path) -> list[list[str]]:
    """Weight file lists to try, in order of preference (safetensors first)."""
    out = []
    pairs = [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]
    for index, single in pairs:
        if (folder / index).exists():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            out.append(sorted(set(weight_map.values())))
        else:
            out.append([single])
    return out


def _zoo_hint() -> str:

    names = zoo.zoo_names()
    return f"the zoo (offline) has: {', '.join(names) or '(nothing yet: run `lenslab zoo train induction-2l`)'}"


def _hint(name: str) -> str:
    """' (did you mean X?)' over zoo and cached models; 'induction-2l' suggests 'zoo/induction-2l'."""

    options = zoo.zoo_names() + cached_model_ids()
    return did_you_mean(zoo.PREFIX + name, zoo.zoo_names()) or did_you_mean(name, options)


def _unknown_name(name: str, why: str) -> LenslabError:
    return LenslabError(f"unknown model {name!r}{_hint(name)}: {why}; {_zoo_hint()}")


def _offline_error(name: str, repo_id: str, cache: str, revision: str | None = None) -> LenslabError:
    from huggingface_hub import constants  # deferred: huggingface_hub loads only for hub access

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE=1 is set, so the Hub is not contacted"
        fix = "unset HF_HUB_OFFLINE and connect to the network to download it"
    else:
        why = "the Hugging Face Hub could not be reached (no network?)"
        fix = "connect to the network to download it"
    cached = cached_model_ids()
    also = f"; cached models: {', '.join(cached)}" if cached else ""
    at = ""
    if revision is not None:
        refs = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "refs"
        have = sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []
        at = f" at revision {revision!r}" + (f" (cached revisions of it: {', '.join(have)})" if have else "")
    return LenslabError(
        f"cannot load {name!r}{at}{_hint(name)}: it is not in the local Hugging Face cache ({cache}) and {why}. "
        f"To use it, {fix} once (it is cached afterwards), or load a local directory or a zoo model; "
        f"{_zoo_hint()}{also}"
    )


# --- local folders -> TransformerLens models ----------------------------------------------------


def _load_folder(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tl_name: str | None,
    placement=None,
    revision: str | None = None,
):
    hf_config = _read_config(folder)
    arch = _architecture(hf_config, folder)
    backend = backend_for(arch)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise LenslabError(
            f"{folder} has a config.json but no weights (model.safetensors); save them with "
            "`model.save_pretrained(dir)`"
        )
    noln = _noln.detect(hf_config)
    if noln is not None and (placement is not None or backend != "hooked"):
        how = (
            "not with device_map: load it on one device"
            if placement is not None
            else f"and TransformerLens converts {arch} only into a TransformerBridge"
        )
        raise LenslabError(
            f"{folder} is {noln.describe()}; lenslab folds such norms away only into a HookedTransformer, {how}"
        )
    tokenizer = (
        _gpt2_tokenizer(folder, noln, hf_config.vocab_size)
        if noln is not None and not _has_tokenizer(folder)
        else _tokenizer(folder)
    )
    with warnings.catch_warnings():
        # HookedTransformer's "deprecated in favour of TransformerBridge" notice (docs/design.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if placement is not None:  # split across devices: always the bridge over accelerate's placement
            model = _offload.load_dispatched(folder, hf_config, arch, tokenizer, dtype, *placement)
        else:
            # LN-free: converted in float32 (the 1e6-scaled norm weights overflow float16), folded, then cast
            load_dtype = torch.float32 if noln is not None else dtype
            parts = (
                _hooked_parts(folder, hf_config, arch, device, load_dtype, tl_name, revision)
                if backend == "hooked"
                else None
            )
            if noln is not None:
                if parts is None:
                    raise LenslabError(
                        f"{folder} is {noln.describe()}, but TransformerLens cannot convert its {arch} weights "
                        "into a HookedTransformer, so lenslab cannot fold its norms away"
                    )
                cfg, state = _noln.fold_fixed_norms(*parts, noln)
                cfg.dtype = dtype
                parts = (cfg, state)
                logger.info("%s: %s; norms folded into the weights", folder, noln.describe())
            if parts is not None:
                model = _build_hooked(*parts, tokenizer, device, dtype)
            else:
                model = _load_bridge(folder, hf_config, arch, tokenizer, device, dtype)
    model.eval()
    model.lenslab_source = str(folder)
    return model


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    return any((folder / n).exists() for n in names)


def _gpt2_tokenizer(folder: Path, noln: _noln.NoLNFormat, vocab: int):
    """GPT-2's tokenizer (from the HF cache, or downloaded when online) for an LN-free GPT-2
    checkpoint that ships none (the published ones do not)."""
    from huggingface_hub import constants, snapshot_download  # deferred: huggingface_hub loads only for hub access

    repo = _noln.TOKENIZER_REPO
    if vocab != 50257:
        raise LenslabError(
            f"{folder} is {noln.describe()} without tokenizer files, and its vocabulary ({vocab}) is not "
            f"GPT-2's (50257), so {repo}'s tokenizer does not fit: save its tokenizer beside the weights"
        )
    offline = bool(constants.HF_HUB_OFFLINE) or not _hub_reachable()
    try:
        tok_folder = Path(
            snapshot_download(
                repo, allow_patterns=_META_PATTERNS, cache_dir=constants.HF_HUB_CACHE, local_files_only=offline
            )
        )
    except Exception as exc:  # offline and not cached, network errors
        raise LenslabError(
            f"{folder} is {noln.describe()} without tokenizer files; lenslab gives it GPT-2's tokenizer ({repo}), "
            f"which could not be {'found in the local Hugging Face cache' if offline else 'downloaded'} "
            f"({type(exc).__name__}). Connect to the network once, or save a GPT-2 tokenizer beside the weights "
            "(`GPT2TokenizerFast.from_pretrained('gpt2').save_pretrained(dir)`)"
        ) from exc
    return _tokenizer(tok_folder)


def _read_config(folder: Path):
    from transformers import AutoConfig  # deferred: transformers loads only for Hugging Face checkpoints

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # unknown model_type, malformed JSON, ...
        raise LenslabError(f"cannot read the Hugging Face config in {folder}: {exc}") from exc


def _architecture(hf_config, folder: Path) -> str:
    """The HF model class name; configs built in code and saved by hand may lack `architectures`."""
    archs = getattr(hf_config, "architectures", None) or []
    causal = [a for a in archs if "For" in a or a.endswith("LMHeadModel")]
    if causal:
        return causal[0]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,  # deferred: transformers loads only for Hugging Face checkpoints
    )

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise LenslabError(
            f"{folder}/config.json names no causal-LM architecture (architectures={archs}, "
            f"model_type={getattr(hf_config, 'model_type', None)!r}); lenslab loads decoder-only language models"
        )
    return arch


def _tokenizer(folder: Path):
    """The folder's tokenizer. A generic `tokenizer.json` (class TokenizersBackend or
    PreTrainedTokenizerFast) is loaded as is: AutoTokenizer in transformers 5 would otherwise
    swap in the model family's tokenizer class (e.g. Qwen2Tokenizer) and lose its vocabulary."""
    from transformers import (  # deferred: transformers loads only for Hugging Face checkpoints
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )

    tok_cfg = folder / "tokenizer_config.json"
    generic = False
    if tok_cfg.exists() and (folder / "tokenizer.json").exists():
        try:
            cls_name = json.loads(tok_cfg.read_text()).get("tokenizer_class")
            generic = cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast")
        except ValueError:
            pass
    try:
        cls = PreTrainedTokenizerFast if generic else AutoTokenizer
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise LenslabError(
            f"cannot load a tokenizer from {folder} ({type(exc).__name__}: {str(exc)[:200]}); save one beside "
            "the weights with `tokenizer.save_pretrained(dir)`"
        ) from exc
    # A tokenizer that already prepends BOS says so, so that TransformerLens keeps it as is
    # instead of reloading it by name with add_bos_token=True (which, again, may change its class).
    ids = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id:
        tokenizer.init_kwargs["add_bos_token"] = True
    return tokenizer


def _hooked_parts(folder, hf_config, arch, device, dtype, tl_name, revision=None):
    """(HookedTransformerConfig, state dict) from TransformerLens's converters, or None when
    TransformerLens cannot convert this checkpoint (then the bridge loads it instead).

    Some architectures HookedTransformer supports only by official name (Gemma, OLMo), and
    some converters read config fields that transformers 5 renamed (Phi).
    """
    import transformer_lens.loading_from_pretrained as loading  # deferred: transformer_lens loads only when a model is built
    from huggingface_hub import constants  # deferred: huggingface_hub loads only for hub access
    from transformers import AutoModelForCausalLM  # deferred: transformers loads only for Hugging Face checkpoints

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    hf_model.eval()
    common = dict(hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=str(device), dtype=dtype)
    try:
        if tl_name is not None:
            # An official TransformerLens id: its name-specific presets apply (context caps, ...).
            at = {} if revision is None else {"revision": revision}  # the config of the revision loaded
            cfg = loading.get_pretrained_model_config(
                tl_name, **common, local_files_only=True, cache_dir=constants.HF_HUB_CACHE, **at
            )
            state = loading.get_pretrained_state_dict(tl_name, cfg, hf_model=hf_model, dtype=dtype)
        else:
            with _config_shim(hf_config, arch) as shim:
                cfg = loading.get_pretrained_model_config(shim, **common)
                state = loading.get_pretrained_state_dict(shim, cfg, hf_model=hf_model, dtype=dtype)
            cfg.model_name = folder.name
            cfg.tokenizer_name = str(folder)
    except (NotImplementedError, ValueError, AttributeError, KeyError, TypeError) as exc:
        logger.info("HookedTransformer cannot convert %s (%r); using TransformerBridge", folder, exc)
        return None
    if cfg.n_ctx > MAX_HOOKED_CTX:
        cfg.n_ctx = MAX_HOOKED_CTX
    return cfg, state


def _build_hooked(cfg, state, tokenizer, device, dtype):
    """HookedTransformer with the converted weights, unprocessed (no folding: logits equal HF's)."""
    from transformer_lens import HookedTransformer  # deferred: transformer_lens loads only when a model is built

    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.to(dtype, print_details=False)
    model.to(device, print_details=False)
    return model


@contextlib.contextmanager
def _config_shim(hf_config, arch: str):
    """A temporary folder holding only config.json (with fix-ups), for TL's config converter.

    TransformerLens picks some architectures from the path name ('llama', 'gemma'), which a
    user's folder name must not decide; transformers 5 no longer writes GPT-2's `n_ctx`; and
    configs saved by hand may lack `architectures` (TL reads `architectures[0]`).
    """
    cfg = hf_config.to_dict()
    cfg["architectures"] = [arch]
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
    with tempfile.TemporaryDirectory(prefix="lenslab-cfg-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(cfg, default=str))
        path = tmp
        if any(t in path.lower() for t in _NAME_TRIGGERS):
            path = os.path.relpath(tmp)  # drops the parts shared with the working directory
        if any(t in path.lower() for t in _NAME_TRIGGERS):
            raise LenslabError(f"temporary folder {tmp} confuses TransformerLens; set TMPDIR to a neutral path")
        yield path


def _load_bridge(folder, hf_config, arch, tokenizer, device, dtype):
    """TransformerBridge around the HF model, with HookedTransformer hook names, no processing."""
    from transformer_lens.model_bridge import (
        TransformerBridge,  # deferred: transformer_lens loads only when a model is built
    )

    overrides = None if getattr(hf_config, "architectures", None) else {"architectures": [arch]}
    try:
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_config_overrides=overrides, device=device, dtype=dtype, tokenizer=tokenizer
        )
    except Exception as exc:  # remote code, unusual configs, ...: name the model and the cause
        raise LenslabError(
            f"TransformerLens's TransformerBridge could not load {folder} ({arch}): {type(exc).__name__}: "
            f"{str(exc)[:300]}"
        ) from exc
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    if getattr(bridge.cfg, "original_architecture", None) is None:
        bridge.cfg.original_architecture = arch
    return bridge
