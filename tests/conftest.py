import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Tiny tensors: one thread avoids oversubscription when the 2 cores are shared.
    torch.set_num_threads(1)
