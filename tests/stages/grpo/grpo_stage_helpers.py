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
    from megatron_diffu.stages.grpo.config import GRPORunConfig

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
    return GRPORunConfig.from_dict(d)


def make_trainer(cfg, grid=None):
    from megatron_diffu.stages.grpo.stage import GRPOStage
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.trainer import Trainer

    stage = GRPOStage()
    stage.tokenizer, stage.mask_token_id = toy_tokenizer(), MASK
    return Trainer(cfg, stage, grid=grid or ProcessGrid.single(), device=torch.device("cpu"))


# ------------------------------------------------------------------ sampler decision margins
U32 = 2.0 ** -24  # fp32 unit roundoff (eps / 2 = 6e-8)


def accumulation_depth(cfg) -> int:
    """The total length of the fp32 reductions a logit goes through, K, for the bound K u M on
    |logit_A - logit_B| between two layouts of the same fp32 model (TP/PP/DP change summation
    orders, nothing else; M = the logits' magnitude): each rounding in a length-n reduction is at
    most u relative, so a length-n dot product is off by <= n u of its magnitude, and the forward
    chains per layer qkv (H), scores (D), softmax and AV (S each), proj (Q*D), fc1 (H), fc2 (F),
    then the head (H). A worst case (rounding errors rarely align): on the tiny GRPO model (K =
    832, max|logit| 0.62) TP=2 and TP=1 logits differ by 1.5e-7 where K u M = 3e-5."""
    m = cfg.model
    d = m.hidden_size // m.num_attention_heads
    per_layer = m.hidden_size + d + 2 * cfg.data.seq_length + m.num_attention_heads * d + m.hidden_size \
        + m.ffn_hidden_size
    return m.num_layers * per_layer + m.hidden_size


