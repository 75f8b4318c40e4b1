"""1F1B schedule on toy stages (two Linear stacks) against the unsplit computation.

The reference is a plain single-process loop written here: the whole stack, every micro-batch,
loss summed, one backward. PP=2 over gloo must give the same per-micro-batch losses and the same
gradient for every parameter, run forwards/backwards in 1F1B order, and handle micro-batches of
different lengths, fewer micro-batches than stages, and forward-only runs.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_diffu.parallel.pipeline import forward_backward, iter_pipeline_phases
from megatron_diffu.testing import run_distributed

HIDDEN, LAYERS = 8, 4


class ToyStage(torch.nn.Module):
    """Layers [lo, hi) of a tanh-Linear stack; the first stage embeds `tokens` (float features)."""

    def __init__(self, lo: int, hi: int, pre_process: bool, post_process: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # global weights for all layers, then keep ours: every split holds the same weights
        weights = [torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN ** 0.5 for _ in range(LAYERS)]
        self.layers = torch.nn.ParameterList([torch.nn.Parameter(weights[i].clone()) for i in range(lo, hi)])
        self.pre_process, self.post_process = pre_process, post_process
        self.events: list[tuple[str, int]] = []
        self.no_sync_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.layers:
            x = torch.tanh(x @ w)
        return x

    def stage_output_shape(self, b: int, s: int) -> tuple[int, int, int]:
        return (b, s, HIDDEN)

    @contextlib.contextmanager
    def no_sync(self):
        self.no_sync_calls += 1
        yield


def make_micro_batches(n: int, lengths: list[int] | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        s = lengths[i % len(lengths)] if lengths else 3
        out.append({"tokens": torch.randn(2, s, HIDDEN, generator=g, dtype=torch.float64),
                    "target": torch.randn(2, s, HIDDEN, generator=g, dtype=torch.float64)})
    return out


def toy_forward_step(model: ToyStage, mb: dict, input_tensor):
    index = int(mb["index"])
    model.events.append(("F", index))
    x = mb["tokens"] if model.pre_process else input_tensor
    out = model(x)
    if not model.post_process:
        if out.requires_grad:  # log the backward when the gradient reaches this stage's output
            out.register_hook(lambda g: model.events.append(("B", index)))
        return out, None

    def loss_fn(o):
        loss = ((o - mb["target"]) ** 2).mean()
        if loss.requires_grad:
            loss.register_hook(lambda g: model.events.append(("B", index)))
        return loss, {"loss": loss.detach(), "index": torch.tensor(index)}
    return out, loss_fn


def reference(micro_batches: list[dict]):
    model = ToyStage(0, LAYERS, True, True)
    losses = []
    for mb in micro_batches:
        loss = ((model(mb["tokens"]) - mb["target"]) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
    return losses, [w.grad.clone() for w in model.layers]


class Grid:  # the attributes of ProcessGrid the schedule reads (tests the grid contract too)
    pass


SCENARIOS = {  # name: (micro-batches, lengths, forward_only, use ProcessGrid)
    "4mb": (4, None, False, True),
    "1mb": (1, None, False, True),  # fewer micro-batches than stages
    "ragged": (5, [3, 5, 2], False, True),  # different sequence lengths per micro-batch
    "fwd_only": (3, None, True, False),
}


def _pp2_worker(rank: int):
    # all scenarios in one spawn: process start-up dominates the cost of these tests
    from megatron_diffu.parallel.state import ProcessGrid
    import torch.distributed as dist
    results = {}
    for name, (n_mb, lengths, forward_only, use_grid) in SCENARIOS.items():
        if use_grid:
            grid = ProcessGrid.build(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
        else:  # a bare object with just the attributes the schedule reads (the grid contract)
            grid = Grid()
            grid.pp_size, grid.pp_rank, grid.pp_group = 2, rank, dist.group.WORLD
            grid.is_first_stage, grid.is_last_stage = rank == 0, rank == 1
            grid.next_rank = grid.prev_rank = 1 - rank
        half = LAYERS // 2
        stage = ToyStage(rank * half, (rank + 1) * half, pre_process=rank == 0, post_process=rank == 1)
        mbs = make_micro_batches(n_mb, lengths)
        for i, mb in enumerate(mbs):
            mb["index"] = i
        reports = forward_backward(toy_forward_step, stage, mbs, grid, forward_only=forward_only, dtype=torch.float64)
        # numpy, not tensors: torch's queue shares tensor storage by fd, which dies with the rank
        grads = [None if w.grad is None else w.grad.numpy().copy() for w in stage.layers]
        reports = [{k: v.numpy().copy() for k, v in r.items()} for r in reports]
        results[name] = {"reports": reports, "grads": grads, "events": stage.events, "no_sync": stage.no_sync_calls}
    return results


@pytest.fixture(scope="module")
def pp2_results():
    return run_distributed(_pp2_worker, world_size=2, timeout=120)


@pytest.mark.parametrize("name", ["4mb", "1mb", "ragged"])
def test_pp2_equals_unsplit(pp2_results, name):
    n_mb, lengths = SCENARIOS[name][:2]
    r0, r1 = (r[name] for r in pp2_results)
    ref_losses, ref_grads = reference(make_micro_batches(n_mb, lengths))
    assert r0["reports"] == []
    got_losses = [float(r["loss"]) for r in r1["reports"]]
    assert [int(r["index"]) for r in r1["reports"]] == list(range(n_mb))
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(ref_losses), rtol=1e-12, atol=1e-12)
    got_grads = r0["grads"] + r1["grads"]
    for i, (g, ref) in enumerate(zip(got_grads, ref_grads)):
        torch.testing.assert_close(torch.from_numpy(g), ref, rtol=1e-12, atol=1e-12, msg=f"layer {i} gradient")
    # every backward but the last ran inside no_sync (one DP all-reduce per step)
    assert r0["no_sync"] == r1["no_sync"] == n_mb - 1


@pytest.mark.parametrize("name", ["4mb", "ragged"])
def test_pp2_runs_1f1b_order(pp2_results, name):
    n = SCENARIOS[name][0]
    r0, r1 = (r[name] for r in pp2_results)
    assert r0["events"] == list(iter_pipeline_phases(2, 0, n))
    assert r1["events"] == list(iter_pipeline_phases(2, 1, n))
    # stage 0 holds at most 2 micro-batches' activations (GPipe would hold all of them)
    assert r0["events"][:4] == [("F", 0), ("F", 1), ("B", 0), ("F", 2)]


def test_pp2_forward_only(pp2_results):
    r0, r1 = (r["fwd_only"] for r in pp2_results)
    ref_losses, _ = reference(make_micro_batches(3))
    torch.testing.assert_close(torch.tensor([float(r["loss"]) for r in r1["reports"]]), torch.tensor(ref_losses),
                               rtol=1e-12, atol=1e-12)
    assert all(g is None for g in r0["grads"] + r1["grads"])
    assert r0["events"] == [("F", 0), ("F", 1), ("F", 2)]


def test_no_pipelining_accumulates():
    mbs = make_micro_batches(3)
    for i, mb in enumerate(mbs):
        mb["index"] = i
    ref_losses, ref_grads = reference(mbs)
    stage = ToyStage(0, LAYERS, True, True)
    grid = Grid()
    grid.pp_size = 1
    reports = forward_backward(toy_forward_step, stage, mbs, grid)
    assert [r["loss"].item() for r in reports] == pytest.approx(ref_losses, rel=1e-12)
    for g, ref in zip(stage.layers, ref_grads):
        torch.testing.assert_close(g.grad, ref, rtol=1e-12, atol=1e-12)
    assert stage.no_sync_calls == 2


def test_bad_inputs_have_clear_errors():
    grid = Grid()
    grid.pp_size = 1
    stage = ToyStage(0, LAYERS, True, True)
    with pytest.raises(ValueError, match="micro_batches is empty"):
        forward_backward(toy_forward_step, stage, [], grid)
    mb = make_micro_batches(1)[0]
    mb["index"] = 0
    with pytest.raises(TypeError, match=r"must return \(loss_for_backward, report: dict\)"):
        forward_backward(lambda m, b, x: (m(b["tokens"]), lambda o: o.sum()), stage, [mb], grid)
    with pytest.raises(NotImplementedError, match="interleaved"):
        forward_backward(toy_forward_step, [stage, stage], [mb], grid)
    assert forward_backward(toy_forward_step, [stage], [mb], grid)[0]["index"] == 0  # Megatron-style list
    with pytest.raises(TypeError, match="scalar tensor"):
        forward_backward(lambda m, b, x: (m(b["tokens"]), lambda o: (o, {})), stage, [mb], grid)
