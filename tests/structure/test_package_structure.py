"""The house rules of the package, checked on its source (no imports executed):

- no import cycle between its top-level parts (`megatron_diffu/<part>/` or `<part>.py`);
- the leaf parts import nothing of the rest: `common` and `execution` (untrusted-code execution
  must be readable and auditable alone), and `config` (the generic config machinery);
- data, model, parallel and execution know nothing of training or stages; training knows no stage;
- no file over 600 lines, no class over 300 lines, no function over 80 lines.
"""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_diffu"
LEAVES = {"common": set(), "execution": set(), "config": {"common"}}
MUST_NOT_IMPORT = {part: {"training", "stages", "pretrain", "sft", "grpo"}
                   for part in ("data", "model", "parallel", "execution", "diffusion", "common", "config")}
MUST_NOT_IMPORT["training"] = {"stages", "pretrain", "sft", "grpo"}
MAX_FILE, MAX_CLASS, MAX_FUNCTION = 600, 300, 80


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "megatron_diffu":
                names += [f"megatron_diffu.{a.name}" for a in node.names]
        out |= {n.split(".")[1] for n in names if n.startswith("megatron_diffu.")}
    return out


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def part_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path in _sources():
        part = _part(path)
        graph[part] |= _imported_parts(ast.parse(path.read_text())) - {part}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_top_level_parts():
    cycle = find_cycle(part_graph())
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle)


@pytest.mark.parametrize("part", sorted(LEAVES))
def test_leaf_parts_import_nothing_else(part):
    extra = part_graph().get(part, set()) - LEAVES[part]
    assert not extra, f"megatron_diffu/{part} must not import {sorted(extra)}"


@pytest.mark.parametrize("part", sorted(MUST_NOT_IMPORT))
def test_lower_parts_know_nothing_of_training_or_stages(part):
    bad = part_graph().get(part, set()) & MUST_NOT_IMPORT[part]
    assert not bad, f"megatron_diffu/{part} imports {sorted(bad)}"


def test_sizes_of_files_classes_and_functions():
    problems = []
    for path in _sources():
        src = path.read_text()
        rel = path.relative_to(PACKAGE.parent)
        if src.count("\n") > MAX_FILE:
            problems.append(f"{rel}: {src.count(chr(10))} lines > {MAX_FILE}")
        for node in ast.walk(ast.parse(src)):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and n > MAX_CLASS:
                problems.append(f"{rel}:{node.lineno} class {node.name}: {n} lines > {MAX_CLASS}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > MAX_FUNCTION:
                problems.append(f"{rel}:{node.lineno} function {node.name}: {n} lines > {MAX_FUNCTION}")
    assert not problems, "\n".join(problems)
