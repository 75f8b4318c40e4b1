"""ProcessGrid layouts on 2 gloo ranks, its validation, and TP-sharded state dicts."""
import pytest
import torch
import torch.distributed as dist

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.layers import (gather_from_sequence_parallel_region,
                                            reduce_scatter_to_sequence_parallel_region,
                                            scatter_to_tensor_parallel_region)
from megatron_diffu.parallel.state import ProcessGrid, validate_layout
from megatron_diffu.testing import run_distributed


def grid_worker(rank):
    out = {}
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        g = ProcessGrid.build(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        x = torch.tensor([float(rank + 1)])
        sums = {}
        for name in ("tp_group", "pp_group", "dp_group", "mp_group", "embedding_group"):
            y = x.clone()
            dist.all_reduce(y, group=getattr(g, name))
            sums[name] = y.item()
        out[(tp, pp)] = dict(sizes=(g.tp_size, g.pp_size, g.dp_size), ranks=(g.tp_rank, g.pp_rank, g.dp_rank),
                             first=g.is_first_stage, last=g.is_last_stage, next=g.next_rank, prev=g.prev_rank,
                             sums=sums)
    try:
        ProcessGrid.build(tensor_model_parallel_size=3)
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_grid_layouts_on_two_ranks():
    r0, r1 = run_distributed(grid_worker, 2, timeout=120)
    assert r0[(2, 1)]["sizes"] == (2, 1, 1) and r1[(2, 1)]["ranks"] == (1, 0, 0)
    assert r0[(2, 1)]["sums"] == dict(tp_group=3, pp_group=1, dp_group=1, mp_group=3, embedding_group=1)
    assert r1[(1, 2)]["ranks"] == (0, 1, 0) and r1[(1, 2)]["last"] and not r1[(1, 2)]["first"]
    assert r0[(1, 2)]["next"] == 1 and r1[(1, 2)]["prev"] == 0
    assert r0[(1, 2)]["sums"] == dict(tp_group=1, pp_group=3, dp_group=1, mp_group=3, embedding_group=3)
    assert r1[(1, 1)]["sizes"] == (1, 1, 2) and r1[(1, 1)]["ranks"] == (0, 0, 1)
    assert r0[(1, 1)]["sums"]["dp_group"] == 3 and r0[(1, 1)]["sums"]["tp_group"] == 1
    assert "not divisible by tensor_model_parallel_size * pipeline_model_parallel_size" in r0["error"]


def test_single_and_validation():
    g = ProcessGrid.single()
    assert (g.tp_size, g.pp_size, g.dp_size, g.tp_group, g.is_first_stage, g.is_last_stage) == (1, 1, 1, None, True, True)
    assert validate_layout(8, 2, 2) == 2
    with pytest.raises(ValueError, match="launch a multiple of 4"):
        validate_layout(6, 2, 2)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="ProcessGrid.single"):
            ProcessGrid.build(tensor_model_parallel_size=1)


def shard_worker(rank):
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    cfg = TransformerConfig.from_preset("tiny", seed=5)
    model = DiffusionTransformer(cfg, grid)
    shards = {n: (t.clone(), d) for n, (t, d) in model.sharded_state_dict().items()}
    other = DiffusionTransformer(TransformerConfig.from_preset("tiny", seed=6), grid)
    ref = DiffusionTransformer(cfg)  # TP=1 model in this process: its global tensors
    other.load_global_state_dict({n: p.detach() for n, p in ref.named_parameters()})
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    # the comm functions on their own: split/gather/reduce-scatter along the sequence dim
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3) * (rank + 1)
    xs = x.clone().requires_grad_(True)
    g = gather_from_sequence_parallel_region(xs, grid.tp_group)
    (g * torch.arange(8.).view(1, 8, 1)).sum().backward()
    rs = reduce_scatter_to_sequence_parallel_region(x, grid.tp_group)
    sc = scatter_to_tensor_parallel_region(x, grid.tp_group, dim=1)
    return {n: (t.numpy(), d) for n, (t, d) in shards.items()}, same, g.detach().numpy(), xs.grad.numpy(), \
        rs.numpy(), sc.numpy()


def test_sharded_state_dict_slices_the_global_weights():
    (s0, same0, g0, gr0, rs0, sc0), (s1, same1, g1, gr1, rs1, sc1) = run_distributed(shard_worker, 2, timeout=120)
    assert same0 and same1  # load_global_state_dict at TP=2 == seeded init at TP=2
    ref = DiffusionTransformer(TransformerConfig.from_preset("tiny", seed=5))
    for name, p in ref.named_parameters():
        (a, d0), (b, d1) = s0[name], s1[name]
        assert d0 == d1
        if d0 is None:
            assert (a == b).all() and torch.equal(torch.from_numpy(a), p.detach()), name
        else:
            torch.testing.assert_close(torch.cat([torch.from_numpy(a), torch.from_numpy(b)], dim=d0), p.detach(),
                                       atol=0, rtol=0, msg=name)
    x0 = torch.arange(24.).view(2, 4, 3)
    x1 = 2 * x0
    torch.testing.assert_close(torch.from_numpy(g0), torch.cat([x0, x1], dim=1))
    w = torch.arange(8.).view(1, 8, 1).expand(2, 8, 3)
    torch.testing.assert_close(torch.from_numpy(gr0), 2 * w[:, :4])  # grad summed over both ranks
    torch.testing.assert_close(torch.from_numpy(gr1), 2 * w[:, 4:])
    torch.testing.assert_close(torch.from_numpy(rs0), (x0 + x1)[:, :2])
    torch.testing.assert_close(torch.from_numpy(rs1), (x0 + x1)[:, 2:])
    torch.testing.assert_close(torch.from_numpy(sc1), x1[:, 2:])
