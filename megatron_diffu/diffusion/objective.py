"""The masked-diffusion training objective (docs/ALGORITHMS.md sec. 2): noise, weights, loss, ELBO.

For a clean sequence x0 of length L (one row of a micro-batch):

1. t ~ U(eps, 1) per sequence (`t_eps`); with `stratified_t` the t of the samples of one global
   batch are stratified: t_b = eps + (1 - eps) * ((u + b / G) mod 1), G = global batch size,
   b = sample_index mod G, u keyed by the global batch number sample_index // G.
2. Every maskable token is replaced by the mask token independently with probability t. Never
   masked: positions outside `maskable` (prompts in SFT, truncated tails, eod/bos only with
   `mask_eod: false`), `never_mask_token_ids`, and,
   with the logit shift on, position 0 (nothing predicts it: docs/ALGORITHMS.md sec. 1). A row that
   drew no masked token gets one (its maskable position with the smallest draw).
3. ~`random_truncation_prob` of the sequences are cut to a random length in
   [`min_truncation_length`, L]; the tail becomes padding (not attended, not maskable).
4. loss = sum_{masked n} w_n * CE(logits_n, x0_n) / normaliser, w_n = 1/t (`inverse_t`, the ELBO
   weight) or CART (`cart`: w_n = 1/2 sum_{i != n, x_t^i unmasked} p (1-p)^(|n-i|-1)) or 1
   (`none`). The normaliser is the token count B*L (the stage passes the *global* batch's count
   so micro-batch losses add up to the global-batch loss), or with `loss_normalization: masked`
   (DiffuLLaMA) the micro-batch's masked count times the number of micro-batches of the step.

The logits come from `model(x_t, ..., logit_positions=masked)`: the head computes [N, V/tp]
logits of the masked *target* positions only (the shift lives inside the head), and the
vocab-parallel cross-entropy consumes them without gathering the vocabulary.

Randomness: everything random about a sample (t, truncation, mask, annealed attention mask) is
drawn from a `torch.Generator` seeded by a hash of (seed, global sample index, purpose), in a
fixed order. No global RNG is touched, so every TP/PP/DP layout and every resume draws the same
noise for the same sample. The hash is `common.seeding.noise_seed` (`rl/coupled.py` uses `keyed_generator` too).

Attention-mask annealing (DiffuLLaMA / DiffuCoder's AR adaptation): during the first
`attention_mask_annealing_iters` iterations the mask is causal OR Bernoulli(ratio) with
ratio = iteration / annealing_iters rising from 0 to 1 (then fully bidirectional); the Bernoulli
draws are keyed per sample like the rest of the noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_diffu.common.seeding import noise_seed
from megatron_diffu.config import SectionConfig

LOSS_WEIGHTINGS = ("inverse_t", "cart", "none")
LOSS_NORMALIZATIONS = ("position", "masked")


# ------------------------------------------------------------------------------------- config
@dataclass
class DiffusionConfig(SectionConfig):
    """Options of the masked-diffusion objective (the `diffusion:` section of a run config)."""

    mask_token_id: Optional[int] = None  # None: the tokenizer's mask id (set at start-up)
    t_eps: float = 1e-3  # t ~ U(t_eps, 1)
    stratified_t: bool = False  # stratify t over the global batch
    loss_weighting: str = "inverse_t"  # inverse_t | cart | none
    cart_p: float = 0.3  # geometric p of CART weights
    random_truncation_prob: float = 0.01  # fraction of sequences cut to a random length
    min_truncation_length: int = 2
    attention_mask_annealing_iters: int = 0  # 0: bidirectional from the start
    never_mask_token_ids: list[int] = field(default_factory=list)  # never masked, in every batch (sec. 2.2)
    mask_eod: bool = True  # eod/bos maskable like any token (DiffuLLaMA); False: never masked (sec. 2.2)
    loss_normalization: str = "position"  # position (gbs * S: ELBO per token) | masked (DiffuLLaMA; sec. 2.4)
    eval_mc_samples: int = 4  # Monte-Carlo draws per sequence for the ELBO validation metric
    eval_noise_seed: int = 20260101  # fixed: the validation metric is comparable across runs

    def problems(self) -> list[str]:
        """Errors (empty if fine), each naming the field and the fix."""
        e = []
        if not 0.0 < self.t_eps < 1.0:
            e.append(f"diffusion.t_eps={self.t_eps} must be in (0, 1) (default 1e-3)")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            e.append(f"diffusion.loss_weighting={self.loss_weighting!r}: choose one of {LOSS_WEIGHTINGS}")
        if not 0.0 < self.cart_p < 1.0:
            e.append(f"diffusion.cart_p={self.cart_p} must be in (0, 1) (Dream uses ~0.3)")
        if not 0.0 <= self.random_truncation_prob <= 1.0:
            e.append(f"diffusion.random_truncation_prob={self.random_truncation_prob} must be in [0, 1]")
        if self.min_truncation_length < 1:
            e.append(f"diffusion.min_truncation_length={self.min_truncation_length} must be >= 1")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            e.append(f"diffusion.loss_normalization={self.loss_normalization!r}: choose one of {LOSS_NORMALIZATIONS}")
        if self.attention_mask_annealing_iters < 0:
            e.append(f"diffusion.attention_mask_annealing_iters={self.attention_mask_annealing_iters} must be >= 0")
        if self.eval_mc_samples < 1:
            e.append(f"diffusion.eval_mc_samples={self.eval_mc_samples} must be >= 1")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            e.append(f"diffusion.mask_token_id={self.mask_token_id} must be a vocabulary id >= 0")
        return e


# ------------------------------------------------------------------------------------- noise
def keyed_generator(seed: int, key: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded by `common.seeding.noise_seed(seed, key, purpose)`: no global RNG state."""
    return torch.Generator(device="cpu").manual_seed(noise_seed(seed, key, purpose))


