"""Shared fixtures: tiny data sets and models, built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.data import ArrayDataset


def blobs(n: int = 256, classes: int = 4, dim: int = 8, seed: int = 0) -> ArrayDataset:
    """Gaussian blobs: a separable toy classification problem."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    labels = torch.randint(classes, (n,), generator=generator)
    inputs = centers[labels] + torch.randn(n, dim, generator=generator)
    return ArrayDataset(inputs, labels)


@pytest.fixture
def toy() -> ArrayDataset:
    return blobs()


def mlp(dim: int = 8, classes: int = 4, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, classes))
