"""Size and memory of a job, estimated before any worker starts.

The parameter count comes from the first checkpoint's headers without loading a
tensor: a safetensors header (8-byte length, then JSON with dtypes and shapes), the
headers of every shard of a sharded index, or — for a PyTorch file, whose format
needs unpickling to be read — the file size. Per worker (``D`` parameters, ``L =
D/W`` entries of each vector on one of ``W`` data-parallel workers, ``b_p`` bytes per
parameter in the job's precision, ``b_v`` per vector entry: float32 for 16-bit jobs)
the estimate counts what the run allocates, probe by probe, as configured:

- **parameters** ``D·b_p`` (a pipeline stage holds about ``1/stages``; a parameter-sharded worker reads
  the whole model before keeping its ``1/workers`` shard, so the whole is counted);
- **graphs**: the operator keeps each batch's first-order gradient graph while the
  bytes autograd saves fit ``graph_memory_bytes`` (2 GiB; none in train mode). A kept
  batch costs its saved activations plus its first-order gradients (``D·b_p``); the
  batches that do not fit are rebuilt, one at a time, at every product. The saved
  bytes are *measured* (:func:`graph_calibration`): the driver builds the model from
  its factory (initial weights, on the CPU, in the job's precision) and builds the
  graph of the first batch of worker 0's probe shard under saved-tensor hooks,
  counting tensors that are not parameters (parameters saved by the graph are
  already counted) and scaling by each batch's example count. Where the model cannot
  be built in the driver (more than a quarter of its available memory, a pipeline
  job, or a factory that fails) the whole budget is charged;
- **vectors**, the largest working set among the probes (they run one after another),
  each declared with its kind (``Kind.vectors`` in ``cluster/kinds/``):
  - ``eigenvalues``: ``m+1`` basis vectors of ``L`` entries, with ``m = max_steps`` or
    ``min(D, max(20k, 100))`` (:func:`probe.eigen.eigenvalues`), lowered to what
    ``basis_memory_bytes`` holds; plus the recurrence's vectors (4·L); on ``basis:
    host`` the basis is host memory and the device holds blocks of 8; on ``disk``
    neither does (the file's pages are the page cache's);
  - ``spectrum``/``critical``: ``runs × (steps+1)`` basis vectors likewise (none
    with ``reorth: none``, or where ``basis_memory_bytes`` makes SLQ drop them), plus
    4 recurrence vectors per run;
  - ``trace``: Hutch++ with ``m`` products keeps ``s = m/3`` sketch vectors ``S``,
    their orthonormalized image ``Q`` and ``AQ`` (a list of blocks and its
    concatenation): ``4s·L``; Hutchinson keeps a draw of 16 probes and its projection;
  - other kinds: a few vectors (as before: 2 × 16 for ``pacbayes``);
  - **the product** of a block of ``k`` columns (1 for ``eigenvalues``, ``runs`` for
    SLQ, 8 for ``trace``): ``k·D`` gathered input entries on ``W > 1`` workers
    (``ShardedOperator.gather``) and the output ``k·D·b_v`` (twice on ``W > 1``: the
    reduce-scatter sends a contiguous ``(D, k)`` copy of it); batched on CUDA, the
    per-parameter copy of the block and its gradients (``k·D·b_p`` each); on the CPU
    one backward per column from views of it: one column's gradients (``D·b_p``) and,
    as measured peaks show, about the block once more (``k·D·b_p``).

With ``gpus_per_worker > 0`` and CUDA here, parameters, graphs and device vectors are
compared with the GPU's total memory (``torch.cuda.get_device_properties``) and the
host bases with the host's ``MemAvailable``; otherwise everything is host memory. A
job that exceeds what is available fails up front with the numbers and what to
change. ``docs/benchmarks.md`` ("Memory estimate against measured peak") compares the
estimate with workers' measured peaks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.checkpoints import (
    SAFETENSORS_ITEMSIZE,
    is_index,
    safetensors_header,
    shard_files,
)
from cluster.errors import ProbeError
from cluster.kinds import KINDS, Sizes

__all__ = [
    "Estimate",
    "GraphCalibration",
    "ResourceError",
    "available_memory_bytes",
    "check_fits",
    "checkpoint_parameters",
    "device_memory_bytes",
    "estimate",
    "graph_calibration",
]

PRECISION_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
GRAPH_BUDGET_BYTES = 2 << 30


class ResourceError(ProbeError, RuntimeError):
    """The job cannot fit the machine it would run on; the message gives the numbers and the fix."""

    category = "placement"


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
            if not str(info.get("dtype", "F")).startswith(("F", "BF")):  # integer buffers (position ids)
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


def device_memory_bytes() -> int:
    """Total memory of this host's current CUDA device, 0 without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:  # noqa: BLE001 - no usable CUDA: the workers will run on the CPU
        pass
    return 0