class DecisionMargins:
    """How far each of the sampler's decisions is from flipping under a logit perturbation, per row.

    A rollout is a chain of discrete decisions on fp32 scores: one inverse-CDF token draw per
    candidate position (`sample_tokens`: the first token whose cumulative probability F_i
    exceeds u) and one top-k selection of positions by confidence (`_reveal_row`). Two layouts
    compute logits that differ by at most delta = K u max|logit / T| (`accumulation_depth`, taken
    on each row's candidate logits) plus 4u (below). To first order
    (log p_i moves by dl_i - sum_j p_j dl_j, i.e. by at most 2 delta):

    * F_i moves by at most 2 delta min(F_i, 1 - F_i) (its own mass, or the mass above it), so a draw
      stands while |F_i - u| exceeds that for every boundary i. The sampler normalises by the
      cumulative total, so the fp32 softmax's common normaliser error cancels; each exp is a few
      ulp off, counted by adding 4u to delta.
    * the entropy confidence c = sum_i p_i log p_i moves by sum_i p_i (log p_i + H) dl_i, at most
      delta s with s = sum_i p_i |log p_i - c| (small on near-uniform rows, where c is flat), and
      its fp32 evaluation (a V-term sum of p log p with p carrying the normaliser's V u error) is
      off by at most e = V u (2|c| + 1). maskgit_plus: c = p_tok, s = 2 p_tok, e = V u p_tok.
      The top-k set stands while c_j - c_i > delta (s_j + s_i) + e_j + e_i for every chosen j and
      unchosen i.

    `ratio[sample_index]` = the smallest margin / required-margin over the row's decisions (>1: all
    of the row's decisions stand under any perturbation within the bound). Rows of a batch are
    independent (own generator; attention never crosses rows), so every row with ratio > 1 in one
    layout must decode identically in any other layout within the bound.

    `decisions[sample_index]` = the row's (chosen candidates, tokens) per step, in order; rows
    listed in `replay` (sample index -> such a list, e.g. another layout's `decisions`) take those
    decisions instead of their own, so that layouts can be compared on the same rollouts whatever
    rounding does to their fragile rows.

    `install()` wraps `diffusion.sampling._row_generators`, `filtered_probs` and `_reveal_row` in
    this process; the wrapper replays each row's draws on a copy of its generator and checks that
    the replayed tokens are the sampler's, so a change in the sampler's draw order fails here, loudly.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.ratio: dict[int, float] = {}
        self.decisions: dict[int, list] = {}
        self.replay: dict[int, list] = {}
        self._row_of: dict[int, int] = {}
        self._step_of: dict[int, int] = {}
        self._delta = float("nan")

    def install(self) -> "DecisionMargins":
        from megatron_diffu.diffusion import sampling

        orig_gens, orig_reveal, orig_probs = sampling._row_generators, sampling._reveal_row, sampling.filtered_probs

        def row_generators(cfg, batch, sample_index, generator, device):
            gens = orig_gens(cfg, batch, sample_index, generator, device)
            ids = list(range(batch)) if sample_index is None else [int(i) for i in sample_index]
            self._row_of = {id(g): i for g, i in zip(gens, ids)}
            self._step_of.update({i: 0 for i in ids})
            return gens

        def filtered_probs(logits, cfg):  # called on each row's candidate logits right before _reveal_row
            scale = float(logits.float().abs().max()) / (cfg.temperature or 1.0)
            self._delta = self.depth * U32 * scale + 4 * U32
            return orig_probs(logits, cfg)

        def reveal_row(probs, cfg, gen, t, s, last):
            replay = torch.Generator(device=probs.device)
            replay.set_state(gen.get_state())  # the row's draws, before the sampler takes them
            chosen, tokens = orig_reveal(probs, cfg, gen, t, s, last)
            ratio = self._ratio(probs, cfg, replay, chosen, tokens)
            row = self._row_of[id(gen)]
            step, self._step_of[row] = self._step_of[row], self._step_of[row] + 1
            self._delta = float("nan")  # a draw without fresh logits would poison the ratio, visibly
            if row in self.replay:
                chosen, tokens = self.replay[row][step]
                return chosen.clone(), tokens.clone()
            self.ratio[row] = min(self.ratio.get(row, float("inf")), ratio)
            self.decisions.setdefault(row, []).append((chosen.clone(), tokens.clone()))
            return chosen, tokens

        sampling._row_generators, sampling._reveal_row = row_generators, reveal_row
        sampling.filtered_probs = filtered_probs
        return self

    def _ratio(self, probs, cfg, replay, chosen, tokens) -> float:
        assert cfg.temperature > 0 and cfg.threshold is None and not cfg.alg_temp, "only the GRPO rollout path"
        assert cfg.alg in ("entropy", "maskgit_plus"), cfg.alg
        assert self._delta == self._delta, "a _reveal_row call without filtered_probs just before it"
        n, vocab = probs.shape
        cum = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        u = torch.rand(n, 1, generator=replay, dtype=torch.float64, device=probs.device) * cum[:, -1:]
        x0 = torch.searchsorted(cum, u, right=True).squeeze(-1).clamp_(max=vocab - 1)
        assert torch.equal(x0[chosen], tokens), "DecisionMargins no longer replays the sampler's token draws"
        F, v = cum[:, :-1] / cum[:, -1:], u / cum[:, -1:]  # the last boundary (F = 1) decides nothing
        need = 2 * self._delta * torch.minimum(F, 1 - F)
        ratio = float(((F - v).abs() / need.clamp_min(1e-300)).min())
        picked = torch.zeros(n, dtype=torch.bool, device=probs.device)
        picked[chosen] = True
        if 0 < int(picked.sum()) < n:
            p = probs.double() / cum[:, -1:]
            if cfg.alg == "entropy":
                logp = torch.log(p + 1e-10)
                conf = (p * logp).sum(-1)
                sens = (p * (logp - conf[:, None]).abs()).sum(-1)
                err = vocab * U32 * (2 * conf.abs() + 1)
            else:
                conf = p.gather(-1, x0[:, None]).squeeze(-1)
                sens, err = 2 * conf, vocab * U32 * conf
            gap = conf[picked][:, None] - conf[~picked][None, :]
            need = self._delta * (sens[picked][:, None] + sens[~picked][None, :]) + err[picked][:, None] + err[~picked][None, :]
            ratio = min(ratio, float((gap / need).min()))
        return ratio
