"""``mode: train`` through specs, workers and Parquet, on a BatchNorm MLP (deterministic in
train mode): the sharpness (Keskar, SAM), PAC-Bayes, critical and surface rows differ from
the ``mode: eval`` job's and equal direct train-mode computations (batch statistics), one
process and a 2-worker group agree, ``noise`` refuses BatchNorm in train mode with its
reason, and the pipeline Hessian honours the mode."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from cluster.data import digits_tensors
from cluster.job import run_job
from cluster.pipeline import PipelineHessian, build_stage, grid_groups
from cluster.spec import load_spec
from cluster.store import ResultStore
from cluster.worker import probe_subset, task_seed
from probe.critical import classify_critical_point
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator
from probe.pacbayes import pacbayes
from probe.sharpness import keskar_sharpness, sam_sharpness

FACTORY = "test_train_mode_jobs:bn_mlp"  # this module (tests/cluster is on sys.path, as compare.py is)
NUM_EXAMPLES, BATCH_SIZE, SEED = 100, 50, 3  # 2 workers form the same two batches of 50 as one process
PROBES = [
    {"kind": "sharpness", "measures": ["keskar", "sam"], "steps": 3},
    {"kind": "pacbayes", "samples": 4, "target": 0.05},
    {"kind": "critical", "runs": 2, "steps": 12},
    {"kind": "surface", "dims": 1, "resolution": 3},
    {"kind": "noise", "batch_size": 32},
]


def bn_mlp(hidden: int = 12) -> nn.Module:
    """Linear → BatchNorm1d → Tanh → Linear on the 64 digits features (the job's model factory)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bn_mlp whose running statistics are those of a few training batches (far from the
    probe batches' own statistics after a random affine), saved with its buffers."""
    torch.manual_seed(0)
    model = bn_mlp()
    x, _ = digits_tensors(split="test")
    model.train()
    with torch.no_grad():
        for start in range(0, 200, 50):
            model(x[start : start + 50] * 1.5 + 0.2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    path = tmp_path_factory.mktemp("bn") / "bn.safetensors"
    save_file(model.state_dict(), str(path), metadata={"lr": "0.1"})
    return path


def write_spec(folder, checkpoint, mode: str, workers: int):
    spec = {
        "name": f"bn-{mode}",
        "model": {"factory": FACTORY, "checkpoints": [str(checkpoint)]},
        "data": {"factory": "cluster.data:digits", "num_examples": NUM_EXAMPLES, "batch_size": BATCH_SIZE},
        "precision": "float64",
        "mode": mode,
        "probes": PROBES,
        "cluster": {"num_workers": workers},
        "output": {"path": str(folder / f"{mode}-{workers}")},
        "seed": SEED,
    }
    path = folder / f"{mode}-{workers}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint):
    folder = tmp_path_factory.mktemp("jobs")
    out = {}
    for mode, backend, workers in (("train", "local", 1), ("eval", "local", 1), ("train", "process", 2)):
        spec = write_spec(folder, checkpoint, mode, workers)
        summary = run_job(spec, backend=backend, progress=lambda m: None)
        out[mode, workers] = (spec, ResultStore(spec.output.path), summary)
    return out


def direct(spec, checkpoint):
    """The model in float64 with the checkpoint, and the job's probe batches."""
    from safetensors.torch import load_file

    model = bn_mlp().to(torch.float64)
    model.load_state_dict(load_file(str(checkpoint)))
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + BATCH_SIZE].tolist()])
        for j in range(0, len(indices), BATCH_SIZE)
    ]
    return model.eval(), [(x.to(torch.float64), y) for x, y in batches]


def train_loss_and_grad(model, batches):
    """``Σ_b (n_b/N) · CE`` with ``model.train()`` (batch statistics) and its gradient, by hand."""
    m = copy.deepcopy(model).train()
    loss = sum(x.shape[0] / NUM_EXAMPLES * F.cross_entropy(m(x), y) for x, y in batches)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m.parameters()))])
    return float(loss.detach()), grad


def test_train_job_rows_equal_direct_train_mode_computations(runs, checkpoint):
    spec, store, summary = runs["train", 1]
    # noise: per-example gradients of a BatchNorm model in train mode are refused, with the reason
    assert summary.num_done == 4 and summary.num_failed == 1
    (failure,) = store.read("failures").to_pylist()
    assert failure["kind"] == "noise" and "mode='train' is undefined" in failure["reason"]
    assert "BatchNorm" in failure["reason"] and "use mode='eval'" in failure["reason"]

    model, batches = direct(spec, checkpoint)
    hand_loss, hand_grad = train_loss_and_grad(model, batches)
    ev = Evaluator(model, F.cross_entropy, batches, mode="train", total_examples=NUM_EXAMPLES)
    assert ev.loss(ev.center()) == pytest.approx(hand_loss, rel=1e-13)

    rows = {(r["measure"], r["steps"]): r for r in store.read("sharpness").to_pylist()}
    g = torch.Generator().manual_seed(task_seed(SEED, 0))  # the runner's one stream, measures in order
    keskar = keskar_sharpness(ev, epsilon=1e-3, steps=3, generator=g)
    sam1 = sam_sharpness(ev, rho=0.05, steps=1, generator=g)  # the runner's one-step SAM row
    sam = sam_sharpness(ev, rho=0.05, steps=3, generator=g)
    assert rows["sam", 1]["value"] == pytest.approx(sam1.value, rel=1e-9)
    rows = {"keskar": rows["keskar", 3], "sam": rows["sam", 3]}
    for r, want in ((rows["keskar"], keskar), (rows["sam"], sam)):
        assert r["mode"] == "train"
        assert r["base_loss"] == pytest.approx(hand_loss, rel=1e-13)
        assert r["value"] == pytest.approx(want.value, rel=1e-9)
        assert r["perturbed_loss"] == pytest.approx(want.perturbed_loss, rel=1e-12)

    (pb,) = store.read("pacbayes").to_pylist()
    want = pacbayes(ev, target=0.05, samples=4, generator=torch.Generator().manual_seed(task_seed(SEED, 1)))
    assert pb["base_loss"] == pytest.approx(hand_loss, rel=1e-13)
    assert pb["sigma"] == pytest.approx(want.sigma, rel=1e-10) and pb["kl"] == pytest.approx(want.kl, rel=1e-10)

    (crit,) = store.read("critical").to_pylist()
    op = HessianOperator(model, F.cross_entropy, batches, mode="train")
    want = classify_critical_point(
        op, hand_grad, runs=2, steps=12, generator=torch.Generator().manual_seed(task_seed(SEED, 2))
    )
    assert crit["grad_norm"] == pytest.approx(float(hand_grad.norm()), rel=1e-12)  # the train-mode gradient
    assert crit["lambda_max"] == pytest.approx(want.lambda_max, rel=1e-9)
    assert crit["lambda_min"] == pytest.approx(want.lambda_min, rel=1e-8, abs=1e-10)

    (surf,) = store.read("surface").to_pylist()
    assert surf["mode"] == "train" and surf["loss"][1] == pytest.approx(hand_loss, rel=1e-13)  # the grid's center


