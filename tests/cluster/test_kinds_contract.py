"""One contract every probe kind passes (cluster/kinds/): run through the job path on the digits
MLP, each stored row holds exactly the kind's declared columns (common + its own), and a runner
that writes a column its kind does not declare is refused by the store, naming the kind and key.

A new kind adds one entry to TINY (its smallest options); the first test fails until it does.
"""

from __future__ import annotations

import dataclasses

import pytest

from cluster.errors import category_of
from cluster.job import run_job
from cluster.kinds import KINDS, kind
from cluster.schema import COMMON_FIELDS, schema_for
from cluster.spec import load_spec
from cluster.store import ResultStore, RowColumnsError

# The smallest options of each kind that exercise its runner; "between" is filled with the two
# checkpoints of the `checkpoints` fixture (which carry lr and step metadata for eos and noise).
TINY = {
    "eigenvalues": {"k": 1, "max_steps": 8},
    "trace": {"matvecs": 6},
    "spectrum": {"runs": 2, "steps": 5, "grid_points": 20},
    "sharpness": {
        "measures": ["lambda_max", "keskar", "sam", "adaptive", "average"],
        "sigma": 0.01,
        "steps": 2,
        "num_samples": 2,
    },
    "barrier": {"path": ["linear", "bezier"], "points": 3, "train_steps": 2},
    "surface": {"dims": 1, "resolution": 3, "directions": "pca"},
    "eos": {"tol": 1e-3},
    "pacbayes": {"samples": 4, "rtol": 0.1},
    "noise": {"chunk_size": 16},
    "critical": {"runs": 2, "steps": 5},
}


def test_every_kind_has_a_contract_entry_and_a_complete_record():
    assert set(TINY) == set(KINDS)
    common = {f.name for f in COMMON_FIELDS}
    for name, k in KINDS.items():
        assert kind(name) is k and k.name == name
        assert set(k.options) == set(k.checks), name  # every option is validated
        assert not common & set(k.column_names), name  # kinds never redeclare common columns
        assert ("symmetry_check" in k.options) == k.uses_hessian, name
        assert not (k.pairwise and k.per_series), name
        assert set(k.checkpoint_options) <= set(k.options), name
    with pytest.raises(KeyError, match="unknown probe kind 'nope'; registered kinds: eigenvalues, trace"):
        kind("nope")


def _probe(name: str, checkpoints) -> dict:
    options = dict(TINY[name])
    if KINDS[name].pairwise:
        options.update({o: [str(checkpoints[0]), str(checkpoints[1])] for o in KINDS[name].checkpoint_options})
    return {"kind": name, **options}


def _capture_writes(monkeypatch) -> list[tuple[str, list[dict]]]:
    """Record the rows the driver hands to the store, as handed."""
    written, write = [], ResultStore.write_result

    def spy(self, kind_name, row):
        written.append((kind_name, [dict(r) for r in (row if isinstance(row, list) else [row])]))
        return write(self, kind_name, row)

    monkeypatch.setattr(ResultStore, "write_result", spy)
    return written


@pytest.mark.parametrize("name", list(TINY))
def test_each_row_holds_exactly_its_kinds_declared_columns(name, make_spec, checkpoints, monkeypatch):
    spec = load_spec(make_spec(name=f"contract-{name}", num_examples=64, probes=[_probe(name, checkpoints)]))
    written = _capture_writes(monkeypatch)
    summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_failed == 0 and summary.num_done >= 1, summary.failures
    declared = set(schema_for(name).names)
    assert written and {k for k, _ in written} == {name}
    for _, rows in written:
        for row in rows:
            assert set(row) == declared, (
                f"{name}: undeclared {sorted(set(row) - declared)}, not written {sorted(declared - set(row))}"
            )
    stored = ResultStore(spec.output.path).read(name)
    assert stored.num_rows == sum(len(rows) for _, rows in written)


def test_a_misspelled_column_is_refused_naming_the_kind_and_key(make_spec, monkeypatch):
    trace = KINDS["trace"]

    def misspelled(ctx, options, generator):
        return {**trace.run(ctx, options, generator), "lamda_max": 1.0}

    monkeypatch.setitem(KINDS, "trace", dataclasses.replace(trace, run=misspelled))
    spec = load_spec(make_spec(name="misspelled", num_examples=64, probes=[{"kind": "trace", "matvecs": 6}]))
    with pytest.raises(
        RowColumnsError,
        match=r"result row of probe kind 'trace' has undeclared column\(s\) "
        r"'lamda_max': a misspelled key",
    ) as info:
        run_job(spec, backend="local", progress=lambda m: None)
    assert category_of(info.value) == "other"  # a bug in a runner, not bad input
    assert ResultStore(spec.output.path).read("trace").num_rows == 0  # nothing silently dropped or stored
