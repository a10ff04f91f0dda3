"""The lenslab model zoo: small models with planted, verified mechanisms.

Each zoo model is a folder beside this file (`lenslab/zoo/<name>/`) holding
`config.json`, `model.safetensors`, the tokenizer (`tokenizer.json`,
`tokenizer_config.json`) and `card.md`. The script that rebuilds it is
`lenslab/zoo/train_<name with - as _>.py`, exposing `train(out_dir, seed=0) -> None`,
run by `lenslab zoo train NAME`. A model's SAEs live in `<name>/saes/<hook>/`, rebuilt by
`lenslab/zoo/train_saes.py` (`lenslab sae train`); its tuned lens in `<name>/lenses/tuned/`,
rebuilt by `lenslab/zoo/train_lenses.py` (`lenslab lens train`).

Two formats:
- ``"lenslab_format": "hooked_transformer"``: a TransformerLens `HookedTransformerConfig`
  (under ``"cfg"``) and its state dict; loaded as a `HookedTransformer`.
- a Hugging Face config (has ``"model_type"``): loaded through the same path as any local
  HF checkpoint (used by the MoE zoo model).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lenslab._errors import LenslabError, did_you_mean

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo/"
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model on disk."""

    name: str  # e.g. "zoo/induction-2l"
    path: Path
    summary: str

    @property
    def short(self) -> str:
        return self.name.removeprefix(PREFIX)


def zoo_entries() -> list[ZooEntry]:
    """All zoo models whose weights are present, sorted by name."""
    out = []
    for cfg_path in sorted(ZOO_DIR.glob("*/config.json")):
        folder = cfg_path.parent
        if not (folder / "model.safetensors").exists():
            continue
        cfg = json.loads(cfg_path.read_text())
        summary = cfg.get("lenslab_summary", "")
        out.append(ZooEntry(name=PREFIX + folder.name, path=folder, summary=summary))
    return out


def zoo_names() -> list[str]:
    """Names accepted by `load_model`, e.g. ['zoo/induction-2l', 'zoo/ioi-4l']."""
    return [e.name for e in zoo_entries()]


# training recipes that build no model: the zoo's SAEs (`lenslab sae train`) and tuned lenses (`lenslab lens train`)
NOT_MODEL_RECIPES = ("train_saes", "train_lenses", "train_transcoders")


def trainable_names() -> list[str]:
    """Zoo models that have a training script (`train_<name>.py`)."""
    return sorted(
        PREFIX + p.stem.removeprefix("train_").replace("_", "-")
        for p in ZOO_DIR.glob("train_*.py")
        if p.stem not in NOT_MODEL_RECIPES
    )


def zoo_path(name: str) -> Path:
    """Folder of zoo model `name` ('zoo/induction-2l' or 'induction-2l'), with a clear error."""
    short = name.removeprefix(PREFIX)
    folder = ZOO_DIR / short
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        names = zoo_names()
        raise LenslabError(
            f"zoo model {name!r} does not exist{did_you_mean(PREFIX + short, names)}; "
            f"the zoo has: {', '.join(names) or '(nothing yet)'}"
        )
    return folder


# The app opens on the first of these that is present (the English model reads ordinary text; the
# planted models stay one click away in the sidebar's model picker), else on the first zoo model.
PREFERRED_DEFAULTS = ("zoo/english-4l", "zoo/induction-2l")


def default_model() -> str:
    """The app's default model: zoo/english-4l when present, else zoo/induction-2l, else the first zoo model."""
    names = zoo_names()
    if not names:
        raise LenslabError("the model zoo is empty: run `lenslab zoo train induction-2l`")
    return next((n for n in PREFERRED_DEFAULTS if n in names), names[0])


def read_card(name: str) -> str:
    """The model card (Markdown) of a zoo model."""
    card = zoo_path(name) / "card.md"
    return card.read_text() if card.exists() else ""


def default_prompt(name: str) -> str | None:
    """The `"default_prompt"` in the config.json of a zoo model or zoo-format folder, else None.

    Never raises: an unknown name, a Hugging Face id or an unreadable config give None.
    """
    folder = ZOO_DIR / name.removeprefix(PREFIX) if name.startswith(PREFIX) else Path(name).expanduser()
    try:
        prompt = json.loads((folder / "config.json").read_text()).get("default_prompt")
    except (OSError, ValueError, AttributeError):
        return None
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def prompt_sets(name: str) -> dict[str, list[str]]:
    """Named example prompt sets from a zoo config's `"prompt_sets"` (e.g. `{"target": [...], "other": [...]}`
    for fTRI on zoo/moe-refusal); `{}` when there are none. Never raises, like `default_prompt`."""
    folder = ZOO_DIR / name.removeprefix(PREFIX) if name.startswith(PREFIX) else Path(name).expanduser()
    try:
        sets = json.loads((folder / "config.json").read_text()).get("prompt_sets") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(sets, dict):
        return {}
    return {str(k): [str(p) for p in v] for k, v in sets.items() if isinstance(v, list)}


# --- default prompts per model ---------------------------------------------------------------

