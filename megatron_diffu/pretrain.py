"""Masked-diffusion pretraining: `python -m megatron_diffu.pretrain --config FILE.yaml [flags]`.

One process: `python -m megatron_diffu.pretrain ...`; several: `torchrun --nproc-per-node N
python -m megatron_diffu.pretrain ...` (or srun; see parallel/launch.py). Exit codes: 0 done,
75 checkpointed after SIGTERM/SIGUSR1 (requeue me; training/signals.py), 2 bad configuration,
1 anything else.

`PretrainStage` is the stage the SFT stage builds on: override `build_datasets` / `collate`
(the data), `noise_inputs` (the masking: e.g. response-only `maskable`, per-response
normalisation) and `loss_normaliser`; the forward step, metrics and ELBO validation are shared.
"""
from __future__ import annotations

import sys
from typing import Iterator, Optional

import torch

from megatron_diffu.config import ConfigError, PretrainConfig
from megatron_diffu.diffusion import objective as obj
from megatron_diffu.training.trainer import Stage, Trainer, TrainingError, build_grid


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class PretrainStage(Stage):
    """Pretraining on packed token windows with the masked-diffusion objective."""

    name = "pretrain"

    def __init__(self) -> None:
        self.trainer: Optional[Trainer] = None
        self.tokenizer = None
        self.train_iter: Optional[Iterator] = None
        self.valid_loader = None
        self.special_ids: list[int] = []
        self.mask_token_id: Optional[int] = None

    # ------------------------------------------------------------------ configuration
    def configure(self, cfg: PretrainConfig, world_size: int) -> None:
        """Before the model is built: the tokenizer fixes the (padded) vocabulary and the mask id."""
        from megatron_diffu.data.loader import unmaskable_ids
        from megatron_diffu.data.tokenizer import build_tokenizer, padded_vocab_size

        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        n = int(self.tokenizer.vocab_size)
        if not cfg.is_explicit("model", "vocab_size"):
            tp = cfg.parallel.tensor_model_parallel_size
            cfg.model.vocab_size = _checkpoint_vocab(cfg, n, tp) or padded_vocab_size(
                n, cfg.data.make_vocab_size_divisible_by, tp)
        elif cfg.model.vocab_size < n:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {n} ids "
                              f"({cfg.data.tokenizer_type}): leave it unset (padded automatically) or raise it")
        if cfg.diffusion.mask_token_id is None:
            cfg.diffusion.mask_token_id = int(self.tokenizer.mask_id)
        self.mask_token_id = int(cfg.diffusion.mask_token_id)
        self.special_ids = sorted(set(unmaskable_ids(self.tokenizer)) | set(cfg.diffusion.never_mask_token_ids))

    # ------------------------------------------------------------------ data
    def build_datasets(self, trainer: Trainer) -> dict:
        from megatron_diffu.data.datasets import build_pretrain_datasets

        t = trainer.cfg.training
        valid = t.eval_iters * trainer.global_batch_size if (t.eval_interval and t.eval_iters) else 0
        return build_pretrain_datasets(trainer.cfg.data, self.tokenizer, trainer.train_iters * trainer.global_batch_size,
                                       valid, 0)

    def make_loader(self, dataset, trainer: Trainer, consumed: int):
        from megatron_diffu.data.loader import make_data_loader

        return make_data_loader(dataset, self.tokenizer, consumed, trainer.micro_batch_size, trainer.grid.dp_rank,
                                trainer.grid.dp_size, trainer.cfg.data.num_workers)

    def setup(self, trainer: Trainer) -> None:
        self.trainer = trainer
        if self.tokenizer is None:
            self.configure(trainer.cfg, trainer.grid.world_size)
        splits = self.build_datasets(trainer)
        self.train_iter = iter(self.make_loader(splits["train"], trainer, trainer.consumed_samples))
        self.valid_loader = self.make_loader(splits["valid"], trainer, 0) if splits.get("valid") is not None else None

    def train_micro_batches(self, trainer: Trainer) -> list[dict]:
        try:
            return [_to_device(next(self.train_iter), trainer.device) for _ in range(trainer.num_micro_batches)]
        except StopIteration:
            raise TrainingError(f"the training data ran out at iteration {trainer.iteration} (consumed samples "
                                f"{trainer.consumed_samples}); the dataset was built for train_iters * "
                                f"global_batch_size samples") from None

    # ------------------------------------------------------------------ objective
    def loss_normaliser(self, batch: dict) -> float:
        """Tokens of the whole global batch: micro-batch losses then add up to the batch loss."""
        tr = self.trainer
        return float(tr.global_batch_size * batch["tokens"].shape[1])

    def noise_inputs(self, batch: dict) -> obj.DiffusionInputs:
        tr = self.trainer
        return obj.prepare_inputs(batch, tr.cfg.diffusion, seed=tr.cfg.data.seed, mask_token_id=self.mask_token_id,
                                  special_ids=self.special_ids, logit_shift=tr.cfg.model.logit_shift,
                                  iteration=tr.iteration, purpose="train", stratify_group=tr.global_batch_size)

    def forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        inputs = self.noise_inputs(batch)
        normaliser = self.loss_normaliser(batch)
        out = _model_forward(model, inputs, input_tensor)
        tp_group = self.trainer.grid.tp_group
        return out, lambda logits: obj.loss_from_logits(logits, inputs, normaliser, tp_group)

    def flops_per_step(self, trainer: Trainer) -> float:
        """Matmul FLOPs of a step (x3 for fwd+bwd): the body on every token, the output layer only
        on the masked tokens (the head computes nothing else), at the last step's mask fraction."""
        m = trainer.cfg.model
        seq = int(trainer.cfg.data.seq_length)
        tokens = self.tokens_per_step(trainer)
        head = 2.0 * m.vocab_size * m.hidden_size
        body = m.flops_per_token(seq, training=False) - head
        return 3.0 * (body * tokens + head * tokens * self._mask_fraction)

    _mask_fraction = 0.5

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        self._mask_fraction = totals.get("num_masked", 0.0) / max(totals.get("num_tokens", 0.0), 1.0)
        tokens = max(totals.get("num_tokens", 0.0), 1.0)
        masked = max(totals.get("num_masked", 0.0), 1.0)
        return {"loss": totals.get("loss_sum", float("nan")) / tokens,
                "masked_ce": totals.get("ce_sum", float("nan")) / masked,
                "mask_fraction": totals.get("num_masked", 0.0) / tokens}

    # ------------------------------------------------------------------ validation
    def validate(self, trainer: Trainer) -> dict[str, float]:
        if self.valid_loader is None:
            return {}
        from megatron_diffu.parallel.pipeline import forward_backward

        cfg = trainer.cfg
        it = iter(self.valid_loader)
        batches = []
        for _ in range(cfg.training.eval_iters * trainer.num_micro_batches):
            try:
                b = _to_device(next(it), trainer.device)
            except StopIteration:
                break
            batches.extend(dict(b, mc_index=k) for k in range(cfg.diffusion.eval_mc_samples))
        if not batches:
            return {}
        reports = forward_backward(self.elbo_forward_step, trainer.model, batches, trainer.grid, forward_only=True,
                                   dtype=cfg.model.params_dtype)
        totals = trainer.reduce_reports(reports)
        return obj.elbo_metrics(totals.get("elbo_nll_sum", 0.0), totals.get("elbo_tokens", 0.0))

    def elbo_forward_step(self, model, batch: dict, input_tensor: Optional[torch.Tensor]):
        cfg = self.trainer.cfg
        inputs = obj.elbo_inputs(batch, cfg.diffusion, int(batch["mc_index"]), mask_token_id=self.mask_token_id,
                                 special_ids=self.special_ids, logit_shift=cfg.model.logit_shift)
        predictable = obj.predictable_count(batch, self.special_ids, cfg.model.logit_shift, cfg.diffusion)
        out = _model_forward(model, inputs, input_tensor)
        tp_group = self.trainer.grid.tp_group
        return out, lambda logits: (logits.float().sum() * 0.0,
                                    obj.elbo_report(logits, inputs, predictable, tp_group))


