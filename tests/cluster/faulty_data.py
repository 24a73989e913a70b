"""A data factory with a NaN in one input (for the bad-input tests; importable because tests/cluster is on sys.path)."""

from torch.utils.data import TensorDataset

from cluster.data import digits_tensors


def nan_digits(**kwargs):
    x, y = digits_tensors(**kwargs)
    x = x.clone()
    x[:, 0] = float("nan")
    return TensorDataset(x, y)
