"""Feature-store indexing throughput (tokens/s) next to sae-lens's own activation pipeline, in one
process and on a local Ray cluster.

    python benchmarks/sae_index.py [--model zoo/steer-sentiment] [--sae SOURCE] [--rows 512]
                                   [--context-size 64] [--batch-size 32] [--part-size ROWS]
                                   [--workers 2] [--repeats 3] [--threads 1]

Same model, same SAE, same token rows for every line: `--rows` rows of `--context-size` tokens
(`<bos>` + the model's zoo corpus concatenated and cut into rows, so there is no padding), run in
batches of `--batch-size` rows.

- sae-lens activations: `sae_lens.ActivationsStore` on an in-memory `datasets.Dataset` with a
  `tokens` column (pretokenized), `get_raw_llm_batch()` once per batch: the model forward up to
  the hook and the activation extraction, which is what sae-lens's training and evaluation read
  (building the store, i.e. the `Dataset`, is not timed).
- sae-lens activations + `sae.encode`: the same, then the SAE's encoder on every activation (the
  least any feature index must compute).
- lenslab `feature_acts`: lenslab's forward to the hook + encoder over the same batches (the bare
  forward + encode; the model/SAE check, a two-token forward, is left out as `index` does it once).
- lenslab `index` (end to end), 1 process: `lenslab.probes.features.index` into a fresh store
  folder: store creation (corpus, vocabulary, every feature's logit effects as Parquet), the
  forward + encoder, the per-feature statistics, histograms, token table and top-20 contexts,
  each part's files, the exact merge of the parts and the final tables.
- lenslab `index`, `--workers` Ray workers: the same call with `cluster="local"` on a local Ray
  started with `num_cpus=--workers` (each worker one torch thread, its own model and SAE copy,
  its own part files; the driver creates the store and merges). The workers are warm (an untimed
  run first, as for every line): their imports and start-up are not timed, the model and SAE
  transfer (`ray.put`) is. Skipped with `--workers 0` or without Ray.

Both `index` lines use the same parts (`--part-size` rows each, default a quarter of the rows), so
they write the same store bit for bit (checked). tokens/s = rows x context size / wall time; best
(and median) of `--repeats` runs, the lines interleaved run by run so that a busy machine slows
all of them alike; `/proc/loadavg` is printed before and after.
`--sae` defaults to the model's first zoo SAE (`lenslab.probes.sae.list_saes`), else a random
`StandardSAE` with 8 x d_model features at `blocks.1.hook_resid_post` (stated in the output).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lenslab
from lenslab.probes import features as F


def _sae(model, source: str | None):
    if source is None:
        try:
            from lenslab.probes.sae import list_saes
        except ImportError:
            list_saes = None
        names = list_saes(model.lenslab_name) if list_saes is not None else []
        source = names[0] if names else None
    if source is not None:
        return F._open_sae(source, model), source
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    d, hook = model.cfg.d_model, "blocks.1.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=8 * d, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():  # biases at each feature's 1 - 32 / d_sae quantile: L0 about 32, like a trained SAE
        x = model.run_with_cache(_rows(model, 64, 64), names_filter=[hook])[1][hook].flatten(0, 1)
        sae.b_enc.copy_(-((x - sae.b_dec) @ sae.W_enc).quantile(1 - 32 / (8 * d), dim=0))
    return sae, f"random StandardSAE (d_sae {8 * d}, {hook}, biases set for L0 ~ 32)"


def _rows(model, n_rows: int, ctx: int) -> torch.Tensor:
    bos = model.tokenizer.bos_token_id
    flat: list[int] = []
    seed = 0
    while len(flat) < n_rows * (ctx - 1):
        corpus = F.corpus_for(model, 256, seed=seed)
        for doc in corpus:
            ids = (
                model.to_tokens(doc, prepend_bos=False)[0].tolist()
                if isinstance(doc, str)
                else [int(i) for i in doc if i != bos]
            )
            flat += ids
        seed += 1
    body = torch.tensor(flat[: n_rows * (ctx - 1)]).view(n_rows, ctx - 1)
    return torch.cat([torch.full((n_rows, 1), bos), body], dim=1)


def _time(setup, fn, repeats: int) -> list[float]:
    """Wall times of `fn(setup())`, setup (e.g. building the ActivationsStore) not timed."""
    out = []
    for _ in range(repeats):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        out.append(time.perf_counter() - t0)
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo/steer-sentiment")
    p.add_argument("--sae", default=None)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--part-size", type=int, default=None, help="rows per part (default: rows / 4)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for the last line (0: skip it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from datasets import Dataset
    from sae_lens import ActivationsStore

    model = lenslab.load_model(args.model, device="cpu")
    sae, sae_name = _sae(model, args.sae)
    hook = sae.cfg.metadata.hook_name
    rows = _rows(model, args.rows, args.context_size)
    n_tok = rows.numel()
    bs = args.batch_size
    n_batches = (args.rows + bs - 1) // bs
    part = args.part_size or max(bs, (args.rows // 4) // bs * bs)

    def store():
        return ActivationsStore(
            model=model,
            dataset=Dataset.from_dict({"tokens": rows.tolist()}),
            streaming=False,
            hook_name=hook,
            hook_head_index=None,
            context_size=args.context_size,
            d_in=sae.cfg.d_in,
            n_batches_in_buffer=4,
            total_training_tokens=n_tok,
            store_batch_size_prompts=bs,
            train_batch_size_tokens=bs * args.context_size,
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device("cpu"),
            dtype="float32",
        )

    def sae_lens_acts(encode: bool):
        def run(s):
            with torch.no_grad():
                for _ in range(n_batches):
                    acts, _ = s.get_raw_llm_batch()
                    if encode:
                        sae.encode(acts)

        return run

    def lenslab_acts(_):
        for b in range(0, args.rows, bs):
            F.feature_acts(model, sae, rows[b : b + bs], check=False)  # the pair is checked once, as index does

    tmp = Path(tempfile.mkdtemp())

    def lenslab_index(cluster, folder):
        def run(_):
            F.index(
                model,
                sae,
                rows,
                tmp / folder,
                batch_size=bs,
                context_size=args.context_size,
                part_size=part,
                resume=False,
                progress=False,
                cluster=cluster,
            ).close()

        return run

    # one check that both pipelines read the same activations
    s = store()
    acts, toks = s.get_raw_llm_batch()
    _, cache = model.run_with_cache(rows[:bs], names_filter=[hook])
    assert torch.equal(toks.view(bs, -1), rows[:bs])
    diff = (acts.view(bs, args.context_size, -1) - cache[hook]).abs().max().item()

    none = lambda: None
    lines = [
        ("sae-lens `ActivationsStore.get_raw_llm_batch`", store, sae_lens_acts(False)),
        ("sae-lens activations + `sae.encode`", store, sae_lens_acts(True)),
        ("lenslab `feature_acts` (forward + encode)", none, lenslab_acts),
        ("lenslab `index`, end to end, 1 process", none, lenslab_index(None, "one")),
    ]
    workers = args.workers
    if workers:
        try:
            from lenslab import jobs

            jobs.connect("local", num_cpus=workers)
            lines.append((f"lenslab `index`, end to end, {workers} Ray workers", none, lenslab_index("local", "ray")))
        except Exception as err:  # no Ray: the line is left out, and said so
            print(f"(no Ray line: {err})")
            workers = 0
    print(
        f"model {args.model}, SAE {sae_name}: hook {hook}, d_sae {sae.cfg.d_sae}; {args.rows} rows x "
        f"{args.context_size} tokens = {n_tok} tokens, batches of {bs} rows, parts of {part} rows; torch threads "
        f"{torch.get_num_threads()}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"max |sae-lens - TL cache| {diff:.1e}; load average before: {_loadavg()}"
    )
    for _, setup, fn in lines:
        fn(setup())  # warm-up (for Ray: the workers start and import)
    times: list[list[float]] = [[] for _ in lines]
    for _ in range(args.repeats):  # interleaved: a busy spell slows every line alike
        for i, (_, setup, fn) in enumerate(lines):
            times[i] += _time(setup, fn, 1)
    print(f"load average after: {_loadavg()}")
    print("| pipeline | best tokens/s | median tokens/s | best time |")
    print("|---|---|---|---|")
    best = []
    for (name, _, _), ts in zip(lines, times):
        best.append(n_tok / min(ts))
        print(f"| {name} | {best[-1]:,.0f} | {n_tok / statistics.median(ts):,.0f} | {min(ts):.2f} s |", flush=True)
    with F.FeatureStore(tmp / "one") as st:
        alive = int((st.arrays()["n_fire"] > 0).sum())
        l0 = st.arrays()["n_fire"].sum() / st.total_tokens
        size = sum(f.stat().st_size for f in (tmp / "one").iterdir())
        print(
            f"store: {st.total_tokens} tokens counted (BOS skipped), {alive} of {st.d_sae} features fire, "
            f"mean L0 {l0:.1f}, {size / 2**20:.1f} MiB"
        )
        if workers:
            with F.FeatureStore(tmp / "ray") as other:
                same = all(st.table(t).equals(other.table(t)) for t in ("features", "contexts", "token_features"))
            print(f"the {workers}-worker store equals the 1-process store bit for bit: {same}")
    ratio = best[3] / best[2]
    print(f"index (1 process) / forward + encode: {ratio:.2f}")
    med = lambda i: n_tok / statistics.median(times[i])
    cells = [f"{best[i]:,.0f} ({med(i):,.0f})" for i in range(len(lines))]
    row = (
        f"| {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {os.cpu_count()} cores, load {_loadavg()} | "
        f"{args.model} ({hook}, {sae.cfg.d_sae}) | " + " | ".join(cells[:4]) + f" | {ratio:.2f} | "
    )
    if workers:
        row += f"{cells[4]} | {best[4] / best[3]:.2f}x |"
        print(f"{workers} Ray workers / 1 process: {best[4] / best[3]:.2f}x")
    else:
        row += "- | - |"
    print("RESULTS.md row:")
    print(row)


if __name__ == "__main__":
    main()
