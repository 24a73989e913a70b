"""The SPMD worker: one per GPU (or CPU slot), the same class in-process, under
``torch.multiprocessing`` or as a Ray actor.

A worker builds the model from the user's factory, loads each checkpoint itself
(nothing large passes through the driver), takes its index shard of the fixed
probe set, joins a ``torch.distributed`` group (gloo on CPU, NCCL on GPU) and
runs probes against a :class:`~cluster.distributed.ShardedOperator`, in lockstep
with its peers. Methods return only small records.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import default_collate

from cluster.checkpoints import checkpoint_sha256, load_checkpoint
from cluster.distributed import ShardedEvaluator, ShardedOperator
from cluster.errors import NonFiniteError
from cluster.hf import load_state_into
from cluster.pipeline import PipelineHessian, grid_groups
from cluster.probe_data import Shard, probe_subset
from cluster.progress_worker import ProgressClient, TaskProgress
from cluster.runners import ProbeContext, run_probe, task_seed
from cluster.spec import SpecError, import_factory, parse_spec
from cluster.stage_loading import check_finite, factory_stage, hf_stage
from probe.batches import batch_size_of, split_batch, token_count
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator

__all__ = ["ProbeWorker", "Shard", "probe_subset", "build_loss", "task_seed", "worker_device"]

# bfloat16, float16: the model and its products in that format; operators and evaluators keep vectors
# in float32 (or the spec's vector_dtype); float16 products at a loss scale (probe.loss_scale).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIMIZER_PREFIX = "optimizer."


class _RayWorkerMetrics:
    """A worker's own metrics through ``ray.util.metrics``: each node's Ray metrics agent
    exports them (``ray_landscape_probe_worker_hvps_total``, ``ray_landscape_probe_worker_task_seconds``) on
    the node's metrics export port, with Ray's worker and node labels added."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        from cluster.metrics import DURATION_BUCKETS_S

        tags = ("job_name", "kind")
        self.hvps = Counter(
            "landscape_probe_worker_hvps",
            description="Hessian-vector products this worker took part in.",
            tag_keys=tags,
        )
        self.seconds = Histogram(
            "landscape_probe_worker_task_seconds",
            description="Wall time of probe tasks on this worker.",
            boundaries=list(DURATION_BUCKETS_S),
            tag_keys=tags,
        )

    def products(self, job_name: str, kind: str, num_matvecs: int) -> None:
        """Count products as they happen (the task's progress hook reports them in batches)."""
        if num_matvecs > 0:
            self.hvps.inc(float(num_matvecs), tags={"job_name": job_name, "kind": kind})

    def record(self, job_name: str, kind: str, num_matvecs: int, duration_s: float) -> None:
        """A finished task: its products not yet counted, and its wall time."""
        self.products(job_name, kind, num_matvecs)
        self.seconds.observe(duration_s, tags={"job_name": job_name, "kind": kind})


def _ray_worker_metrics() -> _RayWorkerMetrics | None:
    """Metrics for a worker running as a Ray actor; None in-process, under
    torch.multiprocessing, or where Ray is not installed (the worker runs without it)."""
    import sys

    if "ray" not in sys.modules:  # a Ray actor has imported ray before it builds us
        return None
    import ray

    try:
        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return None
    except Exception:  # noqa: BLE001 - no runtime context: not a Ray worker
        return None
    return _RayWorkerMetrics()


def build_loss(loss: str | dict):
    """The loss callable named by a spec's ``loss`` entry (mean reduction)."""
    if loss == "cross_entropy":
        return F.cross_entropy
    if loss == "mse":
        return F.mse_loss
    if loss in ("lm_cross_entropy", "causal_lm"):  # causal_lm's labels are shifted with the data (probe_subset)
        from probe.gpt import lm_loss

        return lm_loss
    if loss == "model":
        from probe.batches import model_loss

        return model_loss
    if isinstance(loss, str):  # the spec rejects unknown names; this guards direct callers
        raise ValueError(f"unknown loss {loss!r}; give a loss name or {{factory: 'pkg.module:callable'}}")
    factory = import_factory(loss["factory"], key="loss.factory")
    return factory(**loss.get("kwargs", {}))


