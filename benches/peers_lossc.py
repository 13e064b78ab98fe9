#!/usr/bin/env python3
"""Adapter that lets ../shared/bench/peers.py time lossc side by side with
PyTorch and JAX on the same input files (its `--lossc-cmd`).

peers.py stores every case's inputs under generic names (`input.anchor`,
`input.positive`, `input.negative`, `input.labels`, labels as float32) and
checks gradients named after those columns. This script renames the
tensors to the lossc loss's own inputs (class labels as int64) once per
input file, runs `lossc bench` on them, and renames the gradients back, so
peers.py's correctness check (`grad err` against its float64 reference)
applies to lossc as to every peer.

Run under a Python with numpy and safetensors (peers.py's environment):

    python peers.py run --peers torch-compile,jax --out side.json --md side.md \\
      --lossc-cmd 'PYTHON benches/peers_lossc.py --lossc target/release/lossc \\
        --key {loss} --inputs {inputs} --threads {threads} --warmup {warmup} \\
        --repeats {repeats} --json-out {out_json} --grads-out {grads_out}'
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

# peers.py's loss key -> (lossc class, params, {peers column: lossc input}, int labels)
CASES = {
    "mnrl": ("MultipleNegativesRankingLoss", {}, {"anchor": "anchor", "positive": "positive"}, False),
    "mnrl_hn": (
        "MultipleNegativesRankingLoss",
        {},
        {"anchor": "anchor", "positive": "positive", "negative": "negative"},
        False,
    ),
    "cosent": ("CoSENTLoss", {}, {"anchor": "sentence1", "positive": "sentence2", "labels": "labels"}, False),
    "triplet": (
        "TripletLoss",
        {},
        {"anchor": "anchor", "positive": "positive", "negative": "negative"},
        False,
    ),
    "batch_hard_triplet": ("BatchHardTripletLoss", {}, {"anchor": "embeddings", "labels": "labels"}, True),
    "cosine_similarity": (
        "CosineSimilarityLoss",
        {},
        {"anchor": "sentence1", "positive": "sentence2", "labels": "labels"},
        False,
    ),
    "matryoshka_mnrl": ("MatryoshkaLoss", None, {"anchor": "anchor", "positive": "positive"}, False),
}


def lossc_inputs(path, columns, int_labels):
    """The input file with lossc's tensor names, written once beside it."""
    out = path.replace(".safetensors", ".lossc.safetensors")
    if not os.path.exists(out):
        tensors = load_file(path)
        renamed = {}
        for column, name in columns.items():
            t = tensors[f"input.{column}"]
            if column == "labels" and int_labels:
                t = t.astype(np.int64)
            renamed[name] = np.ascontiguousarray(t)
        tmp = out + ".tmp"
        save_file(renamed, tmp)
        os.replace(tmp, out)
    return out, tensors_dim(load_file(out))


def tensors_dim(tensors):
    """D of the embeddings (Matryoshka's truncations are D, D/2, D/4, D/8)."""
    return next(t.shape[-1] for t in tensors.values() if t.ndim >= 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lossc", default="target/release/lossc")
    ap.add_argument("--key", required=True, choices=sorted(CASES))
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--min-time-s", type=float, default=1.0)
    ap.add_argument("--max-repeats", type=int, default=5000)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--grads-out")
    args = ap.parse_args()

    cls, params, columns, int_labels = CASES[args.key]
    inputs, d = lossc_inputs(args.inputs, columns, int_labels)
    if params is None:
        params = {"loss": "MultipleNegativesRankingLoss", "matryoshka_dims": [d, d // 2, d // 4, d // 8]}
    with tempfile.TemporaryDirectory() as tmp:
        grads = os.path.join(tmp, "grads.safetensors")
        cmd = [
            args.lossc, "bench", "--loss", cls, "--params", json.dumps(params),
            "--inputs", inputs, "--backend", "jit", "--dtype", "f32",
            "--threads", str(args.threads), "--warmup", str(args.warmup),
            "--repeats", str(max(args.repeats, 1)), "--format", "json",
            "--json-out", args.json_out,
        ]
        if args.grads_out:
            cmd += ["--grads-out", grads]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            sys.exit(done.returncode)
        # Time at least --min-time-s in all, as peers.py does for every peer
        # (it suggests only its minimum repeat count).
        median = json.load(open(args.json_out))["median_ms"]
        repeats = max(args.repeats, 1)
        if median * repeats < args.min_time_s * 1e3:
            want = min(args.max_repeats, int(args.min_time_s * 1e3 / max(median, 1e-6)) + 1)
            cmd[cmd.index("--repeats") + 1] = str(want)
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                sys.exit(done.returncode)
        if args.grads_out:
            result = json.load(open(args.json_out))
            got = load_file(grads)
            back = {"output.loss": np.asarray(result["loss"], dtype=np.float64)}
            for column, name in columns.items():
                if column != "labels" and f"grad.{name}" in got:
                    back[f"grad.{column}"] = got[f"grad.{name}"].reshape(-1, d)
            save_file(back, args.grads_out)


if __name__ == "__main__":
    main()
