import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and 40x faster on the shared 2-core machine
    (measured: a 6-step diffusion_generate of the tiny model took 4 s with 2 threads under load,
    0.1 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
