"""Attribution graphs, lenslab against circuit-tracer: time and peak memory (issue 18, point 7).

    .venv/bin/python benchmarks/graph_vs_circuit_tracer.py --ct-python /tmp/ctvenv/bin/python \
        --memory-budget 256MiB --repeats-512 3 --prune-budget 3GiB  # benchmarks/RESULTS.md's run

circuit-tracer pins transformers <= 4.57.3 and lenslab runs on 5.x, so its side runs in a
separate virtual environment (made as tests/fixtures/circuit_tracer/make_reference.py says) and
this script shells out to it: every measurement is a fresh subprocess (`--worker ...`), run with
lenslab's Python for lenslab and `--ct-python` for circuit-tracer, one after the other, sides
interleaved. The circuit-tracer worker imports nothing from lenslab: it builds its
`ReplacementModel` with the fixture script's `load_model_and_transcoders`.

**Graph** (`--lengths`, `--features`): zoo/english-4l (4 layers, d_model 192, vocab 4096) with its
committed per-layer transcoders (TopK k = 24, d_transcoder 768, skip), the same prompt on both
sides (the first tokens of the model's held-out text, BOS first), `max_feature_nodes` as given,
the salient logits (both defaults: at most 10, cumulative probability 0.95), the same
`batch_size` (default 32; circuit-tracer's own default, 512, replicates the whole forward 512
times and does not fit at 512 tokens). `--memory-budget` adds a third side: lenslab's graph under
that `memory_budget` (its chosen targets per pass and whether its rows went to disk are printed). english-4l was trained with 256 positions; for longer
prompts both sides tile its position embedding (`W_pos[p mod 256]`): the weights and the cost
are the model's, the text past 256 is read with repeated positions. Time: the graph call alone
(model and transcoders loaded, one warm-up graph on 16 tokens first). Memory: the process's peak
RSS during the call minus its RSS before it (the kernel's high-water mark is reset before the
call: /proc/self/clear_refs), so the model and the interpreter are not counted.

**Pruning** (`--prune-nodes`, and `--prune-tokens`: long prompts, 8 nodes per token):
`lenslab.probes.attribution_graph.prune` and circuit-tracer's `prune_graph` (node threshold 0.8,
edge threshold 0.98) on the same synthetic dense adjacency of n nodes (a 4-layer graph: n/8
positions, errors and embeddings per position, the rest features, one logit; features read
earlier layers only, errors and embeddings everything; seeded, built identically by both torch
2.13 builds), each measurement in its own process after a warm-up on 1,024 nodes;
`--prune-budget` adds lenslab's default prune under that `memory_budget`; circuit-tracer is not
run past `--ct-max-nodes` (it needs ~7x the adjacency). Memory as above, the adjacency itself
(n² float32) excluded, the pruned graph included. circuit-tracer's users run out of memory in
this step past ~2,300 tokens on large models (circuit-tracer issue #92): every step is a dense
n x n tensor and the edge threshold sorts all n² scores; lenslab's prune works in blocks of rows.

Prints one Markdown row per measurement group (median and range over `--repeats`) and writes
the raw runs to `--out` (JSON). Timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "lenslab" / "zoo"
FIXTURE_SCRIPT = ROOT / "tests" / "fixtures" / "circuit_tracer" / "make_reference.py"
MODEL = "english-4l"


# --- memory -----------------------------------------------------------------------------------------
def _status(field: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn):
    """(result, seconds, extra peak MiB over the RSS before the call)."""
    import gc  # deferred: only the workers measure

    gc.collect()
    before = _status("VmRSS")
    can_reset = reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out, seconds, peak - before


# --- the workers (one per subprocess) ----------------------------------------------------------------
def lenslab_model(n_ctx: int):
    """zoo/english-4l in lenslab for `n_ctx` tokens (a learned position embedding is tiled if that is longer)."""
    import dataclasses  # deferred: worker only

    from transformer_lens import HookedTransformer  # deferred: worker only

    import lenslab  # deferred: the circuit-tracer worker runs in another environment without lenslab

    model = lenslab.load_model(f"zoo/{MODEL}", device="cpu")
    trained = int(model.cfg.n_ctx)
    if n_ctx <= trained:
        return model
    cfg = dataclasses.replace(model.cfg, n_ctx=n_ctx)
    big = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))  # buffers built for the new n_ctx
    }
    if "pos_embed.W_pos" in state:  # learned positions are tiled; rotary ones need nothing
        state["pos_embed.W_pos"] = state["pos_embed.W_pos"].repeat(-(-n_ctx // trained), 1)[:n_ctx]
    big.load_state_dict(state, strict=False)
    return big.eval()


def ct_model(n_ctx: int):
    import importlib.util  # deferred: worker only

    spec = importlib.util.spec_from_file_location("ct_make_reference", FIXTURE_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, _, _ = mod.load_model_and_transcoders(ZOO / MODEL, n_ctx=n_ctx)
    return model


def graph_worker(side: str, tokens: list[int], features: int, batch_size: int, budget: str | None = None) -> dict:
    import torch  # deferred: worker only

    toks = torch.tensor(tokens)
    if side == "lenslab":
        from lenslab.probes import attribution_graph as AG  # deferred: lenslab's environment only
        from lenslab.probes import transcoders as T  # deferred: lenslab's environment only

        model = lenslab_model(len(tokens))
        tc = T.load_transcoders(f"zoo/{MODEL}/per-layer", model=model)
        run = lambda t, f, b=None: AG.attribution_graph(
            model, t, tc, max_feature_nodes=f, batch_size=batch_size, memory_budget=b
        )
        info = lambda g: {
            "n_active": g.provenance["n_active_features"],
            "n_nodes": len(g.nodes),
            "n_features": sum(n.startswith("L") for n in g.nodes),
            **{k: g.provenance[k] for k in ("batch_size", "rows_on_disk", "planned_peak") if k in g.provenance},
        }
    else:
        from circuit_tracer import attribute  # deferred: circuit-tracer's environment only

        model = ct_model(len(tokens))
        run = lambda t, f: attribute(t, model, max_feature_nodes=f, batch_size=batch_size)
        info = lambda g: {
            "n_active": len(g.active_features),
            "n_nodes": g.adjacency_matrix.shape[0],
            "n_features": len(g.selected_features),
        }
    run(toks[:16], 16)  # warm-up: first-call costs (allocator, kernels) are not the graph's
    g, seconds, extra = measure(lambda: run(toks, features, budget) if budget else run(toks, features))
    return {"seconds": seconds, "extra_mib": extra, **({"budget": budget} if budget else {}), **info(g)}


def synthetic_adjacency(n: int, layers: int = 4, seed: int = 0):
    """A dense [n, n] graph in the node order both use (features, errors, embeddings, one logit):
    n // 8 positions, `layers` error nodes and one embedding per position, the rest features in
    `layers` equal layers; a feature reads the features of earlier layers, every error and
    embedding; the logit reads everything."""
    import torch  # deferred: worker only

    P = n // 8
    nf = n - (layers + 1) * P - 1
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    a[nf:-1] = 0  # errors and embeddings have no incoming edges
    a[:, -1] = 0  # nothing reads the logit
    layer_of = torch.arange(nf) * layers // nf
    a[:nf, :nf] *= layer_of[:, None] > layer_of[None, :]
    a[:nf] *= torch.rand(nf, 1, generator=g) < 0.9  # some features without inputs
    return a, nf, P, layers


def prune_worker(side: str, n: int, rankings: list[str], budget: str | None) -> dict:
    """Prune the synthetic n-node graph, after a warm-up on a 1,024-node one."""
    import torch  # deferred: worker only

    if side == "lenslab":
        from lenslab import labels  # deferred: lenslab's environment only
        from lenslab.probes import attribution_graph as AG  # deferred: lenslab's environment only

        def as_graph(a, nf, P, layers):
            nodes = (
                [labels.feature(i * layers // nf, i, 1) for i in range(nf)]
                + [labels.error_node(layer, p) for layer in range(layers) for p in range(P)]
                + [labels.token_node(p) for p in range(P)]
                + [labels.logit_node(0, P - 1)]
            )
            z = torch.zeros(len(a))
            return AG.AttributionGraph(
                nodes=nodes, adjacency=a, activations=z, inputs=z, biases=z, target_weights=torch.ones(1),
                tokens=list(range(P)), str_tokens=[""] * P, n_layers=layers,
            )  # fmt: skip

        for ranking in rankings:
            AG.prune(as_graph(*synthetic_adjacency(1024)), 0.8, 0.98, node_ranking=ranking)
        graph = as_graph(*synthetic_adjacency(n))
        out = {"nodes": n, "adjacency_mib": n * n * 4 / 2**20, "working_mib": AG.prune_bytes(n) / 2**20}
        for ranking in rankings:
            for b in [budget]:
                pruned, seconds, extra = measure(
                    lambda r=ranking, b=b: AG.prune(graph, 0.8, 0.98, node_ranking=r, memory_budget=b)
                )
                out[ranking + (f"@{b}" if b else "")] = {
                    "seconds": seconds, "extra_mib": extra, "kept": len(pruned.nodes),
                    "edges": int((pruned.adjacency != 0).sum()),
                }  # fmt: skip
        return out
    from types import SimpleNamespace  # deferred: worker only

    from circuit_tracer.graph import prune_graph  # deferred: circuit-tracer's environment only

    def as_graph(a, nf, P, layers):
        return SimpleNamespace(
            adjacency_matrix=a, input_tokens=torch.zeros(P), logit_targets=[0], selected_features=torch.zeros(nf),
            logit_probabilities=torch.ones(1),
        )  # fmt: skip

    prune_graph(as_graph(*synthetic_adjacency(1024)), 0.8, 0.98)  # warm-up
    graph = as_graph(*synthetic_adjacency(n))
    res, seconds, extra = measure(lambda: prune_graph(graph, 0.8, 0.98))
    return {"nodes": n, "adjacency_mib": n * n * 4 / 2**20, "all": {"seconds": seconds, "extra_mib": extra,
            "kept": int(res.node_mask.sum()), "edges": int(res.edge_mask.sum())}}  # fmt: skip


# --- the driver ---------------------------------------------------------------------------------------
def prompt_tokens(n: int) -> list[int]:
    """BOS and the first n - 1 tokens of english-4l's held-out text."""
    from tokenizers import Tokenizer  # deferred: driver only

    tok = Tokenizer.from_file(str(ZOO / MODEL / "tokenizer.json"))
    ids = tok.encode((ZOO / MODEL / "heldout.txt").read_text()[: 40 * n]).ids
    bos = tok.token_to_id("<bos>")
    ids = [i for i in ids if i != bos]
    if len(ids) < n - 1:
        raise SystemExit(f"held-out text too short for {n} tokens")
    return [bos] + ids[: n - 1]


