"""Size and memory estimates from checkpoint headers, printed before work; jobs that cannot fit fail up front."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cluster.checkpoints import save_sharded
from cluster.cli import main
from cluster.estimate import ResourceError, available_memory_bytes, checkpoint_parameters, estimate
from cluster.job import run_job
from cluster.spec import load_spec
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
    big = estimate(load_spec(make_spec(name="big", probes=[{"kind": "spectrum", "runs": 50, "steps": 200}])),
                   str(checkpoints[0]), workers_here=1)
    assert big.vector_bytes_per_worker > 100 * small.vector_bytes_per_worker
    assert big.vector_bytes_per_worker == 50 * 201 * n * 8  # float64 basis of every run
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
