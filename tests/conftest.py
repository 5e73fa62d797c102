import pytest
import torch

# The tests work on small tensors, where one thread is faster than two fighting over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
