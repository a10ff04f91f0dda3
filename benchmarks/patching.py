"""Benchmark: TransformerLens activation patching vs lenslab's batched engine, same process, same inputs.

Model: a randomly initialised GPT-2-small-shaped HookedTransformer (12 layers, d_model 768,
12 heads, d_mlp 3072, vocab 50257, gelu_new, LayerNorm; no download). Data: 8 IOI-like prompts x
15 tokens (name A at position 2, B at 4 and 9; the corrupt prompt has a third name C at 9), metric
`logit_diff` (correct minus incorrect logit at the last position, batch mean).

Grids: resid_pre by (layer, pos) (TransformerLens `get_act_patch_resid_pre`) and head output over
all positions (`get_act_patch_attn_head_out_all_pos`), TransformerLens under
`torch.inference_mode()` with the clean cache computed beforehand (not timed), lenslab's
`circuits.patch(..., engine="batched")` end to end (its metric baselines and caches included),
and the same engine with `kernels.options(skip_unchanged=False)`: without the exact shortcut for
patches that write the base run's own values (the prompts' shared prefix), i.e. the engine's cost
on prompts that differ from their first token. Every side runs `--repeats` times (default 3) per
thread count (`--threads 1,2`, each its own rows): rows give the median and the range.

    python benchmarks/patching.py                 # both grids, 1 and 2 threads, appends rows to benchmarks/RESULTS.md
    python benchmarks/patching.py --skip-tl       # lenslab only (TransformerLens' loop takes minutes on CPU)
    python benchmarks/patching.py --profile       # + torch.profiler buckets of the batched resid grid
    python benchmarks/patching.py --compile default   # + the torch.compile'd engine (compile timed apart)
    python benchmarks/patching.py --shape mid --batch 2 --threads 2 --grids resid_pre --tl-repeats 1
    python benchmarks/patching.py --device cuda --dtype bfloat16 --shape mid --results $OUT/RESULTS.md

Shapes: `gpt2-small` (12 layers, d_model 768, 12 heads, d_mlp 3072) and `mid` (24 layers, d_model
2048, 16 heads, d_mlp 8192); both with vocab 50257. `--n-layers/--d-model/--n-heads` override.
Memory: peak extra memory of each grid, and that divided by the most patches one chunk runs at
once ("per in-flight patch"; TransformerLens runs one patch at a time). On CUDA both sides get one
untimed warm-up run first (cuBLAS handles, Triton JIT); `--compile MODE` times the first compiled
call (compilation included) separately from a second, timed call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


class PeakMemory:
    """Peak extra memory during a block: CUDA max_memory_allocated, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.stop = False
            self.max = self.base

            def sample():
                while not self.stop:
                    self.max = max(self.max, self._rss())
                    time.sleep(0.005)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.max, self._rss()) - self.base


SHAPES = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12),  # d_mlp = 4 d_model = 3072
    "mid": dict(n_layers=24, d_model=2048, n_heads=16),  # d_mlp 8192
}
DTYPES = ("float32", "float16", "bfloat16")


def build(args, device):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lenslab import tasks

    cfg = HookedTransformerConfig(
        n_layers=args.n_layers,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_head=args.d_model // args.n_heads,
        d_mlp=4 * args.d_model,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
        device=str(device),
        dtype=getattr(torch, args.dtype),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    B, S = args.batch, args.seq
    names = torch.randint(1000, 40000, (B, 3), generator=g)
    clean = torch.randint(1000, 40000, (B, S), generator=g)
    clean[:, 2], clean[:, 4], clean[:, 9] = names[:, 0], names[:, 1], names[:, 1]
    corrupt = clean.clone()
    corrupt[:, 9] = names[:, 2]
    task = tasks.from_tokens(clean, corrupt, names[:, :2], name="ioi-like").to(device)
    return model, task


def logit_diff_fn(answers):
    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, answers[:, :1]) - last.gather(-1, answers[:, 1:])).mean()

    return metric


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    return out, sec, mem.peak


