"""The jail builds wherever the interpreter lives: a virtual environment under /tmp, under /opt,
in the home directory, and a self-contained ("conda-like", `--copies`) prefix. Each layout is
checked the way a new user meets it: that interpreter imports the package and runs a program in
the jail (sandbox_mode() fails closed, so an unbuildable jail is an error here, never a skip)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_diffu.execution import sandbox

REPO = str(Path(__file__).resolve().parents[2])
REFUSAL = sandbox.kernel_refusal()

CODE = ("import sys; sys.path.insert(0, %r)\n"
        "from megatron_diffu.execution import sandbox\n"
        "assert sandbox.sandbox_mode() == 'jail'\n"
        "r = sandbox.run_python('import sys, json; print(sys.prefix)', no_site=False)\n"
        "print(r.status, r.stdout.strip(), r.error)\n" % REPO)


def _layouts():
    home = os.path.expanduser("~")
    out = [("tmp", "/tmp", []), ("home", home, [])]
    if os.geteuid() == 0:
        out.append(("opt", "/opt", []))
    out.append(("conda-like --copies", "/tmp", ["--copies"]))
    return out


@pytest.mark.skipif(REFUSAL is not None, reason=f"the kernel refuses the jail's namespaces: {REFUSAL}")
@pytest.mark.parametrize("name, parent, flags", _layouts(), ids=[x[0] for x in _layouts()])
def test_jail_builds_for_interpreters_anywhere(name, parent, flags):
    where = tempfile.mkdtemp(prefix="mdiffu-venv-", dir=parent)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, where], check=True, timeout=120)
        py = os.path.join(where, "bin", "python")
        proc = subprocess.run([py, "-I", "-c", CODE], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["passed", where], proc.stdout
    finally:
        shutil.rmtree(where, ignore_errors=True)
