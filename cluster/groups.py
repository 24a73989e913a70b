"""Worker groups: N :class:`~cluster.worker.ProbeWorker` replicas that run tasks in lockstep.

- :class:`LocalGroup`: one worker in this process (``num_workers: 1``, no Ray).
- :class:`ProcessGroup`: N workers under ``torch.multiprocessing`` (no Ray; what a
  GPU machine without Ray runs).
- :class:`RayGroup`: N Ray actors placed through a placement group, one bundle per
  worker; fails fast, naming the resources, when the group cannot be placed.

Every group has ``run(task) -> record`` (rank 0's record) and ``close()``. A worker
that dies raises :class:`WorkerLost`, which the job driver answers by rebuilding
the group and re-running the task.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

from cluster.errors import ProbeError, TaskFailed, category_of
from cluster.worker import ProbeWorker

__all__ = ["WorkerLost", "PlacementError", "TaskError", "LocalGroup", "ProcessGroup", "RayGroup"]


class WorkerLost(ProbeError, RuntimeError):
    """A worker process died (killed, out of memory, node lost) while the group was busy."""

    category = "worker_lost"


class PlacementError(ProbeError, RuntimeError):
    """The cluster cannot place the requested workers; the message names the resources."""

    category = "placement"


# A task that failed inside a worker, carrying the category of the worker's error
# (cluster.errors.TaskFailed; the name the driver and tests have always used).
TaskError = TaskFailed


class LocalGroup:
    """One worker in the driver's process."""

    def __init__(self, spec: dict) -> None:
        self.worker = ProbeWorker(spec, 0, 1)
        self.info = [self.worker.setup()]

    def run(self, task: dict) -> dict:
        try:
            return self.worker.run(task)
        except Exception as exc:
            raise TaskError(str(exc), category=category_of(exc)) from exc

    def close(self) -> None:
        self.worker.shutdown()


def _process_main(spec: dict, rank: int, world_size: int, init_method: str, conn) -> None:
    # the workers share this host's cores: torch's default (every core per process) oversubscribes
    # them, and the collectives then wait on the slowest (measured: a 2-stage pipeline test on 2 cores
    # took 50 s with 2 threads per worker, 6.5 s with 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    worker = ProbeWorker(spec, rank, world_size)
    try:
        conn.send(("ok", worker.setup(init_method)))
        while (task := conn.recv()) is not None:
            try:
                conn.send(("ok", worker.run(task)))
            except Exception as exc:  # reported to the driver, which decides
                conn.send(("error", f"{exc}\n{traceback.format_exc(limit=3)}", category_of(exc)))
    finally:
        worker.shutdown()


class ProcessGroup:
    """N workers as spawned processes joined by ``torch.distributed`` on loopback."""

    def __init__(self, spec: dict, num_workers: int) -> None:
        ctx = mp.get_context("spawn")
        init_method = ProbeWorker(spec, 0, num_workers).rendezvous()
        self.conns, self.procs = [], []
        for rank in range(num_workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_process_main, args=(spec, rank, num_workers, init_method, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self.info = self._all()

    def _recv(self, conn) -> tuple[str, Any]:
        try:
            return conn.recv()
        except (EOFError, ConnectionError) as exc:
            raise WorkerLost("a worker process exited") from exc

    def _all(self) -> list[Any]:
        # Read every rank's reply before judging, so no reply is left in a pipe for the next task.
        replies = [self._recv(c) for c in self.conns]
        for status, payload, *category in replies:
            if status == "error":
                raise TaskError(payload.splitlines()[0], category=category[0] if category else "other")
        return [reply[1] for reply in replies]

    def run(self, task: dict) -> dict:
        for c in self.conns:
            c.send(task)
        return self._all()[0]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class RayGroup:
    """N Ray actors in one placement group, with a ``torch.distributed`` group among them.

    Args:
        spec: the job spec as plain data.
        num_workers: actors in the group.
        cpus_per_worker, gpus_per_worker: each bundle's resources.
        placement_timeout_s: how long to wait for the placement group before failing.
        name: prefix of the actors' names (``<name>-rank<r>``), so operators and
            tests can find them with ``ray.get_actor``.

    Raises:
        PlacementError: when the bundles cannot be placed within the timeout; the
            message gives the request and what the cluster has.
    """

    def __init__(
        self,
        spec: dict,
        num_workers: int,
        *,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        placement_timeout_s: float = 60.0,
        name: str = "probe-worker",
    ) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        bundle = {"CPU": cpus_per_worker}
        if gpus_per_worker:
            bundle["GPU"] = gpus_per_worker
        self.pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
            raise PlacementError(
                f"cannot place {num_workers} worker(s) with {bundle} each within {placement_timeout_s:g} s; "
                f"the cluster has {have}; lower cluster.num_workers, cluster.cpus_per_worker or "
                f"cluster.gpus_per_worker, or add nodes"
            )
        remote_cls = ray.remote(ProbeWorker)
        self.actors = [
            remote_cls.options(
                name=f"{name}-rank{rank}",
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(spec, rank, num_workers, local_rank=0)  # Ray's GPU is device 0 of CUDA_VISIBLE_DEVICES
            for rank in range(num_workers)
        ]
        try:
            init_method = ray.get(self.actors[0].rendezvous.remote())
            self.info = ray.get([a.setup.remote(init_method) for a in self.actors])
        except RayActorError as exc:
            self.close()
            raise WorkerLost(f"a worker died during setup: {exc}") from exc
        except RayTaskError as exc:
            self.close()
            raise TaskError(
                str(exc.cause) if exc.cause else str(exc),
                category=category_of(exc.cause) if exc.cause is not None else "other",
            ) from exc

    def run(self, task: dict) -> dict:
        from ray.exceptions import RayActorError, RayTaskError

        ray = self._ray
        refs = [a.run.remote(task) for a in self.actors]
        results: dict[Any, dict] = {}
        pending = list(refs)
        # Collect results as they finish: a dead worker leaves its peers blocked in a
        # collective, so the first failure must be seen without waiting on the others.
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[done[0]] = ray.get(done[0])
            except RayActorError as exc:
                raise WorkerLost(f"worker died mid-task: {type(exc).__name__}") from exc
            except RayTaskError as exc:
                cause = exc.cause if exc.cause is not None else exc
                message = next(iter(str(cause).splitlines()), "") or type(cause).__name__
                # Peers that did not fail too may be blocked in a collective.
                _, still = ray.wait(pending, num_returns=len(pending), timeout=30) if pending else ([], [])
                raise TaskError(message, category=category_of(cause), group_usable=not still) from exc
        return results[refs[0]]

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                self._ray.kill(a)  # pyright: ignore[reportArgumentType]  # an actor handle, typed by Ray as a proxy
            except Exception:  # noqa: BLE001 - already dead
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass
