"""Coupled-GRPO: `python -m megatron_diffu.grpo --config examples/grpo_tiny_cpu.yaml [flags]`.

ALGORITHMS.md sec. 5. A `Stage` of the one trainer loop (training/trainer.py): the trainer does
micro-batching, the pipeline schedule, gradient reduction/clipping, AdamW, LR, logging and
checkpoints; this stage supplies the rollout batch, the coupled log-probs and the loss.

One optimizer step = one global batch of `training.global_batch_size` COMPLETIONS
(= prompts_per_step * `grpo.num_generations`), split over data-parallel ranks and
`micro_batch_size`-row micro-batches. Every `grpo.num_iterations` steps a new rollout batch is
made; the steps in between reuse it (TRL/DiffuCoder's inner iterations, mu):

1. Prompts: problems (data/rl.py) in a seeded per-epoch permutation; rollout batch k takes
   prompts [k * P, (k + 1) * P). Completion row g of the batch belongs to prompt g // G and has
   the global sample index k * global_batch_size + g, which keys its sampler generator (so a row
   decodes the same on any TP/DP layout and after a resume).
2. Rollouts: `diffusion_generate` (our sampler; `sampling:` section) on this DP rank's rows, in
   chunks of `grpo.rollout_batch_size`, then all-gathered over DP so every rank holds the whole
   rollout batch (identical on every rank: the checkpointed stage state must be).
   Completion mask = generated tokens up to and including the first <|im_end|> (or
   <|endoftext|>); all tokens when there is none.
3. Rewards: the completion text (cut before the first stop token) goes to
   `rl.rewards.compute_rewards` with `grpo.reward_funcs` / `grpo.reward_weights` (default
   2.0 * pass_rate + 0.5 * format, sandboxed, `reward_workers` threads per rank); the rows are
   split over ALL ranks (TP/PP included) and summed back with one all-reduce.
4. Advantages: `rl.advantages.group_advantages` (leave-one-out by default).
5. For every inner iteration j: mask seed s_j = hash(seed, k, j). The old-policy (mu > 1) and
   reference (beta != 0) per-token log-probs with seed s_j are computed right after the
   rollout (forward-only pipeline passes; all copies of a sequence in ONE forward, logits only
   at the needed positions, vocab-parallel log-softmax). When the reference equals the policy
   (no update since the last sync), the reference pass reuses the old pass.
6. Step j of the rollout batch: each micro-batch carries the coupled copies built with s_j
   (`tokens` = [copies * B, S] model input, so the pipeline's shapes follow), the current
   estimate is taken in the forward step and `rl.loss.grpo_loss` gives the clipped + beta*k3 loss
   divided by the GLOBAL number of completion tokens of the batch (trainer contract: the
   micro-batch losses add up to the batch loss).
7. After every `grpo.ref_model_sync_steps` steps the reference model is re-synced to the policy.

Lengths: `data.seq_length` bounds prompt + completion; a prompt longer than
`seq_length - sampling.max_new_tokens` tokens is an error naming its line (drop long prompts with
`tools/preprocess_rl.py --max-prompt-length`).

Checkpoints (trainer + `state_dict`): the data position is the iteration; the stage state holds
the rollout buffer (so a resume mid-cycle continues with the same rollouts and log-probs) and the
iteration of the last reference sync. The reference weights go to
`SAVE/grpo_reference/ref_iter_XXXXXXX/` (DCP, TP-sharded like the model; written atomically, once
per sync) unless the reference equals the saved policy. Loading with `--finetune` (weights only)
starts a fresh reference from the loaded policy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_diffu.config import PretrainConfig
from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
from megatron_diffu.pretrain import PretrainStage
from megatron_diffu.rl.advantages import group_advantages, reward_stats
from megatron_diffu.rl.coupled import build_coupled_batch, coupled_from_logits
from megatron_diffu.rl.loss import grpo_loss
from megatron_diffu.training.trainer import Trainer, build_model

ESTIMATORS = ("coupled", "single", "d1")
ADVANTAGE_MODES = ("loo", "mean", "mean_std")
REFERENCE_DIR = "grpo_reference"


# ------------------------------------------------------------------------------------ config
@dataclass
class GRPOSection:
    """The `grpo:` section (flags: --num-generations, --beta, ...). Defaults = the paper's."""

    num_generations: int = 10            # G completions per prompt
    num_iterations: int = 2              # inner iterations (optimizer steps) per rollout batch
    epsilon_low: float = 0.5
    epsilon_high: float = 0.5
    beta: float = 0.01                   # k3 KL weight (0: no reference model passes)
    ref_model_sync_steps: int = 64       # re-sync the reference to the policy every N steps (0: never)
    estimator: str = "coupled"           # coupled | single | d1 (rl/coupled.py)
    advantage_mode: str = "loo"          # loo | mean | mean_std
    coupled_t_min: float = 0.2
    coupled_t_max: float = 0.8
    p_mask_prompt: float = 0.15          # d1 estimator only
    logp_chunk_size: Optional[int] = None  # rows per forward of the old/ref passes (None: micro_batch_size)
    rollout_batch_size: Optional[int] = None  # rows per sampler call (None: all of this DP rank's rows)
    reward_funcs: list[str] = field(default_factory=lambda: ["pass_rate", "format"])
    reward_weights: list[float] = field(default_factory=lambda: [2.0, 0.5])
    reward_timeout_s: float = 5.0
    reward_workers: int = 4
    reward_memory_mb: int = 1024
    show_first_test: bool = True         # raw problem files only (preprocessed ones carry prompt_ids)
    system_prompt: Optional[str] = None

    def validate(self) -> list[str]:
        e = []
        if self.num_generations < 1 or self.num_iterations < 1:
            e.append("grpo: num_generations and num_iterations must be >= 1")
        if not (0 <= self.epsilon_low < 1) or self.epsilon_high < 0:
            e.append(f"grpo: need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.beta < 0 or self.ref_model_sync_steps < 0:
            e.append("grpo: beta and ref_model_sync_steps must be >= 0")
        if self.estimator not in ESTIMATORS:
            e.append(f"grpo.estimator={self.estimator!r}: choose one of {ESTIMATORS}")
        if self.advantage_mode not in ADVANTAGE_MODES:
            e.append(f"grpo.advantage_mode={self.advantage_mode!r}: choose one of {ADVANTAGE_MODES}")
        if not 0 < self.coupled_t_min <= self.coupled_t_max < 1:
            e.append(f"grpo: need 0 < coupled_t_min <= coupled_t_max < 1, got {self.coupled_t_min}, {self.coupled_t_max}")
        if len(self.reward_funcs) != len(self.reward_weights) or not self.reward_funcs:
            e.append(f"grpo: reward_funcs {self.reward_funcs} and reward_weights {self.reward_weights} need one "
                     f"weight per function")
        for name in ("logp_chunk_size", "rollout_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                e.append(f"grpo.{name}={v} must be >= 1 (or none)")
        if self.reward_timeout_s <= 0 or self.reward_workers < 1:
            e.append("grpo: reward_timeout_s must be > 0 and reward_workers >= 1")
        return e


@dataclass
class GRPOConfig(PretrainConfig):
    grpo: GRPOSection = field(default_factory=GRPOSection)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate_extra(self, world_size: int) -> list[str]:
        e = super().validate_extra(world_size)
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
        if self.parallel.sequence_parallel:
            e.append("parallel.sequence_parallel: not supported by the GRPO stage (rollout lengths vary per batch and "
                     "the sampler runs without sequence parallelism): drop --sequence-parallel")
        from megatron_diffu.rl.rewards import REWARD_FUNCTIONS
        unknown = [f for f in g.reward_funcs if f not in REWARD_FUNCTIONS]
        if unknown:
            e.append(f"grpo.reward_funcs: unknown {unknown}; registered: {sorted(REWARD_FUNCTIONS)} "
                     f"(register more with rl.rewards.register_reward)")
        return e


# ------------------------------------------------------------------------------------ helpers
def mask_seed(seed: int, rollout_index: int, inner: int) -> int:
    """The mask seed of inner iteration `inner` of rollout batch `rollout_index` (shared by the
    old, reference and current passes of that step)."""
    h = hashlib.sha256(f"megatron_diffu.grpo:{int(seed)}:{int(rollout_index)}:{int(inner)}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def completion_mask_from(tokens: torch.Tensor, prompt_length: int, stop_ids: list[int]) -> torch.Tensor:
    """[R, L] bool: generated positions up to and including the first stop token (all if none)."""
    gen = tokens[:, prompt_length:]
    stop = torch.zeros_like(gen, dtype=torch.bool)
    for s in stop_ids:
        stop |= gen == s
    # positions strictly after the first stop: the cumulative count of stops BEFORE them is > 0
    before = torch.cumsum(stop.long(), dim=1) - stop.long()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, prompt_length:] = before == 0
    return mask


def _gather_dp(t: torch.Tensor, grid) -> torch.Tensor:
    if grid.dp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(grid.dp_size)]
    dist.all_gather(parts, t.contiguous(), group=grid.dp_group)
    return torch.cat(parts)


def _bcast_from_last_stage(t: torch.Tensor, grid) -> torch.Tensor:
    if grid.pp_size == 1:
        return t
    t = t.contiguous()
    dist.broadcast(t, src=grid.pp_ranks[-1], group=grid.pp_group)
    return t


@dataclass
class RolloutBuffer:
    """One rollout batch, identical on every rank (CPU tensors; all global rows)."""

    rollout_index: int
    tokens: torch.Tensor           # [R, L] left-padded prompt + completion
    real: torch.Tensor             # [R, L] bool, False on left padding
    prompt_length: int             # P (padded)
    completion_mask: torch.Tensor  # [R, L] bool
    sample_index: torch.Tensor     # [R] long
    rewards: torch.Tensor          # [R] fp32 (weighted total)
    advantages: torch.Tensor       # [R] fp32
    old_logp: list = field(default_factory=list)  # per inner iteration: [R, L] fp32 or None
    ref_logp: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def maskable(self) -> torch.Tensor:
        m = torch.zeros_like(self.real)
        m[:, self.prompt_length:] = True
        return m


# ------------------------------------------------------------------------------------ stage
class GRPOStage(PretrainStage):
    """Coupled-GRPO on the trainer (see the module docstring)."""

    name = "grpo"

    def __init__(self) -> None:
        super().__init__()
        self.problems: list = []
        self.ref_model = None
        self.ref_sync_iteration = 0
        self.buffer: Optional[RolloutBuffer] = None
        self.timings: dict[str, float] = {}
        self._resume: Optional[dict] = None
        self._updates_since_sync = 0
        self._perm: Optional[tuple] = None  # (epoch, permutation of the problems)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer) -> None:
        from megatron_diffu.data.rl import load_rl_problems
        from megatron_diffu.rl.rewards import configure_execution

        self.trainer = trainer
        if self.tokenizer is None:
            self.configure(trainer.cfg, trainer.grid.world_size)
        cfg, g = trainer.cfg, trainer.cfg.grpo
        self.problems = load_rl_problems(cfg.data.data_path[0], self.tokenizer, g.show_first_test, g.system_prompt,
                                         cfg.data.seq_length - cfg.sampling.max_new_tokens, cfg.model.vocab_size)
        configure_execution(timeout_s=g.reward_timeout_s, n_workers=g.reward_workers, memory_mb=g.reward_memory_mb)
        self.stop_ids = sorted({int(self.tokenizer.im_end_id), int(self.tokenizer.eod_id)})
        self.valid_loader = None
        self._build_reference(trainer)
        if trainer.grid.rank == 0:
            print(f"[grpo] {len(self.problems)} problems, {self.prompts_per_step} prompts x "
                  f"{g.num_generations} completions per rollout batch, {g.num_iterations} inner iteration(s), "
                  f"estimator {g.estimator}, beta {g.beta}", flush=True)

    @property
    def prompts_per_step(self) -> int:
        return self.trainer.global_batch_size // self.trainer.cfg.grpo.num_generations

    def _build_reference(self, trainer: Trainer) -> None:
        g = trainer.cfg.grpo
        resume = self._resume or {}
        self.ref_model = None
        if g.beta != 0:
            self.ref_model = build_model(trainer.cfg, trainer.grid, trainer.device)
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
        sync_it = int(resume.get("ref_sync_iteration", trainer.iteration))
        self.ref_sync_iteration = sync_it
        if self.ref_model is not None:
            if sync_it == trainer.iteration:
                self.ref_model.load_state_dict(trainer.model.state_dict())
            else:
                self._load_reference(sync_it)
        self._updates_since_sync = trainer.iteration - sync_it
        buf = resume.get("buffer")
        self.buffer = RolloutBuffer(**buf) if buf else None

    # ------------------------------------------------------------------ reference checkpoint
    def _reference_dir(self, root: str, sync_it: int) -> Path:
        root_p = Path(root)
        if root_p.name.startswith("iter_"):  # --load pointed at one iteration directory
            root_p = root_p.parent
        return root_p / REFERENCE_DIR / f"ref_iter_{sync_it:07d}"

    def _ref_state(self) -> dict:
        from megatron_diffu.training.checkpointing import _wrap
        return {f"ref.{n}": _wrap(t, d, self.trainer.grid) for n, (t, d) in self.ref_model.sharded_state_dict().items()}

    def _save_reference(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        tr = self.trainer
        final = self._reference_dir(tr.cfg.checkpoint.save, self.ref_sync_iteration)
        if (final / ".metadata").exists():
            return  # written by an earlier save of the same sync
        on = dist.is_available() and dist.is_initialized()
        tmp = final.with_name(final.name + ".tmp")
        if tr.grid.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if on:
            dist.barrier()
        dcp.save(self._ref_state(), storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=True,
                                                                     sync_files=True, thread_count=1),
                 no_dist=not on)
        if on:
            dist.barrier()
        if tr.grid.rank == 0:
            os.replace(tmp, final)
            self._prune_references(final.parent)
        if on:
            dist.barrier()

    def _prune_references(self, ref_root: Path) -> None:
        """Keep the reference dirs that a retained checkpoint (or the current state) may need."""
        n = max(self.trainer.cfg.grpo.ref_model_sync_steps, 0)
        save = ref_root.parent
        needed = {self.ref_sync_iteration}
        for d in save.glob("iter_*"):
            try:
                it = int(d.name.split("_")[1].split(".")[0])
            except ValueError:
                continue
            needed.add((it // n) * n if n else 0)
            needed.add(it)
        for d in ref_root.glob("ref_iter_*"):
            try:
                it = int(d.name[len("ref_iter_"):].split(".")[0])
            except ValueError:
                continue
            if it not in needed and ".tmp" not in d.name:
                shutil.rmtree(d, ignore_errors=True)

    def _load_reference(self, sync_it: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        from megatron_diffu.training.checkpointing import CheckpointError

        src = self._reference_dir(self.trainer.cfg.checkpoint.load, sync_it)
        if not (src / ".metadata").exists():
            raise CheckpointError(f"GRPO resume: the reference model of iteration {sync_it} is missing ({src}); "
                                  f"resume from a complete GRPO checkpoint or start with --finetune (fresh reference)")
        state = self._ref_state()
        on = dist.is_available() and dist.is_initialized()
        dcp.load(state, storage_reader=FileSystemReader(str(src)), no_dist=not on)
        if self.trainer.grid.rank == 0:
            print(f"[grpo] reference model of iteration {sync_it} loaded from {src}", flush=True)

    def state_dict(self) -> dict:
        tr = self.trainer
        if self.ref_model is not None and self.ref_sync_iteration != tr.iteration and tr.cfg.checkpoint.save:
            self._save_reference()
        return {"ref_sync_iteration": self.ref_sync_iteration, "rollout_index": (tr.iteration - 1) // self.mu,
                "buffer": None if self.buffer is None else dict(self.buffer.__dict__)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None

    @property
    def mu(self) -> int:
        return self.trainer.cfg.grpo.num_iterations

    # ------------------------------------------------------------------ rollouts
    def _prompt_indices(self, rollout_index: int) -> list[int]:
        """Problem indices of a rollout batch: a seeded permutation per epoch over the problems."""
        n, p = len(self.problems), self.prompts_per_step
        out = []
        for pos in range(rollout_index * p, (rollout_index + 1) * p):
            epoch = pos // n
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.trainer.cfg.data.seed, epoch]).permutation(n))
            out.append(int(self._perm[1][pos % n]))
        return out

    def _rollout(self, rollout_index: int) -> RolloutBuffer:
        tr, g = self.trainer, self.trainer.cfg.grpo
        grid, G, gbs = tr.grid, g.num_generations, tr.global_batch_size
        t0 = time.perf_counter()
        prompt_of = self._prompt_indices(rollout_index)
        P = max(len(self.problems[i].prompt_ids) for i in prompt_of)
        rows_per_dp = gbs // grid.dp_size
        mine = range(grid.dp_rank * rows_per_dp, (grid.dp_rank + 1) * rows_per_dp)
        local = self._generate(rollout_index, [prompt_of[r // G] for r in mine], list(mine), P)
        tokens = _gather_dp(local.to(tr.device), grid).cpu()
        t_gen = time.perf_counter() - t0
        real = torch.zeros_like(tokens, dtype=torch.bool)
        for r in range(gbs):
            real[r, P - len(self.problems[prompt_of[r // G]].prompt_ids):] = True
        comp = completion_mask_from(tokens, P, self.stop_ids)
        t1 = time.perf_counter()
        rewards, comp_stats = self._rewards(tokens, P, [prompt_of[r // G] for r in range(gbs)])
        t_rew = time.perf_counter() - t1
        adv = group_advantages(rewards, G, g.advantage_mode)
        stats = dict(reward_stats(rewards, G))  # reward_mean/std, reward_group_std_mean, zero_std_group_ratio
        stats.update(comp_stats)
        stats["completion_length"] = float(comp[:, P:].sum(1).float().mean())
        stats["rollout_tokens_per_s"] = gbs * tr.cfg.sampling.max_new_tokens / max(t_gen, 1e-9)
        buf = RolloutBuffer(rollout_index, tokens, real, P, comp, torch.arange(gbs) + rollout_index * gbs,
                            rewards.float(), adv.float(), stats=stats)
        t2 = time.perf_counter()
        self._old_ref_passes(buf)
        self.timings = {"rollout_s": t_gen, "reward_s": t_rew, "logp_passes_s": time.perf_counter() - t2}
        return buf

    def _generate(self, rollout_index: int, problem_ids: list[int], rows: list[int], P: int) -> torch.Tensor:
        """This DP rank's completions, left-padded to the global prompt length P: [rows, P + N]."""
        tr = self.trainer
        scfg, gbs = tr.cfg.sampling, tr.global_batch_size
        chunk = tr.cfg.grpo.rollout_batch_size or max(len(rows), 1)
        out = []
        was_training = tr.model.training
        tr.model.eval()
        try:
            for lo in range(0, len(rows), chunk):
                ids = problem_ids[lo:lo + chunk]
                res = diffusion_generate(tr.model, [self.problems[i].prompt_ids for i in ids], scfg,
                                         mask_id=self.mask_token_id, pad_id=self.tokenizer.pad_id,
                                         stop_ids=self.stop_ids, grid=tr.grid,
                                         sample_index=[rollout_index * gbs + r for r in rows[lo:lo + chunk]])
                seq = res.sequences.cpu()
                pad = P - res.prompt_length
                if pad:
                    seq = torch.cat([torch.full((seq.shape[0], pad), self.tokenizer.pad_id, dtype=seq.dtype), seq], 1)
                out.append(seq)
        finally:
            tr.model.train(was_training)
        return torch.cat(out)

    def _rewards(self, tokens: torch.Tensor, P: int, problem_of_row: list[int]) -> tuple[torch.Tensor, dict]:
        """Weighted rewards [R]; rows split over every rank of the world, summed with one all-reduce."""
        from megatron_diffu.rl.rewards import compute_rewards

        tr, g = self.trainer, self.trainer.cfg.grpo
        world, rank = tr.grid.world_size, tr.grid.rank
        R, names = tokens.shape[0], list(g.reward_funcs)
        table = torch.zeros(R, 1 + len(names), dtype=torch.float64)
        rows = list(range(rank, R, world))
        if rows:
            texts = [self.completion_text(tokens[r, P:].tolist()) for r in rows]
            probs = [self.problems[problem_of_row[r]].problem for r in rows]
            out = compute_rewards(texts, probs, dict(zip(names, g.reward_weights)))
            for j, r in enumerate(rows):
                table[r, 0] = out.total[j]
                for c, n in enumerate(names):
                    table[r, 1 + c] = out.components[n][j]
        if world > 1:
            table = table.to(tr.device)
            dist.all_reduce(table)
            table = table.cpu()
        stats = {f"reward_{n}": float(table[:, 1 + c].mean()) for c, n in enumerate(names)}
        if "pass_rate" in names:
            pr = table[:, 1 + names.index("pass_rate")]
            stats["pass_rate"] = float(pr.mean())
            stats["solved_fraction"] = float((pr >= 1.0).double().mean())
        return table[:, 0].float(), stats

    def completion_text(self, ids: list[int]) -> str:
        """The completion's text: tokens before the first <|im_end|> / <|endoftext|> / pad."""
        stops = set(self.stop_ids) | {int(self.tokenizer.pad_id)}
        cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:cut])

    # ------------------------------------------------------------------ old / reference log-probs
    def _old_ref_passes(self, buf: RolloutBuffer) -> None:
        g = self.trainer.cfg.grpo
        ref_is_policy = self._updates_since_sync == 0
        for j in range(self.mu):
            old = self._logp_pass(self.trainer.model, buf, j) if self.mu > 1 else None
            ref = None
            if g.beta != 0:
                ref = old if (ref_is_policy and old is not None) else self._logp_pass(self.ref_model, buf, j)
            buf.old_logp.append(old)
            buf.ref_logp.append(ref)

    def _local_rows(self) -> range:
        tr = self.trainer
        per = tr.global_batch_size // tr.grid.dp_size
        return range(tr.grid.dp_rank * per, (tr.grid.dp_rank + 1) * per)

    def _logp_pass(self, model, buf: RolloutBuffer, inner: int) -> torch.Tensor:
        """Forward-only estimate of this DP rank's rows, gathered over DP and shared over PP: [R, L]."""
        from megatron_diffu.parallel.pipeline import forward_backward

        tr = self.trainer
        rows = self._local_rows()
        chunk = tr.cfg.grpo.logp_chunk_size or tr.micro_batch_size
        mbs = [self._micro_batch(buf, range(lo, min(lo + chunk, rows.stop)), inner, with_targets=False)
               for lo in range(rows.start, rows.stop, chunk)]
        was_training = model.training
        model.eval()
        try:
            reports = forward_backward(self._logp_forward_step, model, mbs, tr.grid, forward_only=True,
                                       dtype=tr.cfg.model.params_dtype)
        finally:
            model.train(was_training)
        if tr.grid.is_last_stage:
            local = torch.cat([r["logp"] for r in reports]).to(tr.device)
        else:
            local = torch.zeros(len(rows), buf.tokens.shape[1], dtype=torch.float32, device=tr.device)
        local = _bcast_from_last_stage(local, tr.grid)
        return _gather_dp(local, tr.grid).cpu()

    def _logp_forward_step(self, model, batch: dict, input_tensor):
        out = self._model_forward(model, batch, input_tensor)
        est, tp = self.trainer.cfg.grpo.estimator, self.trainer.grid.tp_group

        def loss_fn(logits):
            logp, _ = coupled_from_logits(batch["coupled"], logits, est, tp)
            return torch.zeros((), device=logp.device), {"logp": logp.float()}
        return out, loss_fn

    # ------------------------------------------------------------------ training step
    def _micro_batch(self, buf: RolloutBuffer, rows: range, inner: int, with_targets: bool = True) -> dict:
        tr, g = self.trainer, self.trainer.cfg.grpo
        sl = slice(rows.start, rows.stop)
        real = buf.real[sl]
        attn = None if bool(real.all()) else real.to(tr.device)
        cb = build_coupled_batch(buf.tokens[sl].to(tr.device), buf.maskable[sl].to(tr.device),
                                 buf.sample_index[sl], mask_seed(tr.cfg.data.seed, buf.rollout_index, inner),
                                 self.mask_token_id, g.estimator, attn, None, g.coupled_t_min, g.coupled_t_max,
                                 False, g.p_mask_prompt)
        mb = {"tokens": cb.input_ids, "attention_mask": cb.attention_mask, "coupled": cb}
        if with_targets:
            old, ref = buf.old_logp[inner], buf.ref_logp[inner]
            mb.update(advantages=buf.advantages[sl].to(tr.device), completion_mask=buf.completion_mask[sl].to(tr.device),
                      old_logp=None if old is None else old[sl].to(tr.device),
                      ref_logp=None if ref is None else ref[sl].to(tr.device),
                      normaliser=float(buf.completion_mask.sum().clamp(min=1)))
        return mb

    def train_micro_batches(self, trainer: Trainer) -> list[dict]:
        k, inner = (trainer.iteration - 1) // self.mu, (trainer.iteration - 1) % self.mu
        self.timings = {}
        if self.buffer is None or self.buffer.rollout_index != k:
            self.buffer = self._rollout(k)
        rows, mbs = self._local_rows(), trainer.micro_batch_size
        return [self._micro_batch(self.buffer, range(lo, lo + mbs), inner) for lo in range(rows.start, rows.stop, mbs)]

    def _model_forward(self, model, batch: dict, input_tensor):
        stage = getattr(model, "module", model)
        kwargs = {"attention_mask": batch["attention_mask"]}
        if getattr(stage, "post_process", True):
            kwargs["logit_positions"] = batch["coupled"].logit_positions
        if getattr(stage, "pre_process", True):
            return model(batch["tokens"], **kwargs)
        return model(hidden_states=input_tensor, **kwargs)

    def forward_step(self, model, batch: dict, input_tensor):
        out = self._model_forward(model, batch, input_tensor)
        g, tp = self.trainer.cfg.grpo, self.trainer.grid.tp_group

        def loss_fn(logits):
            logp, ent = coupled_from_logits(batch["coupled"], logits, g.estimator, tp, return_entropy=True)
            res = grpo_loss(logp, batch["advantages"], batch["completion_mask"], batch["old_logp"], batch["ref_logp"],
                            g.epsilon_low, g.epsilon_high, g.beta, batch["normaliser"], ent)
            return res.loss, dict(res.metrics, loss=res.loss.detach())
        return out, loss_fn

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        out = {k: float(v) for k, v in totals.items()}
        out["loss"] = float(totals.get("loss", float("nan")))
        if self.buffer is not None:
            out.update(self.buffer.stats)
            out["rollout_index"] = float(self.buffer.rollout_index)
        out.update(self.timings)
        return out

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.grid.rank == 0 and trainer.iteration % trainer.cfg.logging.log_interval == 0:
            keys = ("reward_mean", "pass_rate", "kl", "clip_fraction", "entropy", "zero_std_group_ratio",
                    "completion_length", "rollout_tokens_per_s")
            print(f"[grpo] iteration {trainer.iteration} | " + " | ".join(
                f"{k}: {metrics[k]:.4g}" for k in keys if k in metrics), flush=True)
        self._updates_since_sync += 0 if metrics.get("skipped") else 1
        n = trainer.cfg.grpo.ref_model_sync_steps
        if self.ref_model is not None and n and trainer.iteration % n == 0:
            self.ref_model.load_state_dict(trainer.model.state_dict())
            self.ref_sync_iteration = trainer.iteration
            self._updates_since_sync = 0

    # ------------------------------------------------------------------ throughput accounting
    def tokens_per_step(self, trainer: Trainer) -> int:
        seq = self.buffer.tokens.shape[1] if self.buffer is not None else 1
        return trainer.global_batch_size * seq

    def flops_per_step(self, trainer: Trainer) -> float:
        """Matmul FLOPs of the global batch: the body on every position of every copy, the output
        layer only on the rows the head computes (completion tokens: each once in x_full and once
        across the complementary pair; 2x as an upper bound for the single-mask estimator); x3 for
        the training pass; on a rollout step also the old/ref passes and the rollout (every sampler
        step runs the body over the sequence and the head over the still-masked new tokens, N/2 on
        average)."""
        if self.buffer is None:
            return 0.0
        g, m = trainer.cfg.grpo, trainer.cfg.model
        rows, seq = self.buffer.tokens.shape
        head = 2.0 * m.vocab_size * m.hidden_size
        body = m.flops_per_token(seq, training=False) - head
        copies = {"coupled": 3, "single": 2, "d1": 1}[g.estimator]
        head_rows = {"coupled": 2, "single": 2, "d1": 1}[g.estimator] * float(self.buffer.completion_mask.sum())
        one_pass = body * rows * seq * copies + head * head_rows
        if "rollout_s" not in self.timings:  # a reuse step: the training pass only
            return 3 * one_pass
        passes = (self.mu if self.mu > 1 else 0) + (self.mu if g.beta else 0)
        new_tokens = trainer.cfg.sampling.max_new_tokens
        rollout = trainer.cfg.sampling.steps * (body * rows * seq + head * rows * new_tokens / 2)
        return 3 * one_pass + passes * one_pass + rollout

    def validate(self, trainer: Trainer) -> dict[str, float]:
        return {}


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_diffu.pretrain import main as run_stage

    return run_stage(argv, stage=GRPOStage(), config_cls=GRPOConfig)


if __name__ == "__main__":
    code = main()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.exit(code)
