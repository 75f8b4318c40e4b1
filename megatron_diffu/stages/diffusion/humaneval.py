"""HumanEval pass@1 (greedy) of the model being trained, every N iterations (the SFT hook)."""
from __future__ import annotations

import os

import torch

from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
from megatron_diffu.eval.humaneval import load_humaneval, run_evaluation
from megatron_diffu.execution.protocol import extract_code, instruct_prompt
from megatron_diffu.model.fp8 import fp8_suspended


class PeriodicHumanEval:
    """`sft.sft_eval_humaneval_interval` iterations apart: generate with the instruct protocol
    (execution/protocol.py), score in the sandbox (rank 0's file is kept), log `humaneval_pass@1`."""

    def __call__(self, stage, trainer) -> None:
        n = trainer.cfg.sft.sft_eval_humaneval_interval
        if n and trainer.iteration % n == 0:
            result = self.evaluate(stage, trainer)
            if result:
                trainer.logger.log_validation(trainer.iteration, result)

    def evaluate(self, stage, trainer) -> dict:
        s = trainer.cfg.sft
        problems = load_humaneval()
        if s.sft_eval_humaneval_problems:
            problems = dict(list(problems.items())[: s.sft_eval_humaneval_problems])
        scfg = SamplingConfig(max_new_tokens=s.sft_eval_max_new_tokens, steps=s.sft_eval_max_new_tokens)
        tok = stage.tokenizer

        def generate(prompts: list[str]) -> list[str]:
            ids = [tok.apply_chat_template([{"role": "user", "content": instruct_prompt(p)}]) for p in prompts]
            out = diffusion_generate(trainer.model, ids, scfg, mask_id=stage.mask_token_id, pad_id=tok.pad_id,
                                     stop_ids=[tok.im_end_id, tok.eod_id], grid=trainer.grid)
            return [extract_code(tok.decode(c)) for c in out.completions]

        trainer.model.eval()
        try:
            with torch.no_grad(), fp8_suspended():  # the sampler's shapes follow the data: bf16
                # every rank generates (TP/PP collectives); each scores into its own file, rank 0's is kept
                out_dir = trainer.cfg.checkpoint.save or "."
                rank = "" if trainer.grid.rank == 0 else f".rank{trainer.grid.rank}"
                path = os.path.join(out_dir, f"humaneval_iter_{trainer.iteration:07d}{rank}.jsonl")
                report = run_evaluation(generate, problems, 1, path, resume=False, ks=(1,))
        finally:
            trainer.model.train()
        return {"humaneval_pass@1": float(report.get("pass@1", 0.0))}
