"""Probe records rebuilt from Parquet rows equal the records computed directly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cluster.job import run_job
from cluster.records import barrier_from_row, spectrum_from_row, surface_from_row
from cluster.spec import load_spec
from cluster.store import ResultStore
from cluster.worker import probe_subset, task_seed
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.slq import spectral_density
from probe.surface import loss_surface


def test_spectrum_and_surface_rows_rebuild_the_direct_results(make_spec, checkpoints):
    probes = [
        {"kind": "spectrum", "runs": 3, "steps": 12, "deflate": 0},
        {"kind": "surface", "dims": 1, "resolution": 5},
    ]
    spec = load_spec(make_spec(name="records", probes=probes))
    run_job(spec, backend="local", progress=lambda m: None)
    store = ResultStore(spec.output.path)
    row = next(r for r in store.read("spectrum").to_pylist() if r["checkpoint"] == str(checkpoints[0]))
    surf_row = next(r for r in store.read("surface").to_pylist() if r["checkpoint"] == str(checkpoints[0]))

    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 50].tolist()])
        for j in range(0, len(indices), 50)
    ]
    model = digits_mlp(hidden=16)
    model.load_state_dict(load_file(str(checkpoints[0])))
    model = model.to(torch.float64)
    direct = spectral_density(
        HessianOperator(model, F.cross_entropy, batches),
        runs=3,
        steps=12,
        generator=torch.Generator().manual_seed(task_seed(7, 0)),
    )
    rebuilt = spectrum_from_row(row)
    assert rebuilt is not None
    for q in (1, 2, 3):
        assert rebuilt.moment(q) == direct.moment(q)
    assert rebuilt.negative_mass() == direct.negative_mass()
    assert torch.equal(rebuilt.density, direct.density) and rebuilt.sigma == direct.sigma

    surface = surface_from_row(surf_row)
    ev = Evaluator(model, F.cross_entropy, batches)
    want = loss_surface(ev, dims=1, resolution=5, generator=torch.Generator().manual_seed(task_seed(7, 1)))
    assert surface.alphas == want.alphas and torch.allclose(surface.loss, want.loss, rtol=1e-12, atol=0)


def test_row_without_ritz_data_gives_none_and_missing_numbers_are_nan():
    assert spectrum_from_row({"ritz_values": [], "ritz_weights": [], "grid": [0.0], "density": [1.0]}) is None
    b = barrier_from_row(
        {"t": [0.0, 0.5, 1.0], "loss": [1.0, float("nan"), 1.0], "path": "linear", "eval_set": "probe"}
    )
    assert math.isnan(b.loss_a) and b.num_nonfinite == 1 and b.first_nonfinite_t == 0.5
