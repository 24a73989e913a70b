"""Time per example of ``gradient_moments`` (vmapped per-example gradients) against a plain per-example loop.

Issue 8's benchmark: the sufficient statistics of the gradient-noise probe,
``Σᵢ gᵢ`` and ``Σᵢ ‖gᵢ‖²``, on a ~1M-parameter model (``wide_mlp()``: 1,126,410
parameters), float32, on digits inputs. Two ways, in one process:

- ``gradient_moments``: ``torch.func.vmap(grad(...))`` over ``functional_call``,
  ``chunk_size`` examples at a time (their gradients, ``chunk_size × dim`` floats,
  exist at once), chunk sums and squared norms accumulated in float64;
- the plain loop: one forward and one ``torch.autograd.grad`` per example, adding
  each gradient into float32 running sums and its squared norm into a float64 total.

Each of ``--chunk-sizes`` is timed on ``--sweep-examples`` examples (one warm-up
call, then the best of ``--repeats``), and the comparison runs at
``default_chunk_size()`` (what a caller gets; ``--chunk-size`` overrides it). For each, the memory
of the chunk's gradients is ``chunk_size × dim × 4`` bytes; next to it, the peak
resident memory above the level before the call, from Linux's ``VmHWM`` (reset
through ``/proc/self/clear_refs``): near 0 when the allocator reuses memory the
process already holds (blocks under glibc's mmap threshold), the block size when
each chunk maps fresh memory. Then both methods run on ``--examples``
examples, interleaved in each repeat (so load from other processes hits both
alike), and the best of ``--repeats`` is reported. The two must agree: relative
difference of ``tr(Σ)`` below 1e-4 (exit status 1 otherwise).

A third row times the library default, ``gradient_moments(..., method="auto")``,
which for a model whose selected parameters all sit in ``nn.Linear`` layers on 2-D
inputs (as ``wide_mlp`` does) takes the layer identity of Goodfellow (2015),
"Efficient per-example gradient computations": example ``i``'s weight gradient is
``δᵢ aᵢᵀ``, so ``‖gᵢ‖² = ‖δᵢ‖²‖aᵢ‖²`` (plus ``‖δᵢ‖²`` for the bias) without forming
it, and ``Σᵢ gᵢ`` is one ordinary batched backward. It is checked against the loop
as well, and runs after the comparison (its batched allocations fragment glibc's
heap, after which the vmapped chunks' memory is returned to the system).

    python bench/bench_noise.py [--threads 1,2] [--examples 8192] [--repeats 3] [--json out.json]

Results are in docs/benchmarks.md, "Gradient noise: per-example gradients (issue 8)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cluster.data import digits_tensors  # noqa: E402
from probe.models import wide_mlp  # noqa: E402
from probe.noise import default_chunk_size, gradient_moments, noise_statistics  # noqa: E402
from probe.params import ParameterSpace  # noqa: E402

TARGET_SPEEDUP = 5.0  # issue 8: "target ≥ 5× faster" than the per-example loop
AGREEMENT = 1e-4  # relative difference of tr(Σ) allowed between the two methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak() -> bool:
    """Reset the process's peak resident set (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build(num_examples: int, device: torch.device):
    """``wide_mlp()`` after 10 full-batch GD steps on the digits training split, and
    ``num_examples`` inputs drawn from all 1,797 digits (cycled when more are asked)."""
    x_train, y_train = digits_tensors(split="train")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = wide_mlp().to(device)
    x_train, y_train = x_train.to(device), y_train.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    x, y = digits_tensors(split="all")
    idx = torch.arange(num_examples) % len(y)
    return model, x[idx].to(device), y[idx].to(device)


