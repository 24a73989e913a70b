"""How fast the metrics endpoint answers a burst of scrapes (the timing half of
``tests/cluster/test_load.py``, which bounds counts, identity, memory and threads only).

A registry populated like a busy service's (five jobs × kinds × outcomes, histograms,
failure reasons) is served on loopback by ``cluster.metrics.serve``; ``--scrapes``
requests from ``--threads`` client threads are timed after a warm-up.

    python bench/bench_scrapes.py [--scrapes 1000] [--threads 8]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.metrics import FAILURE_REASONS, Metrics, serve  # noqa: E402

KINDS = ("eigenvalues", "trace", "spectrum", "eos", "sharpness", "barrier")


def populate(metrics: Metrics) -> None:
    for j, job in enumerate(("audit-a", "audit-b", "sweep-c", "lm-d", "loaded")):
        metrics.tasks_planned.labels(job_name=job).set(60)
        for i, kind in enumerate(KINDS):
            for n, outcome in enumerate(("succeeded", "failed", "skipped")):
                metrics.tasks.labels(job_name=job, kind=kind, outcome=outcome).inc(1 + i + n)
            metrics.hvps.labels(job_name=job, kind=kind).inc(100 * (i + 1))
            for d in (0.5, 3.0, 20.0, 400.0, 9000.0):
                metrics.duration.labels(job_name=job, kind=kind).observe(d * (1 + j))
        for reason in FAILURE_REASONS:
            metrics.failure(job, reason)
        metrics.lambda_max.labels(series=job).set(12.5 + j)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    metrics = Metrics()
    populate(metrics)
    server, thread = serve(metrics, port=0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def one(_: int) -> int:
        with urllib.request.urlopen(url, timeout=10) as response:
            return len(response.read())

    try:
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(one, range(50)))
            t0 = time.perf_counter()
            sizes = list(pool.map(one, range(args.scrapes)))
            elapsed = time.perf_counter() - t0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    print(
        f"{platform.processor() or platform.machine()}: {args.scrapes} scrapes of {sizes[0]} bytes from "
        f"{args.threads} threads in {elapsed:.2f} s ({args.scrapes / elapsed:.0f} scrapes/s, "
        f"{elapsed / args.scrapes * 1000:.1f} ms each)"
    )


if __name__ == "__main__":
    main()