def spawn(python: str, args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONSAFEPATH="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")  # fmt: skip
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--threads", str(threads), *args],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-600:]}
    return json.loads(lines[-1][len("RESULT ") :])


def med(runs: list[dict], key: str) -> tuple[float, float, float]:
    xs = [r[key] for r in runs]
    return statistics.median(xs), min(xs), max(xs)


def graph_table(a, sides: dict[str, str], runs: list[dict], tmp: Path) -> None:
    cases = [(n, f) for n in a.lengths for f in a.features[:1]]
    cases += [(a.feature_length, f) for f in a.features[1:]]
    budget_col = f" lenslab, memory_budget={a.memory_budget} |" if a.memory_budget else ""
    print(f"| tokens | max_feature_nodes | threads | circuit-tracer, median (range) | lenslab, median (range) |{budget_col} ratio | active features / nodes (ct, lenslab) |")  # fmt: skip
    print("|---|---|---|---|---|" + ("---|" if a.memory_budget else "") + "---|---|")
    for threads in a.threads:
        for n, f in cases:
            tf = tmp / f"tokens_{n}.json"
            tf.write_text(json.dumps(prompt_tokens(n)))
            got: dict[str, list[dict]] = {s: [] for s in sides}
            for _ in range(a.repeats if n < 512 else a.repeats_512):
                for side, py in sides.items():
                    w = "graph-ct" if side == "circuit-tracer" else "graph-lenslab"
                    extra = ["--memory-budget", a.memory_budget] if side == "lenslab-budget" else []
                    r = spawn(py, ["--worker", w, "--tokens-file", str(tf), "--n", str(f),
                                   "--batch-size", str(a.batch_size), *extra], threads)  # fmt: skip
                    r.update(side=side, kind="graph", tokens=n, features=f, threads=threads, load=os.getloadavg()[0])
                    runs.append(r)
                    if "error" in r:
                        print(f"<!-- {side} {n} tokens failed: {r['error'][-300:]!r} -->", flush=True)
                    else:
                        got[side].append(r)
            cell = {}
            for side, rs in got.items():
                if not rs:
                    cell[side] = "failed"
                    continue
                (t, t0, t1), m = med(rs, "seconds"), med(rs, "extra_mib")[0]
                rng = f" ({t0:.2f}-{t1:.2f})" if len(rs) > 1 else ""
                cell[side] = f"{t:.2f} s{rng}, +{m:,.0f} MiB"
                if side == "lenslab-budget":
                    cell[side] += f" (batch {rs[0]['batch_size']}{', rows on disk' if rs[0]['rows_on_disk'] else ''})"
            ok = got["circuit-tracer"] and got["lenslab"]
            ratio = (
                f"**{med(got['circuit-tracer'], 'seconds')[0] / med(got['lenslab'], 'seconds')[0]:.2f}x**"
                if ok
                else "-"
            )
            shape = (
                f"{got['circuit-tracer'][0]['n_active']:,} / {got['circuit-tracer'][0]['n_nodes']:,}, "
                f"{got['lenslab'][0]['n_active']:,} / {got['lenslab'][0]['n_nodes']:,}"
                if ok
                else "-"
            )
            bcell = f" {cell['lenslab-budget']} |" if a.memory_budget else ""
            print(f"| {n} | {f} | {threads} | {cell['circuit-tracer']} | {cell['lenslab']} |{bcell} {ratio} | {shape} |",
                  flush=True)  # fmt: skip


