"""Bundle the pure-Python packages the GPU machine lacks, so `benchmarks/gpu_run.sh` can run there.

The lent GPU machine (see /work/.library/device/KINDS.md) has Python 3.12 with torch, triton,
transformers, numpy, pandas, pyarrow, pytest, ... but not transformer-lens (nor sae-lens), and
it cannot reach a package index. This script copies transformer-lens and the part of its
dependency closure that the machine lacks from this virtual environment's site-packages into a
git-ignored folder (default `.gpu_bundle/`), which the `run` device tool carries with the
working tree (`carry=[".gpu_bundle"]`, 64 MiB in all with the tree):

    .gpu_bundle/site/          pure-Python, version-independent packages (py3-none-any) + their
                               dist-info; sitecustomize.py and lenslab_tree.py (see below)
    .gpu_bundle/py312/         packages whose wheels are specific to a Python version (e.g.
                               multiprocess is py311-none-any here), as wheels for the target
                               Python fetched with `pip download` (or, offline, copied with a warning)
    .gpu_bundle/MANIFEST.txt   what was bundled, skipped and why

With `PYTHONPATH=.gpu_bundle/site`, Python imports `sitecustomize` at start-up: it puts the folder
for the running Python version on sys.path and installs `lenslab_tree`, a meta-path finder that
maps `lenslab.circuits`, `lenslab.kernels`, ... to the working tree's top-level folders (what
`pip install -e .` does here, read from pyproject.toml's package-dir), then runs any other
sitecustomize further down sys.path. Child processes (the Triton interpreter test) inherit it.

Never copied: torch, triton, transformers, nvidia-*, and anything the GPU image already has (the
list below, read off KINDS.md on 2026-11-17). Skipped on purpose: wandb (53 MiB with a Go binary;
transformer-lens imports it only in train.py).

    python benchmarks/prepare_gpu_bundle.py            # build .gpu_bundle/
    python benchmarks/prepare_gpu_bundle.py --check    # + import it in an isolated interpreter
    python benchmarks/prepare_gpu_bundle.py --with sae-lens   # also bundle sae-lens' missing closure

`--check` simulates the GPU machine here: a fresh virtual environment with empty site-packages,
PYTHONPATH = the bundle + a folder of links to only the packages the GPU image has (and the
dependency closure of torch/triton/transformers, which the image must have for them to work),
then `import transformer_lens`, `import lenslab.kernels` and a tiny batched-vs-reference patch.
It cannot check the GPU's own versions (torch 2.11, transformers 5.17 there): gpu_run.sh prints them.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".gpu_bundle"
MAX_BUNDLE = 60 * 2**20  # the bundle alone
MAX_CARRY = 64 * 2**20  # the working tree + the bundle, the run tool's limit
TARGET = (3, 12)

# Python packages the GPU image holds (/work/.library/device/KINDS.md, "Python packages already there", 2026-11-17).
GPU_HAS = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize huggingface-hub hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
NEVER = {"torch", "triton", "transformers", "lenslab"}  # and nvidia-*: the GPU's own builds must be used
SKIP = {"wandb": "53 MiB with a Go binary; transformer-lens imports it only in train.py (training), never here"}
# markers are evaluated for the GPU machine's interpreter
TARGET_ENV = {
    "python_version": f"{TARGET[0]}.{TARGET[1]}",
    "python_full_version": f"{TARGET[0]}.{TARGET[1]}.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def _norm(name: str) -> str:
    return canonicalize_name(name)


def gpu_has(name: str) -> bool:
    n = _norm(name)
    return n in {_norm(g) for g in GPU_HAS} or n.startswith("nvidia-")


def closure(roots: list[str], env: dict | None = None, stop=None) -> dict[str, md.Distribution | None]:
    """Installed distributions reachable from `roots` by non-extra requirements (markers for `env`,
    default the GPU machine's), not entering those for which `stop(name)` is true (default: NEVER,
    SKIP and what the GPU image has)."""
    env = env or TARGET_ENV
    if stop is None:
        stop = lambda n: n in NEVER or n in SKIP or gpu_has(n)
    seen: dict[str, md.Distribution | None] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen or stop(name):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            seen[name] = None
            continue
        seen[name] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            todo.append(req.name)
    return seen


def wheel_tags(dist: md.Distribution) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def portable(dist: md.Distribution) -> bool:
    """True for a pure-Python wheel for any Python 3 (py3-none-any), without compiled files."""
    tags = [t.split("-") for t in wheel_tags(dist)]
    compiled = any(str(f).endswith((".so", ".pyd", ".dylib")) for f in dist.files or [])
    return (
        not compiled
        and bool(tags)
        and all(len(t) == 3 and t[0] in ("py3", "py2", "py2.py3") and t[1:] == ["none", "any"] for t in tags)
    )


def copy_dist(dist: md.Distribution, dest: Path) -> int:
    """Copy an installed distribution's files (its RECORD) under `dest`; returns bytes copied."""
    base = Path(dist.locate_file(""))
    total = 0
    for f in dist.files or []:
        rel = Path(str(f))
        if rel.parts[0] == ".." or "__pycache__" in rel.parts or rel.suffix == ".pyc":
            continue  # console scripts outside site-packages, bytecode
        src = base / rel
        if not src.is_file():
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
        total += out.stat().st_size
    return total


