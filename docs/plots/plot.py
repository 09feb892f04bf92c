#!/usr/bin/env python3
"""Plot criterion results (target/criterion) as PNGs for docs/benchmarks.md.

Usage: python3 docs/plots/plot.py [criterion-dir] [out-dir]
Needs matplotlib (pip install matplotlib). For each benchmark group it plots
throughput (elements/s from the median) per thread count for both
implementations, plus the lockfree/locked ratio; it also prints a markdown
table of the figures it plotted.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GROUPS = ["W1_spread", "W2_drain", "W3_hot_head", "W4_add_only", "wide_head", "wide_scaling"]


def load(root, group):
    out = {}
    gdir = os.path.join(root, group)
    if not os.path.isdir(gdir):
        return out
    for impl in ("locked", "lockfree"):
        idir = os.path.join(gdir, impl)
        if not os.path.isdir(idir):
            continue
        for x in os.listdir(idir):
            new = os.path.join(idir, x, "new")
            try:
                est = json.load(open(os.path.join(new, "estimates.json")))
                meta = json.load(open(os.path.join(new, "benchmark.json")))
            except OSError:
                continue
            elems = meta["throughput"]["Elements"]
            ns = est["median"]["point_estimate"]
            out.setdefault(impl, {})[int(x)] = elems / (ns * 1e-9)
    return out


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
    dst = sys.argv[2] if len(sys.argv) > 2 else "docs/plots"
    for group in GROUPS:
        data = load(root, group)
        if len(data) < 2:
            continue
        xs = sorted(set(data["locked"]) & set(data["lockfree"]))
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for impl, style in (("locked", "o-"), ("lockfree", "s-")):
            a.plot(xs, [data[impl][x] / 1e6 for x in xs], style, label=impl)
        ratio = [data["lockfree"][x] / data["locked"][x] for x in xs]
        b.plot(xs, ratio, "d-", color="tab:green")
        b.axhline(1.0, color="grey", lw=0.8)
        xl = "keys on the head" if group == "wide_scaling" else "threads"
        for ax in (a, b):
            ax.set_xscale("log", base=2 if group != "wide_scaling" else 10)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_xlabel(xl)
        a.set_ylabel("M elements/s (median)")
        a.legend()
        b.set_ylabel("lockfree / locked")
        fig.suptitle(f"{group} (2-core machine)")
        fig.tight_layout()
        path = os.path.join(dst, f"{group}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        print(f"\n{group} -> {path}\n")
        print(f"| {xl} | locked M/s | lockfree M/s | ratio |\n|---|---|---|---|")
        for x, r in zip(xs, ratio):
            print(f"| {x} | {data['locked'][x] / 1e6:.2f} | {data['lockfree'][x] / 1e6:.2f} | {r:.2f} |")


if __name__ == "__main__":
    main()
