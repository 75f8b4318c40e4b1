"""Shared pieces of the GRPO stage tests: a stand-in tokenizer on a small vocabulary, toy
problems, a toy reward the tiny model can learn quickly, and a tiny GRPO run config.

The tiny model keeps the real architecture (GQA, qkv bias, untied head) but a 64-entry vocabulary
so that rollouts (one full forward per sampler step) stay cheap on 2 CPU cores.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from megatron_diffu.rl.rewards import REWARD_FUNCTIONS, register_reward

VOCAB = 64
PAD, MASK, IM_START, IM_END, EOD = 59, 60, 61, 62, 63
TARGET = 7  # the toy reward: fraction of completion tokens equal to TARGET


def toy_tokenizer():
    return types.SimpleNamespace(pad_id=PAD, mask_id=MASK, im_start_id=IM_START, im_end_id=IM_END, eod_id=EOD,
                                 vocab_size=VOCAB, decode=lambda ids: " ".join(str(int(i)) for i in ids))


def toy_target_reward(completions, problems):
    out = []
    for text in completions:
        toks = text.split()
        out.append(sum(t == str(TARGET) for t in toks) / max(len(toks), 1))
    return out


if "toy_target" not in REWARD_FUNCTIONS:
    register_reward("toy_target")(toy_target_reward)


def write_toy_problems(path: Path, n: int = 8, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            length = 4 + i % 3  # different lengths: left padding in the batch
            ids = [IM_START] + torch.randint(0, 50, (length,), generator=g).tolist() + [IM_END, IM_START]
            f.write(json.dumps({"task_id": f"toy/{i}", "prompt": f"toy {i}", "tests": ["assert True"],
                                "prompt_ids": ids}) + "\n")
    return str(path)


def toy_config(problems: str, *overrides: dict):
    from megatron_diffu.grpo import GRPOConfig

    d = {"model": {"preset": "tiny", "vocab_size": VOCAB, "max_position_embeddings": 64, "seed": 11},
         "data": {"data_path": [problems], "seq_length": 24},
         "grpo": {"num_generations": 4, "num_iterations": 2, "beta": 0.02, "ref_model_sync_steps": 3,
                  "reward_funcs": ["toy_target"], "reward_weights": [1.0], "epsilon_low": 0.2, "epsilon_high": 0.3},
         "sampling": {"max_new_tokens": 8, "steps": 4, "temperature": 1.0, "alg": "entropy"},
         "optimizer": {"lr": 3e-3, "min_lr": 3e-3, "lr_decay_style": "constant", "weight_decay": 0.0,
                       "clip_grad": 1.0, "adam_beta2": 0.99},
         "training": {"micro_batch_size": 4, "global_batch_size": 8, "train_iters": 4, "eval_interval": 0,
                      "exit_signal_handler": False},
         "logging": {"log_interval": 1000, "peak_flops": 1e10}}
    for over in overrides:
        for sec, vals in over.items():
            d.setdefault(sec, {}).update(vals)
    return GRPOConfig.from_dict(d)


def make_trainer(cfg, grid=None):
    from megatron_diffu.grpo import GRPOStage
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.trainer import Trainer

    stage = GRPOStage()
    stage.tokenizer, stage.mask_token_id = toy_tokenizer(), MASK
    cfg.diffusion.mask_token_id = MASK
    return Trainer(cfg, stage, grid=grid or ProcessGrid.single(), device=torch.device("cpu"))