def download_for_target(name: str, version: str, dest: Path, wheels: Path) -> tuple[int, str]:
    """`pip download` the wheel of `name==version` for the target Python and unpack it under `dest`."""
    wheels.mkdir(parents=True, exist_ok=True)
    ver = f"{TARGET[0]}.{TARGET[1]}"
    plats = [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    ]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        ver,
        "--implementation",
        "cp",
        *[a for p in plats for a in ("--platform", p)],
        "-d",
        str(wheels),
        f"{name}=={version}",
        "--quiet",
        "--disable-pip-version-check",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return 0, (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
    found = [w for w in wheels.glob("*.whl") if _norm(w.name.split("-")[0]) == _norm(name)]
    if not found:
        return 0, "pip download saved no wheel"
    total = 0
    with zipfile.ZipFile(found[0]) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            zf.extract(info, dest)
            total += info.file_size
    return total, found[0].name


SITECUSTOMIZE = '''\
"""lenslab GPU bundle (written by benchmarks/prepare_gpu_bundle.py): on PYTHONPATH, Python imports this
at start-up. It adds the bundle's folder for this Python version, maps lenslab's top-level folders
into the `lenslab` package (as `pip install -e .` would), then runs the next sitecustomize on sys.path."""
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
_ver = _os.path.join(_os.path.dirname(_here), "py%d%d" % _sys.version_info[:2])
if _os.path.isdir(_ver) and _ver not in _sys.path:
    _sys.path.insert(_sys.path.index(_here) + 1 if _here in _sys.path else 0, _ver)

import lenslab_tree as _tree  # noqa: E402

_tree.install(_os.environ.get("LENSLAB_ROOT") or _os.path.dirname(_os.path.dirname(_here)))


def _chain():
    import importlib.util

    for entry in _sys.path:
        path = _os.path.join(entry or ".", "sitecustomize.py")
        if _os.path.abspath(entry or ".") != _here and _os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_next_sitecustomize", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_chain()
'''

LENSLAB_TREE = '''\
"""Map `lenslab.<sub>` to the working tree's folders as pyproject.toml's package-dir says (an
editable install without pip). Written by benchmarks/prepare_gpu_bundle.py."""
import importlib.abc
import importlib.util
import os
import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None


def mapping(root):
    """{'lenslab': '<root>/lenslab', 'lenslab.circuits': '<root>/circuits', ...}"""
    out = {"lenslab": os.path.join(root, "lenslab")}
    pyproject = os.path.join(root, "pyproject.toml")
    if tomllib is not None and os.path.isfile(pyproject):
        with open(pyproject, "rb") as fh:
            dirs = tomllib.load(fh).get("tool", {}).get("setuptools", {}).get("package-dir", {})
        out.update({name: os.path.join(root, path) for name, path in dirs.items()})
    return out


class LenslabTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root):
        self.root, self.map = root, mapping(root)

    def find_spec(self, name, path=None, target=None):
        folder = self.map.get(name)
        init = os.path.join(folder, "__init__.py") if folder else None
        if init is None or not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])


def install(root):
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return None
    for finder in sys.meta_path:
        if isinstance(finder, LenslabTreeFinder):
            return finder
    finder = LenslabTreeFinder(root)
    sys.meta_path.insert(0, finder)
    return finder
'''


def build(out: Path, roots: list[str], fetch: bool = True, local_version_dir: bool = False) -> dict:
    """Create the bundle under `out` (replacing it); returns a report dict."""
    if out.exists():
        shutil.rmtree(out)
    site, ver_dir = out / "site", out / f"py{TARGET[0]}{TARGET[1]}"
    site.mkdir(parents=True)
    report = {"copied": [], "target_wheels": [], "missing": [], "warnings": [], "bytes": 0}
    dists = closure(roots)
    for name, dist in sorted(dists.items()):
        if dist is None:
            report["missing"].append(name)
            continue
        if _norm(dist.metadata["Name"]) in NEVER:
            raise RuntimeError(f"refusing to bundle {name}")
        if portable(dist):
            report["bytes"] += copy_dist(dist, site)
            report["copied"].append(f"{dist.metadata['Name']}=={dist.version}")
            continue
        size, how = (
            download_for_target(dist.metadata["Name"], dist.version, ver_dir, out / "wheels")
            if fetch
            else (0, "--no-fetch")
        )
        if size:
            report["bytes"] += size
            report["target_wheels"].append(f"{dist.metadata['Name']}=={dist.version} ({how})")
        else:
            report["bytes"] += copy_dist(dist, ver_dir)
            report["warnings"].append(
                f"{name}: no wheel for Python {TARGET[0]}.{TARGET[1]} ({how}); copied this "
                f"interpreter's build ({', '.join(wheel_tags(dist))}), which may not import there"
            )
        if local_version_dir and sys.version_info[:2] != TARGET:  # for --check on this interpreter
            copy_dist(dist, out / f"py{sys.version_info[0]}{sys.version_info[1]}")
    shutil.rmtree(out / "wheels", ignore_errors=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (site / "lenslab_tree.py").write_text(LENSLAB_TREE)
    report["bytes"] = folder_bytes(out)
    report["tree_bytes"] = tree_bytes()
    lines = [
        f"# lenslab GPU bundle for Python {TARGET[0]}.{TARGET[1]} (benchmarks/prepare_gpu_bundle.py)",
        f"# roots: {', '.join(roots)}; bundle {report['bytes'] / 2**20:.1f} MiB; working tree "
        f"{report['tree_bytes'] / 2**20:.1f} MiB",
        "",
        "copied (py3-none-any):",
        *[f"  {c}" for c in report["copied"]],
        "wheels for the target Python:",
        *[f"  {c}" for c in report["target_wheels"]],
        "skipped:",
        *[f"  {k}: {v}" for k, v in SKIP.items()],
        "never: torch, triton, transformers, nvidia-*, lenslab",
        "not installed here (not bundled):",
        *[f"  {m}" for m in report["missing"]],
        "warnings:",
        *[f"  {w}" for w in report["warnings"]],
    ]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    if report["bytes"] > MAX_BUNDLE:
        raise SystemExit(
            f"the bundle is {report['bytes'] / 2**20:.1f} MiB, over {MAX_BUNDLE / 2**20:.0f} MiB: bundle fewer packages"
        )
    if report["bytes"] + report["tree_bytes"] > MAX_CARRY:
        report["warnings"].append(
            f"bundle + working tree = {(report['bytes'] + report['tree_bytes']) / 2**20:.1f} MiB,"
            f" over the run tool's {MAX_CARRY / 2**20:.0f} MiB"
        )
    return report


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tree_bytes() -> int:
    """What the run tool sends besides carried paths: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


# --- the isolated check --------------------------------------------------------------------------

CHECK = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    assert "sitecustomize" in sys.modules, "the bundle's sitecustomize did not run"
    import torch, transformer_lens, lenslab, lenslab.kernels
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from lenslab import circuits, tasks
    bundle, root = sys.argv[1], sys.argv[2]
    assert transformer_lens.__file__.startswith(bundle), transformer_lens.__file__
    assert lenslab.kernels.__file__.startswith(os.path.join(root, "kernels")), lenslab.kernels.__file__
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=23,
                                  act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    clean = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone(); corrupt[:, 1] = (clean[:, 1] + 1) % 23
    task = tasks.from_tokens(clean, corrupt, torch.tensor([[1, 2], [3, 4]]))
    ref = circuits.patch(model, task, "resid_pre", engine="reference", progress=False)
    fast = circuits.patch(model, task, "z_by_pos", engine="batched", progress=False)
    fast2 = circuits.patch(model, task, "resid_pre", engine="batched", progress=False)
    diff = float((ref.scores - fast2.scores).abs().max())
    assert diff <= 1e-4 and fast.provenance["engine"] == "batched", diff
    print("BUNDLE-OK", "transformer_lens", transformer_lens.__file__, "max|diff|", diff)
""")


def gpu_like_paths(tmp: Path) -> Path:
    """A folder of links to the packages the GPU image has, taken from this environment."""
    sim = tmp / "gpu_image"
    sim.mkdir()
    from packaging.markers import default_environment

    local = dict(default_environment(), extra="")
    keep = closure(["torch", "triton", "transformers"], env=local, stop=lambda n: False)
    names = {n for n in keep} | {_norm(g) for g in GPU_HAS}
    for name in sorted(names):
        if name in SKIP:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if Path(str(f)).parts[0] not in ("..", "__pycache__")}
        for top in tops:
            src, dst = base / top, sim / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return sim