def _checkpoint_vocab(cfg: PretrainConfig, n: int, tp: int) -> Optional[int]:
    """Resuming/finetuning: keep the checkpoint's padded vocabulary (Megatron pads to a multiple of
    128 * TP, so a run resumed at another TP would otherwise build a different embedding)."""
    from megatron_diffu.training import checkpointing

    if not checkpointing.has_checkpoint(cfg.checkpoint.load):
        return None
    try:
        saved = checkpointing.read_run_config(checkpointing.resolve_checkpoint_dir(cfg.checkpoint.load))
        v = int(saved.get("model", {}).get("vocab_size"))
    except (checkpointing.CheckpointError, TypeError, ValueError):
        return None
    return v if v >= n and v % tp == 0 else None


def _model_forward(model, inputs: obj.DiffusionInputs, input_tensor: Optional[torch.Tensor]):
    """One pipeline stage's forward: the first stage embeds x_t, later ones take hidden states;
    only the last stage computes (masked-position) logits."""
    stage = getattr(model, "module", model)
    kwargs = dict(attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)
    if getattr(stage, "post_process", True):
        kwargs["logit_positions"] = inputs.logit_positions
    if getattr(stage, "pre_process", True):
        return model(inputs.input_ids, **kwargs)
    return model(hidden_states=input_tensor, **kwargs)


def main(argv: Optional[list[str]] = None, stage: Optional[Stage] = None, config_cls=PretrainConfig) -> int:
    """Entry point shared by the stages: parse, initialise distributed, train. Returns the exit code."""
    try:
        cfg = config_cls.from_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from megatron_diffu.parallel.launch import init_distributed
        init_distributed()
    except ImportError:  # pragma: no cover - launch.py is another part
        _init_from_torchrun_env()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stage = stage or PretrainStage()
    try:
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_initialized() else 1
        cfg.validate(world)
        stage.configure(cfg, world)
        grid = build_grid(cfg)
        trainer = Trainer(cfg, stage, grid)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return trainer.train()


def _init_from_torchrun_env() -> None:
    import os

    import torch.distributed as dist
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


if __name__ == "__main__":
    code = main()
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.exit(code)
