import os

import pytest
import torch

# Two cores on CI: keep each test process single-threaded unless a test says otherwise,
# so multi-process tests do not oversubscribe.
torch.set_num_threads(int(os.environ.get("MDIFFU_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_global_torch_state_leaks():
    """Fail the test that leaks process-global torch state (grad mode, default dtype), instead of
    letting an unrelated later test fail with a confusing error."""
    dtype = torch.get_default_dtype()
    yield
    leaked = []
    if not torch.is_grad_enabled():
        leaked.append("autograd was left disabled (use `with torch.no_grad()`, not set_grad_enabled(False))")
        torch.set_grad_enabled(True)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"default dtype changed to {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if leaked:
        pytest.fail("test leaked global torch state: " + "; ".join(leaked))