def check(out: Path) -> str:
    """Import transformer_lens and lenslab from the bundle in an interpreter that sees only the
    bundle and the GPU image's packages; returns the check's output (raises on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
        py = tmp / "venv" / "bin" / "python"
        sim = gpu_like_paths(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(out / "site"), str(sim)]),
            HF_HUB_OFFLINE="1",
            WANDB_MODE="disabled",
            PYTHONNOUSERSITE="1",
            LENSLAB_ROOT=str(ROOT),
        )
        proc = subprocess.run(
            [str(py), "-c", CHECK, str(out), str(ROOT)], env=env, cwd=tmp, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0 or "BUNDLE-OK" not in proc.stdout:
            raise RuntimeError(f"the bundle check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc.stdout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--with",
        dest="extra",
        action="append",
        default=[],
        metavar="DIST",
        help="also bundle this distribution's missing closure (e.g. sae-lens)",
    )
    ap.add_argument("--no-fetch", action="store_true", help="never run pip download (copy this interpreter's builds)")
    ap.add_argument("--check", action="store_true", help="import the bundle in an isolated interpreter afterwards")
    args = ap.parse_args(argv)
    report = build(args.out, ["transformer-lens", *args.extra], fetch=not args.no_fetch, local_version_dir=args.check)
    print((args.out / "MANIFEST.txt").read_text())
    for w in report["warnings"]:
        print("WARNING:", w)
    if args.check:
        print(check(args.out).strip())


if __name__ == "__main__":
    main()