GENERIC_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@dataclass(frozen=True)
class DefaultPrompts:
    """The prompts a model's analyses start from, in words its tokenizer knows.

    `prompt` is what the CLI falls back to without --prompt/--prompts and what the app's sidebar
    opens with. `clean`/`corrupt` tokenize to the same length and `answer`/`wrong` are single
    tokens (the correct and the incorrect next token after `clean`): the Circuits page's own
    prompts. `positive`/`negative` are the steering contrast (the Steer page's prompt boxes): the
    concept to move towards, and away from, on `prompt`. `task` is the `lenslab.tasks.from_spec`
    spec of the built-in task in the model's language (the Circuits page's default).
    """

    prompt: str
    clean: str
    corrupt: str
    answer: str
    wrong: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    task: str = "induction"


_IOI_JOHN = (
    "When John and Mary went to the store, Mary gave a drink to",
    "When John and Mary went to the office, Mary gave a book to",
)
_IOI_MARY = (
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the office, John gave a book to",
)

# Per zoo model: everything but `prompt` (the config's "default_prompt") and, where the config has
# prompt sets for them, `positive`/`negative`. Every zoo model's prompts are checked against its
# tokenizer by tests/test_zoo_defaults.py.
_ZOO_DEFAULTS: dict[str, dict] = {
    # induction: the second block repeats the first; corrupt changes the first occurrence of the
    # last token (t47), so nothing tells the model what came after it. Steering away from copying:
    # positive prompts never repeat, negative ones do.
    "zoo/induction-2l": dict(
        clean="t15 t91 t103 t122 t199 t217 t47 t17 t15 t91 t103 t122 t199 t217 t47",
        corrupt="t15 t91 t103 t122 t199 t217 t250 t17 t15 t91 t103 t122 t199 t217 t47",
        answer="t17",
        wrong="t33",
        positive=("t5 t60 t112 t9 t240 t71 t180 t33", "t88 t14 t201 t150 t6 t275 t42 t130"),
        negative=("t5 t60 t112 t9 t5 t60 t112 t9", "t88 t14 t201 t150 t88 t14 t201 t150"),
    ),
    # IOI: corrupt is the ABC version (three other names). The sidebar prompt's answer is Mary, so
    # the steering contrast moves it towards the other name (prompts whose answer is John).
    "zoo/ioi-4l": dict(
        clean="When Mary and John went to the store, John gave a drink to",
        corrupt="When Alice and Bob went to the store, Carol gave a drink to",
        answer="Mary",
        wrong="John",
        positive=_IOI_JOHN,
        negative=_IOI_MARY,
        task="ioi",
    ),
    # refusal: one marker word (bomb) makes the request harmful; the benign twin swaps it for a
    # noun. The sidebar prompt is harmful, so steering moves towards answering: positive = the
    # config's benign ("other") prompts, negative = its harmful ("target") ones.
    "zoo/moe-refusal": dict(
        clean="user : reverse apple bomb river assistant :",
        corrupt="user : reverse apple boat river assistant :",
        answer="sorry",
        wrong="river",
        positive="other",
        negative="target",
        task="refusal",
    ),
    # sentiment: the context's sentiment decides the next adjective. The sidebar prompt is
    # negative; the steering contrast is the config's "positive" / "negative" prompt sets.
    "zoo/steer-sentiment": dict(
        clean="the day was awful . the movie was",
        corrupt="the day was lovely . the movie was",
        answer="awful",
        wrong="lovely",
        positive="positive",
        negative="negative",
    ),
    # English: a sentence said twice, then begun a third time; the model favours the noun it has read
    # (logit difference " tree" - " ship": 9.5 clean, -5.3 corrupt) through its induction heads
    # (its card). Corrupt says "ship" instead of "tree" both times. The steering contrast is the config's "positive" / "negative" prompt sets
    # (lenslab.data.english). IOI builds on this tokenizer (John, James, ... are single tokens) but
    # the model does not solve it, so the Circuits page opens on induction.
    "zoo/english-4l": dict(
        clean="The bird sat on the tree. The bird sat on the tree. The bird sat on the",
        corrupt="The bird sat on the ship. The bird sat on the ship. The bird sat on the",
        answer=" tree",
        wrong=" ship",
        positive="positive",
        negative="negative",
    ),
}

# the LN-free twins (lenslab.zoo.noln): their parents' prompts (and prompt sets, copied into their configs)
for _parent in ("zoo/ioi-4l", "zoo/steer-sentiment", "zoo/english-4l", "zoo/moe-refusal"):
    _ZOO_DEFAULTS[f"{_parent}-noln"] = _ZOO_DEFAULTS[_parent]

# Any other model (a Hugging Face id, a local folder): English, answers with GPT-2-style leading spaces.
_GENERIC_DEFAULTS = dict(
    clean="When Mary and John went to the store, John gave a drink to",
    corrupt="When Alice and Bob went to the store, Carol gave a drink to",
    answer=" Mary",
    wrong=" John",
    positive=("I loved it. It was wonderful, and", "What a lovely, happy day. I felt"),
    negative=("I hated it. It was awful, and", "What a horrible, sad day. I felt"),
)


