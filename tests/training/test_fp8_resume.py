"""Issue 16 item 7: a native-FP8 run (CPU emulation) resumed from its checkpoint continues bit for
bit like the uninterrupted run, losses and scaling state alike; resetting the scales at the resume
(the behaviour before the state was checkpointed) changes both."""
import pytest
import torch

from training_helpers import build_trainer, make_stdlib_dataset, run_losses, tiny_args

from megatron_diffu.model import fp8

FP8 = ["--fp8-format", "hybrid"]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_stdlib_dataset(tmp_path_factory.mktemp("stdlib_fp8"))


def _states(model):
    return {n: m.fp8.state_dict() for n, m in fp8.fp8_modules(model).items()}


def _same_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for n in a for r in a[n] for x, y in zip(a[n][r], b[n][r]))


def test_fp8_resume_is_bit_exact_and_fresh_scales_would_differ(data_prefix, tmp_path):
    ref_losses, ref = run_losses(tiny_args(data_prefix, 6, FP8))
    ref_states = _states(ref.model)
    assert len(ref_states) == 8  # 4 FP8 linears x 2 layers
    save = str(tmp_path / "ck")
    first, _ = run_losses(tiny_args(data_prefix, 6, FP8 + ["--save", save, "--exit-interval", "3"]))
    assert first == ref_losses[:3]

    resumed = build_trainer(tiny_args(data_prefix, 6, FP8 + ["--load", save]))
    assert resumed.iteration == 3
    resumed.train()
    assert [m["loss"] for m in resumed.history] == ref_losses[3:]
    assert _same_states(_states(resumed.model), ref_states)

    reset = build_trainer(tiny_args(data_prefix, 6, FP8 + ["--load", save]))
    for m in fp8.fp8_modules(reset.model).values():  # what a resume did before: scales 1, no history
        m.fp8 = fp8.Fp8LinearState(m.fp8.recipe)
    reset.train()
    assert [m["loss"] for m in reset.history] != ref_losses[3:]
    assert not _same_states(_states(reset.model), ref_states)
