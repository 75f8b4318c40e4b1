"""The jail builds wherever the interpreter lives: a virtual environment under /tmp, under /opt,
in the home directory, and a self-contained ("conda-like", `--copies`) prefix. Each layout is
checked the way a new user meets it: that interpreter imports the package and runs a program in
the jail (sandbox_mode() fails closed, so an unbuildable jail is an error here, never a skip).
Each venv is made in a `mkdtemp` directory (mode 0700, as CI's checkouts and venvs often are):
the jail exposes such a directory's entries under a fresh 0755 directory. A file the jail's uid
really cannot read makes the jail fail closed with an error naming that path and the fix."""
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
    assert os.stat(where).st_mode & 0o777 == 0o700  # mkdtemp's mode: the jail's uid may not read it itself
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", *flags, where], check=True, timeout=120)
        py = os.path.join(where, "bin", "python")
        proc = subprocess.run([py, "-I", "-c", CODE], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["passed", where], proc.stdout
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.skipif(REFUSAL is not None, reason=f"the kernel refuses the jail's namespaces: {REFUSAL}")
@pytest.mark.skipif(os.geteuid() != 0, reason="as a non-root caller the program has the caller's own uid")
def test_an_unreadable_interpreter_file_is_named_with_the_fix():
    where = tempfile.mkdtemp(prefix="mdiffu-venv-")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, timeout=120)
        cfg = os.path.join(where, "pyvenv.cfg")
        os.chmod(cfg, 0o600)
        py = os.path.join(where, "bin", "python")
        proc = subprocess.run([py, "-I", "-c", CODE], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        err = proc.stderr
        assert "SandboxUnavailableError" in err, err[-2000:]
        assert f"cannot read {cfg} (mode 0o600, owner uid 0" in err, err[-2000:]
        assert f"Fix: make it readable by other users (chmod o+r {cfg})" in err, err[-2000:]
        assert "allow namespaces" not in err  # the namespaces work: no misleading advice
    finally:
        shutil.rmtree(where, ignore_errors=True)
