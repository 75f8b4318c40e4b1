"""Masked-diffusion sampling with Dream's `diffusion_generate` semantics, plus measured fast paths.

docs/ALGORITHMS.md sec. 4. One call decodes a batch of prompts:

* ``x = left-padded prompt + N mask tokens``; with padding the model gets the [B, L] padding
  mask a (real queries see the real keys: ``a_i AND a_j`` on real rows; the model keeps it as a
  [B, 1, 1, L] key-padding mask) and ``position_ids = cumsum(a) - 1`` (clamped at 0 on the
  padding, whose positions and outputs never matter); without padding the mask is None.
* timesteps ``tau = linspace(1, eps, S + 1)``; at step i (t = tau_i, s = tau_{i+1}) the model's
  (already shifted) logits of the masked positions are filtered (temperature, then top-p, then
  top-k), a token is sampled (T > 0) or taken by argmax (T = 0) together with a confidence
  (``maskgit_plus``: p of that token; ``topk_margin``: p1 - p2; ``entropy``: sum p log p), and
  ``k = int(#masked * (1 - s / t))`` positions are revealed (all remaining at the last step):
  the top-k by confidence, or k drawn without replacement from ``softmax(conf / alg_temp)``.
  ``origin`` reveals each masked position independently with probability ``1 - s/t``.

Decisions beyond Dream (documented here because callers depend on them):

* **Randomness** is owned per prompt: row b draws from its own ``torch.Generator`` seeded by
  ``row_seed(cfg.seed, sample_index[b])`` (``sample_index`` defaults to ``range(B)``), so a
  prompt decodes the same alone or inside any batch, on any TP layout. Per step and row the
  draws are, in order: (origin) ``rand(#masked)`` for the transfer coin flips, then one token
  per transferred position; (other algs) one token per masked position (T > 0 only), then
  ``multinomial`` for the positions when ``alg_temp > 0``. A token is drawn by inverting the
  CDF: one fp64 uniform ``u`` per position, the first token whose cumulative probability
  exceeds ``u * total`` (``sample_tokens``): the same distribution as Dream's
  ``torch.multinomial``, 6x cheaper on a 152k-entry CPU row (multinomial draws an exponential
  per vocabulary entry). An explicit ``generator=`` replaces the per-row generators
  (rows then draw from it in row order; batch and alone no longer agree).
* **k is per row** (``#masked_in_row``); Dream divides the batch total by B, identical whenever
  rows hold equal mask counts (always, unless a hook edits tokens).
* Sampling math runs in fp32 whatever the model's compute dtype, one row at a time (peak memory
  one row's candidates x V, not the batch's). The head computes only the candidates' logits
  (``logit_positions``): the full head's rows, up to float rounding.
* A position counts as revealed when its token stops being the mask id (Dream's
  ``x == mask_id``): a sampled mask token leaves the position masked for the next step.
* **Blocks** (``block_length``): the N new tokens form ``N / block_length`` blocks decoded left
  to right, ``steps / num_blocks`` steps each with its own ``linspace(1, eps, .)`` schedule; only
  the current block's masks are candidates and counted (LLaDA's semi-AR rule).
* **Threshold** (Fast-dLLM parallel decoding), ``threshold_rule``:
  ``fast_dllm`` (default; NVlabs/Fast-dLLM ``get_transfer_index`` with a threshold): a step
  reveals every candidate whose chosen token has probability >= ``threshold``, plus the
  candidate of highest chosen-token probability (at least one per step); a block runs until it
  has no masks, whatever ``steps`` says (at most ``block_length`` steps: the last of those
  reveals everything left, which only matters when mask tokens are drawn).
  ``alg_confidence`` (the earlier rule): probability > ``threshold`` plus the candidate with the
  highest *alg* confidence, within the block's ``steps / num_blocks`` steps (the last reveals
  everything left, so ``steps`` bounds the forward passes).
  The threshold is a probability whatever the alg; ``threshold > 1`` is one token per step. Not
  allowed with ``origin`` or ``alg_temp > 0``.
* **Cache** (``use_cache``, Fast-dLLM prefix cache, approximate): at the first step of every
  block one full forward also returns the keys/values; the next steps of that block run only
  positions ``[block_start - 1, L)`` with the keys/values of ``[0, block_start - 1)`` as
  ``prefix_kv``. Position ``block_start - 1`` is recomputed because the shifted head predicts
  token ``block_start`` from that hidden state. The prefix is stale (it was computed while the
  block was masked), hence approximate; ``benchmarks/sampling.py`` measures the agreement.
* Stop handling: ``completions[b]`` is row b's new tokens cut before the first ``stop_ids``
  token; ``sequences`` keep everything.
* Tensor parallel: the vocab-sharded logits of the candidate positions are all-gathered over
  ``grid.tp_group`` (sampling needs the full distribution, top-p a full sort); every TP rank
  holds the same generators and therefore reveals the same tokens. ``grid`` defaults to
  ``model.grid`` (DiffusionTransformer keeps its own), so a forgotten ``grid=`` cannot sample
  from one vocabulary shard.
* Pipeline parallel: every stage runs the same step loop; hidden states go stage to stage with
  send/recv, the last stage samples, and the new tokens are broadcast over ``grid.pp_group``.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_diffu.common.seeding import sampler_row_seed
from megatron_diffu.config import SectionConfig

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
THRESHOLD_RULES = ("fast_dllm", "alg_confidence")

LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
TokensHook = Callable[[Optional[int], torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class SamplingConfig(SectionConfig):
    """Sampler options (flags derive from the names: ``--max-new-tokens`` ...)."""

    max_new_tokens: int = 256
    steps: int = 256
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alg: str = "entropy"  # DiffuCoder's choice; Dream's library default is "origin"
    alg_temp: Optional[float] = None
    eps: float = 1e-3
    block_length: Optional[int] = None
    threshold: Optional[float] = None
    threshold_rule: str = "fast_dllm"  # fast_dllm (p >= threshold + most probable) | alg_confidence
    use_cache: bool = False
    seed: int = 0

    def problems(self) -> list[str]:
        errors = []
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.steps < 1:
            errors.append(f"steps={self.steps}: must be >= 1")
        if self.alg not in ALGS:
            errors.append(f"alg={self.alg!r}: choose one of {', '.join(ALGS)}")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature}: must be >= 0 (0 = argmax)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p}: must be in (0, 1] (or unset)")
        if self.top_k is not None and self.top_k < 1:
            errors.append(f"top_k={self.top_k}: must be >= 1 (or unset)")
        if self.alg_temp is not None and self.alg_temp < 0:
            errors.append(f"alg_temp={self.alg_temp}: must be >= 0 (0/unset = top-k by confidence)")
        if not 0 < self.eps < 1:
            errors.append(f"eps={self.eps}: must be in (0, 1)")
        if self.block_length is not None:
            if self.block_length < 1 or self.max_new_tokens % self.block_length:
                errors.append(f"block_length={self.block_length}: must divide max_new_tokens={self.max_new_tokens}")
            else:
                nb = self.max_new_tokens // self.block_length
                if self.steps % nb:
                    errors.append(f"steps={self.steps}: must be a multiple of the number of blocks "
                                  f"max_new_tokens/block_length = {nb}")
        if self.threshold_rule not in THRESHOLD_RULES:
            errors.append(f"threshold_rule={self.threshold_rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
        if self.threshold is not None:
            if self.alg == "origin":
                errors.append("threshold: needs a confidence, so alg must be maskgit_plus, topk_margin or entropy (not origin)")
            if self.alg_temp:
                errors.append(f"threshold with alg_temp={self.alg_temp}: threshold decoding picks by confidence; unset alg_temp")
        return errors

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // (self.block_length or self.max_new_tokens)


@dataclass
class GenerationOutput:
    sequences: torch.Tensor            # [B, P + N] left-padded prompts + new tokens
    completions: list[list[int]]       # per prompt: new tokens cut before the first stop id
    reveal_step: torch.Tensor          # [B, N] long: step at which each new token was revealed (-1: never)
    prompt_length: int                 # P (padded prompt length)
    history: Optional[list[torch.Tensor]] = None  # x after every step (output_history=True)
    nfe: int = 0                       # model forward passes
    elapsed_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.stats.get("tokens_per_s", 0.0)


# --------------------------------------------------------------------------- randomness
def row_seed(seed: int, sample_index: int) -> int:
    """Seed of prompt `sample_index`'s generator (`common.seeding.sampler_row_seed`: a hash, so
    nearby seeds do not share streams)."""
    return sampler_row_seed(seed, sample_index)


def _row_generators(cfg: SamplingConfig, batch: int, sample_index: Optional[Sequence[int]],
                    generator: Optional[torch.Generator], device: torch.device) -> list[torch.Generator]:
    if generator is not None:
        return [generator] * batch
    ids = list(range(batch)) if sample_index is None else [int(i) for i in sample_index]
    if len(ids) != batch:
        raise ValueError(f"sample_index has {len(ids)} entries for {batch} prompts")
    return [torch.Generator(device=device).manual_seed(row_seed(cfg.seed, i)) for i in ids]


# --------------------------------------------------------------------------- token math
# top-p looks at this many best tokens first (then the next count for the rows whose nucleus is
# larger); rows that need more than the last count get a full sort
TOP_P_CANDIDATES = (1024, 16384)


def _drop_after_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop mask over a descending-sorted prefix: everything after the token whose mass crosses top_p."""
    cum = torch.cumsum(sorted_probs, dim=-1)
    drop_sorted = cum > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses top_p
    drop_sorted[..., 0] = False
    return drop_sorted


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted vocabulary whose mass reaches top_p (>= 1 token).

    A full sort of a 152k-entry row dominated rollouts, yet a nucleus is usually small: take the
    best k tokens with `topk` (k from TOP_P_CANDIDATES, ~5-15x cheaper than the sort); where their
    mass already crosses top_p the kept set is the full sort's, else the row tries the next k and
    finally a full sort. The candidate path sums in fp64, the sort path (Dream's) in fp32: they
    differ only where the crossing token's cumulative mass lies within the fp32 sum's rounding
    (~1e-6 for a nucleus of a few tokens, ~1e-5 for thousands) of top_p, i.e. whether one tail
    token of that size is kept. Vocabularies up to TOP_P_CANDIDATES[0] entries always sort.
    """
    vocab = logits.size(-1)
    rows = logits.reshape(-1, vocab)
    keep = torch.zeros_like(rows, dtype=torch.bool)
    todo = torch.arange(rows.size(0), device=rows.device)
    for k in TOP_P_CANDIDATES:
        if k >= vocab or not todo.numel():
            break
        sub = rows[todo]
        top_logits, top_idx = torch.topk(sub, k, dim=-1)
        # fp64 normaliser and prefix sums: the kept set is the exact nucleus up to fp64 rounding
        norm = torch.exp(sub - top_logits[:, :1]).sum(-1, keepdim=True, dtype=torch.float64)
        top_probs = torch.exp(top_logits - top_logits[:, :1]).double() / norm
        done = top_probs.sum(-1) > top_p
        if bool(done.any()):
            keep[todo[done]] = torch.zeros_like(sub[done], dtype=torch.bool).scatter_(
                -1, top_idx[done], ~_drop_after_top_p(top_probs[done], top_p))
        todo = todo[~done]
    if todo.numel():
        sorted_logits, order = torch.sort(rows[todo], descending=True)
        drop_sorted = _drop_after_top_p(torch.softmax(sorted_logits, dim=-1), top_p)
        keep[todo] = torch.zeros_like(drop_sorted).scatter_(-1, order, ~drop_sorted)
    return logits.masked_fill(~keep.view_as(logits), torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """fp32 probabilities after temperature, then top-p, then top-k (Dream's order)."""
    logits = logits.float()
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = top_p_filter(logits, cfg.top_p)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    return torch.softmax(logits, dim=-1)


def sample_tokens(probs: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [n, V] (unnormalised is fine) by inverse CDF: the first index
    whose fp64 cumulative mass exceeds u * total, u ~ U[0, 1) from `gen` (one draw per row).
    Zero-probability tokens are never chosen (their cumulative mass equals their predecessor's)."""
    cum = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = torch.rand(probs.size(0), 1, generator=gen, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cum, u * cum[:, -1:], right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def sample_and_confidence(probs: torch.Tensor, cfg: SamplingConfig,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [n], the alg's confidence [n] and the tokens' probabilities [n] for one row's candidates."""
    if cfg.temperature > 0:
        x0 = sample_tokens(probs, gen)
        p_tok = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        p_tok, x0 = probs.max(dim=-1)
    conf = p_tok
    if cfg.alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif cfg.alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return x0, conf, p_tok


def schedule_count(masked: int, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Dream's k = int(#masked * (1 - s/t)) in fp32 (all remaining at the last step)."""
    if last:
        return masked
    return int((torch.tensor(float(masked)) * (1 - s / t)).item())


def _reveal_row(probs: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator, t: torch.Tensor,
                s: torch.Tensor, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's step for the confidence algs: (indices into the candidates to reveal, their tokens)."""
    n = probs.shape[0]
    x0, conf, p_tok = sample_and_confidence(probs, cfg, gen)
    if cfg.threshold is not None:
        if last:
            chosen = torch.arange(n, device=probs.device)
        elif cfg.threshold_rule == "fast_dllm":
            above = p_tok >= cfg.threshold
            above[p_tok.argmax()] = True  # the most probable token: at least one per step
            chosen = above.nonzero().squeeze(-1)
        else:
            above = p_tok > cfg.threshold
            above[conf.argmax()] = True  # at least one token per step
            chosen = above.nonzero().squeeze(-1)
        return chosen, x0[chosen]
    k = schedule_count(n, t, s, last)
    if k <= 0:
        return x0[:0].long(), x0[:0]
    if not cfg.alg_temp:
        chosen = torch.topk(conf, k).indices
    else:
        chosen = torch.multinomial(torch.softmax(conf / cfg.alg_temp, dim=-1), k, generator=gen)
    return chosen, x0[chosen]


# --------------------------------------------------------------------------- model plumbing
def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def build_batch(prompts: Sequence[Sequence[int]], max_new_tokens: int, mask_id: int, pad_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[prompt | N masks]`` ids [B, L] and the real-token mask [B, L] bool."""
    if not prompts:
        raise ValueError("diffusion_generate: no prompts given")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty: the shifted head needs at least one prompt token at position 0")
    P = max(len(p) for p in prompts)
    B, L = len(prompts), P + max_new_tokens
    x = torch.full((B, L), mask_id, dtype=torch.long)
    real = torch.ones((B, L), dtype=torch.bool)
    for b, p in enumerate(prompts):
        x[b, :P - len(p)] = pad_id
        x[b, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        real[b, :P - len(p)] = False
    return x.to(device), real.to(device)


class _Forward:
    """The model call for one generation: masks, positions, TP gather, PP hand-off, KV cache."""

    def __init__(self, model: Any, real: torch.Tensor, grid: Any):
        self.model, self.grid = model, grid
        self.padded = not bool(real.all())
        B, L = real.shape
        if self.padded:  # the [B, L] padding mask: the model keeps it as key padding (model/attention.py)
            self.pos = (real.long().cumsum(-1) - 1).clamp_min(0)
            self.real = real
        else:
            self.pos = torch.arange(L, device=real.device).expand(B, L)
            self.real = None
        self.tp_group = getattr(grid, "tp_group", None) if grid is not None else None
        self.tp = _group_size(self.tp_group)
        self.pp = getattr(grid, "pp_size", 1) if grid is not None else 1
        self.nfe = 0
        try:  # the head can skip every non-candidate row (a 152k-vocab head dominates small models)
            self.has_logit_positions = "logit_positions" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError, AttributeError):
            self.has_logit_positions = False

    def __call__(self, x: torch.Tensor, start: int = 0, prefix_kv: Optional[list] = None,
                 return_kv: bool = False, logit_positions: Optional[torch.Tensor] = None
                 ) -> tuple[Optional[torch.Tensor], Optional[list]]:
        """Logits for positions [start, L) (or only the `logit_positions` rows, [n, V/tp]; None on
        non-last PP stages) and optionally the kv."""
        ids = x[:, start:]
        kwargs: dict[str, Any] = {}
        if logit_positions is not None:
            kwargs["logit_positions"] = logit_positions
        if self.real is not None:  # without padding None = every query sees every key (prefix too)
            kwargs["attention_mask"] = self.real  # keys: the prefix [0, start) and the queries [start, L)
        if self.padded or start > 0:
            kwargs["position_ids"] = self.pos[:, start:]
        if prefix_kv is not None:
            kwargs["prefix_kv"] = prefix_kv
        if return_kv:
            kwargs["return_kv"] = True
        self.nfe += 1
        if self.pp > 1:
            out = self._pipeline_forward(ids, kwargs)
        else:
            out = self.model(ids, **kwargs)
        kv = None
        if return_kv:
            out, kv = out
        return out, kv

    def _pipeline_forward(self, ids: torch.Tensor, kwargs: dict) -> Any:
        grid, model = self.grid, self.model
        if grid.is_first_stage:
            out = model(ids, **kwargs)
        else:
            shape = model.stage_output_shape(ids.shape[0], ids.shape[1])
            hidden = torch.empty(shape, dtype=_model_dtype(model), device=ids.device)
            dist.recv(hidden, src=grid.prev_rank)
            out = model(None, hidden_states=hidden, **kwargs)
        if not grid.is_last_stage:
            h, kv = out if kwargs.get("return_kv") else (out, None)
            dist.send(h.contiguous(), dst=grid.next_rank)
            return (None, kv) if kwargs.get("return_kv") else None
        return out

    def gather_vocab(self, logits_local: torch.Tensor) -> torch.Tensor:
        """[n, V/tp] -> [n, V] over the TP group (identical on every TP rank)."""
        if self.tp == 1:
            return logits_local
        parts = [torch.empty_like(logits_local) for _ in range(self.tp)]
        dist.all_gather(parts, logits_local.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def share_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """PP: the last stage's x goes to every stage of this pipeline."""
        if self.pp == 1:
            return x
        dist.broadcast(x, src=self.grid.pp_ranks[-1], group=self.grid.pp_group)
        return x


def _group_size(group: Any) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _model_dtype(model: Any) -> torch.dtype:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    dt = getattr(cfg, "params_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


# --------------------------------------------------------------------------- the sampler
@torch.no_grad()
def diffusion_generate(model: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, mask_id: int,
                       pad_id: int, stop_ids: Sequence[int] = (), grid: Any = None, output_history: bool = False,
                       logits_hook: Optional[LogitsHook] = None, tokens_hook: Optional[TokensHook] = None,
                       generator: Optional[torch.Generator] = None,
                       sample_index: Optional[Sequence[int]] = None) -> GenerationOutput:
    """Decode ``cfg.max_new_tokens`` tokens after each prompt (see the module docstring).

    ``model(input_ids, attention_mask=, position_ids=[, prefix_kv=, return_kv=, logit_positions=])``
    must return the (shifted, possibly vocab-sharded) logits [B, S, V/tp]; when its forward takes
    ``logit_positions`` (DiffusionTransformer does) only the candidate rows go through the head.
    Hooks follow Dream: ``logits_hook(step, x, logits) -> logits`` sees the full model output of this
    step (positions ``[L - logits.shape[1], L)``; vocab-sharded under TP; a hook turns the
    candidates-only head off) and ``tokens_hook(step, x, logits) -> x`` runs once before the loop
    (step None) and after every step (logits: None when the head ran on the candidates only or
    on a non-last pipeline stage).
    """
    cfg.validate()
    t0 = time.perf_counter()
    if grid is None:  # a sharded model knows its grid; forgetting to pass it must not sample from one shard
        grid = getattr(model, "grid", None)
    device = _model_device(model)
    N = cfg.max_new_tokens
    x, real = build_batch(prompts, N, mask_id, pad_id, device)
    B, L = x.shape
    P = L - N
    fwd = _Forward(model, real, grid)
    gens = _row_generators(cfg, B, sample_index, generator, device)
    last_stage = grid is None or getattr(grid, "pp_size", 1) == 1 or grid.is_last_stage
    reveal = torch.full((B, N), -1, dtype=torch.long, device=device)
    history: Optional[list[torch.Tensor]] = [] if output_history else None
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    block_len = cfg.block_length or N
    steps_per_block = cfg.steps // cfg.num_blocks
    if cfg.threshold is not None and cfg.threshold_rule == "fast_dllm":
        steps_per_block = block_len  # Fast-dLLM: until the block is full (>= 1 token per step)
    step = 0
    for blk in range(cfg.num_blocks):
        lo, hi = P + blk * block_len, P + (blk + 1) * block_len
        taus = torch.linspace(1, cfg.eps, steps_per_block + 1)
        prefix_kv = None
        for i in range(steps_per_block):
            cand = x[:, lo:hi] == mask_id  # [B, block]
            if not bool(cand.any()):
                break  # nothing left to reveal: identical outcome, no wasted forward
            cached = cfg.use_cache and prefix_kv is not None
            off = lo - 1 if cached else 0  # the call computes positions [off, L)
            rows = None
            if fwd.has_logit_positions and logits_hook is None:
                rows = torch.zeros((B, L - off), dtype=torch.bool, device=device)
                rows[:, lo - off:hi - off] = cand
            if cached:
                logits, _ = fwd(x, start=off, prefix_kv=prefix_kv, logit_positions=rows)
            else:
                logits, kv = fwd(x, return_kv=cfg.use_cache, logit_positions=rows)
                if cfg.use_cache:
                    prefix_kv = [(k[:, :, :lo - 1], v[:, :, :lo - 1]) for k, v in kv]
            before = x[:, P:] == mask_id
            if last_stage:
                if rows is None:  # full [B, L - off, V/tp] output: pick the candidates
                    if logits_hook is not None:
                        logits = logits_hook(step, x, logits)
                    logits = logits[:, lo - off:hi - off][cand]
                x = _step(x, logits, cand, lo, fwd, gens, cfg, taus[i], taus[i + 1], i == steps_per_block - 1)
            x = fwd.share_tokens(x)
            if tokens_hook is not None:
                x = tokens_hook(step, x, logits)
            reveal[before & (x[:, P:] != mask_id)] = step
            if history is not None:
                history.append(x.clone())
            step += 1
    elapsed = time.perf_counter() - t0
    return _finish(x, P, reveal, history, fwd.nfe, elapsed, stop_ids, B, N)


def _step(x: torch.Tensor, cand_logits: torch.Tensor, cand: torch.Tensor, lo: int, fwd: _Forward,
          gens: list[torch.Generator], cfg: SamplingConfig, t: torch.Tensor, s: torch.Tensor,
          last: bool) -> torch.Tensor:
    """One reveal step for every row: gather the candidates' vocab shards once, decide row by row.
    `cand_logits` [n_total, V/tp] holds the candidates in (row, position) order."""
    full = fwd.gather_vocab(cand_logits)  # [n_total, V]
    x = x.clone()
    start = 0
    for b in range(x.shape[0]):
        pos = cand[b].nonzero().squeeze(-1)
        n = pos.numel()
        if n == 0:
            continue
        logits = full[start:start + n]  # filtered row by row: the fp32 [n, V] copies stay one row's worth
        start += n
        if cfg.alg == "origin":
            chosen = _origin_positions(n, t, s, last, gens[b], logits.device)
            if chosen.numel():  # only the transferred positions are filtered and sampled
                x[b, lo + pos[chosen]] = sample_and_confidence(filtered_probs(logits[chosen], cfg), cfg, gens[b])[0]
            continue
        chosen, tokens = _reveal_row(filtered_probs(logits, cfg), cfg, gens[b], t, s, last)
        if chosen.numel():
            x[b, lo + pos[chosen]] = tokens
    return x


def _origin_positions(n: int, t: torch.Tensor, s: torch.Tensor, last: bool, gen: torch.Generator,
                      device: torch.device) -> torch.Tensor:
    """Dream's origin: each candidate moves with probability 1 - s/t (all at the last step)."""
    p_transfer = 1.0 if last else float((1 - s / t).item())
    return (torch.rand(n, generator=gen, device=device) < p_transfer).nonzero().squeeze(-1)


def _finish(x: torch.Tensor, P: int, reveal: torch.Tensor, history: Optional[list], nfe: int, elapsed: float,
            stop_ids: Sequence[int], B: int, N: int) -> GenerationOutput:
    stops = set(int(s) for s in stop_ids)
    completions = []
    for row in x[:, P:].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in stops), len(row))
        completions.append(row[:cut])
    stats = {"tokens_per_s": B * N / max(elapsed, 1e-9), "nfe": float(nfe), "elapsed_s": elapsed,
             "new_tokens": float(B * N)}
    return GenerationOutput(sequences=x, completions=completions, reveal_step=reveal, prompt_length=P,
                            history=history, nfe=nfe, elapsed_s=elapsed, stats=stats)


# --------------------------------------------------------------------------- command-line flags
def add_sampling_args(parser: Any) -> None:
    """One flag per `SamplingConfig` field (``--max-new-tokens``, ``--use-cache/--no-use-cache`` ...)."""
    import argparse
    import dataclasses

    group = parser.add_argument_group("sampling (Dream diffusion_generate + fast paths)")
    for f in dataclasses.fields(SamplingConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        kwargs: dict[str, Any] = dict(dest=f.name, default=f.default, help=f"(default {f.default!r})")
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "alg":
            kwargs.update(type=str, choices=ALGS)
        elif "int" in kind:
            kwargs["type"] = int
        elif "float" in kind:
            kwargs["type"] = float
        else:
            kwargs["type"] = str
        group.add_argument(flag, **kwargs)


def sampling_config_from_args(args: Any) -> SamplingConfig:
    import dataclasses

    return SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)}).validate()
