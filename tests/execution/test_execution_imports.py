"""`execution/` is a leaf (standard library only) and the dependency direction is
execution <- eval, rl, data: rl never imports eval, eval never imports rl, data never imports either.
Checked on the source (every import statement, lazy ones included) and by importing the package
in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "megatron_diffu"


def package_imports(path: Path) -> set[str]:
    """The megatron_diffu subpackages (`eval`, `rl`, ...) that a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.level == 0 else [f"megatron_diffu.{path.parent.name}.{node.module}"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_diffu":
                found.add(parts[1] if len(parts) > 1 else "")
    return found


def files(sub: str):
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / f"{sub}.py"]


@pytest.mark.parametrize("sub, forbidden", [
    ("execution", None),  # None: nothing of the package at all but itself
    ("eval", {"rl", "data"}),
    ("rl", {"eval"}),
    ("data/rl", {"eval", "rl"}),
])
def test_dependency_direction(sub, forbidden):
    for f in files(sub):
        got = package_imports(f)
        bad = got - {"execution"} if forbidden is None else got & forbidden
        assert not bad, f"{f.relative_to(PKG.parent)} imports megatron_diffu.{sorted(bad)}"


def test_execution_imports_only_the_standard_library():
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import megatron_diffu.execution.sandbox, megatron_diffu.execution.problems, "
            "megatron_diffu.execution.protocol\n"
            "mods = sorted(m for m in sys.modules if m.startswith('megatron_diffu') and m != 'megatron_diffu' "
            "and not m.startswith('megatron_diffu.execution'))\n"
            "third = sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) "
            "- {'megatron_diffu'})\n"
            "print(mods, third)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout.strip()
    assert out == "[] []", out


def test_launcher_imports_only_the_standard_library():
    tree = ast.parse((PKG / "execution" / "launcher.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(sys.stdlib_module_names), mods - set(sys.stdlib_module_names)
