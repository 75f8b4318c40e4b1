"""The GRPO estimators' policy gradients on a mini run's SFT model (docs/MINI_REPRO.md):
`python -m megatron_diffu.repro.gradients --run runs/mini_repro [--rollouts 4] [--mask-seeds 8]`.

The full run's GRPO logs show a pre-clip grad norm about 6x smaller for coupled-GRPO than for d1,
and a coupled gain that varies more over RL seeds. This probe measures why. From the run's SFT
checkpoint, with its GRPO arms' configuration (grpo.yaml + the run's flags, in fp32), the GRPO
stage makes `rollouts` rollout batches (its own sampler, rewards and advantages); then for every
estimator variant and each of M mask seeds s (the stage's mask seeds of inner iterations 0..M-1)
it takes the policy gradient of the first GRPO step (ratio 1, KL 0):

    g_s = grad_theta of  - sum_r A_r sum_n m_rn logp_rn(s) / sum m

and reports, averaged over the rollout batches:

    norm        mean_s ||g_s||                           (the trainer's grad norm before clipping)
    mean_norm   ||gbar||, gbar = mean_s g_s              (what the mask noise averages to)
    mask_noise  mean_s ||g_s - gbar||^2 / ||gbar||^2     (the masks' share: 0 = no mask noise)
    cos_<ref>   cos(gbar, gbar of a reference variant)    (do two estimators point the same way);
                references: d1, and d1 without prompt masking (= the x_full gradient, noise-free)
    cos_seed    mean over pairs s != s' of cos(g_s, g_s')  (agreement of two single-seed steps)

Variants: coupled (DiffuCoder's), its two halves alone (x_full; the 1/t-weighted complementary
pair), coupled with d1's prompt masking (option coupled_p_mask_prompt = d1's p_mask_prompt), d1 with
the recipe's prompt masking, and d1 without it. The halves add up to coupled's
gradient exactly (its estimate is their mean), which the tests check.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_diffu.rl.coupled import coupled_from_logits, coupled_terms, per_copy_log_probs

VARIANTS = ("coupled", "coupled_full_half", "coupled_pair_half", "coupled_prompt_mask", "d1", "d1_no_prompt_mask")
REFERENCES = ("d1", "d1_no_prompt_mask")


@dataclass(frozen=True)
class Variant:
    estimator: str                      # the batch's estimator (its noised copies)
    logp: Callable                      # (batch, logits, tp_group) -> [B, S] log-prob estimate
    # GRPOConfig fields set for this variant (else the recipe's): a value, or a function of the recipe's config
    overrides: tuple[tuple[str, float | Callable], ...] = ()


def _coupled_half(which: int) -> Callable:
    def logp(batch, logits, tp):
        from megatron_diffu.parallel.cross_entropy import vocab_parallel_log_probs

        token_logp = vocab_parallel_log_probs(logits, batch.targets, tp).float()
        t = batch.noise.t.to(token_logp.dtype)[:, None]
        return coupled_terms(per_copy_log_probs(batch, token_logp), t)[which] / 2.0
    return logp


def _estimator(name: str) -> Callable:
    return lambda batch, logits, tp: coupled_from_logits(batch, logits, name, tp)[0]


VARIANT_SPECS = {
    "coupled": Variant("coupled", _estimator("coupled")),
    "coupled_full_half": Variant("coupled", _coupled_half(0)),
    "coupled_pair_half": Variant("coupled", _coupled_half(1)),
    "coupled_prompt_mask": Variant("coupled", _estimator("coupled"), (("coupled_p_mask_prompt", lambda g: g.p_mask_prompt),)),
    "d1": Variant("d1", _estimator("d1")),
    "d1_no_prompt_mask": Variant("d1", _estimator("d1"), (("p_mask_prompt", 0.0),)),
}


def gradient_stats(grads: list[torch.Tensor], references: Optional[dict[str, torch.Tensor]] = None) -> dict:
    """The module docstring's statistics of M >= 2 flat gradients (fp64); `references`: name -> mean gradient."""
    g = torch.stack([x.double() for x in grads])
    mean = g.mean(0)
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    m = g.shape[0]
    pair_cos = (unit @ unit.T).sum() - m  # the diagonal's m ones out
    out = {"norm": float(g.norm(dim=1).mean()), "mean_norm": float(mean.norm()),
           "mask_noise": float(((g - mean) ** 2).sum(1).mean() / mean.pow(2).sum().clamp_min(1e-300)),
           "cos_seed": float(pair_cos / (m * (m - 1)))}
    for name, ref in (references or {}).items():
        ref = ref.double()
        out[f"cos_{name}"] = float(mean @ ref / (mean.norm() * ref.norm()).clamp_min(1e-300))
    return out


def policy_gradient(trainer, buf, inner: int, mask_token_id: int, variant: Variant) -> torch.Tensor:
    """Flat gradient of the first-step GRPO loss (ratio 1, no KL) with `variant`'s estimate."""
    from megatron_diffu.stages.grpo.logprobs import coupled_forward, coupled_micro_batch

    g = trainer.cfg.grpo
    changes = [("estimator", variant.estimator)] + [(name, v(g) if callable(v) else v) for name, v in variant.overrides]
    saved = {name: getattr(g, name) for name, _ in changes}
    try:
        for name, value in changes:
            setattr(g, name, value)
        rows = range(0, buf.tokens.shape[0])
        batch = coupled_micro_batch(trainer, buf, rows, inner, mask_token_id, with_targets=False)
    finally:
        for name, value in saved.items():
            setattr(g, name, value)
    model = trainer.model
    logits = coupled_forward(model, batch, None)
    logp = variant.logp(batch["coupled"], logits, trainer.grid.tp_group)
    mask = buf.completion_mask.float()
    loss = -(buf.advantages.float()[:, None] * logp * mask).sum() / mask.sum().clamp(min=1.0)
    return flat_gradient(trainer, loss)


