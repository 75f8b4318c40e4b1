"""The sampler on a CUDA device: greedy equals the CPU result; per-row CUDA generators keep a
sampled batch equal to each prompt alone. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
from test_sampling_reference import MASK, PAD, PROMPTS, tiny_model


@pytest.mark.gpu
def test_cuda_greedy_equals_cpu_and_batch_equals_alone():
    cpu_model = tiny_model()
    gpu_model = tiny_model().cuda()
    for alg in ("maskgit_plus", "entropy"):
        cfg = SamplingConfig(max_new_tokens=12, steps=6, alg=alg, block_length=6, use_cache=True)
        cpu = diffusion_generate(cpu_model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD)
        gpu = diffusion_generate(gpu_model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD)
        assert torch.equal(cpu.sequences, gpu.sequences.cpu()), alg
    cfg = SamplingConfig(max_new_tokens=12, steps=6, alg="entropy", temperature=0.9, top_p=0.95, seed=3)
    batch = diffusion_generate(gpu_model, PROMPTS, cfg, mask_id=MASK, pad_id=PAD)
    P = batch.prompt_length
    for b, prompt in enumerate(PROMPTS):
        alone = diffusion_generate(gpu_model, [prompt], cfg, mask_id=MASK, pad_id=PAD, sample_index=[b])
        assert batch.sequences[b, P:].tolist() == alone.sequences[0, len(prompt):].tolist()
