import os

import pytest
import torch

# Two cores on CI: keep each test process single-threaded unless a test says otherwise,
# so multi-process tests do not oversubscribe.
torch.set_num_threads(int(os.environ.get("MDIFFU_TEST_THREADS", "2")))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked `slow` (skipped by default; MDIFFU_RUN_SLOW=1 does the same; "
                          "scripts/test.sh, the CI command, passes it)")


def _run_slow(config) -> bool:
    # `-m slow` (or any marker expression naming it) selects slow tests on purpose: run them
    return (config.getoption("--runslow") or os.environ.get("MDIFFU_RUN_SLOW", "") == "1"
            or "slow" in (config.getoption("markexpr") or ""))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or MDIFFU_RUN_SLOW=1); scripts/test.sh does")
    run_slow = _run_slow(config)
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture()
def one_thread():
    """One intra-op thread for this test (tiny tensors: two threads only fight over a busy 2-core
    machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_global_torch_state_leaks(request):
    """Fail the test that leaks process-global torch state (grad mode, default dtype, intra-op
    thread count), instead of letting an unrelated later test fail with a confusing error (or run
    with other numerics: the thread count changes reduction orders and speed)."""
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    leaked = []
    if not torch.is_grad_enabled():
        leaked.append("autograd was left disabled (use `with torch.no_grad()`, not set_grad_enabled(False))")
        torch.set_grad_enabled(True)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"default dtype changed to {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:
        leaked.append(f"torch.set_num_threads changed the intra-op thread count from {threads} to "
                      f"{torch.get_num_threads()} (use the `one_thread` fixture, which restores it)")
        torch.set_num_threads(threads)
    if leaked:
        pytest.fail(f"{request.node.nodeid} leaked global torch state: " + "; ".join(leaked))
