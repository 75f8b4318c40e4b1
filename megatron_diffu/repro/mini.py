"""The mini DiffuCoder reproduction (issue 18): `python -m megatron_diffu.repro.mini [--quick] [--out DIR]`.

Stages (each one's result is saved under OUT/stages/<name>.json; a rerun skips finished stages, and
the training stages resume from their own checkpoints):

  data          tasks (tasks.py), pretraining/SFT files (files.py), a SentencePiece tokenizer trained on
                the corpus, tools/preprocess_data.py + tools/preprocess_sft.py
  pretrain      python -m megatron_diffu.pretrain --config examples/mini_repro/pretrain.yaml
  sft           python -m megatron_diffu.sft --config examples/mini_repro/sft.yaml (from pretrain)
  eval_sft      where SFT stands, before any RL (same evaluation as the eval_<arm> stages below)
  select_rl     SFT samples on an RL pool of problems SFT never saw (tasks split `rl_constants`: trained
                templates, constants of neither SFT nor the evaluation); problems with an intermediate
                pass rate kept (hard-sample selection); tools/preprocess_rl.py
  coupled_grpo  python -m megatron_diffu.grpo --config examples/mini_repro/grpo.yaml --estimator coupled
  d1_grpo       the same with --estimator d1 (same rollout budget)
  sft_continued the SFT stage continued from the SFT checkpoint for the same number of steps
  eval_<arm>    held-out pass@1 greedy and T=0.2 (bootstrap 95% CI), pass@10 at T=1.0, per split
  arness        local/global AR-ness at T=0.2 and 1.2 (one token per step), SFT vs coupled-GRPO
  samplers      exact vs two-per-step vs threshold vs blocks+cache on the coupled-GRPO model
  report        OUT/report.json, OUT/report.md, OUT/*.png

Completions only ever run in the sandbox (execution.sandbox via eval.humaneval / rl.rewards).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "examples", "mini_repro")
SFT_CONFIG = os.path.join(CONFIGS, "sft.yaml")
ARMS = ("sft", "coupled_grpo", "d1_grpo", "sft_continued")


# The task family of both modes: 6 of the 16 contexts (35 training templates, 5 held-out compositions).
# The whole family (111 templates) is too much for a 2.6M model in these budgets: 1200 SFT steps on it
# gave 0/40 training problems (the model wrote its most frequent function name and wrong constants);
# 1000 steps on 29 templates gave 3/40 with the 1/t weighting and 7/40 without (see docs/MINI_REPRO.md).
MINI_CONTEXTS = "op_scalar,op_map,pred_scalar,pred_filter,sop_scalar,sop_map"
RL_SPLITS = ("rl_constants", "train")  # Settings.rl_split: the first reserves its constants from SFT


@dataclass
class Settings:
    """Sizes and budgets of one run (`SETTINGS[mode]`); seconds are planned values for the ETA."""
    n_train: int = 6000             # training-split problems (pretraining corpus + SFT pairs)
    n_rl_pool: int = 160            # problems of `rl_split` the RL set is selected from
    rl_split: str = "rl_constants"  # the RL pool's split: rl_constants (constants reserved from SFT, as
    # DiffuCoder's RL data is not its SFT data) | train (SFT keeps every non-held-out constant and RL
    # samples its problems: the runs before; a 3500-step SFT solved all 160 such problems)
    n_heldout_constants: int = 120
    n_heldout_templates: int = 80
    stdlib_bytes: int = 1_500_000
    vocab_size: int = 1000
    pretrain_iters: int = 600
    sft_iters: int = 3000           # where SFT starts to copy constants: RL headroom (1500: 0.02, no copying)
    rl_iters: int = 120             # GRPO steps per arm (= SFT-continued steps)
    rl_select_samples: int = 4
    rl_min_problems: int = 16
    n_pass10: int = 50              # held-out problems given 10 samples at T=1.0
    n_arness: int = 50
    n_samplers: int = 200
    max_new_tokens: int = 48
    steps: int = 24
    batch_size: int = 64
    rl_seq_length: int = 128        # GRPO prompt + completion (prompts longer than this - max_new_tokens dropped)
    seed: int = 0
    contexts: str = MINI_CONTEXTS   # comma-separated task contexts (tasks.CONTEXTS); "" = the whole family
    bf16: str = "auto"              # training in bf16: on | off | auto (on where the CPU has bf16 dot products)
    train_flags: str = ""           # extra flags for every training stage (e.g. a smaller model for smoke tests)
    grpo_flags: str = ""            # extra flags for the GRPO stages
    sft_flags: str = ""             # extra flags for the SFT stages (sft, sft_continued, SFT seeds)
    sft_seeds: str = ""             # comma-separated extra SFT seeds (stages sft_seed<N>): SFT again from the
    # pretraining checkpoint with `--seed N` (another data order and other masks), scored greedily on the
    # held-out problems; the spread of one recipe (one SFT run is one draw). Off by default: each seed
    # costs an SFT stage (~13 minutes of the full run here)


SETTINGS = {
    "full": Settings(),
    "quick": Settings(n_train=6000, n_rl_pool=64, n_heldout_constants=30, n_heldout_templates=20,
                      stdlib_bytes=400_000, pretrain_iters=100, sft_iters=1200, rl_iters=16, n_pass10=10,
                      n_arness=16, n_samplers=30, rl_min_problems=8, rl_split="train",
                      sft_flags="--weight-decay 2.0"),
    # quick keeps every constant in SFT: 1200 steps are too few to learn copying with a third fewer
    # constants per template (the full recipe's 1500 steps scored 0.02; see docs/MINI_REPRO.md).
    # Weight decay 2.0 (sft.yaml: 1.0) was chosen on a validation draw (data seed 1, 197 problems
    # of another prefix): 0.173 vs 0.086 at 1.0; on quick's own held-out set it scored 0.12 (1.0: 0.06)
    "tiny": Settings(n_train=300, n_rl_pool=16, n_heldout_constants=6, n_heldout_templates=4, stdlib_bytes=20_000,
                     vocab_size=400, pretrain_iters=4, sft_iters=4, rl_iters=2, rl_select_samples=2,
                     rl_min_problems=2, n_pass10=2, n_arness=2, n_samplers=4, max_new_tokens=16, steps=8,
                     batch_size=16, rl_seq_length=256, train_flags="--num-layers 1 --hidden-size 32 --ffn-hidden-size 64 "
                     "--num-attention-heads 2 --num-query-groups 1 --micro-batch-size 4 --global-batch-size 4",
                     grpo_flags="--num-generations 2 --logp-chunk-size 4"),
}
# planned share of the wall time per stage (for the ETA before a stage has run)
PLAN = {"data": 0.02, "pretrain": 0.06, "sft": 0.3, "select_rl": 0.03, "coupled_grpo": 0.14, "d1_grpo": 0.13,
        "sft_continued": 0.02, "eval_sft": 0.03, "eval_coupled_grpo": 0.03, "eval_d1_grpo": 0.03,
        "eval_sft_continued": 0.03, "arness": 0.02, "samplers": 0.03, "report": 0.0}
BUDGET_S = {"full": 2700, "quick": 720, "tiny": 60}
PLAN_SCALE_MIN_SHARE = 0.05  # stages this big set the ETA's speed; the data stage (0.02) is too short


def planned_share(stage: str) -> float:
    """A stage's planned share of the wall time; a seed stage is an SFT stage plus a greedy evaluation."""
    from megatron_diffu.repro.seeds import SEED_STAGE_PREFIX

    if stage.startswith(SEED_STAGE_PREFIX):
        return PLAN["sft"] + PLAN["eval_sft"] / 3
    return PLAN.get(stage, 0.0)


