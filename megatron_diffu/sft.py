"""Instruction tuning (SFT): `python -m megatron_diffu.sft --config examples/sft_tiny_cpu.yaml [flags]`.

ALGORITHMS.md sec. 3. The stage composes the pretraining stage and the one trainer loop; only
the data and the normalisation differ:

- data: `data.data_path` = SFT prefixes written by `tools/preprocess_sft.py` (several prefixes are
  concatenated; blend weights are not supported for SFT: they are rejected with the fix). Conversations are padded/packed by
  `data/sft.py`; the global sample index of a row is its noise key, so every TP/PP/DP layout and
  every resume sees the same rows, t and masks.
- masking: `diffusion/objective.prepare_inputs` with `maskable` = response tokens + the padding
  after them (the prompt is never masked); t ~ U(t_eps, 1), weight 1/t; no random truncation
  (SFT has its own response cutoff / tail cut).
- normalisation (`sft_loss_normalization`): `token` (default) divides the global batch's
  sum_n w_n CE_n by its number of maskable (response + padding) tokens; `sequence` divides each
  sequence's sum by its own maskable count (per conversation when packed) and averages over the
  sequences of the global batch. The global count is all-reduced over data-parallel ranks once
  per step, so the micro-batch losses add up to exactly the global-batch loss (trainer contract).
- start: `--load DIR --finetune` from a pretrained native or HF-converted checkpoint (trainer).
- validation: the ELBO (pretraining's MC estimate with fixed noise) on held-out conversations
  (`sft_valid_data_path`, else a seeded `sft_valid_fraction` of `data_path`); optionally HumanEval
  pass@1 every `sft_eval_humaneval_interval` iterations through `megatron_diffu.eval`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_diffu.data.sft import (ConcatConversations, SFTCollator, SFTConversations, SFTDataConfig, SFTDataset,
                                     split_indices)
from megatron_diffu.diffusion import objective as obj
from megatron_diffu.pretrain import PretrainConfig, PretrainStage, _to_device
from megatron_diffu.parallel.state import group_size
from megatron_diffu.training.trainer import Trainer


@dataclass
class SFTConfig(PretrainConfig):
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)

    def validate_extra(self, world_size: int) -> list[str]:
        e = super().validate_extra(world_size)
        if self.diffusion.attention_mask_annealing_iters:
            e.append("diffusion.attention_mask_annealing_iters applies to AR adaptation (pretraining), not SFT: set it to 0")
        return e


# ------------------------------------------------------------------------------------ masking
def normaliser_units(batch: dict, normalization: str) -> float:
    """This micro-batch's share of the global normaliser: maskable tokens, or sequences."""
    if normalization == "token":
        return float(batch["maskable"].sum())
    return float(_sequence_counts(batch)[1])


def _sequence_counts(batch: dict) -> tuple[torch.Tensor, int]:
    """([B, S] maskable count of the sequence (conversation) each position belongs to, #sequences)."""
    maskable = batch["maskable"]
    seg = batch.get("segment_ids")
    if seg is None:
        counts = maskable.sum(1, keepdim=True).expand_as(maskable)
        return counts, int((maskable.sum(1) > 0).sum())
    nseg = int(seg.max()) + 1
    per = torch.zeros(seg.shape[0], nseg, dtype=torch.long, device=seg.device)
    per.scatter_add_(1, seg, maskable.long())
    return per.gather(1, seg), int((per > 0).sum())


def sft_inputs(batch: dict, cfg: obj.DiffusionConfig, *, seed: int, mask_token_id: int, logit_shift: bool = True,
               normalization: str = "token", stratify_group: Optional[int] = None,
               purpose: str = "sft") -> obj.DiffusionInputs:
    """Noise an SFT micro-batch: only `maskable` (response + trailing padding) may be masked, with
    probability t ~ U(t_eps, 1) keyed by (seed, sample_index); weights 1/t (or CART), and with
    `sequence` normalisation each weight is divided by its sequence's maskable count."""
    inputs = obj.prepare_inputs(batch, cfg, seed=seed, mask_token_id=mask_token_id, special_ids=[],
                                logit_shift=logit_shift, purpose=purpose, stratify_group=stratify_group,
                                truncation=False)
    if normalization == "sequence":
        counts, _ = _sequence_counts(batch)
        scale = 1.0 / counts.clamp(min=1).to(inputs.weights.dtype)
        inputs.weights = inputs.weights * scale[inputs.logit_positions]
    return inputs


