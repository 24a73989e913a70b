"""Comparing result rows of two runs (shared by the cluster tests)."""

from __future__ import annotations


def by_task(table, columns) -> dict:
    """Rows keyed by (checkpoint hash, probe config), holding the given columns."""
    return {(r["checkpoint_sha256"], r["probe_config"]): {c: r[c] for c in columns} for r in table.to_pylist()}


def flat(v) -> list:
    return [x for item in v for x in flat(item)] if isinstance(v, list) else [v]


def assert_close(got: dict, want: dict, rtol: float) -> None:
    """Every column of every task agrees to ``rtol`` relative to the largest reference value."""
    assert got.keys() == want.keys() and got
    for key in want:
        for col in want[key]:
            xs, ys = flat(got[key][col]), flat(want[key][col])
            assert len(xs) == len(ys), col
            scale = max(abs(y) for y in ys) or 1.0
            err = max(abs(x - y) for x, y in zip(xs, ys, strict=True)) / scale
            assert err <= rtol, f"{col}: relative difference {err:.3g} > {rtol:g}"
