"""Sequence-level aggregation of token EU over the uncertainty mask."""

import pytest
import torch
from torch.testing import assert_close

from hf_eu import aggregate_uncertainty


def test_sum_mean_max_against_python_loops():
    values = torch.tensor([[0.5, 1.5, 9.0, 2.0], [3.0, 0.1, 0.2, 7.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [False] * 4])
    rows = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(values.tolist(), mask.tolist())]
    assert_close(aggregate_uncertainty(values, mask, "sum"), torch.tensor([sum(r) for r in rows]))
    assert_close(aggregate_uncertainty(values, mask, "mean"), torch.tensor([sum(r) / max(len(r), 1) for r in rows]))
    assert_close(aggregate_uncertainty(values, mask, "max"), torch.tensor([max(r, default=0.0) for r in rows]))
    assert_close(aggregate_uncertainty(values, None, "max"), values.max(-1).values)


def test_bad_arguments_are_named():
    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduction"):
        aggregate_uncertainty(values, None, "median")
    with pytest.raises(ValueError, match="shape"):
        aggregate_uncertainty(values, torch.ones(2, 4, dtype=torch.bool))