@dataclass(frozen=True)
class Estimate:
    """Per-worker memory of a job, in bytes (see the module docstring for what each part counts).

    ``param_bytes_per_worker``, ``vector_bytes_per_worker`` and ``graph_bytes_per_worker`` are
    on the worker's device; ``host_bytes_per_worker`` is host memory a GPU worker keeps off it
    (``basis: host``). ``device`` is ``"cuda"`` when the device parts are compared with a GPU of
    ``device_total_bytes``, ``"cpu"`` when everything is host memory. ``probe_bytes`` holds each
    probe's vector working set (``"INDEX:KIND"``), ``graph_how`` what the graph figure rests on.
    """

    parameters: int
    checkpoint_bytes: int
    how: str
    param_bytes_per_worker: int
    vector_bytes_per_worker: int
    graph_bytes_per_worker: int
    workers_here: int
    available_bytes: int
    host_bytes_per_worker: int = 0
    device: str = "cpu"
    device_total_bytes: int = 0
    workers_per_device: int = 1
    probe_bytes: dict = field(default_factory=dict)
    graph_how: str = "budget"

    @property
    def device_bytes_per_worker(self) -> int:
        """Parameters, graphs and device vectors of one worker."""
        return self.param_bytes_per_worker + self.vector_bytes_per_worker + self.graph_bytes_per_worker

    @property
    def per_worker_bytes(self) -> int:
        """Everything one worker holds, device and host."""
        return self.device_bytes_per_worker + self.host_bytes_per_worker

    @property
    def here_bytes(self) -> int:
        """Host memory the workers on this host need (device parts too when they run on the CPU)."""
        per = self.host_bytes_per_worker if self.device == "cuda" else self.per_worker_bytes
        return per * self.workers_here

    @property
    def device_need_bytes(self) -> int:
        """GPU memory one device needs (0 for CPU workers)."""
        return self.device_bytes_per_worker * self.workers_per_device if self.device == "cuda" else 0

    def summary(self) -> str:
        def gb(b: float) -> str:
            return f"{b / 1e9:.2f} GB"

        count = f"{self.parameters:,} parameters" if self.parameters >= 0 else "an unknown number of parameters"
        graphs = f"graphs {gb(self.graph_bytes_per_worker)} ({self.graph_how})"
        host = f", host bases {gb(self.host_bytes_per_worker)}" if self.host_bytes_per_worker else ""
        where = ""
        if self.device == "cuda":
            where = f"; GPU needs {gb(self.device_need_bytes)} of {gb(self.device_total_bytes)}"
        return (
            f"size: {count} ({gb(self.checkpoint_bytes)} in the checkpoint, from its {self.how}); per worker: "
            f"parameters {gb(self.param_bytes_per_worker)}, vectors {gb(self.vector_bytes_per_worker)}, "
            f"{graphs}{host} = {gb(self.per_worker_bytes)}{where}; "
            f"{self.workers_here} worker(s) on this host need {gb(self.here_bytes)} "
            f"of {gb(self.available_bytes)} available"
        )


# ---------------------------------------------------------------- the graph, measured on one batch


@dataclass(frozen=True)
class GraphCalibration:
    """One batch's first-order gradient graph, measured in the driver.

    Attributes:
        saved_bytes: bytes autograd saved for the first batch that are not parameters.
        counted_bytes: what the operator's budget counts for it (:class:`probe.model_operator.SavedBytes`:
            every distinct saved storage, parameters included).
        batch_examples: examples in every batch of worker 0's probe shard (the first was measured).
    """

    saved_bytes: int
    counted_bytes: int
    batch_examples: tuple[int, ...]


