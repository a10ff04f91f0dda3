#!/usr/bin/env bash
# The GPU session's whole job for issue 6, in one script for the `run` device tool:
#   GPU tests (pytest -m gpu), then benchmarks/patching.py for both shapes and dtypes, and the
#   torch.compile / CUDA-graph engine, with logs and RESULTS.md rows written under $OUT.
#
# Here (no GPU), once:   .venv/bin/python benchmarks/prepare_gpu_bundle.py --check
# Then the run tool, carry [".gpu_bundle"], timeout_s 600, three calls (all stages at once can
# exceed one call's 10 minutes; $OUT is emptied before each call):
#                        bash benchmarks/gpu_run.sh env tests
#                        bash benchmarks/gpu_run.sh bench
#                        bash benchmarks/gpu_run.sh compile
# Afterwards, here:      the rows are in <files_at>/RESULTS.md (the repo's file + the new rows):
#                        copy the new rows into benchmarks/RESULTS.md; logs: <files_at>/*.log
#
# Stages (default "all" = env tests bench compile):
#   env      versions of python/torch/triton/transformers/pyarrow/hub, nvidia-smi, import check
#   tests    pytest -m gpu on tests/kernels and tests/test_models.py (half precision vs float32,
#            GPT-2-small shape, compile and CUDA graphs vs eager, Triton kernel on CUDA)
#   bench    benchmarks/patching.py --device cuda for shapes gpt2-small, mid x dtypes float32,
#            bfloat16, float16 (TransformerLens vs batched, memory per in-flight patch)
#   compile  benchmarks/patching.py --compile default and --compile reduce-overhead (GPT-2 small,
#            float32 and bfloat16)
# SMOKE=1 runs the same commands on CPU with a tiny model and no TransformerLens loop (to test
# this script without a GPU; the -m gpu tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGES=${*:-all}
[ "$STAGES" = all ] && STAGES="env tests bench compile"

if [ ! -f "$ROOT/.gpu_bundle/site/sitecustomize.py" ]; then
  echo "no .gpu_bundle: run 'python benchmarks/prepare_gpu_bundle.py' here and carry .gpu_bundle" >&2
  exit 2
fi
export PYTHONPATH="$ROOT/.gpu_bundle/site${PYTHONPATH:+:$PYTHONPATH}"
export LENSLAB_ROOT="$ROOT" HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -f "$OUT/RESULTS.md" ] || cp benchmarks/RESULTS.md "$OUT/RESULTS.md"

if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SHAPES="gpt2-small"; DTYPES="float32 bfloat16"
  EXTRA=(--n-layers 2 --d-model 64 --n-heads 4 --skip-tl --repeats 1 --threads 2 --note "gpu_run.sh SMOKE on CPU (not a measurement)")
  LIMIT=300
else
  DEVICE=cuda; SHAPES="gpt2-small mid"; DTYPES="float32 bfloat16 float16"
  EXTRA=(--note "gpu_run.sh")
  LIMIT=240
fi
bench() {  # one benchmark run, its output appended to bench.log; a failure does not stop the others
  echo "=== patching.py $*" | tee -a "$OUT/bench.log"
  timeout "$LIMIT" "$PY" benchmarks/patching.py --device "$DEVICE" --results "$OUT/RESULTS.md" "${EXTRA[@]}" "$@" \
    2>&1 | grep -v "it/s]" | tee -a "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  echo "=== exit $rc" | tee -a "$OUT/bench.log"
  return "$rc"
}

status=0
for stage in $STAGES; do
  case $stage in
  env)
    {
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
      "$PY" -c "import sys; print(sys.version)"
      "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|pyarrow|huggingface.hub|numpy|pandas|pytest) " || true
      "$PY" -c "import torch, transformer_lens, lenslab.kernels as k; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); print('transformer_lens', transformer_lens.__file__); print('lenslab.kernels', k.__file__)"
    } 2>&1 | tee "$OUT/env.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
  tests)
    timeout 420 "$PY" -m pytest -p no:cacheprovider -m gpu tests/kernels tests/test_models.py -q -s -rs 2>&1 \
      | grep -v "it/s]" | tee "$OUT/gpu_tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    ;;
  bench)
    for shape in $SHAPES; do
      for dtype in $DTYPES; do
        bench --shape "$shape" --dtype "$dtype" || status=1
      done
    done
    ;;
  compile)
    for dtype in float32 bfloat16; do
      bench --shape gpt2-small --dtype "$dtype" --compile default --skip-tl || status=1
      [ "$DEVICE" = cuda ] && { bench --shape gpt2-small --dtype "$dtype" --compile reduce-overhead --skip-tl || status=1; }
    done
    ;;
  *) echo "unknown stage $stage (env, tests, bench, compile, all)" >&2; exit 2 ;;
  esac
done
echo "gpu_run.sh done (status $status); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
