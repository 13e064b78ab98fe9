#!/usr/bin/env python3
"""The table of docs/perf.md: `lossc bench` (forward + gradient, float32) for
the benchmark losses at every size, one process per row, with each row's
ratio to the best peer's median from ../shared/bench/peers-results.json
(PyTorch eager, torch.compile, JAX jit measured on a 2-core machine of the
same kind).

    cargo build --release
    python3 benches/perf_table.py [--lossc target/release/lossc] \
        [--peers ../shared/bench/peers-results.json] [--only mnrl,cosent] \
        [--sizes small,medium] [--out rows.json]

Prints one markdown row per (loss, size, backend). The interpreter runs at
the small size only (it is the reference, 100-1000x slower)."""

import argparse
import json
import os
import subprocess
import sys

SIZES = {
    "small": (32, 384),
    "medium": (256, 768),
    "large": (4096, 1024),
    "huge16k": (16384, 768),
    "huge32k": (32768, 768),
}

# label -> (class, params, K, sizes)
CASES = {
    "mnrl": ("MultipleNegativesRankingLoss", {}, 0, list(SIZES)),
    "mnrl_hn": ("MultipleNegativesRankingLoss", {}, 1, ["small", "medium", "large"]),
    "cosent": ("CoSENTLoss", {}, None, ["small", "medium", "large"]),
    "triplet": ("TripletLoss", {}, None, ["small", "medium", "large"]),
    "batch_hard_triplet": ("BatchHardTripletLoss", {}, None, ["small", "medium", "large"]),
    "cosine_similarity": ("CosineSimilarityLoss", {}, None, ["small", "medium", "large"]),
    "matryoshka_mnrl": ("MatryoshkaLoss", None, 0, ["small", "medium", "large"]),
}

REPEATS = {"small": 50, "medium": 20, "large": 3, "huge16k": 2, "huge32k": 1}


def peers(path):
    if not os.path.exists(path):
        return {}
    best = {}
    for r in json.load(open(path))["results"]:
        if r.get("median_ms") is None or r["peer"].endswith("noinplace"):
            continue
        key = (r["loss"], r["size"])
        if key not in best or r["median_ms"] < best[key][1]:
            best[key] = (r["peer"], r["median_ms"])
    return best


def bench(lossc, cls, params, k, size, backend):
    b, d = SIZES[size]
    if params is None:  # Matryoshka over MNRL, dims D, D/2, D/4, D/8
        params = {"loss": "MultipleNegativesRankingLoss",
                  "matryoshka_dims": [d, d // 2, d // 4, d // 8]}
    cmd = [lossc, "bench", "--loss", cls, "--params", json.dumps(params),
           "--dims", f"B={b},D={d}" + (f",K={k}" if k is not None else ""),
           "--backend", backend,
           "--repeats", str(REPEATS[size]),
           "--warmup", "1" if size in ("small", "medium") else "0",
           "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lossc", default="target/release/lossc")
    ap.add_argument("--peers", default="../shared/bench/peers-results.json")
    ap.add_argument("--only", default="")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--out")
    args = ap.parse_args()
    best = peers(args.peers)
    only = set(filter(None, args.only.split(",")))
    sizes = args.sizes.split(",")
    rows = []
    print("| loss | size | backend | median ms | first call ms | compile ms | peak RSS MB | Δ RSS MB | streamed | best peer (median ms) | lossc / best peer |")
    print("|---|---|---|--:|--:|--:|--:|--:|---|---|--:|")
    for label, (cls, params, k, case_sizes) in CASES.items():
        if only and label not in only:
            continue
        for size in case_sizes:
            if size not in sizes:
                continue
            for backend in ["jit"] + (["interp"] if size == "small" else []):
                j = bench(args.lossc, cls, params, k, size, backend)
                b, d = SIZES[size]
                peer = best.get((label, size))
                if "error" in j:
                    print(f"| {label} | {b}×{d} | {backend} | error: {j['error']} |")
                    continue
                rows.append({"label": label, "size": size, **j})
                streamed = sum(len(p["streamed"]) for p in j.get("passes", []))
                streamed_s = f"{streamed} nodes" if streamed else "–"
                ratio = f"{j['median_ms'] / peer[1]:.2f}×" if peer else "–"
                peer_s = f"{peer[0]} {peer[1]:.4g}" if peer else "–"
                print(f"| {label} | {b}×{d} | {backend} | {j['median_ms']:.4g} | "
                      f"{j['first_call_ms']:.4g} | {j['compile_ms']:.3g} | {j['peak_rss_mb']:.0f} | "
                      f"{j['peak_rss_mb'] - j['baseline_rss_mb']:.0f} | {streamed_s} | "
                      f"{peer_s} | {ratio} |")
                sys.stdout.flush()
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
