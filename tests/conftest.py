import numpy as np
import pytest
import torch


@pytest.fixture
def rng_seed():
    """One seed feeding numpy and torch generators (no global seeding)."""
    return 1234


@pytest.fixture
def gen(rng_seed):
    return torch.Generator().manual_seed(rng_seed)


@pytest.fixture
def np_rng(rng_seed):
    return np.random.default_rng(rng_seed)
