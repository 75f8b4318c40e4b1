#!/usr/bin/env python
"""Preprocessing throughput: tools/preprocess_data.py's pipeline vs a naive loop, same run, same input.

    python benchmarks/preprocess.py [--mb 20] [--workers 1 2]

Input: ~MB megabytes of standard-library Python source (sorted; test folders last, only when
needed to reach the size; non-UTF-8 and empty files left out), written as one JSONL file.
Tokenizer: the Qwen tokenizer. Baseline ("naive"): read a line, json.loads, tokenizer.encode,
IndexedDatasetBuilder.add_document, one document at a time in one process. The pipeline's
outputs are checked byte-identical to the baseline's. Tokenizer load and imports are outside
the timings (done once before); pool start-up and the final merge are inside. CPU seconds
(process + joined workers) are printed beside wall seconds: on a shared machine the wall-clock
speedup of N workers is capped by the cores the run actually gets.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import sysconfig
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine/Apex are absent: irrelevant to data tools.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron_diffu.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from megatron_diffu.data.tokenizer import build_tokenizer  # noqa: E402

SKIP = {"site-packages", "__pycache__"}
TESTS = {"test", "tests", "idle_test"}


def stdlib_sources(limit_bytes: int):
    """(path, text) of stdlib .py files, sorted, non-test folders first, up to limit_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    normal, tests = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.startswith("."))
        in_tests = any(part in TESTS for part in os.path.relpath(dirpath, root).split(os.sep))
        for name in sorted(filenames):
            if name.endswith(".py"):
                (tests if in_tests else normal).append(os.path.join(dirpath, name))
    out, total = [], 0
    for path in normal + tests:
        data = open(path, "rb").read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text:
            continue
        out.append((path, text))
        total += len(data)
        if total >= limit_bytes:
            break
    return out, total


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool workers are joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def naive(jsonl: str, prefix: str, tok) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_diffu.data.indexed import token_dtype

    import torch

    docs = tokens = 0
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(tok.vocab_size))
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [tok.eod_id]
            builder.add_document(torch.tensor(ids), [len(ids)])
            docs += 1
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return {"documents": docs, "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="megabytes of source to tokenize")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the baseline is one core too
    tok = build_tokenizer()  # loaded once, outside the timings
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (multi-second import, outside the timings)

    docs, nbytes = stdlib_sources(int(a.mb * 1e6))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "stdlib.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for path, text in docs:
                f.write(json.dumps({"text": text, "path": path}) + "\n")
        print(f"input: {len(docs)} stdlib files, {nbytes / 1e6:.1f} MB of source ({os.path.getsize(jsonl) / 1e6:.1f} "
              f"MB JSONL); tokenizer: Qwen (vocab {tok.vocab_size}); {os.cpu_count()} CPU cores", flush=True)
        t, c = time.perf_counter(), cpu_seconds()
        res = naive(jsonl, os.path.join(tmp, "naive"), tok)
        rows.append(("naive loop (1 process)", time.perf_counter() - t, res["tokens"], "naive", cpu_seconds() - c))
        for w in a.workers:
            cfg = PreprocessConfig(input=[jsonl], output_prefix=os.path.join(tmp, f"w{w}"), append_eod=True,
                                   workers=w, log_interval=0)
            t, c = time.perf_counter(), cpu_seconds()
            s = run_preprocess(cfg)
            rows.append((f"pipeline --workers {w}", time.perf_counter() - t, s.tokens, f"w{w}_text_document",
                         cpu_seconds() - c))
        ref = [open(os.path.join(tmp, "naive" + e), "rb").read() for e in (".bin", ".idx")]
        same = {r[3]: [open(os.path.join(tmp, r[3] + e), "rb").read() for e in (".bin", ".idx")] == ref
                for r in rows[1:]}
    base = rows[0][1]
    print(f"\n{'mode':<26}{'seconds':>9}{'tokens':>12}{'tokens/s':>12}{'MB/s':>8}{'speedup':>9}"
          f"{'CPU s':>8}{'cores used':>11}{'tokens/CPU-s':>14}  identical")
    for name, sec, tokens, key, cpu in rows:
        ident = "-" if key == "naive" else ("yes" if same[key] else "NO")
        print(f"{name:<26}{sec:>9.2f}{tokens:>12,}{tokens / sec:>12,.0f}{nbytes / 1e6 / sec:>8.2f}"
              f"{base / sec:>8.2f}x{cpu:>8.1f}{cpu / sec:>11.2f}{tokens / cpu:>14,.0f}  {ident}")
    print("speedup = naive seconds / seconds (wall clock). 'cores used' = CPU seconds / wall seconds: on a "
          "shared machine it shows how many cores the run actually got; tokens/CPU-s is the per-core cost.")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