def loop_moments(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The plain reference: ``(Σᵢ gᵢ as a float64 flat vector, Σᵢ ‖gᵢ‖²)``, one example at a time."""
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    sum_sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        for s, g in zip(sums, grads, strict=True):
            s += g
        sum_sq += sum(torch.linalg.vector_norm(g).double() ** 2 for g in grads)
    return torch.cat([s.reshape(-1) for s in sums]).double(), float(sum_sq)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def run(threads: int, args, model, x, y, device) -> dict:
    torch.set_num_threads(threads)
    dim = sum(p.numel() for p in model.parameters())
    batches = [(x, y)]
    sweep = [(x[: args.sweep_examples], y[: args.sweep_examples])]
    print(f"\n## {threads} thread(s), load average {os.getloadavg()[0]:.2f}")

    tuning = {}
    for cs in (int(c) for c in args.chunk_sizes.split(",")):
        gradient_moments(model, F.cross_entropy, [(x[:cs], y[:cs])], chunk_size=cs, method="vmap")  # warm-up
        times = []
        for _ in range(args.repeats):
            _sync(device)
            base = _rss_kib("VmRSS")
            peak_ok = _reset_peak()
            t0 = time.perf_counter()
            gradient_moments(model, F.cross_entropy, sweep, chunk_size=cs, method="vmap")
            _sync(device)
            times.append((time.perf_counter() - t0) / args.sweep_examples)
            peak_mib = (_rss_kib("VmHWM") - base) / 1024 if peak_ok else float("nan")
        grads_mib = cs * dim * 4 / 2**20
        tuning[cs] = {
            "s_per_example": min(times),
            "peak_rss_above_baseline_mib": peak_mib,
            "chunk_grads_mib": grads_mib,
        }
        print(
            f"  chunk_size {cs:4d}: {min(times) * 1e3:7.3f} ms/example on {args.sweep_examples}; "
            f"chunk gradients {grads_mib:6.0f} MiB, peak RSS +{peak_mib:6.0f} MiB"
        )
    fastest = min(tuning, key=lambda c: tuning[c]["s_per_example"])
    auto = default_chunk_size(ParameterSpace.of(model), next(model.parameters()).dtype, device)
    best = args.chunk_size or auto
    print(f"  fastest chunk_size {fastest}; default_chunk_size() gives {auto}; comparing at {best}")

    loop_moments(model, x[:8], y[:8])  # warm-up
    gradient_moments(model, F.cross_entropy, [(x[:8], y[:8])])  # warm-up of the library default
    vmap_s, loop_s, ident_s = [], [], []
    moments = ref = None
    for r in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        moments = gradient_moments(model, F.cross_entropy, batches, chunk_size=best, method="vmap")
        _sync(device)
        vmap_s.append((time.perf_counter() - t0) / len(y))
        t0 = time.perf_counter()
        ref = loop_moments(model, x, y)
        _sync(device)
        loop_s.append((time.perf_counter() - t0) / len(y))
        print(
            f"  repeat {r}: gradient_moments {vmap_s[-1] * 1e3:.3f} ms/example, "
            f"loop {loop_s[-1] * 1e3:.3f} ms/example (loop total {loop_s[-1] * len(y):.1f} s; "
            f"load average {os.getloadavg()[0]:.2f})"
        )
    default = None
    for _ in range(args.repeats):  # the library default: the layer identity for an all-Linear model
        t0 = time.perf_counter()
        default = gradient_moments(model, F.cross_entropy, batches)
        _sync(device)
        ident_s.append((time.perf_counter() - t0) / len(y))
    n = len(y)
    ref_grad, ref_sq = ref
    ref_trace = ref_sq / n - float((ref_grad / n).square().sum())
    ident_trace = noise_statistics(default).noise_trace
    ident_diff = abs(ident_trace - ref_trace) / ref_trace
    result = noise_statistics(moments)
    trace_diff = abs(result.noise_trace - ref_trace) / ref_trace
    grad_diff = float((moments.sum_grad.cpu() - ref_grad.cpu()).norm() / ref_grad.cpu().norm())
    ratio = min(loop_s) / min(vmap_s)
    default_ratio = min(loop_s) / min(ident_s)
    verdict = "met" if default_ratio >= TARGET_SPEEDUP else "NOT met"
    print(
        f"  method='vmap', chunk_size {best}: {min(vmap_s) * 1e3:.3f} ms/example, loop {min(loop_s) * 1e3:.3f} "
        f"ms/example: {ratio:.2f}×"
    )
    print(
        f"  tr(Σ) {result.noise_trace:.6g} vs loop {ref_trace:.6g}: relative difference {trace_diff:.2e}; "
        f"Σg relative difference {grad_diff:.2e}; noise scale {result.noise_scale:.4g}"
    )
    print(
        f"  library default (method={default.method!r}): {min(ident_s) * 1e3:.4f} ms/example, "
        f"{default_ratio:.1f}× the loop (target ≥ {TARGET_SPEEDUP:g}×: {verdict}); "
        f"tr(Σ) relative difference {ident_diff:.2e}"
    )
    return {
        "threads": threads,
        "load_average_1min": os.getloadavg()[0],
        "chunk_sweep": tuning,
        "chunk_size": best,
        "default_chunk_size": auto,
        "fastest_chunk_size": fastest,
        "vmap_s_per_example": min(vmap_s),
        "loop_s_per_example": min(loop_s),
        "vmap_s_per_example_all": vmap_s,
        "loop_s_per_example_all": loop_s,
        "speedup": ratio,
        "target_met": default_ratio >= TARGET_SPEEDUP,
        "default_method": default.method,
        "noise_trace": result.noise_trace,
        "noise_trace_loop": ref_trace,
        "noise_trace_rel_diff": trace_diff,
        "sum_grad_rel_diff": grad_diff,
        "noise_scale": result.noise_scale,
        "default_s_per_example": min(ident_s),
        "default_speedup": default_ratio,
        "default_trace_rel_diff": ident_diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=8192, help="examples compared (loop ≥ 10 s on 1 CPU thread)")
    ap.add_argument("--sweep-examples", type=int, default=512, help="examples per chunk-size trial")
    ap.add_argument("--chunk-sizes", default="4,7,8,16,32,64,128", help="chunk sizes to time on the sweep examples")
    ap.add_argument("--chunk-size", type=int, default=0, help="chunk size of the comparison (0: default_chunk_size())")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    model, x, y = build(args.examples, device)
    dim = sum(p.numel() for p in model.parameters())
    print(f"# wide_mlp(): {dim:,} parameters, float32; {args.examples} digits examples; device {device}")
    print(f"# machine: {machine()}; torch {torch.__version__}; load average {os.getloadavg()}")
    runs = [run(int(t), args, model, x, y, device) for t in args.threads.split(",")]
    ok = all(max(r["noise_trace_rel_diff"], r["default_trace_rel_diff"]) < AGREEMENT for r in runs)
    print(f"\nagreement (tr(Σ) relative difference < {AGREEMENT:g}): {'ok' if ok else 'FAILED'}")
    if args.json:
        record = {
            "machine": machine(),
            "torch": torch.__version__,
            "device": str(device),
            "num_parameters": dim,
            "num_examples": args.examples,
            "target": TARGET_SPEEDUP,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