def worker_device(
    rank: int, local_rank: int, gpus_per_worker: float, cuda_available: bool, device_count: int
) -> torch.device:
    """The device of worker ``rank``: ``cuda:(local_rank mod device_count)`` when the spec asks
    for GPUs and CUDA has any, else the CPU.

    ``local_rank`` is the worker's index among the workers of its host: under
    ``torch.multiprocessing`` every rank is on this host (``local_rank = rank``), so ranks
    0..N-1 take devices 0..N-1 (NCCL refuses two ranks on one device); under Ray each actor
    sees only the GPUs Ray assigned it (``CUDA_VISIBLE_DEVICES``), so its group passes
    ``local_rank = 0``. ``rank`` names the worker in the message only.

    Raises:
        ValueError: for a negative ``local_rank``.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank of worker {rank} must be >= 0, got local_rank={local_rank}")
    if gpus_per_worker > 0 and cuda_available and device_count > 0:
        return torch.device("cuda", local_rank % device_count)
    return torch.device("cpu")


class ProbeWorker:
    """One worker of a group.

    Args:
        spec: the job spec as plain data (``JobSpec.to_dict()``), so it crosses process boundaries.
        rank: this worker's rank in ``[0, world_size)``.
        world_size: workers in the group.
        local_rank: this worker's index among the workers of its host, which picks its GPU
            (:func:`worker_device`); default ``rank`` (every worker on one host, as under
            ``torch.multiprocessing``); Ray actors pass 0 (each sees only its own GPUs).
    """

    def __init__(self, spec: dict, rank: int = 0, world_size: int = 1, local_rank: int | None = None) -> None:
        self.spec = parse_spec(spec)
        self.rank = rank
        self.world_size = world_size
        self.dtype = DTYPES[self._precision()]
        # one device per rank of this host (see worker_device); local_rank defaults to rank (one host)
        cuda = torch.cuda.is_available()
        self.device = worker_device(
            rank,
            rank if local_rank is None else local_rank,
            self.spec.cluster.gpus_per_worker,
            cuda,
            torch.cuda.device_count() if cuda else 0,
        )
        use_gpu = self.device.type == "cuda"
        if use_gpu:
            torch.cuda.set_device(self.device)  # NCCL's collectives run on the current device
        self.backend = "nccl" if use_gpu else "gloo"
        self.batches: list = []
        self.data_sha256 = ""
        self._ray_metrics = _ray_worker_metrics()
        self._progress: TaskProgress | None = None  # the running task's progress hook (see run())
        # pipeline: this worker's place on the grid of stages × data replicas (set up in setup())
        self.stages = self.spec.cluster.stages
        self.stage, self.replica, self.replicas = 0, rank, world_size
        self.pipe_ranks: list[int] = []
        self.pipe_group = self.data_group = None

    def _precision(self) -> str:
        """The spec's precision; ``auto`` (the driver resolves it before workers start) as the driver would."""
        if self.spec.precision != "auto":
            return self.spec.precision
        from cluster.checkpoints import expand_checkpoints
        from cluster.hf import resolve_precision

        hf = self.spec.model.hf is not None
        first = expand_checkpoints(self.spec.model.checkpoints)[0] if hf else None
        return resolve_precision("auto", hf, first)[0]

    def rendezvous(self) -> str:
        """A ``tcp://HOST:PORT`` address on this worker's host with a free port (called on rank 0)."""
        import socket

        host = os.environ.get("PROBE_RENDEZVOUS_HOST", "127.0.0.1")
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def setup(self, init_method: str | None = None) -> dict:
        """Join the group at ``init_method`` and prepare this worker's data shard; returns a small description.

        ``init_method`` (``tcp://HOST:PORT``, from rank 0's :meth:`rendezvous`) is
        ignored when ``world_size == 1``.
        """
        if self.world_size > 1 and not dist.is_initialized():
            if init_method and init_method.startswith("tcp://127.0.0.1"):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            dist.init_process_group(self.backend, init_method=init_method, rank=self.rank, world_size=self.world_size)
        if self.stages > 1:
            self.replicas = self.world_size // self.stages
            self.pipe_ranks, self.pipe_group, self.data_group, self.stage, self.replica = grid_groups(
                self.stages, self.replicas
            )
        probe = self.shard("probe")
        self.batches, self.total_examples, self.total_tokens, self.data_sha256 = probe
        self._eval_shards: dict[str, Shard] = {"probe": probe}
        self.loss_fn = build_loss(self.spec.loss)
        examples = sum(batch_size_of(split_batch(b)[1]) for b in self.batches)
        return {"rank": self.rank, "examples": examples, "device": str(self.device), "pid": os.getpid()}

    def shard(self, eval_set: str) -> Shard:
        """This worker's batches of a data set (collated by ``default_collate``: dict items give
        dict batches), the set's global counts and its hash."""
        if eval_set in getattr(self, "_eval_shards", {}):
            return self._eval_shards[eval_set]
        dataset, indices, sha = probe_subset(self.spec, eval_set)
        # data replicas split the set; the stages of one pipeline share their replica's part
        mine = (
            indices.tensor_split(self.replicas)[self.replica]
            if self.stages > 1
            else indices.tensor_split(self.world_size)[self.rank]
        )
        bs = self.spec.data.batch_size
        batches = [default_collate([dataset[i] for i in mine[j : j + bs].tolist()]) for j in range(0, len(mine), bs)]
        if self.spec.loss == "model":  # the model computes its own loss: it gets the labels with its inputs
            batches = [(dict(b), b["labels"]) if isinstance(b, dict) and "labels" in b else b for b in batches]
        tokens = None
        if self.spec.weighting == "tokens":  # over the whole set, not this shard: no collective needed
            tokens = sum(token_count(torch.as_tensor(split_batch(dataset[i])[1])) for i in indices.tolist())
        shard = Shard(batches, len(indices), tokens, sha)
        if hasattr(self, "_eval_shards"):
            self._eval_shards[eval_set] = shard
        return shard

    def _weighting(self, shard: Shard) -> dict:
        """Keyword arguments that weight a shard's batches as the spec says, by global counts."""
        if self.spec.weighting == "tokens":
            return {"weighting": "tokens", "total_tokens": shard.total_tokens}
        return {"total_examples": shard.total_examples}

    def evaluator(self, model: torch.nn.Module, eval_set: str = "probe"):
        """Loss/error evaluator on a data set (whole-set means, also when data-parallel)."""
        if self.stages > 1:
            raise SpecError(
                "loss evaluations need the whole model on each worker; they are not available with cluster.stages > 1"
            )
        shard = self.shard(eval_set)
        # train mode: every evaluation draws the same dropout masks (seeded per job and rank), so a
        # job is reproducible and differences between points are common-random-number differences
        extra = {
            "mode": self.spec.mode,
            "dropout_seed": self.spec.seed * 1_000_003 + self.rank,
            **self._weighting(shard),
        }
        if self.world_size > 1:
            return ShardedEvaluator(model, self.loss_fn, shard.batches, **extra)
        return Evaluator(model, self.loss_fn, shard.batches, **extra)

    def build_model(self, checkpoint: str) -> tuple[torch.nn.Module, dict]:
        """Model from the factory with the checkpoint's weights, in the spec's precision and on this device.

        ``checkpoint="init"`` gives the factory's initialization drawn from the job seed.

        Raises:
            CheckpointError: for missing or unexpected keys or shape mismatches, naming them.
        """
        if self.stages > 1:
            return self._build_stage(checkpoint)
        if self.spec.model.hf is not None:
            return self._build_hf(checkpoint)
        assert self.spec.model.factory is not None  # the spec gives a model either hf or factory
        factory = import_factory(self.spec.model.factory, key="model.factory")
        if checkpoint == "init":
            with torch.random.fork_rng():
                torch.manual_seed(self.spec.seed)
                model = factory(**self.spec.model.kwargs)
            return model.to(device=self.device, dtype=self.dtype), {}
        # In the spec's precision before loading: a float64 checkpoint keeps its digits in a float64 job
        # (loaded into the factory's float32 first, it would be rounded); float32 ones load exactly either way.
        model = factory(**self.spec.model.kwargs).to(dtype=self.dtype)
        state, meta = self._read(checkpoint)
        # tied parameters load from whichever of their names the file holds (see load_state_into)
        load_state_into(
            model,
            state,
            checkpoint,
            what=f"model.factory {self.spec.model.factory!r}",
            dtype=self.dtype,
            device=self.device,
        )
        return model.to(device=self.device, dtype=self.dtype), meta

    def _read(self, checkpoint: str, keys=None) -> tuple[dict, dict]:
        """A checkpoint's tensors (finite, checked; only ``keys`` when given) and metadata; optimizer
        state saved beside the weights (safetensors: ``optimizer.<field>.<param>``) is kept apart in the metadata."""
        state, meta = load_checkpoint(checkpoint, keys=keys)
        optimizer_tensors = {k: state.pop(k) for k in [k for k in state if k.startswith(OPTIMIZER_PREFIX)]}
        if optimizer_tensors:
            meta = {**meta, "_optimizer_tensors": optimizer_tensors}
        check_finite(state, checkpoint)
        return state, meta

    def _build_hf(self, checkpoint: str) -> tuple[torch.nn.Module, dict]:
        """A Hugging Face model built from the checkpoint's own config.json with its tensors (ties kept)."""
        from cluster.hf import build_hf_model, describe

        if checkpoint == "init":
            raise SpecError("checkpoint 'init' is not available with model.hf; give two checkpoint folders")
        state, meta = self._read(checkpoint)
        m = self.spec.model
        model = build_hf_model(
            checkpoint,
            state,
            hf_root=m.hf,
            hf_class=m.hf_class,
            attn_implementation=m.attn_implementation,
            dtype=self.dtype,
            device=self.device,
        )
        self.model_info = describe(model)
        return model, meta

    def _build_stage(self, checkpoint: str) -> tuple[torch.nn.Module, dict]:
        """This worker's pipeline stage (:mod:`cluster.stage_loading`): only its tensors are read."""
        if self.spec.model.hf is not None:
            part, layout, meta, self.model_info = hf_stage(
                self.spec, checkpoint, self.stages, self.stage, dtype=self.dtype, device=self.device, read=self._read
            )
        else:
            part, layout, meta = factory_stage(
                self.spec, checkpoint, self.stages, self.stage, dtype=self.dtype, device=self.device
            )
        self.stage_offset, self.stage_dim = layout.offset, layout.total_dim
        return part, meta

    def operator(self, model: torch.nn.Module):
        """The Hessian of the probe set's mean loss (over examples or tokens, as the spec weights it):
        a pipeline stage's, a parameter-sharded one's, or the whole model's (summed over data replicas);
        it carries the running task's progress hook (:mod:`probe.progress`)."""
        op = self._operator(model)
        if self._progress is not None:
            op.progress = self._progress
        return op

    def _operator(self, model: torch.nn.Module):
        c = self.spec.cluster
        if self.stages > 1:
            return PipelineHessian(
                model,
                self.loss_fn,
                self.batches,
                stage_index=self.stage,
                ranks=self.pipe_ranks,
                offset=self.stage_offset,
                dim=self.stage_dim,
                pipe_group=self.pipe_group,
                data_group=self.data_group,
                mode=self.spec.mode,
                schedule=c.schedule,
                micro_batches=c.micro_batches,
                **self._weighting(self._eval_shards["probe"]),
            )
        if self.parameter_sharded:
            from cluster.sharded_hvp import ShardedHessian

            return ShardedHessian(
                model, self.loss_fn, self.batches, mode=self.spec.mode, **self._weighting(self._eval_shards["probe"])
            )
        vectors = DTYPES[self.spec.vector_dtype] if self.spec.vector_dtype else None  # None: the operator's default
        loss_fn, head = self.loss_fn, self._chunked_head(model)
        if head is not None:
            from probe.lm_head import chunked_lm_loss

            loss_fn = chunked_lm_loss
        local = HessianOperator(
            model,
            loss_fn,
            self.batches,
            mode=self.spec.mode,
            accumulate_dtype=vectors,
            forward_context=head,
            **self._weighting(self._eval_shards["probe"]),
        )
        return ShardedOperator(local) if self.world_size > 1 else local

    def _chunked_head(self, model: torch.nn.Module):
        """For a Hugging Face causal LM under a built-in LM loss: the context that runs its head in
        token chunks (:mod:`probe.lm_head`: no tokens × vocabulary tensor beyond a few chunks), when
        the head allows it (a bias-free linear, logits not transformed); else None (the plain head)."""
        if self.spec.model.hf is None or self.spec.loss not in ("lm_cross_entropy", "causal_lm"):
            return None
        from probe.lm_head import CHUNKED_HEAD_CLASSES, check_chunkable, chunked_head

        # only where the model hands the head's output on untouched (OPT's forward, for one, calls
        # .contiguous() on the logits): the causal LMs whose forward was read and tested
        if not any(c.__name__ in CHUNKED_HEAD_CLASSES for c in type(model).__mro__):
            return None

        try:
            check_chunkable(model)
        except ValueError:
            return None
        return lambda: chunked_head(model)

    @property
    def parameter_sharded(self) -> bool:
        """Whether products run on parameter shards (cluster.shard_parameters over more than one worker)."""
        return self.spec.cluster.shard_parameters and self.world_size > 1

    def layout(self) -> str:
        """How this worker holds the model: ``replicated``, ``pipeline`` or ``parameter-sharded``."""
        if self.stages > 1:
            return f"pipeline {self.stages} stages x {self.replicas} replicas ({self.spec.cluster.schedule})"
        if self.parameter_sharded:
            return f"parameter-sharded over {self.world_size}"
        return "replicated" if self.world_size > 1 else "single"

    def run(self, task: dict) -> dict:
        """Run one task ``{checkpoint, kind, options, probe_index}`` (and ``progress``, where the
        driver listens: :meth:`cluster.progress.ProgressHub.channel`); returns the probe's record.

        Every worker of the group must call this with the same task (SPMD). While it runs, the
        task's products and Lanczos steps are counted as they happen: rank 0 sends them to the
        driver, every rank adds them to its Ray worker counter.
        """
        channel = task.get("progress") or {}
        client = ProgressClient(channel["address"], channel["authkey"]) if channel and self.rank == 0 else None
        self._progress = TaskProgress(
            client if client is not None else (lambda message: None),
            channel.get("task", ""),
            interval_s=float(channel.get("interval_s", 1.0)),
            on_products=None if (m := self._ray_metrics) is None else partial(m.products, self.spec.name, task["kind"]),
        )
        hook = self._progress
        try:
            record = self._run(task)
        finally:
            hook.flush()
            self._progress = None
            if client is not None:
                client.close()
        reported = hook.sent_products
        if self._ray_metrics is not None:
            rest = max(int(record.get("num_matvecs", 0) or 0) - reported, 0)  # not yet counted as they happened
            self._ray_metrics.record(self.spec.name, task["kind"], rest, record["duration_s"])
        return record

    def _run(self, task: dict) -> dict:
        t0 = time.perf_counter()
        model, meta = self.build_model(task["checkpoint"])
        if self.stages == 1 and task["checkpoint"] != "init":
            # a loss that is not finite at the checkpoint makes every probe meaningless: say so, naming it
            ev = self.evaluator(model)
            loss = ev.loss(ev.center())
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"non-finite loss ({loss}) at checkpoint {task['checkpoint']!r} on the probe set: check the "
                    "probe data for NaN/Inf and the loss function"
                )
        # before the probe: a parameter-sharded operator releases the model's parameters
        num_parameters = (
            self.stage_dim if self.stages > 1 else sum(p.numel() for p in model.parameters() if p.requires_grad)
        )
        ctx = ProbeContext(self, model, task["checkpoint"], meta)
        record = run_probe(task["kind"], ctx, task["options"], task_seed(self.spec.seed, task["probe_index"]))
        record["duration_s"] = time.perf_counter() - t0
        record["world_size"] = self.world_size
        record["num_parameters"] = num_parameters  # model.parameters() lists a tied tensor once
        record["hvp"] = self.spec.hvp
        record["layout"] = self.layout()
        record["lm_head"] = None  # not a Hugging Face language model under a built-in LM loss
        if self.spec.model.hf is not None and self.spec.loss in ("lm_cross_entropy", "causal_lm"):
            whole = self.stages == 1 and not self.parameter_sharded  # as operator() decides
            record["lm_head"] = "chunked" if whole and self._chunked_head(model) else "plain"
        record["attention"] = getattr(self, "model_info", {}).get("attention")
        record["checkpoint_metadata"] = {k: str(v) for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        return record

    def checkpoint_sha256(self, path: str) -> str:
        return checkpoint_sha256(path)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
