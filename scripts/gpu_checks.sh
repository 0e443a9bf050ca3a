#!/usr/bin/env bash
# GPU-only checks, one prepared run for a GPU machine (CI has none). Writes everything under $OUT.
#   OUT=/tmp/gpu bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
pip install --no-deps -e . >"$OUT/install.log" 2>&1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -m pytest -q tests/test_gpu.py tests/test_reference.py tests/test_mechanics.py >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?" >>"$OUT/pytest_gpu.txt"
timeout 360 python scripts/bench.py --device cuda --preset large --bf16 --steps 12 --variants sam,asam --peers \
  --out "$OUT/bench_large_bf16.json" >"$OUT/bench_large_bf16.txt" 2>&1
echo "bench rc=$?" >>"$OUT/bench_large_bf16.txt"
tail -n 12 "$OUT"/pytest_gpu.txt "$OUT"/bench_large_bf16.txt