# ------------------------------------------------------------------------------------ stage
class _HeldOut:
    """Held-out micro-batches of this DP rank, in a fixed order (no shuffle, no packing)."""

    def __init__(self, dataset: SFTDataset, collator: SFTCollator, mbs: int, dp_rank: int, dp_size: int) -> None:
        self.dataset, self.collator = dataset, collator
        self.mbs, self.dp_rank, self.dp_size = mbs, dp_rank, dp_size

    def __iter__(self):
        n = len(self.dataset)
        step = self.mbs * self.dp_size
        for start in range(0, n - step + 1, step):
            idx = list(range(start + self.dp_rank * self.mbs, start + (self.dp_rank + 1) * self.mbs))
            yield self.collator([self.dataset.row(i, shuffle=False) for i in idx], idx)


class SFTStage(PretrainStage):
    """Pretraining's stage with SFT data, response-only masking and response normalisation."""

    name = "sft"

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.tokenizer is None:
            self.configure(trainer.cfg, trainer.grid.world_size)
        cfg = trainer.cfg
        prefixes, weights = cfg.data.parsed_blend()
        if weights is not None:
            raise ValueError(f"SFT --data-path takes prefixes without weights (they are concatenated), got "
                             f"{cfg.data.data_path}: drop the numbers or merge the sources when preprocessing")
        convs = ConcatConversations(prefixes)
        s = cfg.sft
        if s.sft_valid_data_path:
            train_ids, valid = np.arange(len(convs)), SFTConversations(s.sft_valid_data_path)
            valid_ids = np.arange(len(valid))
        else:
            train_ids, valid_ids = split_indices(len(convs), s.sft_valid_fraction, cfg.data.seed)
            valid = convs
        seq = cfg.data.seq_length
        self.train_set = SFTDataset(convs, seq, cfg.data.seed, pack=s.sft_pack, indices=train_ids)
        self.collator = SFTCollator(seq, self.tokenizer.pad_id, s, seed=cfg.data.seed)
        self.valid_loader = None
        if len(valid_ids):
            eval_collator = SFTCollator(seq, self.tokenizer.pad_id, SFTDataConfig(), seed=cfg.data.seed)
            held = SFTDataset(valid, seq, cfg.data.seed, pack=False, indices=valid_ids)
            self.valid_loader = _HeldOut(held, eval_collator, trainer.micro_batch_size, trainer.grid.dp_rank,
                                         trainer.grid.dp_size)
        if trainer.grid.rank == 0:
            print(f"[sft] {len(train_ids)} training conversations in {len(self.train_set)} rows "
                  f"({'packed' if s.sft_pack else 'one per row'}), {len(valid_ids)} held out", flush=True)

    def _indices(self, trainer: Trainer, micro: int) -> list[int]:
        """Megatron's sampler: micro-step m of the step takes the next mbs*dp indices, rank r its slice."""
        mbs, dp = trainer.micro_batch_size, trainer.grid.dp_size
        start = trainer.consumed_samples + micro * mbs * dp + trainer.grid.dp_rank * mbs
        return list(range(start, start + mbs))

    def train_micro_batches(self, trainer: Trainer) -> list[dict]:
        batches = []
        for m in range(trainer.num_micro_batches):
            idx = self._indices(trainer, m)
            batches.append(self.collator([self.train_set.row(i) for i in idx], idx))
        units = torch.tensor(sum(normaliser_units(b, trainer.cfg.sft.sft_loss_normalization) for b in batches),
                             dtype=torch.float64)
        if group_size(trainer.grid.dp_group) > 1:
            units = units.to(trainer.device)
            dist.all_reduce(units, group=trainer.grid.dp_group)
        total = max(float(units.item()), 1.0)
        return [_to_device(dict(b, sft_normaliser=total), trainer.device) for b in batches]

    def loss_normaliser(self, batch: dict) -> float:
        return float(batch["sft_normaliser"])

    def noise_inputs(self, batch: dict) -> obj.DiffusionInputs:
        tr = self.trainer
        return sft_inputs(batch, tr.cfg.diffusion, seed=tr.cfg.data.seed, mask_token_id=self.mask_token_id,
                          logit_shift=tr.cfg.model.logit_shift, normalization=tr.cfg.sft.sft_loss_normalization,
                          stratify_group=tr.global_batch_size)

    def forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        out, loss_fn = super().forward_step(model, batch, input_tensor)
        units = normaliser_units(batch, self.trainer.cfg.sft.sft_loss_normalization)
        response = float(batch["response_mask"].sum())

        def sft_loss(logits):
            loss, report = loss_fn(logits)
            report = dict(report, sft_units=torch.tensor(units), response_tokens=torch.tensor(response))
            return loss, report

        return out, sft_loss

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        # throughput accounting from what the step really processed: micro-batches are padded to
        # their length bucket (or packed), not to seq_length, and only response tokens are masked
        self._step_positions = totals.get("num_tokens", 0.0)
        self._mask_fraction = totals.get("num_masked", 0.0) / max(self._step_positions, 1.0)
        units = max(totals.get("sft_units", 0.0), 1.0)
        masked = max(totals.get("num_masked", 0.0), 1.0)
        return {"loss": totals.get("loss_sum", float("nan")) / units,
                "masked_ce": totals.get("ce_sum", float("nan")) / masked,
                "response_tokens": totals.get("response_tokens", 0.0),
                "mask_fraction": self._mask_fraction}

    _step_positions = 0.0

    def tokens_per_step(self, trainer: Trainer) -> int:
        """Token positions of the global batch as padded (bucketed) this step; seq_length before the first."""
        return int(self._step_positions) or super().tokens_per_step(trainer)

    # ------------------------------------------------------------------ evaluation
    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        n = trainer.cfg.sft.sft_eval_humaneval_interval
        if n and trainer.iteration % n == 0:
            result = self.humaneval(trainer)
            if result:
                trainer.logger.log_validation(trainer.iteration, result)

    def humaneval(self, trainer: Trainer) -> dict:
        """HumanEval pass@1 (greedy) of the current model through megatron_diffu.eval (rank 0 scores)."""
        import os

        from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
        from megatron_diffu.eval.humaneval import load_humaneval, run_evaluation

        s = trainer.cfg.sft
        problems = load_humaneval()
        if s.sft_eval_humaneval_problems:
            problems = dict(list(problems.items())[: s.sft_eval_humaneval_problems])
        scfg = SamplingConfig(max_new_tokens=s.sft_eval_max_new_tokens, steps=s.sft_eval_max_new_tokens)
        tok = self.tokenizer

        def generate(prompts: list[str]) -> list[str]:
            # the instruct protocol of tools/evaluate.py --chat: ask for the function in a fenced
            # block, then put the first ```python block after the prompt (it redefines the function)
            ids = [tok.apply_chat_template([{"role": "user", "content":
                                             f"Complete the following Python function:\n```python\n{p}\n```"}])
                   for p in prompts]
            out = diffusion_generate(trainer.model, ids, scfg, mask_id=self.mask_token_id, pad_id=tok.pad_id,
                                     stop_ids=[tok.im_end_id, tok.eod_id], grid=trainer.grid)
            return [_first_code_block(tok.decode(c)) for c in out.completions]

        trainer.model.eval()
        try:
            with torch.no_grad():
                # every rank generates (TP/PP collectives); each scores into its own file, rank 0's is kept
                out_dir = trainer.cfg.checkpoint.save or "."
                rank = "" if trainer.grid.rank == 0 else f".rank{trainer.grid.rank}"
                path = os.path.join(out_dir, f"humaneval_iter_{trainer.iteration:07d}{rank}.jsonl")
                report = run_evaluation(generate, problems, 1, path, resume=False, ks=(1,))
        finally:
            trainer.model.train()
        return {"humaneval_pass@1": float(report.get("pass@1", 0.0))}


def _first_code_block(text: str) -> str:
    """The first ```python block of an instruct answer (with a leading newline), else the text."""
    start = text.find("```python")
    if start < 0:
        return text
    body = text[start + len("```python"):].lstrip(" \t").partition("\n")[2]
    return "\n" + body.split("```", 1)[0]


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_diffu.pretrain import main as run_stage

    return run_stage(argv, stage=SFTStage(), config_cls=SFTConfig)


if __name__ == "__main__":
    code = main()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.exit(code)