@dataclass
class Noise:
    """The noise of a micro-batch: t [B] fp32, masked [B, S] bool, valid [B, S] bool (not truncated)."""

    t: torch.Tensor
    masked: torch.Tensor
    valid: torch.Tensor
    truncated: torch.Tensor  # [B] bool


def _stratified_u(sample_index: int, group: int, seed: int, purpose: str) -> float:
    u = torch.rand((), generator=keyed_generator(seed, sample_index // group, purpose + "/strata")).item()
    return (u + (sample_index % group) / group) % 1.0


def sample_noise(sample_index: torch.Tensor, maskable: torch.Tensor, cfg: DiffusionConfig, seed: int,
                 purpose: str = "train", stratify_group: Optional[int] = None,
                 truncation: bool = True, logit_shift: bool = True) -> Noise:
    """Draw t, the truncation and the mask of each row from its key (seed, sample_index, purpose).

    `maskable` [B, S] bool: positions that may be masked. `stratify_group`: the global batch size
    when `cfg.stratified_t` (None = independent t). Per row the draws come in a fixed order
    (t, truncate?, length, S mask uniforms), so a row's noise never depends on its neighbours.
    """
    bsz, seq = maskable.shape
    eps = float(cfg.t_eps)
    t = torch.empty(bsz, dtype=torch.float32)
    r = torch.empty(bsz, seq, dtype=torch.float32)
    length = torch.full((bsz,), seq, dtype=torch.long)
    for b, idx in enumerate(sample_index.tolist()):
        g = keyed_generator(seed, idx, purpose)
        u = torch.rand((), generator=g).item()
        cut, cut_len = torch.rand(2, generator=g).tolist()
        r[b] = torch.rand(seq, generator=g)
        if cfg.stratified_t and stratify_group:
            u = _stratified_u(idx, int(stratify_group), seed, purpose)
        t[b] = eps + (1.0 - eps) * u
        if truncation and cut < cfg.random_truncation_prob:
            lo = min(int(cfg.min_truncation_length), seq)
            length[b] = lo + min(int(cut_len * (seq - lo + 1)), seq - lo)
    valid = torch.arange(seq).unsqueeze(0) < length.unsqueeze(1)
    can = maskable.cpu().bool() & valid
    if logit_shift:
        can[:, 0] = False  # with the shift nothing predicts position 0
    masked = can & (r < t.unsqueeze(1))
    # a row with no masked token gets one: its maskable position with the smallest draw
    empty = (~masked.any(1)) & can.any(1)
    if empty.any():
        forced = torch.where(can, r, torch.full_like(r, 2.0)).argmin(1)
        masked[empty, forced[empty]] = True
    return Noise(t=t, masked=masked, valid=valid, truncated=length < seq)


def cart_weights(masked: torch.Tensor, context: torch.Tensor, p: float) -> torch.Tensor:
    """CART (Dream): w_n = 1/2 sum_{i != n, context_i} p (1-p)^(|n-i|-1); [B, S] fp32 (0 off `masked`).

    `context` [B, S] bool = the unmasked real tokens x_t^i (masked positions and padding excluded).
    O(S^2) via a Toeplitz kernel matrix, which is small next to the model's attention.
    """
    seq = masked.shape[1]
    pos = torch.arange(seq, dtype=torch.float64)
    dist = (pos.unsqueeze(0) - pos.unsqueeze(1)).abs()
    kernel = torch.where(dist > 0, p * (1.0 - p) ** (dist - 1.0), torch.zeros_like(dist))
    w = 0.5 * (context.to(torch.float64) @ kernel)
    return (w * masked).to(torch.float32)


def loss_weights(noise: Noise, cfg: DiffusionConfig) -> torch.Tensor:
    """Per-position weights [B, S] fp32 (meaningful on masked positions)."""
    if cfg.loss_weighting == "inverse_t":
        return (1.0 / noise.t).unsqueeze(1).expand_as(noise.masked).contiguous()
    if cfg.loss_weighting == "cart":
        return cart_weights(noise.masked, noise.valid & ~noise.masked, cfg.cart_p)
    return torch.ones(noise.masked.shape, dtype=torch.float32)


def annealing_ratio(iteration: int, annealing_iters: int) -> float:
    """Fraction of future positions visible: iteration / annealing_iters, 1 when annealing is off."""
    if annealing_iters <= 0:
        return 1.0
    return min(1.0, max(0.0, iteration / annealing_iters))


def annealed_attention_mask(sample_index: torch.Tensor, seq: int, ratio: float, seed: int,
                            purpose: str = "train") -> Optional[torch.Tensor]:
    """[B, 1, S, S] bool: causal OR Bernoulli(ratio) per (query, key) pair; None when ratio >= 1."""
    if ratio >= 1.0:
        return None
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    rows = []
    for idx in sample_index.tolist():
        g = keyed_generator(seed, idx, purpose + "/anneal")
        rows.append(causal | (torch.rand(seq, seq, generator=g) < ratio))
    return torch.stack(rows).unsqueeze(1)


# ------------------------------------------------------------------------------------- inputs
@dataclass
class DiffusionInputs:
    """What the model and the loss need for one micro-batch (all on the model's device)."""

    input_ids: torch.Tensor  # x_t [B, S]
    attention_mask: Optional[torch.Tensor]  # None | [B, S] padding | [B, 1, S, S] bool
    position_ids: Optional[torch.Tensor]
    logit_positions: torch.Tensor  # masked [B, S] bool
    targets: torch.Tensor  # x0 at masked positions [N], nonzero() order
    weights: torch.Tensor  # [N] fp32
    t: torch.Tensor  # [B]
    num_tokens: int  # B * S: this micro-batch's share of the normaliser


def default_maskable(tokens: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """Pretraining: every token but the specials (eod/bos/...)."""
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    for sid in special_ids:
        maskable &= tokens != int(sid)
    return maskable


def batch_maskable(batch: dict, cfg: DiffusionConfig, special_ids: Optional[list[int]] = None) -> torch.Tensor:
    """[B, S] bool: the batch's own `maskable` (else every token but `special_ids`), minus
    `cfg.never_mask_token_ids` (applied to every batch, whatever made its `maskable`) and the
    batch's [B, S] padding."""
    tokens = batch["tokens"]
    maskable = batch.get("maskable")
    if maskable is None:
        maskable = default_maskable(tokens, list(special_ids or []))
    never = list(cfg.never_mask_token_ids)
    if never:
        maskable = maskable & ~torch.isin(tokens, torch.tensor(never, dtype=tokens.dtype, device=tokens.device))
    pad = batch.get("attention_mask")
    if pad is not None and pad.dim() == 2:
        maskable = maskable & pad.bool()
    return maskable


def _combine_masks(padding: Optional[torch.Tensor], structured: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """AND a [B, S] padding mask into a [B, 1, S, S] mask (queries on padding keep their diagonal
    so no softmax row is empty); either may be None."""
    if structured is None:
        return padding
    if padding is None:
        return structured
    pad = padding.bool()
    pair = pad[:, None, :, None] & pad[:, None, None, :]
    eye = torch.eye(pad.shape[1], dtype=torch.bool, device=pad.device)
    return (structured & pair) | (eye & ~pad[:, None, :, None])


def prepare_inputs(batch: dict, cfg: DiffusionConfig, *, seed: int, mask_token_id: int,
                   special_ids: Optional[list[int]] = None, logit_shift: bool = True, iteration: int = 0,
                   purpose: str = "train", stratify_group: Optional[int] = None,
                   truncation: bool = True, weighting: Optional[str] = None,
                   t_override: Optional[torch.Tensor] = None) -> DiffusionInputs:
    """Noise one micro-batch (`tokens`, `sample_index`, optional `maskable`, `attention_mask`,
    `position_ids`) into the model inputs and the loss's targets/weights."""
    tokens = batch["tokens"]
    device = tokens.device
    maskable = batch_maskable(batch, cfg, special_ids)
    pad = batch.get("attention_mask")
    noise = sample_noise(batch["sample_index"].cpu(), maskable.cpu(), cfg, seed, purpose, stratify_group,
                         truncation, logit_shift)
    if t_override is not None:  # ELBO: stratified MC t chosen by the caller, mask redrawn from it
        noise = _redraw_with_t(batch["sample_index"].cpu(), maskable.cpu(), noise, t_override, seed, purpose, logit_shift)
    w_cfg = cfg if weighting is None else DiffusionConfig(**{**cfg.__dict__, "loss_weighting": weighting})
    weights = loss_weights(noise, w_cfg)
    masked = noise.masked.to(device)
    x_t = torch.where(masked, torch.full_like(tokens, int(mask_token_id)), tokens)
    padding = pad if (pad is not None and pad.dim() == 2) else None
    if noise.truncated.any():
        valid = noise.valid.to(device)
        padding = valid if padding is None else (padding.bool() & valid)
    structured = pad if (pad is not None and pad.dim() == 4) else None
    ratio = annealing_ratio(iteration, cfg.attention_mask_annealing_iters) if purpose == "train" else 1.0
    anneal = annealed_attention_mask(batch["sample_index"].cpu(), tokens.shape[1], ratio, seed, purpose)
    if anneal is not None:
        structured = anneal.to(device) if structured is None else (structured & anneal.to(device))
    attention_mask = _combine_masks(padding, structured)
    return DiffusionInputs(
        input_ids=x_t, attention_mask=attention_mask, position_ids=batch.get("position_ids"),
        logit_positions=masked, targets=tokens[masked], weights=weights.to(device)[masked],
        t=noise.t.to(device), num_tokens=int(tokens.numel()))


def _redraw_with_t(sample_index, maskable, noise: Noise, t: torch.Tensor, seed: int, purpose: str,
                   logit_shift: bool) -> Noise:
    can = maskable & noise.valid
    if logit_shift:
        can[:, 0] = False
    r = torch.stack([torch.rand(maskable.shape[1], generator=keyed_generator(seed, int(i), purpose + "/r"))
                     for i in sample_index.tolist()])
    masked = can & (r < t.unsqueeze(1))
    empty = (~masked.any(1)) & can.any(1)
    if empty.any():
        forced = torch.where(can, r, torch.full_like(r, 2.0)).argmin(1)
        masked[empty, forced[empty]] = True
    return Noise(t=t.float(), masked=masked, valid=noise.valid, truncated=noise.truncated)


# ------------------------------------------------------------------------------------- loss
def weighted_masked_ce(logits: torch.Tensor, inputs: DiffusionInputs, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_n w_n CE_n, CE per masked token [N]) from the head's [N, V/tp] logits, vocab-parallel."""
    from megatron_diffu.parallel.cross_entropy import vocab_parallel_cross_entropy

    if logits.shape[0] != inputs.targets.shape[0]:
        raise ValueError(f"model returned {logits.shape[0]} logit rows for {inputs.targets.shape[0]} masked "
                         f"positions: call it with logit_positions=inputs.logit_positions")
    ce = vocab_parallel_cross_entropy(logits, inputs.targets, tp_group)
    return (ce.float() * inputs.weights).sum(), ce


def diffusion_loss(model: Callable, inputs: DiffusionInputs, normaliser: float, tp_group=None) -> tuple[torch.Tensor, dict]:
    """Forward + loss in one call (no pipeline): (loss, report); loss = sum(w * CE) / normaliser."""
    logits = model(inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                   logit_positions=inputs.logit_positions)
    return loss_from_logits(logits, inputs, normaliser, tp_group)


def loss_from_logits(logits: torch.Tensor, inputs: DiffusionInputs, normaliser: float,
                     tp_group=None) -> tuple[torch.Tensor, dict]:
    """(loss_for_backward, report). The report's sums add up over micro-batches and DP ranks."""
    wsum, ce = weighted_masked_ce(logits, inputs, tp_group)
    report = {"loss_sum": wsum.detach(), "num_tokens": torch.tensor(float(inputs.num_tokens)),
              "num_masked": torch.tensor(float(ce.numel())), "ce_sum": ce.detach().float().sum()}
    return wsum / float(normaliser), report


# ------------------------------------------------------------------------------------- ELBO
def elbo_inputs(batch: dict, cfg: DiffusionConfig, mc_index: int, *, mask_token_id: int,
                special_ids: Optional[list[int]] = None, logit_shift: bool = True) -> DiffusionInputs:
    """Inputs of MC draw `mc_index` of the validation ELBO: fixed seed `cfg.eval_noise_seed`, t
    stratified over the `eval_mc_samples` draws of a sequence, weight 1/t, no truncation, full
    bidirectional attention."""
    k_total = int(cfg.eval_mc_samples)
    idx = batch["sample_index"].cpu().tolist()
    u = torch.tensor([torch.rand((), generator=keyed_generator(cfg.eval_noise_seed, i, "elbo/u")).item() for i in idx])
    frac = (u + mc_index / k_total) % 1.0
    t = cfg.t_eps + (1.0 - cfg.t_eps) * frac
    return prepare_inputs(batch, cfg, seed=cfg.eval_noise_seed, mask_token_id=mask_token_id, special_ids=special_ids,
                          logit_shift=logit_shift, purpose=f"elbo/{mc_index}", truncation=False,
                          weighting="inverse_t", t_override=t)


def elbo_report(logits: torch.Tensor, inputs: DiffusionInputs, num_predictable: int, tp_group=None) -> dict:
    """Sums of one ELBO draw: nll_sum = sum_n CE_n / t, predictable = tokens that could be masked."""
    wsum, _ = weighted_masked_ce(logits, inputs, tp_group)
    return {"elbo_nll_sum": wsum.detach(), "elbo_tokens": torch.tensor(float(num_predictable))}


def elbo_metrics(nll_sum: float, tokens: float) -> dict[str, float]:
    """Per-token ELBO bound (nats) and the perplexity bound exp(bound)."""
    loss = nll_sum / max(tokens, 1.0)
    return {"elbo_loss": loss, "elbo_ppl": math.exp(min(loss, 700.0))}


def predictable_count(batch: dict, special_ids: list[int], logit_shift: bool, cfg: DiffusionConfig) -> int:
    """Tokens the ELBO covers: maskable ones (and not position 0 under the shift)."""
    maskable = batch_maskable(batch, cfg, special_ids)
    if logit_shift:
        maskable = maskable.clone()
        maskable[:, 0] = False
    return int(maskable.sum())
