"""Two pipeline stages on 2 gloo ranks (hand-written send/recv, no schedule) equal one model:
loss and every gradient, with tied embeddings (the last stage's copy of the word embeddings is
kept in sync by allreduce_embedding_grads)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer, allreduce_embedding_grads, pipeline_layer_split
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.testing import run_distributed


def cfg():
    return TransformerConfig.from_preset("tiny", num_layers=3, untie_embeddings_and_output_weights=False)


def inputs():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 256, (2, 6), generator=g)
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[0, :2] = 0
    return ids, pad


def loss_fn(logits, ids):
    return F.cross_entropy(logits[:, 1:].reshape(-1, 256), ids[:, 1:].reshape(-1))


def stage_worker(rank):
    grid = ProcessGrid.build(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    c = cfg()
    layers = pipeline_layer_split(c, grid.pp_size, grid.pp_rank)
    model = DiffusionTransformer(c, grid, pre_process=grid.is_first_stage, post_process=grid.is_last_stage,
                                 layer_ids=layers)
    ids, pad = inputs()
    shape = model.stage_output_shape(2, 6)
    loss = None
    if grid.is_first_stage:
        h = model(ids, attention_mask=pad)
        assert tuple(h.shape) == shape
        dist.send(h.detach().contiguous(), grid.next_rank)
        grad = torch.empty(shape)
        dist.recv(grad, grid.next_rank)
        h.backward(grad)
    else:
        h = torch.empty(shape)
        dist.recv(h, grid.prev_rank)
        h.requires_grad_(True)
        loss = loss_fn(model(hidden_states=h, attention_mask=pad), ids)
        loss.backward()
        dist.send(h.grad.contiguous(), grid.prev_rank)
    allreduce_embedding_grads(model, grid)
    return layers, (None if loss is None else loss.item()), {n: p.grad.numpy() for n, p in model.named_parameters()}


def test_two_stages_equal_one_model_with_tied_embeddings():
    (l0, _, g0), (l1, loss1, g1) = run_distributed(stage_worker, 2, timeout=120)
    assert (l0, l1) == ([0, 1], [2])
    model = DiffusionTransformer(cfg())
    ids, pad = inputs()
    loss = loss_fn(model(ids, attention_mask=pad), ids)
    loss.backward()
    assert abs(loss.item() - loss1) < 1e-6
    ref = {n: p.grad for n, p in model.named_parameters()}
    assert set(g0) | set(g1) == set(ref)
    for grads in (g0, g1):
        for n, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(g), ref[n], atol=1e-6, rtol=1e-5, msg=n)
    assert "embedding.word_embeddings.weight" in g0 and "embedding.word_embeddings.weight" in g1
