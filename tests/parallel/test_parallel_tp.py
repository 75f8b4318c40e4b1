"""TP=2 (with and without sequence parallelism) equals TP=1 with the same global weights:
logits, loss and every parameter gradient; and the vocab-parallel CE / log-prob / entropy /
argmax / top-k at TP=2 equal torch on the full vocabulary (values and gradients)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.parallel.cross_entropy import (gather_vocab_parallel_logits, vocab_parallel_argmax,
                                                   vocab_parallel_cross_entropy, vocab_parallel_entropy,
                                                   vocab_parallel_log_probs, vocab_parallel_max,
                                                   vocab_parallel_topk)
from megatron_diffu.parallel.layers import allreduce_sequence_parallel_grads
from megatron_diffu.parallel.state import ProcessGrid, group_size
from megatron_diffu.testing import run_distributed

B, S = 2, 8


def portable(obj, back=False):
    """Tensors <-> numpy for results crossing the process boundary (torch's shared-memory fd
    passing fails once the rank process has exited)."""
    if isinstance(obj, dict):
        return {k: portable(v, back) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v, back) for v in obj)
    if back and hasattr(obj, "__array__"):
        return torch.from_numpy(obj)
    if not back and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    return obj


def run2(fn, *args, timeout=240):
    return [portable(r, back=True) for r in run_distributed(fn, 2, args=args, timeout=timeout)]


def make_inputs(cfg):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, :3] = 0  # left padding in row 1
    positions = torch.rand(B, S, generator=g) < 0.5
    positions[:, 0] = False
    positions[0, 5] = True
    return ids, pad, positions


def make_cfg(tied: bool):
    return TransformerConfig.from_preset("tiny", untie_embeddings_and_output_weights=not tied)


def run_model(model, ids, pad, positions, tp_group):
    """Full logits (gathered), loss on the selected positions, and the backward pass."""
    with torch.no_grad():
        logits = gather_vocab_parallel_logits(model(ids, attention_mask=pad), tp_group)
    sel = model(ids, attention_mask=pad, logit_positions=positions)
    loss = vocab_parallel_cross_entropy(sel, ids[positions], tp_group).mean()
    loss.backward()
    return logits, loss.detach()


def global_grads(model, tp_group):
    out = {}
    for name, p in model.named_parameters():
        dim, g = getattr(p, "tp_shard_dim", None), p.grad
        if dim is not None and group_size(tp_group) > 1:
            parts = [torch.empty_like(g) for _ in range(group_size(tp_group))]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            g = torch.cat(parts, dim=dim)
        out[name] = g.clone()
    return out


def tp_worker(rank, tied):
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    cfg = make_cfg(tied)
    ids, pad, positions = make_inputs(cfg)
    results = {}
    for sp in (False, True):
        model = DiffusionTransformer(cfg, grid, sequence_parallel=sp)
        logits, loss = run_model(model, ids, pad, positions, grid.tp_group)
        allreduce_sequence_parallel_grads(model, grid.tp_group)
        results[sp] = (logits, loss, global_grads(model, grid.tp_group))
    results["kv"] = kv_and_prefix(model, ids, pad, grid.tp_group)  # the SP model
    return portable(results)


def kv_and_prefix(model, ids, pad, tp_group):
    """return_kv (local KV heads) and a prefix-cached call of the last 4 tokens."""
    with torch.no_grad():
        _, kv = model(ids, attention_mask=pad, return_kv=True)
        prefix = [(k[:, :, :4], v[:, :, :4]) for k, v in kv]
        suffix = model(ids[:, 4:], attention_mask=pad, prefix_kv=prefix)
    return kv, gather_vocab_parallel_logits(suffix, tp_group)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tp_runs(request):
    tied = request.param
    cfg = make_cfg(tied)
    ids, pad, positions = make_inputs(cfg)
    model = DiffusionTransformer(cfg)
    logits, loss = run_model(model, ids, pad, positions, None)
    ref = (logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}, kv_and_prefix(model, ids, pad, None))
    # the loss itself against torch on the full logits
    full = model(ids, attention_mask=pad)
    torch.testing.assert_close(loss, F.cross_entropy(full[positions], ids[positions]), atol=1e-6, rtol=1e-6)
    return ref, run2(tp_worker, tied)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_equals_tp1(tp_runs, sp):
    (ref_logits, ref_loss, ref_grads, _), ranks = tp_runs
    for rank_result in ranks:
        logits, loss, grads = rank_result[sp]
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert ref_grads[name].abs().sum() > 0, name  # every parameter really gets a gradient
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_tp2_kv_cache_shards(tp_runs):
    (_, _, _, (ref_kv, ref_suffix)), ranks = tp_runs
    for rank, r in enumerate(ranks):
        kv, suffix = r["kv"]
        torch.testing.assert_close(suffix, ref_suffix, atol=2e-5, rtol=1e-5)
        for (k, v), (rk, rv) in zip(kv, ref_kv):
            assert k.shape == (B, 1, S, 16)  # 2 KV heads over 2 ranks
            torch.testing.assert_close(k, rk[:, rank:rank + 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, rv[:, rank:rank + 1], atol=1e-5, rtol=1e-5)


def vocab_worker(rank):
    grid = ProcessGrid.build(tensor_model_parallel_size=2)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 3, 16, generator=g, dtype=torch.float64).to(torch.bfloat16).float()
    full[0, 0, 2] = full[0, 0, 11] = 8.0  # bf16-exact tie across shards -> smallest id
    target = torch.randint(0, 16, (5, 3), generator=g)
    local = full.chunk(2, dim=-1)[grid.tp_rank].clone().requires_grad_(True)
    ce = vocab_parallel_cross_entropy(local, target, grid.tp_group)
    lp = vocab_parallel_log_probs(local, target, grid.tp_group)
    ent = vocab_parallel_entropy(local, grid.tp_group)
    (ce * torch.arange(15.).view(5, 3)).sum().backward(retain_graph=False)
    ce_grad = local.grad.clone()
    local.grad = None
    ent.sum().backward()
    ent_grad = local.grad.clone()
    mx, am = vocab_parallel_max(local.detach(), grid.tp_group)
    topv, topi = vocab_parallel_topk(local.detach(), 3, grid.tp_group)
    bf16 = vocab_parallel_cross_entropy(local.detach().bfloat16(), target, grid.tp_group)
    return portable(dict(full=full, target=target, ce=ce.detach(), lp=lp.detach(), ent=ent.detach(), ce_grad=ce_grad,
                ent_grad=ent_grad, mx=mx, am=am, am2=vocab_parallel_argmax(local.detach(), grid.tp_group),
                topv=topv, topi=topi, bf16=bf16))


def test_vocab_parallel_functions_match_torch():
    for rank, r in enumerate(run2(vocab_worker, timeout=120)):
        full = r["full"].clone().requires_grad_(True)
        ref_ce = F.cross_entropy(full.view(-1, 16), r["target"].view(-1), reduction="none").view(5, 3)
        (ref_ce * torch.arange(15.).view(5, 3)).sum().backward()
        torch.testing.assert_close(r["ce"], ref_ce.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["lp"], -ref_ce.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["ce_grad"], full.grad.chunk(2, dim=-1)[rank], atol=1e-6, rtol=1e-6)
        assert r["bf16"].dtype == torch.float32
        torch.testing.assert_close(r["bf16"], ref_ce.detach(), atol=1e-6, rtol=1e-6)  # inputs are bf16-exact
        full.grad = None
        logp = full.log_softmax(-1)
        ref_ent = -(logp.exp() * logp).sum(-1)
        ref_ent.sum().backward()
        torch.testing.assert_close(r["ent"], ref_ent.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["ent_grad"], full.grad.chunk(2, dim=-1)[rank], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["mx"], r["full"].max(-1).values)
        torch.testing.assert_close(r["am"], r["full"].argmax(-1))  # torch: first occurrence on ties
        assert r["am"][0, 0] == 2
        torch.testing.assert_close(r["am2"], r["am"])
        ref_top = r["full"].topk(3, dim=-1)
        torch.testing.assert_close(r["topv"], ref_top.values)
        torch.testing.assert_close(r["full"].gather(-1, r["topi"]), ref_top.values)
