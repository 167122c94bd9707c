#!/usr/bin/env bash
# The GPU checks in one command, in 8 minutes at most: the GPU tests (pytest -m gpu, <= 100 s),
# then benchmarks/bench_gpu.py (<= 360 s: both recipes' eager, CUDA-graph, lockstep K = 1/4/8/16
# and compiled settings, 1/2/4 workers per GPU without and, where it can be started, with MPS; it
# skips what its budget cannot fit and ends with PASS/FAIL against the targets).
# Results go to $UNLEARN_BENCH_OUT (default benchmarks/out/):
#   pytest-gpu.txt   the tests' output
#   bench_gpu.txt    the benchmark's table and verdicts;  bench_gpu.json  rows and provenance
# Run from anywhere: benchmarks/gpu_check.sh   (PYTHON=... picks the interpreter; default .venv)
# Exit code: 0 when the tests passed and the benchmark ran; without a GPU the tests are skipped
# and the benchmark says so, and it exits 0 too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${UNLEARN_BENCH_OUT:-benchmarks/out}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"

TESTS_S=100   # GPU tests: small models, one inductor compile, spawned GPU workers
BENCH_S=360   # the benchmark: its phases fit in --budget, the rest is start-up and slack
# Worst case: 100 + 360 s, plus 2 x 10 s for `timeout -k` to kill: 480 s = 8 minutes.
echo "== GPU tests (at most ${TESTS_S} s) -> $OUT/pytest-gpu.txt"
timeout -k 10 "$TESTS_S" "$PY" -m pytest -m gpu -q -rs tests/ 2>&1 | tee "$OUT/pytest-gpu.txt"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (at most ${BENCH_S} s) -> $OUT/bench_gpu.txt, $OUT/bench_gpu.json"
timeout -k 10 "$BENCH_S" "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget 330
bench_rc=$?

echo "== tests: exit $tests_rc; benchmark: exit $bench_rc (124: timed out; rows so far are kept)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
