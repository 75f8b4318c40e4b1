"""Sandbox results: statuses, captured output, ordering and the concurrency limit."""
import json
import os

import pytest

from megatron_diffu.execution import sandbox
from megatron_diffu.execution.sandbox import SandboxResult, run_many, run_python


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
    assert res.error.startswith("crashed: signal 11 (SIGSEGV)"), res


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


def test_fails_closed_without_namespaces_and_basic_only_when_asked(monkeypatch, caplog, capsys):
    monkeypatch.setattr(sandbox, "_mode_cache", None)
    monkeypatch.setattr(sandbox, "_mode_error", None)
    monkeypatch.setattr(sandbox, "_allow_basic", False)
    monkeypatch.setattr(sandbox, "_basic_warned", False)
    monkeypatch.setattr(sandbox, "_unshare_argv", lambda: ["/nonexistent/unshare"])
    monkeypatch.delenv("MDIFFU_SANDBOX_MODE", raising=False)
    monkeypatch.delenv("MDIFFU_ALLOW_BASIC_SANDBOX", raising=False)
    with pytest.raises(sandbox.SandboxUnavailableError, match="nonexistent/unshare.*Fix:.*--allow-basic-sandbox"):
        sandbox.sandbox_mode()
    with pytest.raises(sandbox.SandboxUnavailableError):
        run_python("print(6 * 7)")  # untrusted code never runs unconfined by default
    sandbox.set_allow_basic(True)
    with caplog.at_level("WARNING", logger="megatron_diffu.execution.sandbox"):
        assert sandbox.sandbox_mode() == "basic"
    assert "NOT protected" in caplog.text and "NOT protected" in capsys.readouterr().err
    monkeypatch.setenv("MDIFFU_SANDBOX_MODE", "chroot")
    with pytest.raises(ValueError, match="MDIFFU_SANDBOX_MODE must be 'jail' or 'basic'"):
        sandbox.sandbox_mode()


def test_unknown_signal_and_invalid_completions_are_named_failures():
    res = run_python("import os\nos.kill(os.getpid(), 40)\n")
    assert res.status == "crashed" and res.error.startswith("crashed: signal 40 (SIGRTMIN+"), res
    res = run_python("x = '\ud800'\n" + "\ud800")
    assert res.status == "failed" and res.error.startswith("invalid completion: not UTF-8 encodable"), res
    res = run_python("x = 1\x00")
    assert res.status == "failed" and res.error.startswith("invalid completion: contains a NUL"), res
    res = run_python("print('x' * 5_000_000, end='')", max_output_bytes=1000)
    assert res.status == "resource_limit", res
