"""The evaluation stages of the mini reproduction (called by `mini.Run` with the run as `self`):
held-out pass rates per arm, AR-ness of the decoding order, and the samplers compared."""
from __future__ import annotations


def _log(msg: str) -> None:
    from megatron_diffu.repro.mini import log

    log(msg)


def _scored(self, arm: str, pol, name: str, cfg, n: int, probs: dict, split_of: dict) -> dict:
    """Sample `n` answers per problem, score them in the sandbox, keep them under eval/, summarise."""
    from megatron_diffu.repro import evaluate as ev
    from megatron_diffu.repro.files import write_jsonl

    samples = ev.generate(pol, probs, cfg, n, self.s.batch_size, key=f"{arm}/{name}")
    scored = ev.score(samples, probs)
    write_jsonl(self.path("eval", f"{arm}_{name}.jsonl"),
                [{k: v for k, v in r.items() if not k.startswith("_") and k != "reveal_step"} for r in scored])
    if n == 1:
        out = {**ev.pass1_summary(scored, split_of), **ev.throughput(samples)}
    else:
        out = {**ev.passk_summary(scored, (1, 10)), **ev.throughput(samples)}
    _log(f"{arm} {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items() if isinstance(v, float)))
    return out


def _heldout(self) -> tuple[dict, dict]:
    from megatron_diffu.repro import evaluate as ev

    held = self.heldout()
    return ev.load_problem_records(held), {r["task_id"]: r["split"] for r in held}


def evaluate_arm(self, arm: str) -> dict:
    probs, split_of = _heldout(self)
    pol = self.policy(arm)
    pass10 = dict(list(probs.items())[::max(1, len(probs) // self.s.n_pass10)][:self.s.n_pass10])
    runs = [("greedy", self.sampling(), 1, probs),
            ("t0.2", self.sampling(temperature=0.2, top_p=0.95), 1, probs),
            ("t1.0", self.sampling(temperature=1.0, top_p=0.95), 10, pass10)]
    return {name: _scored(self, arm, pol, name, cfg, n, pp, split_of) for name, cfg, n, pp in runs}


def greedy_heldout(self, arm: str) -> dict:
    """Greedy pass@1 of one checkpoint on the held-out problems (the first row of evaluate_arm)."""
    probs, split_of = _heldout(self)
    return _scored(self, arm, self.policy(arm), "greedy", self.sampling(), 1, probs, split_of)


def arness_stage(self) -> dict:
    from megatron_diffu.repro import evaluate as ev

    held = self.heldout()
    sub = ev.load_problem_records(held[::max(1, len(held) // self.s.n_arness)][:self.s.n_arness])
    out = {}
    for arm in ("sft", "coupled_grpo"):
        pol = self.policy(arm)
        for temp in (0.2, 1.2):
            cfg = self.sampling(temperature=temp, top_p=0.95, steps=self.s.max_new_tokens)  # one token per step
            samples = ev.generate(pol, sub, cfg, 1, self.s.batch_size, key=f"arness/{arm}/{temp}")
            scored = ev.score(samples, sub)
            out[f"{arm}@T{temp}"] = {**ev.arness_summary(samples),
                                     "pass@1": sum(r["passed"] for r in scored) / len(scored)}
            _log(f"arness {arm} T={temp}: local@1={out[f'{arm}@T{temp}']['local@1']:.3f} "
                f"global@1={out[f'{arm}@T{temp}']['global@1']:.3f}")
    return out


def samplers_stage(self) -> dict:
    from megatron_diffu.repro import evaluate as ev

    held = self.heldout()
    sub = ev.load_problem_records(held[::max(1, len(held) // self.s.n_samplers)][:self.s.n_samplers])
    N = self.s.max_new_tokens
    blk = N // 3 if N % 3 == 0 else N // 2
    variants = {"exact (1 token/step)": dict(steps=N),
                "2 tokens/step": dict(steps=N // 2),
                "threshold 0.9": dict(steps=N, threshold=0.9),
                f"blocks {blk} + cache": dict(steps=N, block_length=blk, use_cache=True),
                f"blocks {blk} + cache + threshold 0.9": dict(steps=N, block_length=blk, use_cache=True,
                                                               threshold=0.9)}
    pol = self.policy("coupled_grpo")
    out = {}
    for name, kw in variants.items():
        samples = ev.generate(pol, sub, self.sampling(**kw), 1, self.s.batch_size, key=f"samplers/{name}")
        scored = ev.score(samples, sub)
        p = [float(r["passed"]) for r in scored]
        out[name] = {"pass@1": sum(p) / len(p), "ci95": ev.bootstrap_ci(p), "n": len(p), **kw,
                     **ev.throughput(samples)}
        _log(f"sampler {name}: pass@1={out[name]['pass@1']:.3f} tokens/s={out[name]['tokens_per_s']:.0f}")
    return out

