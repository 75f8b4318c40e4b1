"""TP=2 (vocab-sharded logits gathered for sampling) and PP=2 (hidden states sent stage to stage,
tokens broadcast from the last stage) each equal the single-process sampler token for token."""
from __future__ import annotations

import pytest
import torch

from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.testing import run_distributed

VOCAB, MASK, PAD = 128, 127, 126
PROMPTS = [[5, 17, 42, 9, 33], [7, 8], [60, 61, 62, 63, 64, 65, 66, 1]]
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one intra-op thread is faster than two fighting over a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CONFIGS = [
    dict(max_new_tokens=10, steps=5, temperature=0.0, alg="entropy"),
    dict(max_new_tokens=10, steps=5, temperature=0.9, top_p=0.9, top_k=30, alg="maskgit_plus", seed=7),
    dict(max_new_tokens=10, steps=10, temperature=0.0, alg="topk_margin", threshold=0.4, block_length=5,
         use_cache=True),
    dict(max_new_tokens=10, steps=5, temperature=1.0, alg="origin", seed=3),
]


def _build(grid):
    cfg = TransformerConfig.from_preset("tiny", vocab_size=VOCAB, seed=3)
    if grid is not None and grid.pp_size > 1:
        from megatron_diffu.model.transformer import pipeline_layer_split

        model = DiffusionTransformer(cfg, grid=grid, pre_process=grid.is_first_stage,
                                     post_process=grid.is_last_stage,
                                     layer_ids=pipeline_layer_split(cfg, grid.pp_size, grid.pp_rank)).eval()
    else:
        model = DiffusionTransformer(cfg, grid=grid).eval()
    if hasattr(model, "output_layer"):
        with torch.no_grad():
            model.output_layer.weight.mul_(20.0)  # scaling a vocab shard = scaling the global head
    return model


def _generate_all(model, grid):
    return [diffusion_generate(model, PROMPTS, SamplingConfig(**c), mask_id=MASK, pad_id=PAD, grid=grid)
            for c in CONFIGS]


def _parallel_rank(rank: int):
    from megatron_diffu.parallel.state import ProcessGrid

    torch.manual_seed(100 + rank)  # the sampler must not read the global RNG
    results = {}
    for tp, pp in [(2, 1), (1, 2)]:  # both layouts in one spawn: rank start-up dominates on 2 cores
        grid = ProcessGrid.build(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        results[(tp, pp)] = [(o.sequences, o.reveal_step) for o in _generate_all(_build(grid), grid)]
    return results


def test_tp2_and_pp2_equal_single_process():
    torch.manual_seed(0)
    single = [(o.sequences, o.reveal_step) for o in _generate_all(_build(None), None)]
    ranks = run_distributed(_parallel_rank, world_size=2)
    for rank, by_layout in enumerate(ranks):
        for layout, outs in by_layout.items():
            for (seq1, rev1), (seq2, rev2), c in zip(single, outs, CONFIGS):
                assert torch.equal(seq1, seq2), (rank, layout, c)
                assert torch.equal(rev1, rev2), (rank, layout, c)
