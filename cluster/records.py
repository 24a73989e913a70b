"""Probe records rebuilt from their Parquet rows.

The inverse of the runners' row writing, for figures (``probe report``) and for
users who want the probe objects back (``SpectrumResult.moment``, ``negative_mass``,
the plot functions) from a results folder::

    rows = ResultStore("results").read("spectrum").to_pylist()
    spectrum_from_row(rows[0]).negative_mass()

Each reader lives with its kind (``Kind.read`` of :mod:`cluster.kinds`); this module
gathers them under their usual names. Missing optional columns become NaN (numbers)
or empty values; nothing is invented.
"""

from __future__ import annotations

from cluster.kinds.barrier import barrier_from_row
from cluster.kinds.base import floats
from cluster.kinds.eos import eos_series_from_rows
from cluster.kinds.spectrum import spectrum_from_row
from cluster.kinds.surface import surface_from_row

__all__ = ["floats", "spectrum_from_row", "barrier_from_row", "surface_from_row", "eos_series_from_rows"]
