"""Test helper shared by the spec tests: a minimal valid spec as plain data."""

from __future__ import annotations


def raw_spec(**top) -> dict:
    """A minimal valid spec as plain data (what YAML parses into)."""
    spec = {
        "name": "audit",
        "model": {
            "factory": "probe.models:digits_mlp",
            "kwargs": {"hidden": 8},
            "checkpoints": ["ckpts/a.safetensors"],
        },
        "data": {"factory": "cluster.data:digits", "num_examples": 64, "batch_size": 16},
        "probes": [{"kind": "eigenvalues", "k": 3}, {"kind": "trace", "matvecs": 30}],
    }
    spec.update(top)
    return spec
