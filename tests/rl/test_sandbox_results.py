"""Sandbox results: statuses, captured output, ordering and the concurrency limit."""
import json
import os

import pytest

from megatron_diffu.rl import sandbox
from megatron_diffu.rl.sandbox import SandboxResult, run_many, run_python


def test_statuses_of_ordinary_programs():
    ok = run_python("print('hello')\nimport sys\nprint('err', file=sys.stderr)\n")
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout == "hello\n" and ok.stderr == "err\n"
    assert ok.passed and isinstance(ok, SandboxResult) and ok.duration_s > 0
    bad = run_python("def f():\n    return 1\nassert f() == 2, 'f is wrong'\n")
    assert bad.status == "failed" and bad.returncode == 1
    assert bad.error == "AssertionError: f is wrong"
    syntax = run_python("def f(:\n")
    assert syntax.status == "failed" and syntax.error.startswith("SyntaxError")
    code = run_python("raise SystemExit(3)")
    assert code.status == "failed" and code.returncode == 3


def test_crash_by_signal_is_reported():
    res = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert res.status == "crashed" and res.returncode == -11 and "SIGSEGV" in res.error, res


def test_file_size_limit():
    res = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 1048576)\n", file_size_mb=2)
    assert res.status == "resource_limit" and "file size" in res.error, res


def test_cpu_time_limit():
    # Wall clock generous, CPU 1 s: SIGXCPU ends it.
    res = run_python("while True: pass", timeout_s=20, cpu_s=1)
    assert res.status == "timeout" and "CPU" in res.error, res


def test_run_many_keeps_order():
    codes = [f"import time; time.sleep({0.2 * (3 - i)}); print({i})" for i in range(4)]
    out = run_many(codes, max_workers=2)
    assert [r.stdout.strip() for r in out] == ["0", "1", "2", "3"]


def test_concurrency_limit_serialises_runs():
    sandbox.set_max_concurrency(1)
    try:
        code = "import time, json\nt0 = time.time()\ntime.sleep(0.3)\nprint(json.dumps([t0, time.time()]))\n"
        spans = sorted(json.loads(r.stdout) for r in run_many([code] * 3, max_workers=3))
    finally:
        sandbox.set_max_concurrency(os.cpu_count() or 1)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans  # no two programs ran at the same time


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="max_workers"):
        run_many(["pass"], max_workers=0)


def test_falls_back_to_basic_mode_loudly_without_namespaces(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_mode_cache", None)
    monkeypatch.setattr(sandbox, "_unshare_argv", lambda: ["/nonexistent/unshare"])
    monkeypatch.delenv("MDIFFU_SANDBOX_MODE", raising=False)
    with caplog.at_level("WARNING", logger="megatron_diffu.rl.sandbox"):
        assert sandbox.sandbox_mode() == "basic"
    assert "falling back to 'basic' mode" in caplog.text
    res = run_python("print(6 * 7)")
    assert res.status == "passed" and res.stdout == "42\n" and res.sandbox_uid is None
    monkeypatch.setenv("MDIFFU_SANDBOX_MODE", "chroot")
    with pytest.raises(ValueError, match="MDIFFU_SANDBOX_MODE must be 'jail' or 'basic'"):
        sandbox.sandbox_mode()
