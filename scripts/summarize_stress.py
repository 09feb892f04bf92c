#!/usr/bin/env python3
"""Markdown tables from docs/results/stress.jsonl (scripts/measure_stress.sh).

Per workload: the median over runs of each run's lock-free/locked and
lock-free/sharded throughput ratio (each run's ratio is itself the median
over its rounds), with the min-max over runs; median ops/s per
implementation; the harness's ns/op and its share of each implementation's;
p99.9 add latency.
"""
import json
import statistics
import sys
from collections import OrderedDict

path = sys.argv[1] if len(sys.argv) > 1 else "docs/results/stress.jsonl"
rows = OrderedDict()
for line in open(path):
    rec = json.loads(line)
    rows.setdefault(rec["label"], []).append(rec["report"])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


print("| workload | lock-free / locked (median, min-max over runs) | lock-free / sharded | Mops/s locked / sharded / lock-free | harness ns/op (share of lock-free's) | p99.9 add µs locked / lock-free | verdicts |")
print("|---|---|---|---|---|---|---|")
for label, reps in rows.items():
    ol = [r.get("ratio_lockfree_over_locked") for r in reps]
    os_ = [r.get("ratio_lockfree_over_sharded") for r in reps]
    ops = {}
    p999 = {}
    for r in reps:
        for s in r["results"]:
            ops.setdefault(s["impl"], []).append(s["ops_per_sec"])
            p999.setdefault(s["impl"], []).append(s["p999_ns"])
    def finite(x):
        return x if isinstance(x, (int, float)) and x == x and x != float("inf") else None

    h_ns = med([finite(r["harness"]["ns_per_op"]) for r in reps if r.get("harness")])
    h_share = med([finite(r["harness"]["share_of"].get("lockfree")) for r in reps if r.get("harness")])
    harness = f"{h_ns:.0f} ({h_share * 100:.0f}%)" if h_ns == h_ns else "n/a (counts refs run)"
    mops = " / ".join(f"{med(ops.get(n, [])) / 1e6:.2f}" for n in ("locked", "sharded", "lockfree"))
    lat = f"{med(p999.get('locked', [])) / 1e3:.1f} / {med(p999.get('lockfree', [])) / 1e3:.1f}"
    verdicts = ",".join(r["verdict"] for r in reps)
    print(f"| {label} | {med(ol):.2f} ({spread(ol)}) | {med(os_):.2f} ({spread(os_)}) | {mops} | {harness} | {lat} | {verdicts} |")
