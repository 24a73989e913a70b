"""Size and memory estimates from checkpoint headers, printed before work; jobs that cannot fit fail up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cluster.checkpoints import expand_checkpoints, save_sharded
from cluster.cli import main
from cluster.estimate import (
    Estimate,
    ResourceError,
    available_memory_bytes,
    check_fits,
    checkpoint_parameters,
    estimate,
)
from cluster.job import run_job
from cluster.spec import load_spec, parse_spec
from probe.gpt import gpt, gpt_num_parameters


def test_parameter_count_from_headers_equals_the_model(tmp_path):
    model = gpt(vocab=32, dim=16, layers=2, heads=2, max_len=8)
    n = sum(p.numel() for p in model.parameters())
    assert n == gpt_num_parameters(vocab=32, dim=16, layers=2, max_len=8)
    single = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(single))
    assert checkpoint_parameters(single) == (n, 4 * n, "header")
    index = save_sharded(model.state_dict(), tmp_path / "sharded", max_shard_bytes=10_000)
    assert checkpoint_parameters(index) == (n, 4 * n, "header")
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    count, size, how = checkpoint_parameters(pt)
    assert (count, how) == (-1, "file size") and size == pt.stat().st_size


def test_estimate_is_printed_and_grows_with_the_probe_plan(make_spec, checkpoints):
    messages = []
    spec = load_spec(make_spec(name="sized", probes=[{"kind": "trace", "matvecs": 12}]))
    run_job(spec, backend="local", progress=messages.append)
    (line,) = [m for m in messages if "size:" in m]
    n = checkpoint_parameters(checkpoints[0])[0]
    assert f"size: {n:,} parameters" in line and "1 worker(s) on this host" in line
    small = estimate(spec, str(checkpoints[0]), workers_here=1)
    big = estimate(
        load_spec(make_spec(name="big", probes=[{"kind": "spectrum", "runs": 50, "steps": 200, "deflate": 0}])),
        str(checkpoints[0]),
        workers_here=1,
    )
    assert big.vector_bytes_per_worker > 100 * small.vector_bytes_per_worker
    basis = 50 * 201 * n * 8  # float64 basis of every run
    # plus 4 recurrence vectors per run (200) and the 50-column product on the CPU (one backward per
    # column from views of it: one column's gradients, the block once more, the 50 output rows): 301
    assert big.vector_bytes_per_worker == basis + 301 * n * 8
    # deflate: auto (the default) holds the deflated vectors too, at most the first pass's 200 steps;
    # the first pass's basis (201 vectors) fits in the runs' slots
    deflated = estimate(
        load_spec(make_spec(name="defl", probes=[{"kind": "spectrum", "runs": 50, "steps": 200}])),
        str(checkpoints[0]),
        workers_here=1,
    )
    assert deflated.vector_bytes_per_worker == big.vector_bytes_per_worker + 200 * n * 8
    assert 0 < small.available_bytes == pytest.approx(available_memory_bytes(), rel=0.2)


def test_a_job_that_cannot_fit_fails_up_front_with_the_numbers(make_spec, capsys, tmp_path):
    # a spectrum whose bases alone exceed any host: 10^7 runs
    path = make_spec(name="huge", probes=[{"kind": "spectrum", "runs": 10_000_000, "steps": 80}])
    with pytest.raises(ResourceError, match=r"the job needs about [\d.]+ GB on this host but [\d.]+ GB is available"):
        run_job(load_spec(path), backend="local", progress=lambda m: None)
    assert not (tmp_path / "results").exists()  # nothing written
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("probe run: the job needs about") and "fewer SLQ runs" in err and err.count("\n") == 1
    assert "trace method: hutchinson" in err  # the trace estimator whose memory does not grow with its budget


# ---------------------------------------------------------------- what the estimate counts


def _spec(make_spec, probes, **cluster):
    return load_spec(make_spec(name="counted", probes=probes, cluster=cluster or None))


def test_eigenvalues_count_the_probes_own_step_cap_and_basis_store(make_spec, checkpoints):
    n = checkpoint_parameters(checkpoints[0])[0]  # 1,306: the default cap is min(n, max(20k, 100)) = 100
    ckpt = str(checkpoints[0])

    def vectors(**o):
        est = estimate(
            _spec(make_spec, [{"kind": "eigenvalues", "k": 1, "symmetry_check": False, **o}]),
            ckpt,
            workers_here=1,
            calibrate=False,
        )
        return est.vector_bytes_per_worker // (n * 8), est

    # 101 basis vectors, 4 of the recurrence, the product's gradient and output
    assert vectors()[0] == 101 + 4 + 2
    assert vectors(k=10)[0] == 201 + 4 + 2  # max(20k, 100) steps
    assert vectors(max_steps=6)[0] == 7 + 4 + 2
    assert vectors(basis_memory_bytes=21 * n * 8)[0] == 21 + 4 + 2  # lowered to what the budget holds
    assert vectors(basis="disk")[0] == 4 + 2  # in the file (on the CPU, blocks are views of its pages)
    count, host = vectors(basis="host")
    assert count == 101 + 4 + 2  # a CPU worker: host memory is its device memory
    assert host.device == "cpu" and host.host_bytes_per_worker == 0


def test_data_parallel_workers_hold_slices_and_gather_only_the_product_block(make_spec, checkpoints):
    n = checkpoint_parameters(checkpoints[0])[0]
    spec = _spec(make_spec, [{"kind": "eigenvalues", "k": 1, "max_steps": 9, "symmetry_check": False}], num_workers=2)
    est = estimate(spec, str(checkpoints[0]), workers_here=2, calibrate=False)
    # 10 basis + 4 recurrence vectors of n/2 entries; the gathered column, its gradient and output in full
    assert est.vector_bytes_per_worker == (14 * (n // 2) + 3 * n) * 8
    assert est.here_bytes == 2 * est.per_worker_bytes


def test_hutchpp_counts_its_sketch_and_its_blocks(make_spec, checkpoints):
    n = checkpoint_parameters(checkpoints[0])[0]
    spec = _spec(make_spec, [{"kind": "trace", "method": "hutch++", "matvecs": 60, "symmetry_check": False}])
    est = estimate(spec, str(checkpoints[0]), workers_here=1, calibrate=False)
    # S, Q, AQ (3 × 20), a draw of 16 probes, and a product of 8 columns (copy 8, gradients 16, output 8)
    assert est.vector_bytes_per_worker == (60 + 16 + 32) * n * 8


def test_graph_is_measured_on_one_batch_not_charged_as_the_budget(make_spec, checkpoints):
    spec = _spec(make_spec, [{"kind": "trace", "matvecs": 12}])
    est = estimate(spec, str(checkpoints[0]), workers_here=1)
    budget = estimate(spec, str(checkpoints[0]), workers_here=1, calibrate=False)
    assert budget.graph_bytes_per_worker == 2 << 30 and "budget" in budget.graph_how
    assert est.graph_how.startswith("measured on one batch")
    # 192 examples in batches of 50: 4 kept graphs, each its saved activations and first-order gradients
    n = checkpoint_parameters(checkpoints[0])[0]
    assert 4 * n * 8 < est.graph_bytes_per_worker < 4 * n * 8 + 4 * 50 * (64 + 16 + 10) * 8 * 4


def test_gpu_workers_are_compared_with_the_device_and_host_bases_with_the_host():
    common = {
        "parameters": 10,
        "checkpoint_bytes": 40,
        "how": "header",
        "param_bytes_per_worker": 4 << 30,
        "vector_bytes_per_worker": 8 << 30,
        "graph_bytes_per_worker": 1 << 30,
        "workers_here": 2,
        "available_bytes": 100 << 30,
        "device": "cuda",
        "workers_per_device": 1,
    }
    fits = Estimate(**common, host_bytes_per_worker=30 << 30, device_total_bytes=16 << 30)
    assert fits.here_bytes == 60 << 30 and fits.device_need_bytes == 13 << 30
    check_fits(fits)
    with pytest.raises(ResourceError, match=r"about 14.0 GB on each GPU but a GPU has 12.9 GB"):
        check_fits(Estimate(**common, device_total_bytes=12 << 30))
    with pytest.raises(ResourceError, match="on this host"):
        check_fits(Estimate(**common, host_bytes_per_worker=60 << 30, device_total_bytes=16 << 30))
    assert "GPU needs" in fits.summary() and "host bases" in fits.summary()


# ---------------------------------------------------------------- the estimate against measured peaks

BENCH = Path(__file__).resolve().parents[2] / "bench"
ROOT = BENCH.parent
GPT = {"vocab": 64, "dim": 256, "layers": 4, "heads": 4, "max_len": 16}
MEASURE = (
    "import json, sys; import bench_estimate as be; "
    "print('PEAKS', json.dumps(be.worker_peaks(json.loads(sys.argv[1]))))"
)


def _minilm_case(folder: Path) -> dict:
    import bench_estimate as be  # bench/ is on sys.path (the measured fixture puts it there)

    probes = [{"kind": "eigenvalues", "k": 1, "tol": 1e-3, "max_steps": 4}, {"kind": "trace", "matvecs": 6}]
    return be.minilm_spec(str(folder / "out-minilm"), probes=probes, num_examples=4, batch_size=4)


def _gpt_case(folder: Path) -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = gpt(**GPT).to(torch.float64)
    ckpt = folder / "gpt.safetensors"
    save_file(model.state_dict(), str(ckpt))
    return {
        "name": "gpt-estimate",
        "model": {"factory": "probe.gpt:gpt", "kwargs": GPT, "checkpoints": [str(ckpt)]},
        "data": {
            "factory": "cluster.data:tokens",
            "kwargs": {"num_sequences": 8, "seq_len": 16, "vocab": 64},
            "num_examples": 8,
            "batch_size": 8,
        },
        "loss": "lm_cross_entropy",
        "precision": "float64",  # the symmetry check's two-column product runs too
        "probes": [
            {"kind": "eigenvalues", "k": 1, "tol": 1e-3, "max_steps": 6},
            {"kind": "trace", "matvecs": 9},
            {"kind": "spectrum", "runs": 2, "steps": 4, "deflate": 0},  # deflated: an upper bound, test above
        ],
        "output": {"path": str(folder / "out-gpt")},
        "seed": 0,
    }


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Each case's spec and the measured peak RSS of a worker running its probes (a fresh process each,
    both at once), above the worker's resident size before its first model."""
    assert Path("/proc/self/status").exists(), "peak RSS is read from /proc (Linux)"
    sys.path.insert(0, str(BENCH))
    folder = tmp_path_factory.mktemp("estimate")
    cases = {"gpt-3.2M": _gpt_case(folder), "minilm-22.7M": _minilm_case(folder)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", MEASURE, json.dumps(spec)],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, spec in cases.items()
    }
    peaks = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        line = [ln for ln in out.splitlines() if ln.startswith("PEAKS ")][-1]
        peaks[name] = json.loads(line[len("PEAKS ") :])
    return {name: (cases[name], peaks[name]) for name in cases}


@pytest.mark.parametrize("case", ["gpt-3.2M", "minilm-22.7M"])
def test_estimate_is_within_30_percent_of_the_measured_worker_peak(measured, case):
    raw, peaks = measured[case]
    spec = parse_spec(raw)
    est = estimate(spec, expand_checkpoints(spec.model.checkpoints)[0], workers_here=1)
    assert est.graph_how.startswith("measured")
    measured_bytes = peaks["peak_mb"] * (1 << 20)
    print(
        f"\n{case}: estimate {est.per_worker_bytes / 2**20:,.0f} MB, measured {peaks['peak_mb']:,.0f} MB, "
        f"ratio {est.per_worker_bytes / measured_bytes:.2f}"
    )
    assert est.per_worker_bytes == pytest.approx(measured_bytes, rel=0.3), (est.summary(), peaks)
    if case.startswith("minilm"):
        assert est.parameters == 22_713_216