def profile_batched(model, task, site):
    """Self-CPU time of the batched engine bucketed into GEMM / elementwise / softmax / copies."""
    from torch.profiler import ProfilerActivity, profile

    from lenslab import circuits

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        circuits.patch(model, task, site, engine="batched", progress=False)
    buckets = {"GEMM": 0.0, "elementwise": 0.0, "softmax": 0.0, "copy/cat/index": 0.0, "other": 0.0}
    gemm = ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "einsum", "dot")
    elem = (
        "add",
        "sub",
        "mul",
        "div",
        "pow",
        "tanh",
        "sqrt",
        "mean",
        "gelu",
        "where",
        "sum",
        "rsqrt",
        "masked_fill",
        "neg",
        "exp",
        "clamp",
        "triu",
        "tril",
        "sigmoid",
        "silu",
    )
    copy = (
        "copy",
        "cat",
        "index",
        "gather",
        "clone",
        "contiguous",
        "to",
        "empty",
        "stack",
        "repeat",
        "expand",
        "select",
        "slice",
        "view",
        "reshape",
        "permute",
        "transpose",
        "as_strided",
        "fill",
        "zero",
    )
    total = 0.0
    for ev in prof.key_averages():
        name = ev.key.removeprefix("aten::")
        t = ev.self_cpu_time_total
        total += t
        base = name.rstrip("_")
        if base in gemm or base.endswith("mm"):
            buckets["GEMM"] += t
        elif "softmax" in base:
            buckets["softmax"] += t
        elif base in elem or any(base.startswith(e) for e in elem):
            buckets["elementwise"] += t
        elif any(base.startswith(c) for c in copy):
            buckets["copy/cat/index"] += t
        else:
            buckets["other"] += t
    return {k: 100 * v / total for k, v in buckets.items()}, total / 1e6