def prune_table(a, runs: list[dict]) -> None:
    sizes = [(n, False) for n in a.prune_nodes] + [(8 * t, True) for t in a.prune_tokens]
    if not sizes:
        return
    b = a.prune_budget
    print("\n| nodes (adjacency) | circuit-tracer prune_graph | lenslab prune(node_ranking='all') | lenslab prune (default) |"
          + (f" lenslab prune (default), memory_budget={b} |" if b else ""))  # fmt: skip
    print("|---|---|---|---|" + ("---|" if b else ""))
    for n, long in sizes:
        rankings = ["features"] if long else ["all", "features"]
        if n <= a.ct_max_nodes:
            ct = spawn(a.ct_python, ["--worker", "prune-ct", "--n", str(n)], a.threads[0])
        else:
            ct = {"skipped": "circuit-tracer's prune_graph needs ~7-8x the adjacency, past this machine's memory"}
        ls = {}  # each lenslab measurement in its own process, like circuit-tracer's
        for ranking, budget in [(r, None) for r in rankings] + ([("features", b)] if b else []):
            extra = ["--prune-budget", budget] if budget else []
            r = spawn(sys.executable, ["--worker", "prune-lenslab", "--n", str(n), "--rankings", ranking, *extra],
                      a.threads[0])  # fmt: skip
            if "error" in r:
                print(f"<!-- lenslab prune {n} {ranking} failed: {r['error'][-300:]!r} -->")
            r.update(side="lenslab", kind="prune", nodes=n, threads=a.threads[0], load=os.getloadavg()[0])
            runs.append(r)
            ls.update({k: v for k, v in r.items() if isinstance(v, dict)})
        ct.update(side="circuit-tracer", kind="prune", nodes=n, threads=a.threads[0], load=os.getloadavg()[0])
        runs.append(ct)
        fmt = lambda d: f"{d['seconds']:.2f} s, +{d['extra_mib']:,.0f} MiB, {d['kept']:,} kept, {d['edges']:,} edges"
        cells = [fmt(ct["all"]) if "all" in ct else ("not run" if "skipped" in ct else "failed")]
        cells += [fmt(ls[k]) if k in ls else ("-" if k not in rankings else "failed") for k in ("all", "features")]
        if b:
            cells.append(fmt(ls[f"features@{b}"]) if f"features@{b}" in ls else "failed")
        label = f"{n:,} ({n * n * 4 / 2**20:,.0f} MiB)" + (f", {n // 8:,} tokens" if long else "")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct-python", default="/tmp/ctvenv/bin/python")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16, 64, 128, 256, 512])
    ap.add_argument("--features", type=int, nargs="*", default=[256, 64, 1024], help="max_feature_nodes values")
    ap.add_argument("--feature-length", type=int, default=128, help="prompt length for the other --features")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--memory-budget", default=None, help="also run lenslab's graph under this memory_budget")
    ap.add_argument("--threads", type=int, nargs="*", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-512", type=int, default=1, help="repeats at 512 tokens and more")
    ap.add_argument("--prune-nodes", type=int, nargs="*", default=[2048, 4096, 8192, 12288])
    ap.add_argument("--prune-tokens", type=int, nargs="*", default=[2048, 4096],
                    help="long prompts: prune graphs of 8 nodes per token (4 errors, the embedding, features)")  # fmt: skip
    ap.add_argument("--prune-budget", default=None, help="also prune under this memory_budget")
    ap.add_argument("--ct-max-nodes", type=int, default=16384, help="largest graph circuit-tracer prunes here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graph_vs_circuit_tracer.json"))
    ap.add_argument("--worker", choices=["graph-lenslab", "graph-ct", "prune-lenslab", "prune-ct"])
    ap.add_argument("--tokens-file")
    ap.add_argument("--n", type=int)
    ap.add_argument("--rankings", nargs="*", default=["all", "features"])
    a = ap.parse_args()
    if a.worker:
        import torch  # deferred: workers only

        torch.set_num_threads(a.threads[0])
        kind, side = a.worker.split("-")
        side = "lenslab" if side == "lenslab" else "ct"
        if kind == "graph":
            tokens = json.loads(Path(a.tokens_file).read_text())
            res = graph_worker(side, tokens, a.n, a.batch_size, a.memory_budget)
        else:
            res = prune_worker(side, a.n, a.rankings, a.prune_budget)
        print("RESULT " + json.dumps(res))
        return
    sides = {"circuit-tracer": a.ct_python, "lenslab": sys.executable}
    if a.memory_budget:
        sides["lenslab-budget"] = sys.executable
    load0, t_start = os.getloadavg()[0], time.time()
    runs: list[dict] = []
    tmp = Path(tempfile.mkdtemp())
    if a.lengths or a.features[1:]:
        graph_table(a, sides, runs, tmp)
    prune_table(a, runs)
    meta = {"load_before": load0, "load_after": os.getloadavg()[0], "minutes": (time.time() - t_start) / 60,
            "cpu": os.cpu_count(), "args": vars(a)}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    print(f"\nload {load0:.1f} -> {meta['load_after']:.1f}, {meta['minutes']:.1f} min; raw runs: {a.out}")


if __name__ == "__main__":
    main()
