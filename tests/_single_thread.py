"""Shared by the training tests: run torch with one intra-op thread for the module."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """On a shared 2-core runner, 2 spinning OpenMP threads run small models 3-5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
