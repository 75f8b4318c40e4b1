"""The coupled-GRPO run config: the shared sections + `grpo:` + `sampling:` (no `diffusion:`:
the policy's log-probabilities come from the coupled estimator, not the pretraining objective)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_diffu.config import SectionConfig
from megatron_diffu.diffusion.sampling import SamplingConfig
from megatron_diffu.stages.run_config import StageRunConfig

ESTIMATORS = ("coupled", "single", "d1")
ADVANTAGE_MODES = ("loo", "mean", "mean_std")
LOSS_NORMALIZATIONS = ("micro_batch", "global_tokens")
STOP_TOKEN_NAMES = ("im_end", "eod")


@dataclass
class GRPOConfig(SectionConfig):
    """The `grpo:` section (flags: --num-generations, --beta, ...). Defaults = the paper's."""

    num_generations: int = 10            # G completions per prompt
    num_iterations: int = 2              # inner iterations (optimizer steps) per rollout batch
    epsilon_low: float = 0.5
    epsilon_high: float = 0.5
    beta: float = 0.01                   # k3 KL weight (0: no reference model passes)
    ref_model_sync_steps: int = 64       # re-sync the reference to the policy every N steps (0: never)
    ref_model_mixup_alpha: float = 0.6   # sync = ref <- alpha * policy + (1 - alpha) * ref (TRL's default; 1.0: copy)
    estimator: str = "coupled"           # coupled | single | d1 (rl/coupled.py)
    advantage_mode: str = "loo"          # loo | mean | mean_std
    loss_normalization: str = "micro_batch"  # micro_batch (DiffuCoder/TRL) | global_tokens (docs/ALGORITHMS.md 5.4)
    coupled_t_min: float = 0.2
    coupled_t_max: float = 0.8
    p_mask_prompt: float = 0.15          # d1 estimator only
    coupled_p_mask_prompt: float = 0.0   # coupled/single: prompt masking as d1's (0 = DiffuCoder's code; a deviation)
    logp_chunk_size: Optional[int] = None  # rows per forward of the old/ref passes (None: micro_batch_size)
    rollout_batch_size: Optional[int] = None  # rows per sampler call (None: all of this DP rank's rows)
    reward_funcs: list[str] = field(default_factory=lambda: ["pass_rate", "format"])
    reward_weights: list[float] = field(default_factory=lambda: [2.0, 0.5])
    reward_timeout_s: float = 5.0
    reward_workers: int = 4
    reward_memory_mb: int = 1024
    reward_allow_basic_sandbox: bool = False  # run rewards without the jail if it cannot be built (docs/SANDBOX.md)
    reward_format_rule: str = "strict"   # strict (DiffuCoder's whole-text rule) | lenient (one block anywhere)
    reward_timeout_policy: str = "zero_problem"  # zero_problem (DiffuCoder: a timeout zeroes the problem) | per_case
    reward_problem_budget_s: float = 30.0  # zero_problem: summed test run time over this zeroes it (0: none)
    show_first_test: bool = True         # raw problem files only (preprocessed ones carry prompt_ids)
    system_prompt: Optional[str] = "You are a helpful assistant."  # the recipe's (raw files only)
    prompt_template: str = "diffucoder"  # diffucoder ("\nTest cases: ...") | fenced (data/rl.py: user_message)
    max_prompt_length: Optional[int] = None  # None: seq_length - max_new_tokens (the recipe: 200)
    long_prompts: str = "truncate_left"  # truncate_left (keep the last max_prompt_length tokens, TRL) | error
    completion_stop_tokens: list[str] = field(default_factory=lambda: ["im_end"])  # end the completion mask

    def problems(self) -> list[str]:
        e = []
        if self.num_generations < 1 or self.num_iterations < 1:
            e.append("grpo: num_generations and num_iterations must be >= 1")
        if not (0 <= self.epsilon_low < 1) or self.epsilon_high < 0:
            e.append(f"grpo: need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0 or self.ref_model_sync_steps < 0:
            e.append("grpo: beta and ref_model_sync_steps must be >= 0")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            e.append(f"grpo.ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in (0, 1] (1.0: hard copy; "
                     f"TRL/DiffuCoder: 0.6)")
        if self.estimator not in ESTIMATORS:
            e.append(f"grpo.estimator={self.estimator!r}: choose one of {ESTIMATORS}")
        if self.advantage_mode not in ADVANTAGE_MODES:
            e.append(f"grpo.advantage_mode={self.advantage_mode!r}: choose one of {ADVANTAGE_MODES}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            e.append(f"grpo.loss_normalization={self.loss_normalization!r}: choose one of {LOSS_NORMALIZATIONS}")
        if not 0 < self.coupled_t_min <= self.coupled_t_max < 1:
            e.append(f"grpo: need 0 < coupled_t_min <= coupled_t_max < 1, got {self.coupled_t_min}, {self.coupled_t_max}")
        for name in ("p_mask_prompt", "coupled_p_mask_prompt"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                e.append(f"grpo.{name}={getattr(self, name)} is a probability: use a value in [0, 1]")
        if len(self.reward_funcs) != len(self.reward_weights) or not self.reward_funcs:
            e.append(f"grpo: reward_funcs {self.reward_funcs} and reward_weights {self.reward_weights} need one "
                     f"weight per function")
        for name in ("logp_chunk_size", "rollout_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                e.append(f"grpo.{name}={v} must be >= 1 (or none)")
        from megatron_diffu.data.rl import LONG_PROMPT_POLICIES, PROMPT_TEMPLATES
        if self.prompt_template not in PROMPT_TEMPLATES:
            e.append(f"grpo.prompt_template={self.prompt_template!r}: choose one of {PROMPT_TEMPLATES}")
        if self.long_prompts not in LONG_PROMPT_POLICIES:
            e.append(f"grpo.long_prompts={self.long_prompts!r}: choose one of {LONG_PROMPT_POLICIES}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            e.append(f"grpo.max_prompt_length={self.max_prompt_length} must be >= 1 (or none)")
        bad = [t for t in self.completion_stop_tokens if t not in STOP_TOKEN_NAMES]
        if bad or not self.completion_stop_tokens:
            e.append(f"grpo.completion_stop_tokens={self.completion_stop_tokens}: names from {STOP_TOKEN_NAMES}")
        if self.reward_timeout_s <= 0 or self.reward_workers < 1:
            e.append("grpo: reward_timeout_s must be > 0 and reward_workers >= 1")
        from megatron_diffu.rl.rewards import FORMAT_RULES, TIMEOUT_POLICIES
        if self.reward_format_rule not in FORMAT_RULES:
            e.append(f"grpo.reward_format_rule={self.reward_format_rule!r}: choose one of {FORMAT_RULES}")
        if self.reward_timeout_policy not in TIMEOUT_POLICIES:
            e.append(f"grpo.reward_timeout_policy={self.reward_timeout_policy!r}: choose one of {TIMEOUT_POLICIES}")
        if self.reward_problem_budget_s < 0:
            e.append(f"grpo.reward_problem_budget_s={self.reward_problem_budget_s} must be >= 0 (0: no budget)")
        return e


@dataclass
class GRPORunConfig(StageRunConfig):
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def cross_section_problems(self, world_size: int) -> list[str]:
        e = super().cross_section_problems(world_size)
        g, s = self.grpo, self.sampling
        gbs = self.resolved_global_batch_size(world_size)
        if gbs % g.num_generations:
            e.append(f"training.global_batch_size={gbs} (completions per step) must be a multiple of "
                     f"grpo.num_generations={g.num_generations}: e.g. --global-batch-size "
                     f"{max(1, gbs // g.num_generations) * g.num_generations}")
        if g.num_generations > 1 and s.temperature == 0:
            e.append("sampling.temperature=0 decodes the G completions of a prompt identically (no group signal): "
                     "set --temperature 1.0 (the paper uses 1.0-1.2)")
        if len(self.data.data_path) != 1:
            e.append(f"data.data_path must be ONE problems JSONL (tools/preprocess_rl.py), got {self.data.data_path}")
        if self.data.seq_length <= s.max_new_tokens:
            e.append(f"data.seq_length={self.data.seq_length} (prompt + completion) must exceed sampling.max_new_tokens="
                     f"{s.max_new_tokens}: prompts get seq_length - max_new_tokens tokens")
        if g.max_prompt_length is not None and g.max_prompt_length > self.data.seq_length - s.max_new_tokens:
            e.append(f"grpo.max_prompt_length={g.max_prompt_length} exceeds data.seq_length - sampling.max_new_tokens = "
                     f"{self.data.seq_length - s.max_new_tokens}: raise --seq-length")
        if self.parallel.sequence_parallel:
            e.append("parallel.sequence_parallel: not supported by the GRPO stage (rollout lengths vary per batch and "
                     "the sampler runs without sequence parallelism): drop --sequence-parallel")
        from megatron_diffu.rl.rewards import REWARD_FUNCTIONS
        unknown = [f for f in g.reward_funcs if f not in REWARD_FUNCTIONS]
        if unknown:
            e.append(f"grpo.reward_funcs: unknown {unknown}; registered: {sorted(REWARD_FUNCTIONS)} "
                     f"(register more with rl.rewards.register_reward)")
        return e

    def fp8_lengths(self) -> list[tuple[str, int]]:
        """None to check: a rollout batch's length (its longest prompt + max_new_tokens) follows the
        data, so under FP8 the stage pads it to the FP8 length multiple (GRPOStage.padded_prompt_length)."""
        return []