def default_prompts(name: str) -> DefaultPrompts:
    """The default prompts of model `name` (zoo name, Hugging Face id or local folder).

    Zoo models get prompts in their own vocabulary; any other model gets English ones, except
    that a zoo-format folder's config gives `prompt` (its `"default_prompt"`) and `positive` /
    `negative` (its `"positive"` / `"negative"` prompt sets) when it has them. Never raises.
    """
    sets = prompt_sets(name)
    fields = dict(_ZOO_DEFAULTS.get(name, _GENERIC_DEFAULTS))
    if name not in _ZOO_DEFAULTS and sets.get("positive") and sets.get("negative"):
        fields.update(positive="positive", negative="negative")  # a zoo-format folder's own steering sets
    for which in ("positive", "negative"):
        value = fields[which]
        # a string names one of the config's prompt sets
        fields[which] = tuple(sets.get(value, ())) if isinstance(value, str) else tuple(value)
    return DefaultPrompts(prompt=default_prompt(name) or GENERIC_PROMPT, **fields)


# --- helpers shared by the training scripts -------------------------------------------------


def word_tokenizer(words: list[str]):
    """A word-level HF fast tokenizer: special tokens first, then `words`, one id each.

    Splits on whitespace and punctuation, so every word (e.g. every IOI name) is one token.
    """
    from tokenizers import (  # deferred: tokenizers loads only when a tokenizer is built
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads only for Hugging Face checkpoints

    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS.values(), *words]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with single spaces
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    # add_bos_token + name_or_path let TransformerLens's set_tokenizer accept it as is (offline).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, add_bos_token=True, name_or_path="lenslab-word-level", **SPECIAL_TOKENS
    )


def save_hooked(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    summary: str,
    card: str,
    extra: dict | None = None,
    weights_dtype: torch.dtype = torch.float32,
) -> None:
    """Write a HookedTransformer zoo model: config.json, model.safetensors, tokenizer, card.md.

    `weights_dtype` is how the weights are stored (float16 halves a larger model's file; it loads
    as float32 or whatever `load_model` asks for)."""
    from safetensors.torch import save_file  # deferred: safetensors loads only when a file is read or written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(model.cfg.__dict__)
    keep = _cfg_init_fields()
    # None is a value too (normalization_type=None: no LayerNorm); only unserialisable values are dropped
    cfg = {k: _jsonable(v) for k, v in cfg.items() if k in keep and (v is None or _jsonable(v) is not None)}
    meta = {"lenslab_format": "hooked_transformer", "lenslab_summary": summary, "cfg": cfg, **(extra or {})}
    if getattr(model, "lenslab_norm_variant", "pre") != "pre":  # Peri-LN / Post-LN (lenslab.zoo.norm_variants)
        meta["norm_variant"] = model.lenslab_norm_variant
    (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    state = {
        k: v.detach().to("cpu", weights_dtype).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith(_BUILT_BUFFERS)
    }
    save_file(state, str(out / "model.safetensors"))
    tokenizer.save_pretrained(str(out))
    (out / "card.md").write_text(card)


# buffers a HookedTransformer computes from its config: never stored (a float16 copy of a rotary
# table would round it), and ignored in older files
_BUILT_BUFFERS = ("rotary_sin", "rotary_cos")


def load_hooked(folder: str | Path, device: torch.device, dtype: torch.dtype):
    """Load a `hooked_transformer` zoo folder as a HookedTransformer on `device` in `dtype`."""

    from safetensors.torch import load_file  # deferred: safetensors loads only when a file is read or written
    from transformer_lens import (  # deferred: transformer_lens loads only when a model is built
        HookedTransformer,
        HookedTransformerConfig,
    )
    from transformers import PreTrainedTokenizerFast  # deferred: transformers loads only for Hugging Face checkpoints

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    cfg_dict = dict(meta["cfg"])
    cfg_dict["device"] = str(device)
    cfg_dict["dtype"] = dtype
    cfg_dict.setdefault("model_name", folder.name)
    cfg = HookedTransformerConfig(**cfg_dict)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice (see docs/design.md)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    if meta.get("norm_variant", "pre") != "pre":
        from lenslab.zoo import norm_variants  # deferred: only Peri-LN / Post-LN folders need it

        norm_variants.apply_norm_variant(model, meta["norm_variant"])
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.endswith(_BUILT_BUFFERS)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("IGNORE", "mask", *_BUILT_BUFFERS))]
    if missing or unexpected:
        raise LenslabError(
            f"zoo weights in {folder} do not match its config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); rebuild with `lenslab zoo train {folder.name}`"
        )
    model.to(dtype, print_details=False)
    model.to(device, print_details=False)
    model.eval()
    return model


def _cfg_init_fields() -> set[str]:
    from transformer_lens import HookedTransformerConfig  # deferred: transformer_lens loads only when a model is built

    return {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init} - {"device", "dtype", "n_devices"}


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return None
    return None