def plan_scale(stage_s: dict, budget_s: float) -> float:
    """How much slower (> 1) or faster than planned this machine runs: measured / planned seconds over
    the finished stages of at least PLAN_SCALE_MIN_SHARE of the plan (1 before any has run). The data
    stage alone would read 0.2 here (10 s of a planned 54) and give a 34-minute run an 11-minute ETA."""
    done = {n: t for n, t in stage_s.items() if planned_share(n) >= PLAN_SCALE_MIN_SHARE}
    planned = sum(planned_share(n) for n in done) * budget_s
    return sum(done.values()) / planned if planned > 0 else 1.0


def log(msg: str) -> None:
    print(f"[mini {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings_flags(s: Settings, grpo: bool) -> list[str]:
    """The settings' extra flags of a training stage (train_flags, and grpo_flags for GRPO)."""
    return s.train_flags.split() + (s.grpo_flags.split() if grpo else [])


def grpo_flags(run: "Run", estimator: str) -> list[str]:
    """The GRPO arms' configuration flags (no checkpoint or log paths; the gradient probe reuses them)."""
    s = run.s
    return ["--config", os.path.join(CONFIGS, "grpo.yaml"), "--data-path", run.path("data", "rl.jsonl"),
            *run.tok_flags(), "--estimator", estimator, "--seq-length", str(s.rl_seq_length),
            "--train-iters", str(s.rl_iters), "--max-new-tokens", str(s.max_new_tokens), "--steps", str(s.steps)]


class Run:
    def __init__(self, out: str, mode: str, settings: Settings, python: str = sys.executable) -> None:
        self.out, self.mode, self.s, self.python = os.path.abspath(out), mode, settings, python
        self.data = os.path.join(self.out, "data")
        os.makedirs(os.path.join(self.out, "stages"), exist_ok=True)
        os.makedirs(self.data, exist_ok=True)
        self.sft_config = SFT_CONFIG  # the SFT stage's recipe (seeds.base_sft_seed reads it)
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
                        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._tok = None
        self._problems: dict = {}

    # ------------------------------------------------------------------ bookkeeping
    def path(self, *p: str) -> str:
        return os.path.join(self.out, *p)

    def result(self, name: str) -> Optional[dict]:
        p = self.path("stages", f"{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return None

    def save_result(self, name: str, obj: dict) -> None:
        from megatron_diffu.common.atomic import atomic_write_json

        atomic_write_json(self.path("stages", f"{name}.json"), obj)

    def sh(self, args: list[str], log_name: str, last: tuple = ()) -> None:
        """Run a tool or training stage (training stages get bf16 and train_flags; `last` comes after
        them, so that it wins over a flag of train_flags: a seed stage's --seed)."""
        if "-m" in args and any(a.startswith("megatron_diffu.") for a in args):
            args = args + (["--bf16"] if self.s.bf16 == "on" else []) + settings_flags(self.s, "megatron_diffu.grpo" in args)
        args = args + list(last)
        logf = self.path("logs", log_name + ".log")
        os.makedirs(os.path.dirname(logf), exist_ok=True)
        log(f"$ {' '.join(args)}  (log: {logf})")
        with open(logf, "a") as f:
            proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            for line in proc.stdout:
                f.write(line)
                if any(w in line for w in ("iteration", "error", "Error", "wrote", "[grpo]", "ETA")):
                    print("    " + line.rstrip()[:220], flush=True)
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{args[:3]} failed with exit code {rc}; see {logf}")

    @property
    def tokenizer(self):
        if self._tok is None:
            from megatron_diffu.data.tokenizer import build_tokenizer

            self._tok = build_tokenizer("SentencePieceTokenizer", self.path("data", "sp.model"))
        return self._tok

    def problems(self, split: str) -> list[dict]:
        if split not in self._problems:
            from megatron_diffu.execution.problems import read_jsonl

            self._problems[split] = [r for _, r in read_jsonl(self.path("data", f"problems_{split}.jsonl"))]
        return self._problems[split]

    def heldout(self) -> list[dict]:
        return self.problems("heldout_constants") + self.problems("heldout_templates")

    @property
    def contexts(self) -> Optional[list[str]]:
        return [c.strip() for c in self.s.contexts.split(",") if c.strip()] or None

    def tok_flags(self) -> list[str]:
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", self.path("data", "sp.model")]

    def ckpt(self, arm: str) -> str:
        return self.path("checkpoints", arm)

    # ------------------------------------------------------------------ stages
    def stage_data(self) -> dict:
        from megatron_diffu.data.tokenizer import train_sentencepiece
        from megatron_diffu.repro import files, tasks

        s = self.s
        ctx = self.contexts
        train = tasks.generate("train", s.n_train, s.seed, contexts=ctx, reserve_rl=s.rl_split == RL_SPLITS[0])
        pool = tasks.generate(s.rl_split, s.n_rl_pool, s.seed, prefix="rlpool", contexts=ctx)
        hc = tasks.generate("heldout_constants", s.n_heldout_constants, s.seed, contexts=ctx)
        ht = tasks.generate("heldout_templates", s.n_heldout_templates, s.seed, contexts=ctx)
        for name, ts in (("train", train), ("rlpool", pool), ("heldout_constants", hc), ("heldout_templates", ht)):
            files.write_problems(self.path("data", f"problems_{name}.jsonl"), ts)
        docs = files.pretrain_documents(train, s.stdlib_bytes, s.seed)
        sft = files.sft_records(train)
        files.write_jsonl(self.path("data", "pretrain.jsonl"), docs)
        files.write_jsonl(self.path("data", "sft.jsonl"), sft)
        corpus = files.write_tokenizer_corpus(self.path("data", "tokenizer_corpus.txt"), docs, sft)
        log(f"training a SentencePiece tokenizer (vocab {s.vocab_size}) on {os.path.getsize(corpus):,} bytes")
        train_sentencepiece([corpus], s.vocab_size, self.path("data", "sp"))
        self.sh([self.python, "tools/preprocess_data.py", "--input", self.path("data", "pretrain.jsonl"),
                 "--json-keys", "text", "--append-eod", "--workers", "1", "--output-prefix",
                 self.path("data", "pretrain"), *self.tok_flags(), "--log-interval", "0"], "preprocess_data")
        self.sh([self.python, "tools/preprocess_sft.py", "--input", self.path("data", "sft.jsonl"), "--output-prefix",
                 self.path("data", "sft"), *self.tok_flags()], "preprocess_sft")
        tok = self.tokenizer
        resp = [len(tok.encode(r["response"])) + 1 for r in sft[:500]]
        prompt = [len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}])) for r in sft[:500]]
        return {"n_train": len(train), "n_rl_pool": len(pool), "n_heldout_constants": len(hc),
                "n_heldout_templates": len(ht), "templates_train": len(tasks.train_templates(ctx)),
                "templates_heldout": len(tasks.heldout_templates(ctx)),
                "heldout_template_ids": tasks.heldout_templates(ctx), "pretrain_docs": len(docs),
                "tokenizer_vocab": tok.vocab_size, "response_tokens_max": max(resp),
                "response_tokens_mean": sum(resp) / len(resp), "prompt_tokens_max": max(prompt)}

    def stage_pretrain(self) -> dict:
        ck = self.ckpt("pretrain")
        self.sh([self.python, "-m", "megatron_diffu.pretrain", "--config", os.path.join(CONFIGS, "pretrain.yaml"),
                 "--data-path", self.path("data", "pretrain_text_document"), *self.tok_flags(),
                 "--train-iters", str(self.s.pretrain_iters), "--save", ck, "--load", ck,
                 "--save-interval", str(max(1, min(200, self.s.pretrain_iters))),
                 "--log-file", self.path("logs", "pretrain_train.log")], "pretrain")
        return {"iters": self.s.pretrain_iters, "log": self.path("logs", "pretrain_train.log.jsonl")}

    def _finetune_flags(self, save: str, parent: str) -> list[str]:
        from megatron_diffu.training.checkpointing import has_checkpoint

        if has_checkpoint(save):  # resume this stage's own run
            return ["--save", save, "--load", save, "--no-finetune"]
        return ["--save", save, "--load", parent, "--finetune"]

    def _sft(self, arm: str, parent: str, iters: int, extra: tuple = (), last: tuple = ()) -> dict:
        ck = self.ckpt(arm)
        self.sh([self.python, "-m", "megatron_diffu.sft", "--config", self.sft_config,
                 "--data-path", self.path("data", "sft"), *self.tok_flags(), "--train-iters", str(iters),
                 *self._finetune_flags(ck, parent), "--save-interval", str(max(1, min(200, iters))),
                 "--log-file", self.path("logs", f"{arm}_train.log"), *self.s.sft_flags.split(), *extra], arm, last)
        return {"iters": iters, "checkpoint": ck, "log": self.path("logs", f"{arm}_train.log.jsonl")}

    def stage_sft(self) -> dict:
        return self._sft("sft", self.ckpt("pretrain"), self.s.sft_iters)

    @property
    def sft_seeds(self) -> list[int]:
        from megatron_diffu.repro.seeds import parse_seeds

        return parse_seeds(self.s.sft_seeds)

    def stage_sft_seed(self, seed: int) -> dict:
        from megatron_diffu.repro.seeds import seed_stage

        return seed_stage(self, seed)

    def sampling(self, **kw):
        from megatron_diffu.diffusion.sampling import SamplingConfig

        base = dict(max_new_tokens=self.s.max_new_tokens, steps=self.s.steps, temperature=0.0, alg="entropy")
        base.update(kw)
        return SamplingConfig(**base).validate()

    def policy(self, arm: str):
        from megatron_diffu.repro.evaluate import Policy

        return Policy.load(self.ckpt(arm), self.tokenizer)

    def stage_select_rl(self) -> dict:
        """Hard-sample selection: keep RL-pool problems whose SFT samples have a mean test pass rate in (0, 1)."""
        from megatron_diffu.execution.problems import problem_from_record
        from megatron_diffu.repro.evaluate import generate, load_problem_records
        from megatron_diffu.rl.rewards import configure_execution, pass_rates

        pool = self.problems("rlpool")[:self.s.n_rl_pool]
        probs = load_problem_records(pool)
        samples = generate(self.policy("sft"), probs, self.sampling(temperature=1.0, top_p=0.95),
                           self.s.rl_select_samples, self.s.batch_size, key="select")
        configure_execution(timeout_s=3.0, n_workers=2, no_site=True)
        rates = pass_rates([s["answer"] for s in samples], [probs[s["task_id"]] for s in samples])
        by: dict = {}
        for s, r in zip(samples, rates):
            by.setdefault(s["task_id"], []).append(r)
        mean = {t: sum(v) / len(v) for t, v in by.items()}
        mid = [t for t, m in mean.items() if 0 < m < 1]
        chosen = list(mid)
        if len(chosen) < self.s.rl_min_problems:  # too few: fill with the closest-to-intermediate ones
            rest = sorted((t for t in mean if t not in mid), key=lambda t: abs(mean[t] - 0.5))
            chosen += rest[:self.s.rl_min_problems - len(chosen)]
        keep = set(chosen)
        raw = self.path("data", "rl_raw.jsonl")
        from megatron_diffu.repro.files import write_jsonl

        write_jsonl(raw, [{k: r[k] for k in ("task_id", "prompt", "entry_point", "tests", "include_prompt")}
                          for r in pool if r["task_id"] in keep])
        # no system message: SFT never saw one (DiffuCoder's RL recipe adds "You are a helpful
        # assistant."; with it this model's rollouts collapsed to 4-13 tokens and pass rate 0)
        self.sh([self.python, "tools/preprocess_rl.py", "--input", raw, "--output", self.path("data", "rl.jsonl"),
                 *self.tok_flags(), "--no-show-first-test", "--system-prompt", "",
                 "--max-prompt-length", str(self.s.rl_seq_length - self.s.max_new_tokens)], "preprocess_rl")
        self._check_rl_prompts(probs)
        del problem_from_record
        return {"pool": len(pool), "intermediate": len(mid), "all_zero": sum(m == 0 for m in mean.values()),
                "all_one": sum(m == 1 for m in mean.values()), "selected": len(chosen),
                "pool_mean_pass_rate": sum(mean.values()) / max(1, len(mean))}

    def _check_rl_prompts(self, probs: dict) -> None:
        """Fail closed: every RL prompt must be token for token the prompt SFT trained on and the
        evaluation uses (`Policy.prompt_ids`); a different wrapping makes RL train another task."""
        from megatron_diffu.execution.problems import read_jsonl
        from megatron_diffu.repro.evaluate import Policy

        pol = Policy(None, self.tokenizer, "")
        path = self.path("data", "rl.jsonl")
        for line, rec in read_jsonl(path):
            want = pol.prompt_ids(probs[rec["task_id"]])
            if rec.get("prompt_ids") != want:
                raise RuntimeError(f"{path}:{line}: prompt_ids of {rec['task_id']} differ from the SFT/evaluation "
                                   f"prompt ({self.tokenizer.decode(rec.get('prompt_ids') or [])[:80]!r}...): "
                                   f"check tools/preprocess_rl.py's --system-prompt / --prompt-template")

    def _grpo(self, arm: str, estimator: str) -> dict:
        ck = self.ckpt(arm)
        self.sh([self.python, "-m", "megatron_diffu.grpo", *grpo_flags(self, estimator),
                 *self._finetune_flags(ck, self.ckpt("sft")), "--save-interval", str(max(1, min(20, self.s.rl_iters))),
                 "--log-file", self.path("logs", f"{arm}_train.log")], arm)
        return {"iters": self.s.rl_iters, "estimator": estimator, "checkpoint": ck,
                "log": self.path("logs", f"{arm}_train.log.jsonl")}

    def stage_coupled_grpo(self) -> dict:
        return self._grpo("coupled_grpo", "coupled")

    def stage_d1_grpo(self) -> dict:
        return self._grpo("d1_grpo", "d1")

    def stage_sft_continued(self) -> dict:
        # the SFT stage from the SFT checkpoint, as many optimizer steps as each RL arm took, at the
        # learning rate SFT ended with (min_lr, constant): a fresh warm-up to SFT's peak 2e-3 is a
        # perturbation, not "no RL" (it cost 0.07 pass@1 in the first full run)
        from megatron_diffu.stages.diffusion.config import SFTRunConfig

        end_lr = SFTRunConfig.from_args(["--config", self.sft_config]).optimizer.min_lr
        flags = ("--lr", str(end_lr), "--min-lr", str(end_lr), "--lr-warmup-iters", "0", "--lr-decay-style", "constant")
        return self._sft("sft_continued", self.ckpt("sft"), self.s.rl_iters, flags)

    def _evaluate(self, arm: str) -> dict:
        from megatron_diffu.repro.eval_stages import evaluate_arm

        return evaluate_arm(self, arm)

    def stage_arness(self) -> dict:
        from megatron_diffu.repro.eval_stages import arness_stage

        return arness_stage(self)

    def stage_samplers(self) -> dict:
        from megatron_diffu.repro.eval_stages import samplers_stage

        return samplers_stage(self)

    def stage_report(self) -> dict:
        from megatron_diffu.repro.report import write_report

        return write_report(self)

    # ------------------------------------------------------------------ driver
    def stages(self) -> list[tuple[str, Callable[[], dict]]]:
        st = [("data", self.stage_data), ("pretrain", self.stage_pretrain), ("sft", self.stage_sft),
              ("eval_sft", lambda: self._evaluate("sft"))]  # where SFT stands, before any RL
        st += [(f"sft_seed{n}", (lambda n=n: self.stage_sft_seed(n))) for n in self.sft_seeds]  # seeds.seed_stage
        st += [("select_rl", self.stage_select_rl), ("coupled_grpo", self.stage_coupled_grpo),
               ("d1_grpo", self.stage_d1_grpo), ("sft_continued", self.stage_sft_continued)]
        st += [(f"eval_{a}", (lambda a=a: self._evaluate(a))) for a in ARMS if a != "sft"]
        st += [("arness", self.stage_arness), ("samplers", self.stage_samplers), ("report", self.stage_report)]
        return st

    def run(self, only: Optional[list[str]] = None) -> int:
        t_start = time.time()
        meta = self.result("_meta") or {"wall_s_before": 0.0, "stage_s": {}}
        stages = self.stages()
        budget = BUDGET_S.get(self.mode, 600)
        for i, (name, fn) in enumerate(stages, 1):
            if only and name not in only:
                continue
            if self.result(name) is not None and name != "report":
                log(f"stage {i}/{len(stages)} {name}: done already (skipped)")
                continue
            scale = plan_scale(meta["stage_s"], budget)
            left_plan = sum(planned_share(n) for n, _ in stages[i - 1:]) * budget
            from megatron_diffu.common.progress import format_eta

            log(f"stage {i}/{len(stages)} {name} (planned {format_eta(planned_share(name) * budget * scale)}; "
                f"ETA of the run {format_eta(left_plan * scale)})")
            t0 = time.time()
            res = fn()
            dt = time.time() - t0
            meta["stage_s"][name] = dt
            if name != "report":
                self.save_result(name, {**res, "wall_s": dt})
            self.save_result("_meta", meta)
            log(f"stage {name} done in {format_eta(dt)}")
        log(f"finished: {self.path('report.json')} (this invocation {time.time() - t_start:.0f} s)")
        return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, threads {torch.get_num_threads()}"


