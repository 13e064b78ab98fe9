#!/usr/bin/env python3
"""PyTorch reference timings for scripts/gpu-check.sh.

Times forward + backward of one loss at one batch size (D = 768, float32, on
cuda:0) in PyTorch eager mode or under torch.compile, written as
sentence-transformers 6.2 computes it, and prints one JSON line:
{"loss": ..., "B": ..., "mode": "eager"|"compile", "median_ms": ..., "peak_mb": ...}
or {"error": "..."} when PyTorch, CUDA or memory is missing.

Inputs are random with the same shapes and distribution as lossc's seeded
random inputs (standard normal embeddings, integer labels in a small range),
not bit-identical values: timings do not depend on the values.
"""
import json
import sys
import time


def main():
    loss_name, b, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    d = 768
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure means "no torch"
        print(json.dumps({"error": f"no PyTorch: {e}"}))
        return
    if not torch.cuda.is_available():
        print(json.dumps({"error": "PyTorch sees no CUDA device"}))
        return
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.float32)

    def cos_sim(a, p):
        return F.normalize(a, p=2, dim=1) @ F.normalize(p, p=2, dim=1).T

    def mnrl(a, p):
        scores = cos_sim(a, p) * 20.0
        return F.cross_entropy(scores, torch.arange(a.shape[0], device=dev))

    def cosent(s1, s2, labels):
        scores = F.cosine_similarity(s1, s2) * 20.0
        diff = scores[:, None] - scores[None, :]
        mask = labels[:, None] < labels[None, :]
        diff = diff - (~mask).float() * 1e12
        diff = torch.cat((torch.zeros(1, device=dev), diff.view(-1)), dim=0)
        return torch.logsumexp(diff, dim=0)

    def batch_hard_triplet(e, labels, margin=5.0):
        dot = e @ e.T
        sq = torch.diag(dot)
        dist = (sq[None, :] - 2.0 * dot + sq[:, None]).clamp(min=0)
        zero = dist.eq(0).float()
        dist = (1.0 - zero) * torch.sqrt(dist + zero * 1e-16)
        eye = torch.eye(e.shape[0], device=dev, dtype=torch.bool)
        same = labels[:, None] == labels[None, :]
        pos = (same & ~eye).float()
        hardest_pos = (pos * dist).max(1, keepdim=True)[0]
        max_d = dist.max(1, keepdim=True)[0]
        neg = dist + max_d * same.float()
        hardest_neg = neg.min(1, keepdim=True)[0]
        return F.relu(hardest_pos - hardest_neg + margin).mean()

    def matryoshka_mnrl(a, p):
        return sum(mnrl(a[:, :k], p[:, :k]) for k in (768, 512, 256, 128, 64))

    if loss_name == "MultipleNegativesRankingLoss":
        fn, args = mnrl, [randn(b, d), randn(b, d)]
    elif loss_name == "CoSENTLoss":
        fn, args = cosent, [randn(b, d), randn(b, d), torch.rand(b, device=dev, generator=g)]
    elif loss_name == "BatchHardTripletLoss":
        labels = torch.randint(0, 8, (b,), device=dev, generator=g)
        fn, args = batch_hard_triplet, [randn(b, d), labels]
    elif loss_name == "MatryoshkaLoss":
        fn, args = matryoshka_mnrl, [randn(b, d), randn(b, d)]
    else:
        print(json.dumps({"error": f"no PyTorch version of {loss_name}"}))
        return
    for x in args:
        if x.is_floating_point() and x.dim() == 2:
            x.requires_grad_(True)
    if mode == "compile":
        fn = torch.compile(fn)

    def step():
        for x in args:
            x.grad = None
        fn(*args).backward()
        torch.cuda.synchronize()

    try:
        step()  # warm-up (and compilation)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"error": "out of memory"}))
        return
    times.sort()
    print(json.dumps({
        "loss": loss_name,
        "B": b,
        "mode": mode,
        "median_ms": times[len(times) // 2],
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
    }))


if __name__ == "__main__":
    main()
