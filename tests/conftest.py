import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean():
    """Every test starts from a fixed seed and an empty Pyro param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
