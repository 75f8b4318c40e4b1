#!/usr/bin/env python
"""Time split of one coupled-GRPO step (rollout, reward, log-prob passes, update) and rollout
tokens/s: the GRPO stage on the trainer beside a plain reference implementation of the SAME step
(same model weights, prompts, sampler seeds, mask seeds), measured in the same run.

    python benchmarks/grpo_step.py                       # tiny model, 4096-token vocabulary, CPU
    python benchmarks/grpo_step.py --vocab-size 151680 --hidden-size 256 --device cuda

The reference is what a direct transcription of docs/ALGORITHMS.md sec. 5 does: one sampler call per
completion, one reward call per completion, and for every sequence and every copy (x_full, x_a,
x_b) its own forward with full-vocabulary logits and log_softmax, the loss and backward per
sequence. The stage batches the rollout rows, runs every copy of a micro-batch in ONE forward
whose head computes logits only at the masked positions (vocab-parallel log-softmax), and reuses
the old-policy pass as the reference pass while the reference equals the policy.

The rewards are a token-parity toy reward (the sandboxed code reward is benchmarked in
benchmarks/sandbox.py; an untrained model writes no code that would run). The losses of both
implementations are printed: they agree to float tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.rl.rewards import REWARD_FUNCTIONS, compute_rewards, register_reward  # noqa: E402

def toy_reward(completions, problems):
    """Fraction of even token ids: differs between completions, so advantages are not zero."""
    return [sum(int(t) % 2 == 0 for t in c.split()) / max(len(c.split()), 1) for c in completions]


if "bench_target" not in REWARD_FUNCTIONS:
    register_reward("bench_target")(toy_reward)


def stand_in_tokenizer(vocab: int):
    ids = dict(pad_id=vocab - 5, mask_id=vocab - 4, im_start_id=vocab - 3, im_end_id=vocab - 2, eod_id=vocab - 1)
    return types.SimpleNamespace(vocab_size=vocab, decode=lambda t: " ".join(str(int(i)) for i in t), **ids)


def write_problems(path: str, n: int, prompt_len: int, vocab: int, tok) -> None:
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            body = torch.randint(0, vocab - 8, (prompt_len - 3 - i % 4,), generator=g).tolist()
            f.write(json.dumps({"task_id": f"b/{i}", "prompt": "p", "tests": ["assert True"],
                                "prompt_ids": [tok.im_start_id] + body + [tok.im_end_id, tok.im_start_id]}) + "\n")


def build(args, problems: str):
    from megatron_diffu.stages.grpo.config import GRPORunConfig
    from megatron_diffu.stages.grpo.stage import GRPOStage
    from megatron_diffu.parallel.state import ProcessGrid
    from megatron_diffu.training.trainer import Trainer

    d = {"model": {"preset": "tiny", "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
                   "ffn_hidden_size": 2 * args.hidden_size, "max_position_embeddings": 1024, "seed": 3},
         "data": {"data_path": [problems], "seq_length": args.prompt_length + args.max_new_tokens},
         "grpo": {"num_generations": args.G, "num_iterations": 2, "beta": 0.01, "ref_model_sync_steps": 64,
                  "reward_funcs": ["bench_target"], "reward_weights": [1.0]},
         "sampling": {"max_new_tokens": args.max_new_tokens, "steps": args.steps, "temperature": 1.0, "top_p": 0.95,
                      "alg": "entropy"},
         "optimizer": {"lr": 1e-4, "min_lr": 1e-4, "lr_decay_style": "constant", "clip_grad": 0.0, "weight_decay": 0.0},
         "training": {"micro_batch_size": args.micro_batch_size, "global_batch_size": args.prompts * args.G,
                      "train_iters": 1, "eval_interval": 0, "exit_signal_handler": False},
         "logging": {"log_interval": 1000, "peak_flops": 1e12}}
    cfg = GRPORunConfig.from_dict(d)
    stage = GRPOStage()
    tok = stand_in_tokenizer(args.vocab_size)
    stage.tokenizer, stage.mask_token_id = tok, tok.mask_id
    return Trainer(cfg, stage, grid=ProcessGrid.single(), device=torch.device(args.device))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ the plain reference
def reference_step(trainer, rollout_index: int = 0) -> dict:
    """The same GRPO step written plainly (loops, no batching of rows or copies, full logits)."""
    from megatron_diffu.diffusion.sampling import diffusion_generate
    from megatron_diffu.stages.grpo.logprobs import mask_seed
    from megatron_diffu.stages.grpo.rollout import completion_mask_from
    from megatron_diffu.stages.grpo.scoring import completion_text
    from megatron_diffu.rl.advantages import group_advantages
    from megatron_diffu.rl.coupled import draw_noise

    st, cfg, dev = trainer.stage, trainer.cfg, trainer.device
    g, G, gbs = cfg.grpo, cfg.grpo.num_generations, trainer.global_batch_size
    model, tok = trainer.model, st.tokenizer
    times = {}
    sync(cfg_device := str(dev))
    t0 = time.perf_counter()
    prompt_of = st.schedule.problem_indices(rollout_index)
    P = max(len(st.problems[i].prompt_ids) for i in prompt_of)
    rows = []
    model.eval()
    with torch.no_grad():
        for r in range(gbs):  # one sampler call per completion
            ids = st.problems[prompt_of[r // G]].prompt_ids
            out = diffusion_generate(model, [ids], cfg.sampling, mask_id=st.mask_token_id, pad_id=tok.pad_id,
                                     stop_ids=st.stop_ids, sample_index=[rollout_index * gbs + r])
            rows.append([tok.pad_id] * (P - len(ids)) + out.sequences[0].tolist())
    sync(cfg_device)
    times["rollout_s"] = time.perf_counter() - t0
    tokens = torch.tensor(rows)
    real = torch.ones_like(tokens, dtype=torch.bool)
    for r in range(gbs):
        real[r, :P - len(st.problems[prompt_of[r // G]].prompt_ids)] = False
    comp = completion_mask_from(tokens, P, st.stop_ids)
    t0 = time.perf_counter()
    rewards = []
    for r in range(gbs):  # one reward call per completion
        text = completion_text(tok, tokens[r, P:].tolist(), st.stop_ids)
        rewards += compute_rewards([text], [st.problems[prompt_of[r // G]].problem], {"bench_target": 1.0}).total
    times["reward_s"] = time.perf_counter() - t0
    adv = group_advantages(torch.tensor(rewards), G, g.advantage_mode)
    maskable = torch.zeros_like(real)
    maskable[:, P:] = True
    seed = mask_seed(cfg.data.seed, rollout_index, 0)

    def plain_logp(net, r: int) -> torch.Tensor:
        """Coupled estimate of row r: three separate full-logit forwards."""
        x0 = tokens[r:r + 1].to(dev)
        noise = draw_noise(maskable[r:r + 1], torch.tensor([rollout_index * gbs + r]), seed,
                           g.coupled_t_min, g.coupled_t_max)
        t = float(noise.t[0])
        out = torch.zeros(x0.shape[1], device=dev)
        attn = real[r:r + 1].to(dev)
        for m, w in ((maskable[r:r + 1], 0.5), (noise.mask_a, 0.5 / t), (noise.mask_b, 0.5 / (1 - t))):
            m = m.to(dev)
            xt = torch.where(m, torch.full_like(x0, st.mask_token_id), x0)
            logits = net(xt, attention_mask=attn)[0].float()  # [L, V] (shift applied in the head)
            lp = torch.log_softmax(logits, -1).gather(-1, x0[0, :, None])[:, 0]
            out = out + torch.where(m[0], lp * w, torch.zeros_like(lp))
        return out

    sync(cfg_device)
    t0 = time.perf_counter()
    with torch.no_grad():  # mu = 2: the old policy pass; beta: the reference pass (separately)
        old = [plain_logp(model, r) for r in range(gbs)]
        ref = [plain_logp(st.ref_model, r) for r in range(gbs)]
        for r in range(gbs):  # the second inner iteration's seed is computed too (same cost)
            plain_logp(model, r), plain_logp(st.ref_model, r)
    sync(cfg_device)
    times["logp_passes_s"] = time.perf_counter() - t0
    model.train()
    t0 = time.perf_counter()
    n_tok = float(comp.sum())
    total = 0.0
    for r in range(gbs):
        lp = plain_logp(model, r)
        ratio = torch.exp(lp - old[r])
        a = float(adv[r])
        per = -torch.min(ratio * a, ratio.clamp(1 - g.epsilon_low, 1 + g.epsilon_high) * a)
        d = ref[r] - lp
        per = per + g.beta * (torch.exp(d) - d - 1)
        loss = (per * comp[r].to(dev)).sum() / n_tok
        loss.backward()
        total += float(loss.detach())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-cfg.optimizer.lr)  # a plain SGD-sized update: same order of work
                p.grad = None
    sync(cfg_device)
    times["update_s"] = time.perf_counter() - t0
    times["loss"] = total
    times["tokens"], times["old_logp"] = tokens, torch.stack(old).cpu()
    times["rollout_tokens_per_s"] = gbs * cfg.sampling.max_new_tokens / times["rollout_s"]
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        problems = os.path.join(tmp, "problems.jsonl")
        write_problems(problems, 16, args.prompt_length, args.vocab_size, stand_in_tokenizer(args.vocab_size))
        ours = build(args, problems)
        sync(args.device)
        t0 = time.perf_counter()
        m = ours.train_step()
        sync(args.device)
        step = time.perf_counter() - t0
        stage = {k: float(m[k]) for k in ("rollout_s", "reward_s", "logp_passes_s")}
        stage["update_s"] = step - sum(stage.values())
        stage["loss"] = float(m["loss"])
        stage["rollout_tokens_per_s"] = float(m["rollout_tokens_per_s"])
        ref = reference_step(build(args, problems))
        buf = ours.stage.buffer
        same_rollouts = bool(torch.equal(buf.tokens, ref["tokens"]))
        logp_diff = float((buf.old_logp[0] - ref["old_logp"]).abs().max())
    print(f"GRPO step: tiny model hidden {args.hidden_size}, vocab {args.vocab_size}, {args.prompts} prompts x G={args.G}, "
          f"{args.max_new_tokens} new tokens in {args.steps} steps, device {args.device}, threads {args.threads}")
    print(f"{'phase':<22}{'reference (s)':>15}{'stage (s)':>12}{'speed-up':>10}")
    for k in ("rollout_s", "reward_s", "logp_passes_s", "update_s"):
        print(f"{k[:-2]:<22}{ref[k]:>15.3f}{stage[k]:>12.3f}{ref[k] / max(stage[k], 1e-9):>9.2f}x")
    tr, ts = sum(ref[k] for k in ("rollout_s", "reward_s", "logp_passes_s", "update_s")), step
    print(f"{'total':<22}{tr:>15.3f}{ts:>12.3f}{tr / ts:>9.2f}x")
    print(f"{'rollout tokens/s':<22}{ref['rollout_tokens_per_s']:>15.1f}{stage['rollout_tokens_per_s']:>12.1f}"
          f"{stage['rollout_tokens_per_s'] / ref['rollout_tokens_per_s']:>9.2f}x")
    print(f"same rollouts: {same_rollouts}; coupled old log-probs max |diff| {logp_diff:.2e}; "
          f"loss: reference {ref['loss']:.6e} stage {stage['loss']:.6e} |diff| {abs(ref['loss'] - stage['loss']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
