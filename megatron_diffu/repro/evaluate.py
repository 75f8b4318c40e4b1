"""Evaluation of a checkpoint on the mini task family: the project's sampler
(`diffusion.sampling.diffusion_generate`), the sandbox (`eval.humaneval.evaluate_samples`, which runs
every program in `execution.sandbox`), pass@k (`eval.passk`), AR-ness (`diffusion.arness`) and a
percentile bootstrap over problems for the 95% intervals.

Answers are read back with the evaluation rule (`execution.protocol.extract_code`: the first
```python block) and run as whole programs (the problems have include_prompt = false): the
completion is never executed anywhere but in the sandbox.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from megatron_diffu.common.seeding import evaluation_sample_key
from megatron_diffu.execution.problems import Problem, problem_from_record
from megatron_diffu.execution.protocol import extract_code


# ----------------------------------------------------------------------------- statistics
def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each index (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of `values` (one value per problem)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                          seed: int = 0) -> dict:
    """mean(a - b) over paired problems with its percentile bootstrap interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = bootstrap_ci(d, n_boot, alpha, seed)
    return {"diff": float(d.mean()) if d.size else float("nan"), "ci95": [lo, hi],
            "excludes_zero": bool(lo > 0 or hi < 0)}


def normal_ci(p: float, n: int, z: float = 1.959964) -> list[float]:
    """The plain Wald interval p +- z sqrt(p (1 - p) / n) (what the bootstrap is checked against)."""
    h = z * math.sqrt(p * (1 - p) / n)
    return [p - h, p + h]


# ----------------------------------------------------------------------------- policy
@dataclass
class Policy:
    model: object
    tokenizer: object
    path: str

    @classmethod
    def load(cls, path: str, tokenizer) -> "Policy":
        import torch

        from megatron_diffu.convert.loading import load_model_for_inference

        model, _ = load_model_for_inference(path, device=torch.device("cpu"))
        model.eval()
        return cls(model, tokenizer, path)

    def prompt_ids(self, problem: Problem) -> list[int]:
        from megatron_diffu.data.rl import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, problem, show_first_test=False)

    @property
    def stop_ids(self) -> list[int]:
        return sorted({int(self.tokenizer.im_end_id), int(self.tokenizer.eod_id)})


def load_problem_records(records: Sequence[dict]) -> dict[str, Problem]:
    return {r["task_id"]: problem_from_record(r, f"problem {r['task_id']}") for r in records}


def generate(policy: Policy, problems: Mapping[str, Problem], cfg, n_samples: int = 1, batch_size: int = 64,
             key: str = "", log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """`n_samples` answers per problem: {task_id, sample_index, answer, completion (the code), reveal_step};
    each sample's sampler stream is keyed by (key, task_id, sample index), so runs are reproducible."""
    import torch

    from megatron_diffu.common.progress import Progress
    from megatron_diffu.diffusion.sampling import diffusion_generate

    tok = policy.tokenizer
    jobs = [(tid, i) for tid in problems for i in range(n_samples)]
    ids = {tid: policy.prompt_ids(p) for tid, p in problems.items()}
    jobs.sort(key=lambda j: len(ids[j[0]]))  # similar lengths share a batch: less padding
    out: list[dict] = []
    prog = Progress(len(jobs), f"[eval] {key} samples", log=log or (lambda s: print(s, flush=True)), every_s=30)
    gen_s, new_tokens = 0.0, 0
    for lo in range(0, len(jobs), batch_size):
        batch = jobs[lo:lo + batch_size]
        with torch.no_grad():
            res = diffusion_generate(policy.model, [ids[t] for t, _ in batch], cfg, mask_id=tok.mask_id,
                                     pad_id=tok.pad_id, stop_ids=policy.stop_ids,
                                     sample_index=[evaluation_sample_key(f"{key}/{t}", i) for t, i in batch])
        gen_s += res.elapsed_s
        new_tokens += len(batch) * cfg.max_new_tokens
        for (tid, i), comp, rev in zip(batch, res.completions, res.reveal_step):
            answer = tok.decode(comp)
            out.append({"task_id": tid, "sample_index": i, "answer": answer, "completion": extract_code(answer),
                        "reveal_step": rev.tolist(), "answer_tokens": len(comp)})
        prog.update(len(batch))
    prog.finish()
    for r in out:
        r["_gen_s"], r["_new_tokens"] = gen_s, new_tokens
    return out


def score(samples: list[dict], problems: Mapping[str, Problem], n_workers: int = 2) -> list[dict]:
    """Run every sample's program in the sandbox; adds `passed`, `result`, `status`."""
    from megatron_diffu.eval.humaneval import evaluate_samples

    return evaluate_samples(samples, problems, n_workers=n_workers, timeout=3.0, progress=False, no_site=True)


def per_problem(records: Sequence[dict]) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for r in sorted(records, key=lambda r: (r["task_id"], r["sample_index"])):
        out.setdefault(r["task_id"], []).append(bool(r["passed"]))
    return out


def pass1_summary(records: Sequence[dict], split_of: Mapping[str, str], seed: int = 0) -> dict:
    """pass@1 (mean over problems of the fraction of passing samples), its 95% bootstrap interval and n,
    overall and per split; plus the per-problem values (for paired comparisons)."""
    by = per_problem(records)
    tids = sorted(by)
    vals = [float(np.mean(by[t])) for t in tids]
    out = {"pass@1": float(np.mean(vals)) if vals else float("nan"), "ci95": bootstrap_ci(vals, seed=seed),
           "n": len(vals), "per_problem": dict(zip(tids, vals))}
    splits = {}
    for s in sorted(set(split_of[t] for t in tids)):
        sv = [v for t, v in zip(tids, vals) if split_of[t] == s]
        splits[s] = {"pass@1": float(np.mean(sv)), "ci95": bootstrap_ci(sv, seed=seed), "n": len(sv)}
    out["splits"] = splits
    return out


def passk_summary(records: Sequence[dict], ks: Sequence[int] = (1, 10)) -> dict:
    from megatron_diffu.eval.passk import aggregate_pass_at_k, estimate_pass_at_k

    by = per_problem(records)
    out = aggregate_pass_at_k(by, ks)
    for k in ks:
        if all(len(v) >= k for v in by.values()):
            per = estimate_pass_at_k([len(v) for v in by.values()], [sum(v) for v in by.values()], k)
            out[f"pass@{k}_ci95"] = bootstrap_ci(per)
    out["n"] = len(by)
    return out


def arness_summary(samples: Sequence[dict]) -> dict:
    import torch

    from megatron_diffu.diffusion.arness import arness

    rev = torch.tensor([s["reveal_step"] for s in samples], dtype=torch.long)
    a = arness(rev, ks=(1, 2))
    mean_step = rev.float().mean(0).tolist()
    return {"local@1": a["local@1"], "global@1": a["global@1"], "local@2": a["local@2"], "global@2": a["global@2"],
            "n": len(samples), "mean_reveal_step": mean_step}


def throughput(samples: Sequence[dict]) -> dict:
    if not samples:
        return {}
    s = samples[0]
    return {"gen_s": s["_gen_s"], "tokens_per_s": s["_new_tokens"] / max(s["_gen_s"], 1e-9),
            "answer_tokens_mean": float(np.mean([x["answer_tokens"] for x in samples]))}


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t0
