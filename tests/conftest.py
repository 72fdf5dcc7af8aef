import os

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


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the files in tests/golden/ from the current code (review the diff before committing)",
    )


@pytest.fixture
def update_golden(request):
    """True when pytest runs with --update-golden: golden tests write their files instead of comparing."""
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """A temporary kernel cache (``RULESEARCH_CACHE``) for a test module that builds native kernels."""
    old = os.environ.get("RULESEARCH_CACHE")
    os.environ["RULESEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["RULESEARCH_CACHE"]
    else:
        os.environ["RULESEARCH_CACHE"] = old
