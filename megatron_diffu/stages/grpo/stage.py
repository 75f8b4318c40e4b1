"""Coupled-GRPO as a stage of the one trainer loop (docs/ALGORITHMS.md sec. 5).

One optimizer step = one global batch of `training.global_batch_size` COMPLETIONS
(= prompts per rollout batch * `grpo.num_generations`), split over data-parallel ranks and
`micro_batch_size`-row micro-batches. Every `grpo.num_iterations` (mu) steps a new rollout batch is
made; the steps in between reuse it (TRL/DiffuCoder's inner iterations). A rollout step:
prompts (prompts.py) -> completions (rollout.py) -> rewards and advantages (scoring.py) -> old and
reference log-probs for every inner iteration (logprobs.py). Every step: the coupled loss
(loss.py). After every `grpo.ref_model_sync_steps` steps the reference policy (reference.py) is
re-synced to the policy: ref <- alpha * policy + (1 - alpha) * ref (`grpo.ref_model_mixup_alpha`,
TRL's 0.6; 1.0 = a hard copy).

Lengths: `data.seq_length` bounds prompt + completion; a prompt longer than `grpo.max_prompt_length`
(default `seq_length - sampling.max_new_tokens`) keeps its last tokens (`grpo.long_prompts:
truncate_left`, TRL/DiffuCoder) or is an error naming its line (`error`).

Checkpoints: the data position is the iteration; the stage state holds the rollout buffer (so a
resume mid-cycle continues with the same rollouts and log-probs) and the iteration of the last
reference sync; the reference weights are saved by the trainer's checkpointer (`reference.*`).
`--finetune` (weights only) starts a fresh reference from the loaded policy.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from megatron_diffu.data.rl import load_rl_problems
from megatron_diffu.model.fp8_shapes import length_multiple, round_up
from megatron_diffu.rl.rewards import configure_execution
from megatron_diffu.stages.grpo.logprobs import LogProbPasses, coupled_micro_batch
from megatron_diffu.stages.grpo.loss import grpo_forward_step
from megatron_diffu.stages.grpo.prompts import PromptSchedule
from megatron_diffu.stages.grpo.reference import ReferencePolicy
from megatron_diffu.stages.grpo.rollout import (RolloutBuffer, completion_mask_from, gather_dp, generate_rows,
                                                local_rows, real_token_mask)
from megatron_diffu.stages.grpo.scoring import advantages_and_stats, completion_text, score_rollouts
from megatron_diffu.stages.tokens import resolve_tokens
from megatron_diffu.training.checkpointing import CheckpointError
from megatron_diffu.training.trainer import Stage, StepInputs, StepReport, Trainer, build_model

LOG_KEYS = ("reward_mean", "pass_rate", "kl", "clip_fraction", "entropy", "zero_std_group_ratio",
            "completion_length", "rollout_tokens_per_s")


class GRPOStage(Stage):
    name = "grpo"

    def __init__(self) -> None:
        self.trainer: Optional[Trainer] = None
        self.tokenizer = None
        self.mask_token_id: Optional[int] = None
        self.problems: list = []
        self.reference: Optional[ReferencePolicy] = None
        self.ref_sync_iteration = 0
        self.buffer: Optional[RolloutBuffer] = None
        self._resume: Optional[dict] = None
        self._updates_since_sync = 0
        self._ref_sync_was_copy = True

    # ------------------------------------------------------------------ construction
    def configure(self, cfg, world_size: int) -> None:
        tokens = resolve_tokens(cfg)
        self.tokenizer, self.mask_token_id = tokens.tokenizer, tokens.mask_token_id

    def checkpoint_states(self, trainer: Trainer) -> dict:
        if trainer.cfg.grpo.beta == 0:
            return {}
        self.reference = ReferencePolicy(build_model(trainer.cfg, trainer.grid, trainer.device))
        return {"reference": self.reference}

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.tokenizer is None:
            self.configure(trainer.cfg, trainer.grid.world_size)
        cfg, g = trainer.cfg, trainer.cfg.grpo
        self.problems = load_rl_problems(cfg.data.data_path[0], self.tokenizer, g.show_first_test, g.system_prompt,
                                         g.max_prompt_length or cfg.data.seq_length - cfg.sampling.max_new_tokens,
                                         cfg.model.vocab_size, template=g.prompt_template, long_prompts=g.long_prompts)
        configure_execution(timeout_s=g.reward_timeout_s, n_workers=g.reward_workers, memory_mb=g.reward_memory_mb,
                            allow_basic_sandbox=g.reward_allow_basic_sandbox, format_rule=g.reward_format_rule,
                            timeout_policy=g.reward_timeout_policy, problem_budget_s=g.reward_problem_budget_s)
        self.stop_ids = sorted({int(self.tokenizer.im_end_id), int(self.tokenizer.eod_id)})  # sampler, reward text
        named = {"im_end": int(self.tokenizer.im_end_id), "eod": int(self.tokenizer.eod_id)}
        # the completion mask ends at the first of these (DiffuCoder: <|im_end|> only)
        self.completion_stop_ids = sorted({named[n] for n in g.completion_stop_tokens})
        self.schedule = PromptSchedule(len(self.problems), self.prompts_per_step, cfg.data.seed)
        self.logprobs = LogProbPasses(trainer, self.mask_token_id)
        self._forward_step = grpo_forward_step(trainer)
        self._restore(trainer, self._resume or {})
        if trainer.grid.rank == 0:
            print(f"[grpo] {len(self.problems)} problems, {self.prompts_per_step} prompts x "
                  f"{g.num_generations} completions per rollout batch, {g.num_iterations} inner iteration(s), "
                  f"estimator {g.estimator}, beta {g.beta}", flush=True)

    def _restore(self, trainer: Trainer, resume: dict) -> None:
        """The reference policy and rollout buffer after `--load` (or fresh ones)."""
        self.ref_sync_iteration = int(resume.get("ref_sync_iteration", trainer.iteration))
        if self.reference is not None and "reference" not in trainer.restored_states:
            if self.ref_sync_iteration != trainer.iteration:
                raise CheckpointError(f"GRPO resume: the checkpoint at --load {trainer.cfg.checkpoint.load} has no "
                                      f"reference policy (reference.*) of iteration {self.ref_sync_iteration}; resume "
                                      f"from a complete GRPO checkpoint or start with --finetune (fresh reference)")
            self.reference.sync_from(trainer.model)  # a fresh reference: a hard copy of the policy
            resume = dict(resume, ref_sync_was_copy=True)
        self._updates_since_sync = trainer.iteration - self.ref_sync_iteration
        self._ref_sync_was_copy = bool(resume.get("ref_sync_was_copy", True))
        buf = resume.get("buffer")
        self.buffer = RolloutBuffer(**buf) if buf else None

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        return None if self.reference is None else self.reference.model

    @property
    def reference_is_policy(self) -> bool:
        """The reference holds the policy's weights: no update since a hard-copy sync."""
        return self._updates_since_sync == 0 and self._ref_sync_was_copy

    @property
    def prompts_per_step(self) -> int:
        return self.trainer.global_batch_size // self.trainer.cfg.grpo.num_generations

    @property
    def mu(self) -> int:
        return self.trainer.cfg.grpo.num_iterations

    # ------------------------------------------------------------------ rollouts
    def rollout(self, rollout_index: int) -> tuple[RolloutBuffer, dict]:
        """A new rollout batch with its rewards, advantages and old/ref log-probs, and its timings."""
        tr, G = self.trainer, self.trainer.cfg.grpo.num_generations
        gbs = tr.global_batch_size
        t0 = time.perf_counter()
        prompt_of = self.schedule.problem_indices(rollout_index)
        row_problem = [self.problems[prompt_of[r // G]] for r in range(gbs)]
        P = self.padded_prompt_length(max(len(p.prompt_ids) for p in row_problem))
        mine = local_rows(tr)
        local = generate_rows(tr, [row_problem[r].prompt_ids for r in mine], [rollout_index * gbs + r for r in mine], P,
                              mask_id=self.mask_token_id, pad_id=self.tokenizer.pad_id, stop_ids=self.stop_ids)
        tokens = gather_dp(local.to(tr.device), tr.grid).cpu()
        t_gen = time.perf_counter() - t0
        real = real_token_mask(tokens, P, [len(p.prompt_ids) for p in row_problem])
        comp = completion_mask_from(tokens, P, self.completion_stop_ids)
        t1 = time.perf_counter()
        rewards, comp_stats = score_rollouts(
            tr, lambda rows: [completion_text(self.tokenizer, tokens[r, P:].tolist(), self.stop_ids) for r in rows],
            [p.problem for p in row_problem], P)
        t_rew = time.perf_counter() - t1
        adv, stats = advantages_and_stats(rewards, tr)
        stats.update(comp_stats)
        stats["completion_length"] = float(comp[:, P:].sum(1).float().mean())
        stats["rollout_tokens_per_s"] = gbs * tr.cfg.sampling.max_new_tokens / max(t_gen, 1e-9)
        buf = RolloutBuffer(rollout_index, tokens, real, P, comp, torch.arange(gbs) + rollout_index * gbs,
                            rewards.float(), adv.float(), stats=stats)
        t2 = time.perf_counter()
        self.logprobs.fill(buf, self.ref_model, reference_is_policy=self.reference_is_policy)
        return buf, {"rollout_s": t_gen, "reward_s": t_rew, "logp_passes_s": time.perf_counter() - t2}

    def padded_prompt_length(self, longest: int) -> int:
        """P: the batch's longest prompt, and under FP8 more left padding so that P + N meets the
        FP8 length multiple of every pass that runs FP8 (model/fp8_shapes.py; ALGORITHMS.md sec. 11.3):
        the training micro-batches (copies x micro_batch_size rows) and, with model.fp8_no_grad, the
        old/reference chunks (copies x logp_chunk_size rows, and the remainder chunk). Padding is
        unattended and skipped by the positions, so the outputs are those of the unpadded batch."""
        cfg = self.trainer.cfg
        if cfg.model.fp8_format is None:
            return longest
        copies = {"coupled": 3, "single": 2, "d1": 1}[cfg.grpo.estimator]
        rows = [copies * self.trainer.micro_batch_size]
        if cfg.model.fp8_no_grad:
            per, chunk = len(local_rows(self.trainer)), cfg.grpo.logp_chunk_size or self.trainer.micro_batch_size
            rows += [copies * min(chunk, per)] + ([copies * (per % chunk)] if per % chunk else [])
        tp = cfg.parallel.tensor_model_parallel_size
        m = math.lcm(*(length_multiple(cfg.model, tp, False, r) for r in rows))
        n = cfg.sampling.max_new_tokens
        return round_up(longest + n, m) - n

    # ------------------------------------------------------------------ one step
    def forward_step(self, model, batch: dict, input_tensor):
        return self._forward_step(model, batch, input_tensor)

    def step_inputs(self, trainer: Trainer) -> StepInputs:
        k, inner = (trainer.iteration - 1) // self.mu, (trainer.iteration - 1) % self.mu
        timings = {}
        if self.buffer is None or self.buffer.rollout_index != k:
            self.buffer, timings = self.rollout(k)
        rows, mbs = local_rows(trainer), trainer.micro_batch_size
        batches = [coupled_micro_batch(trainer, self.buffer, range(lo, lo + mbs), inner, self.mask_token_id)
                   for lo in range(rows.start, rows.stop, mbs)]
        return StepInputs(batches, info=timings)

    def step_report(self, trainer: Trainer, inputs: StepInputs, totals: dict[str, float]) -> StepReport:
        metrics = {k: float(v) for k, v in totals.items()}
        metrics["loss"] = float(totals.get("loss", float("nan")))
        metrics.update(self.buffer.stats)
        metrics["rollout_index"] = float(self.buffer.rollout_index)
        metrics.update(inputs.info)
        return StepReport(metrics, trainer.global_batch_size * self.buffer.tokens.shape[1],
                          self.step_flops(trainer, rollout_step="rollout_s" in inputs.info))

    def step_flops(self, trainer: Trainer, rollout_step: bool) -> float:
        """Matmul FLOPs of the global batch (docs/ALGORITHMS.md sec. 8): the body on every position
        of every copy, the output layer only on the rows the head computes (completion tokens: each
        once in x_full and once across the complementary pair; 2x as an upper bound for the
        single-mask estimator); x3 for the training pass; on a rollout step also the old/ref passes
        and the rollout (every sampler step runs the body over the sequence and the head over the
        still-masked new tokens, N/2 on average)."""
        g, m = trainer.cfg.grpo, trainer.cfg.model
        rows, seq = self.buffer.tokens.shape
        copies = {"coupled": 3, "single": 2, "d1": 1}[g.estimator]
        head_rows = {"coupled": 2, "single": 2, "d1": 1}[g.estimator] * float(self.buffer.completion_mask.sum())
        passes = 3.0
        if rollout_step:
            passes += (self.mu if self.mu > 1 else 0) + (self.mu if g.beta else 0)
        train = m.step_flops(rows * seq * copies, head_rows, seq, passes=passes)
        if not rollout_step:
            return train
        s = trainer.cfg.sampling
        return train + m.step_flops(s.steps * rows * seq, s.steps * rows * s.max_new_tokens / 2, seq, passes=1.0)

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.grid.rank == 0 and trainer.iteration % trainer.cfg.logging.log_interval == 0:
            print(f"[grpo] iteration {trainer.iteration} | " + " | ".join(
                f"{k}: {metrics[k]:.4g}" for k in LOG_KEYS if k in metrics), flush=True)
        self._updates_since_sync += 0 if metrics.get("skipped") else 1
        n = trainer.cfg.grpo.ref_model_sync_steps
        if self.reference is not None and n and trainer.iteration % n == 0:
            alpha = float(trainer.cfg.grpo.ref_model_mixup_alpha)
            self.reference.sync_from(trainer.model, alpha)  # TRL's mixup (alpha 1: a hard copy)
            self.ref_sync_iteration = trainer.iteration
            self._updates_since_sync = 0
            self._ref_sync_was_copy = alpha == 1.0

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        tr = self.trainer
        return {"ref_sync_iteration": self.ref_sync_iteration, "ref_sync_was_copy": self._ref_sync_was_copy,
                "rollout_index": (tr.iteration - 1) // self.mu,
                "buffer": None if self.buffer is None else dict(self.buffer.__dict__)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None
