"""Which device each worker of a group takes (cluster.worker.worker_device), without a GPU."""

from __future__ import annotations

import pytest
import torch

from cluster.worker import worker_device


def test_ranks_of_one_host_take_one_device_each():
    # torch.multiprocessing: every rank on this host, local rank = rank; NCCL refuses two ranks on one device
    got = [worker_device(r, r, 1, True, 4) for r in range(4)]
    assert got == [torch.device("cuda", i) for i in range(4)]


def test_more_ranks_than_devices_wrap_around():
    assert [worker_device(r, r, 0.5, True, 2).index for r in range(4)] == [0, 1, 0, 1]


def test_a_ray_actor_takes_device_zero_of_its_visible_gpus():
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU: its group passes local_rank 0, one visible device
    assert worker_device(3, 0, 1, True, 1) == torch.device("cuda", 0)


@pytest.mark.parametrize("gpus_per_worker, cuda_available, device_count", [(0, True, 4), (1, False, 0), (1, True, 0)])
def test_cpu_when_no_gpu_is_asked_for_or_there(gpus_per_worker, cuda_available, device_count):
    assert worker_device(1, 1, gpus_per_worker, cuda_available, device_count) == torch.device("cpu")


def test_negative_local_rank_is_refused():
    with pytest.raises(ValueError, match="local_rank of worker 2 must be >= 0, got local_rank=-1"):
        worker_device(2, -1, 1, True, 4)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_process_workers_take_their_own_device(make_spec, monkeypatch, rank):
    """ProbeWorker under torch.multiprocessing (4 GPUs faked): rank r on cuda:r, not all on cuda:0."""
    from cluster.spec import load_spec
    from cluster.worker import ProbeWorker

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    spec = load_spec(make_spec(name="gpus", cluster={"num_workers": 4, "gpus_per_worker": 1})).to_dict()
    worker = ProbeWorker(spec, rank, 4)
    assert worker.device == torch.device("cuda", rank) and worker.backend == "nccl"
    assert current == [torch.device("cuda", rank)]  # NCCL's current device is the worker's own
    assert ProbeWorker(spec, rank, 4, local_rank=0).device == torch.device("cuda", 0)  # as a Ray actor
