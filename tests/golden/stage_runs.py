"""Short tiny-config runs of the three stages whose per-iteration numbers are the golden curves.

`python tests/golden/stage_runs.py --record` rewrote `tests/assets/golden_stages.json` once, before
the package was reshaped into stages/ (commit "golden curves"); test_golden_stages.py asserts that
the current code reproduces them. Re-record only for a deliberate, documented change of behaviour.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ASSET = HERE.parent / "assets" / "golden_stages.json"
sys.path[:0] = [str(HERE.parent / "training"), str(HERE.parent / "stages" / "grpo"), str(HERE.parent / "stages" / "diffusion")]

PRETRAIN_KEYS = ("loss", "masked_ce", "grad_norm", "lr")
SFT_KEYS = ("loss", "masked_ce", "grad_norm", "response_tokens")
GRPO_KEYS = ("loss", "reward_mean", "kl", "grad_norm", "clip_fraction", "completion_length")


def _curves(history: list[dict], keys) -> dict[str, list[float]]:
    return {k: [float(h[k]) for h in history] for k in keys}


def _validation(trainer) -> list[list]:
    return [[it, {k: float(v) for k, v in sorted(m.items())}] for it, m in trainer.validation_history]


def run_pretrain(work: Path) -> dict:
    from training_helpers import build_trainer, make_stdlib_dataset, tiny_args

    prefix = make_stdlib_dataset(work)
    trainer = build_trainer(tiny_args(prefix, train_iters=6, extra=["--eval-interval", "3", "--eval-iters", "1",
                                                                   "--no-exit-signal-handler",
                                                                   # the behaviour recorded in the golden file:
                                                                   "--no-mask-eod", "--loss-normalization", "position"]))
    trainer.train()
    return {"curves": _curves(trainer.history, PRETRAIN_KEYS), "validation": _validation(trainer)}


def run_sft(work: Path) -> dict:
    from test_sft_training import corpus as corpus_fixture, make_cfg, make_trainer

    class _Factory:
        def mktemp(self, name):
            p = work / name
            p.mkdir(parents=True, exist_ok=True)
            return p

    prefix, tok = corpus_fixture.__wrapped__(_Factory())
    cfg = make_cfg(prefix, tok.vocab_size, {"training": {"train_iters": 6, "eval_interval": 3, "eval_iters": 1},
                                            "sft": {"sft_tail_cut_prob": 0.5, "sft_length_buckets": [96, 160],
                                                    "sft_cut_length_multiple": 1}})  # recorded before the default 16
    trainer = make_trainer(cfg, tok)
    trainer.train()
    return {"curves": _curves(trainer.history, SFT_KEYS), "validation": _validation(trainer)}


def run_grpo(work: Path) -> dict:
    from grpo_stage_helpers import make_trainer, toy_config, write_toy_problems

    problems = write_toy_problems(work / "toy.jsonl")
    cfg = toy_config(problems, {"training": {"train_iters": 5}, "grpo": {"ref_model_sync_steps": 3, "beta": 0.05,
                                                                   # the behaviour recorded in the golden file:
                                                                   "ref_model_mixup_alpha": 1.0,
                                                                   "loss_normalization": "global_tokens",
                                                                   "completion_stop_tokens": ["im_end", "eod"]}})
    trainer = make_trainer(cfg)
    trainer.train()
    return {"curves": _curves(trainer.history, GRPO_KEYS)}


RUNS = {"pretrain": run_pretrain, "sft": run_sft, "grpo": run_grpo}


def run(name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden numbers were recorded single-threaded
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return RUNS[name](Path(tmp))
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true", help=f"write {ASSET}")
    ap.add_argument("--out", default=None, help="write the runs here instead (to compare)")
    args = ap.parse_args()
    result = {name: run(name) for name in RUNS}
    text = json.dumps(result, indent=1)
    if args.record or args.out:
        path = ASSET if args.record else Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