def flat_gradient(trainer, loss: torch.Tensor) -> torch.Tensor:
    """`loss`'s gradient as the trainer's optimizer sees it: its flat fp32 gradient buffer (the layers
    may accumulate weight gradients into it directly, so autograd.grad would not see them)."""
    opt = trainer.optimizer
    opt.zero_grad()
    loss.backward()
    opt.reduce_gradients()
    return opt.grad_buffer.detach().clone()


def probe(trainer, stage, rollouts: int, mask_seeds: int, variants=VARIANTS, progress=print) -> dict:
    """Per rollout batch and variant, the statistics of `mask_seeds` gradients; and their means."""
    per_batch = []
    for k in range(rollouts):
        buf, _ = stage.rollout(k)
        grads = {v: [policy_gradient(trainer, buf, j, stage.mask_token_id, VARIANT_SPECS[v]) for j in range(mask_seeds)]
                 for v in variants}
        refs = {r: torch.stack(grads[r]).double().mean(0) for r in REFERENCES if r in grads}
        stats = {v: gradient_stats(gs, refs) for v, gs in grads.items()}
        stats["_rollout"] = {"reward_mean": float(buf.rewards.mean()), "advantage_abs_mean": float(buf.advantages.abs().mean()),
                             "completion_tokens": float(buf.completion_mask.sum())}
        per_batch.append(stats)
        progress(f"[gradients] rollout batch {k + 1}/{rollouts}: " + ", ".join(
            f"{v} |g| {stats[v]['norm']:.3g}" for v in variants))
    mean = {v: {key: sum(b[v][key] for b in per_batch) / len(per_batch) for key in per_batch[0][v]} for v in variants}
    return {"rollouts": rollouts, "mask_seeds": mask_seeds, "mean": mean, "per_batch": per_batch}


def build_trainer(run_dir: str, extra_flags: list[str]):
    """The run's GRPO configuration from its SFT checkpoint, in one process (fp32, no saving)."""
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.repro.mini import Run, Settings, grpo_flags, settings_flags
    from megatron_diffu.stages.grpo.config import GRPORunConfig
    from megatron_diffu.stages.grpo.stage import GRPOStage
    from megatron_diffu.training.trainer import Trainer

    with open(os.path.join(run_dir, "settings.json")) as f:
        saved = json.load(f)
    s = Settings(**{f.name: saved[f.name] for f in dataclasses.fields(Settings) if f.name in saved})
    run = Run(run_dir, saved.get("mode", "full"), s)
    sft = run.ckpt("sft")
    for need, stage in ((run.path("data", "rl.jsonl"), "select_rl"), (sft, "sft")):
        if not os.path.exists(need):
            raise SystemExit(f"error: {need} does not exist: run the {stage} stage of {run_dir} first "
                             f"(python -m megatron_diffu.repro.mini --out {run_dir} --only ... {stage})")
    argv = [*grpo_flags(run, "coupled"), *settings_flags(s, grpo=True), "--load", sft, "--finetune", *extra_flags]
    cfg = GRPORunConfig.from_args(argv)
    cfg.checkpoint.save, cfg.checkpoint.save_interval = None, None  # grpo.yaml's interval needs a --save
    stage = GRPOStage()
    stage.configure(cfg, 1)
    trainer = Trainer(cfg, stage, grid=ProcessGrid.single(), device=torch.device("cpu"))
    return trainer, stage


def format_table(result: dict) -> str:
    rows = ["| variant | grad norm | norm of the seed mean | mask noise | cos(two seeds) | "
            + " | ".join(f"cos(mean, {r}'s)" for r in REFERENCES) + " |", "|---" * (5 + len(REFERENCES)) + "|"]
    for v, st in result["mean"].items():
        rows.append(f"| {v} | {st['norm']:.3g} | {st['mean_norm']:.3g} | {st['mask_noise']:.3g} | {st['cos_seed']:.3f} | "
                    + " | ".join(f"{st.get('cos_' + r, float('nan')):.3f}" for r in REFERENCES) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a mini run's folder (its SFT checkpoint and RL set)")
    p.add_argument("--rollouts", type=int, default=4, help="rollout batches (4 prompts x 8 completions each)")
    p.add_argument("--mask-seeds", type=int, default=8, help="mask seeds per rollout batch and variant (>= 2)")
    p.add_argument("--out", default=None, help="JSON output (default RUN/gradients.json)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then GRPO flags that override the run's")
    a = p.parse_args(argv)
    if a.mask_seeds < 2:
        raise SystemExit("error: --mask-seeds must be at least 2 (the statistics compare seeds)")
    from megatron_diffu.common.atomic import atomic_write_json

    trainer, stage = build_trainer(a.run, [x for x in a.extra if x != "--"])
    result = probe(trainer, stage, a.rollouts, a.mask_seeds)
    out = a.out or os.path.join(a.run, "gradients.json")
    atomic_write_json(out, result)
    print(format_table(result))
    print(f"[gradients] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