def spread(times: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated timings."""
    return statistics.median(times), min(times), max(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--n-layers", type=int, default=None, help="override the shape's layers")
    ap.add_argument("--d-model", type=int, default=None, help="override the shape's d_model (d_mlp = 4 d_model)")
    ap.add_argument("--n-heads", type=int, default=None, help="override the shape's heads")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=15)
    ap.add_argument("--grids", default="resid_pre,z", help="comma list of resid_pre, z")
    ap.add_argument("--skip-tl", action="store_true", help="lenslab only (no speed-up ratio)")
    ap.add_argument(
        "--threads", default="1,2", help="CPU: comma list of torch thread counts, each its own rows (default 1,2)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and row: median and range (default 3)")
    ap.add_argument("--tl-repeats", type=int, default=None, help="TransformerLens runs per row (default: --repeats)")
    ap.add_argument(
        "--no-raw",
        action="store_true",
        help="skip the engine without its unchanged-patch shortcut (kernels.options(skip_unchanged=False))",
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--note", default="", help="free text for the RESULTS.md row (e.g. machine load)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the markdown file rows are appended to")
    ap.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time the engine with kernels.options(compile=MODE): default, reduce-overhead, "
        "max-autotune, max-autotune-no-cudagraphs",
    )
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one untimed run of each side first (default: on for CUDA, off for CPU)",
    )
    args = ap.parse_args(argv)
    for key, val in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    from lenslab import circuits, kernels, tasks
    from lenslab._device import resolve_device

    device = resolve_device(args.device)
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()] if device.type == "cpu" else [None]
    tl_repeats = args.tl_repeats or args.repeats
    warmup = device.type == "cuda" if args.warmup is None else args.warmup
    model, task = build(args, device)
    metric = tasks.get_metric("logit_diff", model, task)
    tl_metric = logit_diff_fn(task.answer_tokens)
    print(
        f"model: {args.n_layers}L d_model {args.d_model} heads {args.n_heads} vocab 50257 {args.dtype}; "
        f"{args.batch} prompts x {args.seq} tokens; clean {metric.clean_value:.4f} corrupt {metric.corrupt_value:.4f}"
    )
    from transformer_lens import patching as tlp

    tl_fns = {"resid_pre": tlp.get_act_patch_resid_pre, "z": tlp.get_act_patch_attn_head_out_all_pos}

    def ours(**opts):
        with kernels.options(**opts):
            return circuits.patch(model, task, site, engine="batched", metric="logit_diff", progress=False)

    def repeat(fn, n):
        """-> (last result, [seconds], max peak memory) of n timed calls."""
        secs, peak, out = [], 0, None
        for _ in range(n):
            out, sec, mem = timed(fn, device)
            secs.append(sec)
            peak = max(peak, mem)
        return out, secs, peak

    for n_threads in threads:
        if n_threads:
            torch.set_num_threads(n_threads)
        rows = []
        load0 = os.getloadavg()
        dev_desc = device_name(device)
        print(f"device: {dev_desc}; load average {load0[0]:.1f}")
        for site in args.grids.split(","):
            site = site.strip()
            if warmup:
                ours()
            res, secs, mem = repeat(ours, args.repeats)
            n = res.scores.numel()
            det = res.provenance["engine_details"]
            row = {
                "site": site,
                "patches": n,
                "ours": spread(secs),
                "ours_mem": mem,
                "chunks": det["chunks"],
                "in_flight": max(1, det["max_chunk_experiments"]),
                "unchanged": det["unchanged_patches"],
                "prefix": det["prefix_skipped_patches"],
                "engine": "batched",
            }
            print(
                f"[{site}] lenslab batched: median {row['ours'][0]:.3f} s (range {row['ours'][1]:.3f}-{row['ours'][2]:.3f}), "
                f"{n / row['ours'][0]:.1f} patches/s, peak +{mem / 2**20:.0f} MiB "
                f"({mem / 2**20 / row['in_flight']:.2f} MiB per in-flight patch, up to {row['in_flight']} per chunk), "
                f"{row['chunks']} chunks; {row['unchanged']} unchanged patches scored from the base run, "
                f"{row['prefix']} started after the shared prefix; triton {det['triton']}"
            )
            if not args.no_raw:
                raw_res, raw_secs, raw_mem = repeat(lambda: ours(skip_unchanged=False), args.repeats)
                row["raw"], row["raw_mem"] = spread(raw_secs), raw_mem
                row["raw_diff"] = float((raw_res.scores - res.scores).abs().max())
                print(
                    f"[{site}] lenslab batched, skip_unchanged=False: median {row['raw'][0]:.3f} s "
                    f"(range {row['raw'][1]:.3f}-{row['raw'][2]:.3f}), max |diff| to the default {row['raw_diff']:.1e}"
                )
            if not args.skip_tl:

                def tl_run():  # called within this iteration only
                    return tl_fns[site](model, task.corrupt_tokens, clean_cache, tl_metric)  # noqa: B023

                with torch.inference_mode():
                    _, clean_cache = model.run_with_cache(task.clean_tokens)
                    if warmup:
                        model(task.corrupt_tokens, return_type=None)
                    ref, tsecs, tmem = repeat(tl_run, tl_repeats)
                del clean_cache
                ref = ref.float().cpu()
                row.update(tl=spread(tsecs), tl_mem=tmem, diff=float((ref - res.scores).abs().max()))
                print(
                    f"[{site}] TransformerLens (inference_mode): median {row['tl'][0]:.2f} s "
                    f"(range {row['tl'][1]:.2f}-{row['tl'][2]:.2f}), {n / row['tl'][0]:.2f} patches/s, "
                    f"peak +{tmem / 2**20:.0f} MiB"
                )
                extra = f"; without the shortcut {row['tl'][0] / row['raw'][0]:.1f}x" if "raw" in row else ""
                print(f"[{site}] speed-up {row['tl'][0] / row['ours'][0]:.1f}x{extra}, max |diff| {row['diff']:.2e}")
            rows.append(row)
            if args.compile:
                first, csec, _ = timed(lambda: ours(compile=args.compile), device)
                cres, c2, cmem = timed(lambda: ours(compile=args.compile), device)
                cdiff = float((cres.scores - res.scores).abs().max())
                crow = dict(
                    row,
                    engine=f"batched, compile={args.compile}",
                    ours=(c2, c2, c2),
                    ours_mem=cmem,
                    compile_first_s=csec,
                    eager_s=row["ours"][0],
                    compile_diff=cdiff,
                )
                crow.pop("raw", None)
                if "tl" in row:
                    crow.update(diff=float((ref - cres.scores).abs().max()))
                print(
                    f"[{site}] lenslab batched compile={args.compile}: first call (compiling) {csec:.2f} s, then "
                    f"{c2:.3f} s ({n / c2:.1f} patches/s; eager {row['ours'][0]:.3f} s -> {row['ours'][0] / c2:.2f}x), "
                    f"max |compiled - eager| {cdiff:.1e}"
                )
                rows.append(crow)
        load1 = os.getloadavg()
        if args.profile:
            buckets, total = profile_batched(model, task, "resid_pre")
            print(
                f"profile of the batched resid_pre grid ({total:.1f} s self CPU): "
                + ", ".join(f"{k} {v:.1f}%" for k, v in buckets.items())
            )
        if not args.no_record:
            record(args, dev_desc, rows, load0, load1, args.results)


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}" if x >= 2**20 else f"{x / 2**20:.2f}"


def _secs(t: tuple[float, float, float], digits: int = 2) -> str:
    """'median s (min-max)'; one run: 'median s'."""
    med, lo, hi = t
    return f"{med:.{digits}f} s" + (f" ({lo:.{digits}f}-{hi:.{digits}f})" if hi > lo else "")


HEADER = (
    "| date | device | shape | grid (patches) | TransformerLens, median (range) | lenslab batched, median (range) "
    "| speed-up | engine without the unchanged-patch shortcut | max abs diff | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)
MARKER = "<!-- rows: benchmarks/patching.py appends here -->"


def record(args, dev_desc, rows, load0, load1, path: Path = RESULTS) -> None:
    """Append one table row per grid under MARKER in `path` (a new table at the end if it has none)."""
    path = Path(path)
    if not path.exists():
        path.write_text("# Patching benchmark results\n\n")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shape = f"{args.n_layers}L/{args.d_model}/{args.n_heads}h, {args.batch}x{args.seq}, {args.dtype}"
    lines = []
    for r in rows:
        n = r["patches"]
        tl = f"{_secs(r['tl'])}, {n / r['tl'][0]:.2f}/s, +{_mib(r['tl_mem'])} MiB" if "tl" in r else "not run"
        ratio = f"**{r['tl'][0] / r['ours'][0]:.1f}x**" if "tl" in r else "-"
        diff = f"{r['diff']:.1e}" if "diff" in r else "-"
        per = r["ours_mem"] / max(1, r["in_flight"])
        ours = (
            f"{_secs(r['ours'], 3)}, {n / r['ours'][0]:.1f}/s, +{_mib(r['ours_mem'])} MiB = "
            f"{_mib(per)} MiB per in-flight patch, {r['chunks']} chunks; {r['unchanged']} unchanged, "
            f"{r['prefix']} after the shared prefix"
        )
        if "compile_first_s" in r:
            ours += (
                f"; {r['engine']}: first call {r['compile_first_s']:.1f} s, "
                f"{r['eager_s'] / r['ours'][0]:.2f}x vs eager, max diff vs eager {r['compile_diff']:.1e}"
            )
        raw = "-"
        if "raw" in r:
            raw = f"{_secs(r['raw'], 3)}" + (f", **{r['tl'][0] / r['raw'][0]:.1f}x**" if "tl" in r else "")
        runs = f"{args.repeats} runs per side" + (
            f" (TransformerLens {args.tl_repeats})" if args.tl_repeats and args.tl_repeats != args.repeats else ""
        )
        lines.append(
            f"| {now} | {dev_desc} | {shape} | {r['site']} ({n}) | {tl} | {ours} | {ratio} | {raw} | "
            f"{diff} | load {load0[0]:.1f}->{load1[0]:.1f}, {runs} {args.note} |"
        )
    text = path.read_text()
    if MARKER not in text:
        text = text.rstrip("\n") + "\n\n" + HEADER + "\n" + MARKER + "\n"
    text = text.replace(MARKER, "\n".join(lines) + "\n" + MARKER)
    path.write_text(text)
    print(f"appended {len(lines)} row(s) to {path}")


if __name__ == "__main__":
    main()
