#!/usr/bin/env python3
"""The side-by-side table of docs/perf.md from one ../shared/bench/peers.py
run that timed lossc with the peers (`--lossc-cmd`, benches/peers_lossc.py):

    python3 benches/side_table.py side.json

One row per (loss, size): each peer's median (ms; the faster of the
small cases' passes, which peers.py runs twice), lossc's, lossc's ratio to
the best peer whose gradients are correct, lossc's gradient error against
the float64 sentence-transformers reference, and peak RSS above the
baseline for lossc and the best peer. Ratios below 1 mean lossc is faster.
A peer whose gradient error exceeds 1e-3 does not count as the best (torch.compile
returns wrong BatchHardTripletLoss gradients on this setup; peers.py runs
`torch-compile-noinplace` beside it)."""

import json
import sys

PEERS = ["torch-eager", "torch-compile", "torch-compile-noinplace", "jax"]


def main():
    results = json.load(open(sys.argv[1]))["results"]
    rows = {}
    for r in results:
        if r.get("median_ms") is None:
            continue
        key = (r["loss"], r["size"], r["B"], r["D"])
        best = rows.setdefault(key, {}).get(r["peer"])
        if best is None or r["median_ms"] < best["median_ms"]:
            rows[key][r["peer"]] = r
    print("| loss | size | " + " | ".join(PEERS) + " | lossc | lossc / best peer | lossc grad err | Δ RSS MB lossc / best peer |")
    print("|---|---|" + "--:|" * (len(PEERS) + 2) + "--:|--:|")
    for (loss, size, b, d), peers in rows.items():
        lossc = peers.get("lossc")
        fair = {p: r for p, r in peers.items() if p != "lossc" and (r.get("grad_err") or 0) <= 1e-3}
        best = min(fair.values(), key=lambda r: r["median_ms"], default=None)
        cells = [f"{peers[p]['median_ms']:.4g}" if p in peers else "–" for p in PEERS]
        if lossc and best:
            ratio = f"**{lossc['median_ms'] / best['median_ms']:.2f}×** ({best['peer']})"
            rss = f"{lossc.get('delta_rss_mb', 0):.0f} / {best.get('delta_rss_mb', 0):.0f}"
        else:
            ratio, rss = "–", "–"
        err = f"{lossc['grad_err']:.1e}" if lossc and lossc.get("grad_err") is not None else "–"
        lm = f"{lossc['median_ms']:.4g}" if lossc else "–"
        print(f"| {loss} | {b}×{d} | " + " | ".join(cells) + f" | {lm} | {ratio} | {err} | {rss} |")


if __name__ == "__main__":
    main()
