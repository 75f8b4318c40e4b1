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