def test_train_rows_differ_from_eval_rows(runs):
    (_, train, _), (_, evals, summary) = runs["train", 1], runs["eval", 1]
    assert summary.num_done == 5 and summary.num_failed == 0  # eval mode: noise runs on running statistics
    for kind, cols in (
        ("sharpness", ("base_loss", "value")),
        ("pacbayes", ("base_loss", "sigma")),
        ("critical", ("grad_norm", "lambda_max")),
        ("surface", ("loss",)),
    ):
        t_rows, e_rows = train.read(kind).to_pylist(), evals.read(kind).to_pylist()
        assert {r["mode"] for r in t_rows} == {"train"} and {r["mode"] for r in e_rows} <= {"eval", "eval+bn_recompute"}
        for t, e in zip(sorted(t_rows, key=str), sorted(e_rows, key=str), strict=True):
            for c in cols:
                a, b = t[c], e[c]
                if isinstance(a, list):
                    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-3, (kind, c)
                else:
                    assert abs(a - b) > 1e-4 * max(abs(b), 1e-12), (kind, c, a, b)


def test_two_workers_agree_with_one_process_in_train_mode(runs):
    """Each worker's shard is one of the single process's two batches: the same train-mode loss."""
    (_, one, _), (_, two, summary) = runs["train", 1], runs["train", 2]
    assert summary.num_done == 4 and summary.num_failed == 1
    for kind, cols in (
        ("sharpness", ("base_loss", "value", "perturbed_loss")),
        ("pacbayes", ("base_loss", "sigma")),
        ("critical", ("grad_norm", "lambda_max")),
    ):
        a = sorted(one.read(kind).to_pylist(), key=lambda r: str(r.get("measure")))
        b = sorted(two.read(kind).to_pylist(), key=lambda r: str(r.get("measure")))
        assert {r["world_size"] for r in b} == {2}
        for r1, r2 in zip(a, b, strict=True):
            for c in cols:
                assert r2[c] == pytest.approx(r1[c], rel=1e-9), (kind, c)


# --------------------------------------------------------------------------- the pipeline Hessian in train mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_worker(rank: int, world: int, port: int, out: str, V: torch.Tensor, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks, pipe, data_group, stage, _ = grid_groups(world, 1)
        model, batches = _pipeline_model(), _pipeline_batches()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        part, offset, dim = build_stage(model, world, stage)
        op = PipelineHessian(
            part,
            F.cross_entropy,
            batches,
            stage_index=stage,
            ranks=ranks,
            offset=offset,
            dim=dim,
            total_examples=30,
            pipe_group=pipe,
            data_group=data_group,
            mode=mode,
        )
        hv = op.matmat(V[op.local_slice].contiguous())
        hv2 = op.matmat(V[op.local_slice].contiguous())
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        torch.save(
            {"slice": (offset, offset + op.local_dim), "hv": hv, "hv2": hv2, "unchanged": unchanged},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def _pipeline_model() -> nn.Sequential:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def _pipeline_batches():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    return [(x[:12], y[:12]), (x[12:22], y[12:22]), (x[22:], y[22:])]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pipeline_hessian_honours_the_mode(tmp_path, mode):
    model, batches = _pipeline_model(), _pipeline_batches()
    op = HessianOperator(model, F.cross_entropy, batches, mode=mode)
    other = HessianOperator(model, F.cross_entropy, batches, mode="eval" if mode == "train" else "train")
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want, wrong = op.matmat(V), other.matmat(V)
    assert float((want - wrong).abs().max()) > 1e-3 * float(want.abs().max())
    mp.set_forkserver_preload(["torch", "cluster.pipeline"])
    mp.start_processes(
        _pipeline_worker, args=(2, _free_port(), str(tmp_path), V, mode), nprocs=2, join=True, start_method="forkserver"
    )
    parts = sorted((torch.load(tmp_path / f"rank{r}.pt") for r in range(2)), key=lambda p: p["slice"])
    got = torch.cat([p["hv"] for p in parts])
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))
    assert torch.equal(got, torch.cat([p["hv2"] for p in parts]))
    assert all(p["unchanged"] for p in parts)  # running statistics restored on every stage
