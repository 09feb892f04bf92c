#!/usr/bin/env bash
# The stress figures of docs/benchmarks.md: every workload of the issue's
# goals, 3 runs of 6 s per implementation (each run: rounds interleaved
# across locked, sharded and lock-free, plus the no-op harness), JSON lines
# into docs/results/stress.jsonl. Run alone on the machine:
#   cargo build --release -p delayed-refs-stress && scripts/measure_stress.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/delayed-refs-stress
out=${OUT:-docs/results/stress.jsonl}
runs=${RUNS:-3}
secs=${SECONDS_PER_IMPL:-6}
: > "$out"
while read -r label args; do
  for r in $(seq 1 "$runs"); do
    # shellcheck disable=SC2086
    line=$($bin stress $args --impl all --seconds "$secs" --harness-cost --json)
    echo "{\"label\":\"$label\",\"run\":$r,\"report\":$line}" >> "$out"
    echo "$label run $r done" >&2
  done
done <<'LIST'
add-only/1 --workload add-only --threads 1
add-only/2 --workload add-only --threads 2
spread/1 --workload spread --threads 1
spread/2 --workload spread --threads 2
drain/1 --workload drain --threads 1 --runners 1
drain/2 --workload drain --threads 2 --runners 2
hot/2 --workload hot --threads 2
wide/2 --workload wide --threads 2
spread/16 --workload spread --threads 16 --runners 16
LIST
