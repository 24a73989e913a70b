"""Gradient and Hessian-vector product through a large-vocabulary LM head + token-mean cross-entropy:
the chunked head (probe.lm_head.linear_cross_entropy) against plain double backward of
F.cross_entropy(h @ W.T).

Each (vocabulary, variant) runs in a fresh subprocess, one after another, so that its peak
resident memory is its own: the figure reported is the process's peak RSS (getrusage) above
its RSS after setup (h, W, targets, the direction). "saved MB" is what autograd saved for the
gradient graph that the product differentiates (saved-tensor hooks; h and W themselves not
counted). Times are the best of --reps repetitions, each building the gradient graph
(create_graph=True, as HessianOperator does once per batch) and then one product.

    flock /tmp/bench.lock .venv/bin/python bench/bench_vocab.py > /tmp/bench_vocab.log
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from probe.lm_head import chunk_rows, linear_cross_entropy


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class SavedCounter:
    """Bytes of distinct storages autograd saves while active, except those of ``exclude``."""

    def __init__(self, exclude):
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t


def worker(args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    V, T, d = args.vocab, args.tokens, args.hidden
    h = torch.randn(T, d, dtype=dtype).requires_grad_()
    w = torch.randn(V, d, dtype=dtype).mul_(d**-0.5).requires_grad_()
    y = torch.randint(0, V, (T,))
    y[torch.rand(T) < 0.05] = -100  # a few ignored targets
    vh = torch.randn(T, d, dtype=dtype)
    vw = torch.randn(V, d, dtype=dtype)
    if args.variant == "plain":

        def loss_fn():
            return F.cross_entropy(h @ w.T, y, ignore_index=-100)
    else:
        chunk = None if args.variant == "chunked" else int(args.variant.split("=")[1])

        def loss_fn():
            return linear_cross_entropy(h, w, y, chunk=chunk)

    gc.collect()
    base = rss_bytes()
    grad_s, hvp_s, saved, norm = [], [], 0, 0.0
    for _ in range(args.reps):
        counter = SavedCounter([h, w])
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = loss_fn()
            grads = torch.autograd.grad(loss, (h, w), create_graph=True)
        t1 = time.perf_counter()
        hv = torch.autograd.grad(grads, (h, w), (vh, vw))
        t2 = time.perf_counter()
        grad_s.append(t1 - t0)
        hvp_s.append(t2 - t1)
        saved = counter.bytes
        norm = float(torch.cat([x.reshape(-1) for x in hv]).double().norm())
        del loss, grads, hv
        gc.collect()
    return {
        "grad_s": min(grad_s),
        "hvp_s": min(hvp_s),
        "peak_mb": max(0, peak_rss_bytes() - base) / 2**20,
        "saved_mb": saved / 2**20,
        "hv_norm": norm,
    }


def run_one(args, vocab: int, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--vocab", str(vocab), "--variant", variant]
    cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--reps", str(args.reps)]
    cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 128_000])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="extra chunk sizes (tokens) to time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, hidden {args.hidden}, "
        f"{args.dtype}, best of {args.reps}; each variant in its own process"
    )
    head = f"{'vocab':>7} {'variant':>14} {'grad s':>7} {'HVP s':>7} {'peak MB':>8} {'saved MB':>9}"
    print(head + f" {'grad x':>7} {'HVP x':>7} {'peak x':>7} {'|Hv|':>12}")
    for vocab in args.vocabs:
        variants = ["plain", "chunked"] + [f"chunk={c}" for c in args.chunks]
        results = {v: run_one(args, vocab, v) for v in variants}
        ref = results["plain"]
        for v, r in results.items():
            name = f"{v} ({chunk_rows(vocab)})" if v == "chunked" else v
            print(
                f"{vocab:>7} {name:>14} {r['grad_s']:7.2f} {r['hvp_s']:7.2f} {r['peak_mb']:8.0f} {r['saved_mb']:9.0f} "
                f"{r['grad_s'] / ref['grad_s']:7.2f} {r['hvp_s'] / ref['hvp_s']:7.2f} "
                f"{r['peak_mb'] / max(ref['peak_mb'], 1e-9):7.3f} {r['hv_norm']:12.6e}",
                flush=True,
            )
    print("x columns: variant / plain (below 1: faster or smaller); 'chunked (n)': the default chunk of n tokens")


if __name__ == "__main__":
    main()
