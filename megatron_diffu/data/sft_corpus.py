"""A small, real instruction set built from the Python standard library (no download needed).

Every top-level function or method of a fixed list of pure-Python stdlib modules that has a
docstring and a short body becomes one conversation:

    user:      Write a Python function `name(args)` that does the following.
               <docstring>
    assistant: ```python
               <the function's source without its docstring>
               ```

The result is real code with real instructions, deterministic for a given Python version, and
disjoint from HumanEval (kept for evaluation). Used by the SFT tests and the quickstart:

    python -m megatron_diffu.data.sft_corpus --output runs/quickstart/data/stdlib_sft.jsonl --num 400
"""
from __future__ import annotations

import argparse
import ast
import os
import sysconfig
import textwrap
from typing import Iterator, Optional

from megatron_diffu.common.atomic import atomic_write_jsonl

# Pure-Python modules with many small documented functions (stable across 3.10-3.13).
MODULES = (
    "textwrap", "string", "shlex", "fnmatch", "posixpath", "genericpath", "colorsys", "bisect",
    "heapq", "calendar", "base64", "quopri", "html/__init__", "statistics", "fractions", "glob",
    "keyword", "operator", "copy", "pprint", "difflib", "gettext", "locale", "ipaddress",
    "urllib/parse", "email/utils", "json/encoder", "json/decoder", "csv", "random", "functools",
    "inspect", "tokenize", "dataclasses", "enum", "contextlib", "argparse", "configparser",
)


def _strip_docstring(node: ast.AST) -> ast.AST:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    return node


def _signature(fn: ast.FunctionDef) -> str:
    return f"{fn.name}({ast.unparse(fn.args)})"


def conversations_from_source(source: str, module: str, max_body_lines: int = 25,
                              min_doc_chars: int = 20) -> Iterator[dict]:
    """Yield {prompt, response, source} records for the documented short functions of `source`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < min_doc_chars:
            continue
        code = ast.unparse(_strip_docstring(node))
        n_lines = code.count("\n") + 1
        if n_lines < 2 or n_lines > max_body_lines:
            continue
        prompt = (f"Write a Python function `{_signature(node)}` that does the following.\n\n"
                  f"{textwrap.dedent(doc).strip()}")
        yield {"prompt": prompt, "response": f"```python\n{code}\n```", "source": f"{module}:{node.name}"}


def build_corpus(num: int = 400, stdlib: Optional[str] = None) -> list[dict]:
    """Up to `num` conversations, round-robin over MODULES (so no module dominates), deduplicated."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    per_module: list[list[dict]] = []
    for mod in MODULES:
        path = os.path.join(root, mod + ".py")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            per_module.append(list(conversations_from_source(f.read(), mod.replace("/", "."))))
    out, seen = [], set()
    depth = 0
    while len(out) < num and any(depth < len(m) for m in per_module):
        for recs in per_module:
            if depth < len(recs) and recs[depth]["response"] not in seen and len(out) < num:
                seen.add(recs[depth]["response"])
                out.append(recs[depth])
        depth += 1
    return out


def write_jsonl(records: list[dict], path: str) -> None:
    """Atomic write (`common.atomic.atomic_write_jsonl`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic_write_jsonl(path, records)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--num", type=int, default=400)
    a = ap.parse_args(argv)
    recs = build_corpus(a.num)
    write_jsonl(recs, a.output)
    print(f"wrote {len(recs)} conversations to {a.output}")


if __name__ == "__main__":
    main()