def graph_calibration(spec, checkpoint: str, group: int) -> GraphCalibration:
    """Build the model (CPU, the job's precision) and the graph of worker 0's first probe batch,
    counting the bytes autograd saves with saved-tensor hooks."""
    import torch

    from cluster.worker import ProbeWorker, build_loss
    from probe.batches import batch_size_of, call_model, split_batch, weigh_batches
    from probe.model_operator import model_mode

    worker = ProbeWorker(spec.to_dict(), rank=0, world_size=group)
    worker.device = torch.device("cpu")
    batches = worker.shard("probe").batches
    sizes = tuple(batch_size_of(split_batch(b)[1]) for b in batches)
    model, _ = worker.build_model(checkpoint)
    loss_fn = build_loss(spec.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    ((x, y),) = weigh_batches(batches[:1], params[0].dtype, torch.device("cpu")).batches
    seen: set[tuple[int, int]] = set()
    totals = {"saved": 0, "counted": 0}

    def pack(t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            totals["counted"] += key[1]
            if key[0] not in param_storages:
                totals["saved"] += key[1]
        return t

    with model_mode(model, spec.mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(call_model(model, x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    del grads, loss, model
    return GraphCalibration(totals["saved"], totals["counted"], sizes)


def _graph_bytes(cal: GraphCalibration, param_bytes: int, budget: int) -> int:
    """Kept graphs (saved tensors and first-order gradients of each batch that fits ``budget``, as
    the operator decides with its own count) plus, when some do not fit, one rebuilt batch."""
    first = cal.batch_examples[0]
    kept_counted = kept = 0
    for n in cal.batch_examples:
        counted = cal.counted_bytes * n // first
        if kept_counted + counted > budget:
            break
        kept_counted += counted
        kept += 1
    per = [cal.saved_bytes * n // first + param_bytes for n in cal.batch_examples]
    total = sum(per[:kept])
    if kept < len(per):
        total += max(per[kept:])
    return total


# ---------------------------------------------------------------- the probes' vectors


def _product_bytes(k: int, dim: int, local: int, bp: int, bv: int, world: int, batched: bool) -> int:
    """Peak of one product of a block of ``k`` columns beyond its input (see the module docstring)."""
    if batched or k == 1:  # one backward for the block, from per-parameter copies of it
        unflatten = k * dim * bp if (k > 1 or bp != bv) else 0
        grads = k * dim * bp
    else:  # one backward per column, from views of it, written into its output row; measured peaks
        # still hold about the block once more (autograd makes the strided views contiguous per
        # parameter, and the allocator keeps what the columns freed), so it is counted once
        unflatten = k * dim * bp
        grads = dim * bp
    out = k * dim * bv
    if world > 1 and k > 1:  # the reduce-scatter sends a (D, k) contiguous copy of the (k, D) product
        out *= 2
    gathered = k * dim * bv if world > 1 else 0
    return gathered + unflatten + grads + out


def _probe_bytes(
    p, dim: int, local: int, bp: int, bv: int, world: int, on_cuda: bool, symmetry_default: bool
) -> tuple[int, int]:
    """``(device, host)`` bytes of one probe's vectors and products: its kind's working set
    (:attr:`cluster.kinds.Kind.vectors`), its Lanczos basis placed where ``basis`` says, and the
    symmetry check's two products for a kind that takes it."""
    o = p.resolved()
    kind = KINDS[p.kind]

    def product(k: int) -> int:
        return _product_bytes(k, dim, local, bp, bv, world, batched=on_cuda)

    work = kind.vectors(o, Sizes(dim=dim, local=local, bp=bp, bv=bv, product=product))
    device = host = 0
    if work.per_run:
        where = o.get("basis", "device")
        basis = work.runs * work.per_run * local * bv
        if where == "device":
            device += basis
        else:
            if on_cuda:  # projections copy blocks of 8 vectors per run to the GPU (on the CPU they are views)
                device += work.runs * min(8, work.per_run) * local * bv
            if where == "host":
                host += basis  # (basis: disk lives in a file: page cache, not the worker's memory)
    device += work.device
    check = o.get("symmetry_check", None)
    if kind.uses_hessian and (check or (check is None and symmetry_default)):
        device = max(device, 2 * local * bv + product(2))
    return device, host


def _largest_stage(spec, checkpoint: str) -> int | None:
    """The parameters (owned and borrowed) of the largest pipeline stage, from the model built on the
    meta device as the workers cut it; None when it cannot be built here (the workers will say why)."""
    import torch

    from cluster.pipeline_layout import stage_layout

    try:
        m = spec.model
        if m.hf is not None:
            from cluster.hf import config_path, hf_skeleton
            from cluster.hf_stages import pipeline_pieces

            model = pipeline_pieces(hf_skeleton(config_path(checkpoint, m.hf), m.hf_class, m.attn_implementation))
        else:
            from cluster.spec import import_factory

            with torch.device("meta"):
                model = import_factory(m.factory, key="model.factory")(**m.kwargs)
        layouts = stage_layout(model, spec.cluster.stages, spec.cluster.balance)
    except Exception:  # noqa: BLE001 - an estimate; the workers report a model that does not build
        return None
    return max(s.dim + sum(b.numel for b in s.borrowed) for s in layouts)


def estimate(spec, checkpoint: str, *, workers_here: int, calibrate: bool = True) -> Estimate:
    """The memory estimate of ``spec`` on ``checkpoint`` with ``workers_here`` workers on this host.

    ``calibrate=False`` skips measuring the graph (the whole ``graph_memory_bytes`` budget is charged).
    """
    numel, nbytes, how = checkpoint_parameters(checkpoint)
    stages = getattr(spec.cluster, "stages", 1) or 1
    group = spec.cluster.group_size or spec.cluster.num_workers
    bp = PRECISION_BYTES.get(spec.precision, 4)
    bv = 8 if getattr(spec, "vector_dtype", None) == "float64" else max(bp, 4)  # vectors: float32 or wider
    dim = numel if numel >= 0 else nbytes // 4
    sharded = bool(getattr(spec.cluster, "shard_parameters", False)) and group > 1
    params = dim * bp // stages
    largest = _largest_stage(spec, checkpoint) if stages > 1 else None
    if largest is not None:  # stages balanced by compute hold unequal parameters: count the largest
        params = largest * bp
    # a pipeline stage or a parameter shard applies its own slice: no gathered block
    world = group if stages == 1 and not sharded else 1
    local = dim // stages if stages > 1 else -(-dim // group)
    if sharded:  # the whole model is read before sharding: its parameters still count once at the peak
        params = dim * bp
    gpus = getattr(spec.cluster, "gpus_per_worker", 0) or 0
    device_total = device_memory_bytes() if gpus > 0 else 0
    on_cuda = device_total > 0
    stage_dim = local if sharded else dim // stages
    probe_bytes, host = {}, 0
    vectors = 0
    for i, p in enumerate(spec.probes):
        d, h = _probe_bytes(p, stage_dim, local, bp, bv, world, on_cuda, symmetry_default=spec.precision == "float64")
        probe_bytes[f"{i}:{p.kind}"] = d + (0 if on_cuda else h)
        vectors = max(vectors, d if on_cuda else d + h)
        host = max(host, h if on_cuda else 0)
    budget = GRAPH_BUDGET_BYTES
    graph, graph_how = budget, "the whole budget"
    if spec.mode == "train":
        graph_how = "train mode: rebuilt per product, the whole budget charged"
    elif calibrate and stages == 1 and dim * bp < available_memory_bytes() // 4:
        try:
            cal = graph_calibration(spec, checkpoint, group)
            graph = _graph_bytes(cal, params, budget)
            graph_how = f"measured on one batch: {cal.saved_bytes / 1e6:.1f} MB saved"
        except Exception as exc:  # noqa: BLE001 - the workers will report a model that does not build
            graph_how = f"the whole budget (not measured: {type(exc).__name__})"
    return Estimate(
        numel,
        nbytes,
        how,
        params,
        vectors,
        graph,
        workers_here,
        available_memory_bytes(),
        host_bytes_per_worker=host,
        device="cuda" if on_cuda else "cpu",
        device_total_bytes=device_total,
        workers_per_device=max(1, math.floor(1 / gpus)) if gpus > 0 else 1,
        probe_bytes=probe_bytes,
        graph_how=graph_how,
    )


def check_fits(est: Estimate) -> None:
    """Raise :class:`ResourceError` when the workers on this host cannot fit its available memory,
    or a GPU's workers its total memory."""
    if est.here_bytes > est.available_bytes:
        raise ResourceError(
            f"the job needs about {est.here_bytes / 1e9:.1f} GB on this host but {est.available_bytes / 1e9:.1f} GB "
            f"is available ({est.summary()}); use more workers or pipeline stages on more hosts, fewer SLQ runs or "
            "steps, spectrum reorth: none, basis: host or disk, fewer trace matvecs or trace method: hutchinson "
            "(16 vectors whatever the budget; the sketching methods keep matvecs/2 to 2·matvecs), or float32"
        )
    if est.device == "cuda" and est.device_need_bytes > est.device_total_bytes:
        raise ResourceError(
            f"the job needs about {est.device_need_bytes / 1e9:.1f} GB on each GPU but a GPU has "
            f"{est.device_total_bytes / 1e9:.1f} GB ({est.summary()}); use more workers or pipeline stages, "
            "basis: host or disk, fewer SLQ runs or steps, fewer trace matvecs or trace method: hutchinson, "
            "or bfloat16"
        )