def cpu_has_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX): bf16 training is ~1.8x fp32 there, and
    slower than fp32 where it is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def generator_fingerprint() -> str:
    """sha256 (12 hex) of the task generator and file builders: a changed generator means new data."""
    import hashlib

    h = hashlib.sha256()
    for name in ("tasks.py", "files.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 12-minute setting (50 held-out problems)")
    p.add_argument("--mode", choices=sorted(SETTINGS), default=None, help="full | quick | tiny (smoke test)")
    p.add_argument("--out", default=None, help="output folder (default runs/mini_repro, runs/mini_repro_quick)")
    p.add_argument("--only", nargs="*", default=None, help="run only these stages (others must be done)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override Settings fields (repeatable: --set a=1 b=2 and --set a=1 --set b=2 both keep both)")
    return p.parse_args(argv)


def apply_overrides(s: Settings, pairs: list[str]) -> Settings:
    """`KEY=VALUE` overrides of Settings fields, each value parsed as the field's type; a malformed
    pair, an unknown key or a value of the wrong type stops with an error naming it."""
    types = {f.name: type(getattr(s, f.name)) for f in fields(s)}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {kv!r}: expected KEY=VALUE")
        if k not in types:
            raise SystemExit(f"error: --set {k}: not a setting; choose one of {', '.join(sorted(types))}")
        try:
            s = replace(s, **{k: types[k](v)})
        except ValueError:
            raise SystemExit(f"error: --set {kv}: {k} takes a {types[k].__name__}") from None
    return s


