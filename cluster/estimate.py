"""Size and memory of a job, estimated before any worker starts.

The parameter count comes from the first checkpoint's headers without loading a
tensor: a safetensors header (8-byte length, then JSON with dtypes and shapes), the
headers of every shard of a sharded index, or — for a PyTorch file, whose format
needs unpickling to be read — the file size. Per worker the estimate adds:

- parameters in the job's precision (all of them for data parallelism; a
  pipeline stage holds about ``1/stages``);
- the largest vector working set of the spec's probes (the Lanczos basis: ``runs
  × (steps + 1)`` vectors for ``spectrum``, ``max_steps`` or ``min(dim, 300)`` for
  ``eigenvalues``, blocks of 16 probes for ``trace``) over the worker's slice of
  the parameter vector, plus the gathered block of full vectors a data-parallel
  product needs;
- the autograd graphs kept between products (``graph_memory_bytes``, 2 GiB by
  default; the operator measures and caps them).

A job whose workers on this host would need more than the host has available
(``MemAvailable``) fails up front with the numbers and what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cluster.checkpoints import SAFETENSORS_ITEMSIZE, is_index, safetensors_header, shard_files

__all__ = ["Estimate", "checkpoint_parameters", "estimate", "available_memory_bytes", "ResourceError"]

PRECISION_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GRAPH_BUDGET_BYTES = 2 << 30


class ResourceError(RuntimeError):
    """The job cannot fit the machine it would run on; the message gives the numbers and the fix."""


def checkpoint_parameters(path: str | os.PathLike) -> tuple[int, int, str]:
    """``(numel, bytes, how)`` of a checkpoint's tensors, read from headers only.

    ``how`` says what the figure rests on (``"header"``, or ``"file size"`` for a
    PyTorch file, whose element count is then unknown: ``numel`` is -1).
    """
    path = Path(path)
    files = [path]
    if is_index(path):
        files = shard_files(path)
    numel = nbytes = 0
    for f in files:
        if f.suffix != ".safetensors":
            return -1, sum(p.stat().st_size for p in files), "file size"
        for name, info in safetensors_header(f)[0].items():
            if name == "__metadata__" or name.startswith("optimizer."):
                continue
            n = math.prod(info["shape"])
            numel += n
            nbytes += n * SAFETENSORS_ITEMSIZE.get(info["dtype"], 4)
    return numel, nbytes, "header"


def available_memory_bytes() -> int:
    """``MemAvailable`` of this host (Linux), else total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Estimate:
    parameters: int
    checkpoint_bytes: int
    how: str
    param_bytes_per_worker: int
    vector_bytes_per_worker: int
    graph_bytes_per_worker: int
    workers_here: int
    available_bytes: int

    @property
    def per_worker_bytes(self) -> int:
        return self.param_bytes_per_worker + self.vector_bytes_per_worker + self.graph_bytes_per_worker

    @property
    def here_bytes(self) -> int:
        return self.per_worker_bytes * self.workers_here

    def summary(self) -> str:
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        count = f"{self.parameters:,} parameters" if self.parameters >= 0 else "an unknown number of parameters"
        return (f"size: {count} ({gb(self.checkpoint_bytes)} in the checkpoint, from its {self.how}); per worker: "
                f"parameters {gb(self.param_bytes_per_worker)}, vectors {gb(self.vector_bytes_per_worker)}, "
                f"graphs ≤ {gb(self.graph_bytes_per_worker)} = {gb(self.per_worker_bytes)}; "
                f"{self.workers_here} worker(s) on this host need {gb(self.here_bytes)} of {gb(self.available_bytes)} available")


def _vectors(spec, dim: int) -> int:
    """The largest number of parameter-length vectors a probe of ``spec`` keeps at once."""
    most = 4
    for p in spec.probes:
        o = p.resolved()
        if p.kind == "spectrum":
            most = max(most, o["runs"] * (o["steps"] + 1) if o["reorth"] != "none" else 3 * o["runs"])
        elif p.kind in ("eigenvalues", "critical", "eos", "sharpness"):
            steps = o.get("max_steps") or min(dim, 300)
            most = max(most, steps + 1)
        elif p.kind == "trace":
            most = max(most, 3 * 16)
        elif p.kind == "pacbayes":
            most = max(most, 2 * 16)
    return most


def estimate(spec, checkpoint: str, *, workers_here: int) -> Estimate:
    """The memory estimate of ``spec`` on ``checkpoint`` with ``workers_here`` workers on this host."""
    numel, nbytes, how = checkpoint_parameters(checkpoint)
    stages = getattr(spec.cluster, "stages", 1) or 1
    group = spec.cluster.group_size or spec.cluster.num_workers
    itemsize = PRECISION_BYTES.get(spec.precision, 4)
    dim = numel if numel >= 0 else nbytes // 4
    params = dim * itemsize // stages
    shard = dim // (stages if stages > 1 else group)
    vectors = _vectors(spec, dim) * shard * itemsize + (16 * dim * itemsize if group > 1 and stages == 1 else 0)
    return Estimate(numel, nbytes, how, params, vectors, GRAPH_BUDGET_BYTES, workers_here, available_memory_bytes())


def check_fits(est: Estimate) -> None:
    """Raise :class:`ResourceError` when the workers on this host cannot fit its available memory."""
    if est.here_bytes > est.available_bytes:
        raise ResourceError(
            f"the job needs about {est.here_bytes / 1e9:.1f} GB on this host but {est.available_bytes / 1e9:.1f} GB "
            f"is available ({est.summary()}); use more workers or pipeline stages on more hosts, fewer SLQ runs or "
            "steps, spectrum reorth: none, or float32"
        )