def reproducing_command(mode: str, s: Settings) -> str:
    """The command that makes a run of these settings: the mode's flag and one `--set` per field that
    differs from the mode's defaults (`s` before bf16's `auto` is resolved), so a report names every override."""
    words = ["bash", "examples/mini_repro.sh", *{"quick": ["--quick"], "tiny": ["--mode", "tiny"]}.get(mode, [])]
    base = SETTINGS[mode]
    pairs = [f"{f.name}={getattr(s, f.name)}" for f in fields(s) if getattr(s, f.name) != getattr(base, f.name)]
    return " ".join(words + (["--set", *map(shlex.quote, pairs)] if pairs else []))


# settings.json keys that describe where and how a run was started, not what it computes
UNCOMPARED_KEYS = ("machine", "command")


def main(argv=None) -> int:
    a = parse_args(argv)
    mode = a.mode or ("quick" if a.quick else "full")
    s = apply_overrides(SETTINGS[mode], a.set)
    command = reproducing_command(mode, s)
    if s.bf16 not in ("on", "off", "auto"):
        raise SystemExit(f"error: --set bf16={s.bf16}: use on, off or auto")
    if s.rl_split not in RL_SPLITS:
        raise SystemExit(f"error: --set rl_split={s.rl_split}: use one of {', '.join(RL_SPLITS)}")
    if s.bf16 == "auto":  # resolved here, so that settings.json records what the run used
        s = replace(s, bf16="on" if cpu_has_bf16() else "off")
    out = a.out or os.path.join(REPO, "runs", "mini_repro" if mode == "full" else f"mini_repro_{mode}")
    run = Run(out, mode, s)
    from megatron_diffu.common.atomic import atomic_write_json

    want = {"mode": mode, **asdict(s), "generator": generator_fingerprint()}
    saved_path = run.path("settings.json")
    if os.path.exists(saved_path) and run.result("data") is not None:
        with open(saved_path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in UNCOMPARED_KEYS}
        if saved != want:  # resuming with other settings or another task generator would mix two runs
            diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
            raise SystemExit(f"error: {run.out} was made with other settings ({', '.join(diff)}); "
                             f"use another --out or delete it")
    atomic_write_json(saved_path, {**want, "machine": machine(), "command": command})
    log(f"mode {mode}, out {run.out}; machine: {machine()}")
    return run.run(a.only)


if __name__ == "__main__":
    sys.exit(main())
