"""The sandbox contains hostile programs and leaves the machine as it was.

After every attack we check, independently of the sandbox's own report: this process is alive,
a sentinel file outside the sandbox is unchanged, no process of the run's uid is left alive
anywhere on the machine, and the temporary directory is gone.

"Alive" excludes zombies (state Z: dead, waiting to be reaped) and gives processes that are already
killed a moment to finish exiting: when a run is killed on its timeout, the kernel tears its pid
namespace down asynchronously, so right after `run_python` returns a killed process can still show
as running (R) for a few milliseconds. A real survivor (a fork-bomb child sleeping in its loop) is
still there after the grace period and fails the check.
"""
import os
import socket
import sys
import tempfile
import time

import pytest

from megatron_diffu.execution import sandbox
from megatron_diffu.execution.sandbox import run_many, run_python

# Fail closed: skip only where the kernel itself refuses the namespaces (and say which check
# refused); a jail that cannot be built on a kernel that allows them is a failure, not a skip.
KERNEL_REFUSAL = sandbox.kernel_refusal()
JAIL = KERNEL_REFUSAL is None
needs_jail = pytest.mark.skipif(not JAIL, reason=f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")


def test_jail_builds_wherever_the_kernel_allows_it():
    if not JAIL:
        pytest.skip(f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")
    assert sandbox.sandbox_mode() == "jail"  # raises SandboxUnavailableError with the cause otherwise


@pytest.fixture
def basic_kw(monkeypatch):
    """Arguments for an explicit basic-mode run: as root, basic mode refuses uid 0, so it needs an
    interpreter and a temp dir that a fresh uid can reach."""
    if os.geteuid() != 0:
        return {}
    py = _world_runnable_python()
    if py is None:
        pytest.skip("root without a world-runnable interpreter: basic mode refuses to run (by design)")
    d = tempfile.mkdtemp(prefix="mdiffu-basic-", dir="/tmp")
    os.chmod(d, 0o711)
    monkeypatch.setattr(tempfile, "tempdir", d)
    yield {"python": py}
    os.rmdir(d)
SENTINEL_TEXT = "do not touch\n"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A private temp root for the sandbox's directories plus a sentinel file outside them."""
    sbx_tmp = tmp_path / "sandbox_tmp"
    sbx_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sbx_tmp))
    sentinel = tmp_path / "outside" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text(SENTINEL_TEXT)
    stat = sentinel.stat()
    yield {"sentinel": sentinel, "sbx_tmp": sbx_tmp}
    assert sentinel.read_text() == SENTINEL_TEXT
    assert sentinel.stat().st_mtime_ns == stat.st_mtime_ns
    assert list(sbx_tmp.iterdir()) == [], "sandbox temp dir left behind"


def processes_of_uid(uid):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        found.append(int(pid))
        except OSError:
            pass
    return found


def _live_processes_of_uid(uid):
    live = []
    for pid in processes_of_uid(uid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead already
                    live.append(pid)
        except OSError:  # gone meanwhile
            pass
    return live


def survivors_of_uid(uid, grace_s=10.0):
    """The live processes of `uid` once killed ones have had `grace_s` to finish exiting."""
    deadline = time.monotonic() + grace_s
    live = _live_processes_of_uid(uid)
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        live = _live_processes_of_uid(uid)
    return live


def check_clean(res):
    os.kill(os.getpid(), 0)  # we are alive
    if res.sandbox_uid is not None:
        assert survivors_of_uid(res.sandbox_uid) == []


@needs_jail
def test_infinite_loop_times_out(machine):
    res = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert res.status == "timeout", res
    assert res.error in ("timed out after 1.5 s (wall clock)", "CPU time limit exceeded"), res
    check_clean(res)


@needs_jail
def test_fork_bomb_is_capped_and_fully_killed(machine):
    # Small process cap and short timeout: this must not load the shared 2-core machine.
    code = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)\n"
    res = run_python(code, timeout_s=1.5, max_procs=6)
    assert res.status in ("timeout", "failed"), res
    check_clean(res)


@needs_jail
def test_background_child_escaping_with_setsid_is_killed(machine):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('bye')\n"
    res = run_python(code, timeout_s=5)
    assert res.status == "passed" and res.stdout == "bye\n", res
    check_clean(res)


@needs_jail
def test_memory_bomb(machine):
    res = run_python("x = bytearray(8 * 1024**3)\n", memory_mb=256)
    assert res.status == "resource_limit" and "MemoryError" in res.error, res
    res = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", memory_mb=256)
    assert res.status == "resource_limit", res
    check_clean(res)


@needs_jail
def test_writing_and_deleting_outside_is_impossible(machine):
    target = str(machine["sentinel"])
    attacks = [
        f"open({target!r}, 'w').write('pwned')",
        f"import os; os.remove({target!r})",
        f"import shutil; shutil.rmtree({os.path.dirname(target)!r})",
        "import os; os.chdir('..'); print(os.listdir('.'))",
        "open('/etc/passwd', 'a').write('evil::0:0::/:/bin/sh\\n')",
        "import os; os.rename('/etc/hostname', '/etc/x')",
    ]
    before = open("/etc/passwd").read()
    for code, res in zip(attacks, run_many(attacks, max_workers=2)):
        assert res.status in ("failed", "passed"), (code, res)
        if "listdir" not in code:
            assert res.status == "failed", (code, res)
        check_clean(res)
    assert open("/etc/passwd").read() == before
    # Writes inside the working directory and /tmp work, and vanish afterwards.
    res = run_python("open('f.txt','w').write('x'); open('/tmp/g.txt','w').write('y'); print(open('f.txt').read())")
    assert res.status == "passed" and res.stdout == "x\n", res


@needs_jail
def test_host_files_are_invisible(machine):
    res = run_python(f"import os; print(os.path.exists({str(machine['sentinel'])!r}), os.listdir('/tmp'))")
    assert res.stdout.strip() == "False []", res


@needs_jail
def test_socket_to_a_listening_port_fails(machine):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        res = run_python(code)
        assert res.status == "failed" and "connected" not in res.stdout, res
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    check_clean(res)


@needs_jail
def test_killing_the_parent_fails(machine):
    me = os.getpid()
    code = (f"import os, signal\nfor pid in (os.getppid(), 1, {me}):\n    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print(type(e).__name__)\n")
    res = run_python(code)
    assert res.status == "passed", res
    assert len(res.stdout.split()) == 3, res  # every kill refused or aimed at nothing
    check_clean(res)


@pytest.mark.parametrize("mode", ["jail", "basic"])
def test_printing_gigabytes_is_cut(machine, mode, request):
    if mode == "jail" and not JAIL:
        pytest.skip(f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")
    kw = request.getfixturevalue("basic_kw") if mode == "basic" else {}
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", max_output_bytes=100_000,
                     timeout_s=20, mode=mode, **kw)
    # Cut by the output cap, not by the (generous) timeout: the run is killed once it is over.
    assert res.status == "resource_limit" and res.error == "output exceeded 100000 bytes", res
    assert len(res.stdout) == 100_000
    check_clean(res)


@pytest.mark.parametrize("mode", ["jail", "basic"])
@pytest.mark.parametrize("exit_call", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_early_is_not_a_pass(machine, mode, exit_call, request):
    if mode == "jail" and not JAIL:
        pytest.skip(f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")
    kw = request.getfixturevalue("basic_kw") if mode == "basic" else {}
    res = run_python(f"{exit_call}\nassert False, 'the tests would fail'\n", mode=mode, **kw)
    assert res.status == "failed" and "before its end" in res.error, res


@pytest.mark.parametrize("mode", ["jail", "basic"])
def test_environment_secrets_are_not_visible(machine, monkeypatch, mode, request):
    if mode == "jail" and not JAIL:
        pytest.skip(f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")
    kw = request.getfixturevalue("basic_kw") if mode == "basic" else {}
    monkeypatch.setenv("MDIFFU_TEST_SECRET", "hunter2")
    code = "import os\nprint(os.environ.get('MDIFFU_TEST_SECRET'))\nprint(open('/proc/self/environ').read())\n"
    res = run_python(code, mode=mode, **kw)
    assert res.status == "passed", res
    assert "hunter2" not in res.stdout and res.stdout.startswith("None\n")


def test_basic_mode_refuses_sockets_and_times_out(machine, basic_kw):
    res = run_python("import socket; socket.socket()", mode="basic", **basic_kw)
    assert res.status == "failed" and "network access is disabled" in res.error, res
    res = run_python("while True: pass", mode="basic", timeout_s=1.0, **basic_kw)
    assert res.status == "timeout", res


CAPS_CODE = ("fields = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
             "print(*(fields[k].strip() for k in ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs')))\n"
             "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             "print(libc.mount(None, b'/usr', None, 32 | 4096, None), ctypes.get_errno())\n"
             "print(libc.ptrace(16, 1, None, None), ctypes.get_errno())\n")  # PTRACE_ATTACH to pid 1


@needs_jail
@pytest.mark.parametrize("as_non_root", [False, True])
def test_no_capabilities_and_binds_cannot_be_made_writable(machine, monkeypatch, as_non_root):
    if as_non_root:  # the path a non-root caller takes: unshare --user --map-root-user, no uid switch
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = run_python(CAPS_CODE)
    assert res.status == "passed", res
    caps, remount, ptrace = res.stdout.splitlines()
    assert caps == "0000000000000000 0000000000000000 0000000000000000 1"
    assert remount == "-1 1"  # mount(MS_REMOUNT|MS_BIND) on /usr: EPERM
    assert ptrace == "-1 1"  # the launcher (pid 1, holding the namespace's capabilities): EPERM
    assert (res.sandbox_uid is None) == as_non_root


def _others_can_reach_tmp():
    return sandbox._others_can_reach(os.path.join(tempfile.gettempdir(), "x"))


def _world_runnable_python():
    for p in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if os.path.exists(p) and sandbox._others_can_run(p):
            return p
    return None


@pytest.mark.skipif(os.geteuid() != 0 or _world_runnable_python() is None or not _others_can_reach_tmp(),
                    reason="needs root and an interpreter other users can run")
def test_basic_mode_never_runs_as_uid_0(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    # /root is private: a fresh uid cannot run an interpreter under it, so basic mode refuses
    with pytest.raises(sandbox.SandboxSetupError, match="refuses to run untrusted code as uid 0"):
        run_python("print(1)", mode="basic", python=sys.executable if not sandbox._others_can_run(sys.executable)
                   else "/nonexistent/python")


def test_basic_mode_as_root_drops_to_a_fresh_uid(tmp_path):
    """Without namespaces (e.g. a container without CAP_SYS_ADMIN), root still runs the program
    under a fresh uid: it cannot signal us, cannot write root's files, and leaves no process."""
    secret_dir = tmp_path / "private"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "s.txt").write_text("x")
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "for attack in (lambda: os.kill(os.getppid(), 9), lambda: os.kill(%d, 9),\n"
            "               lambda: open('/etc/passwd', 'a'), lambda: os.remove(%r)):\n"
            "    try:\n        attack()\n        print('succeeded')\n    except OSError as e:\n"
            "        print(type(e).__name__)\n" % (os.getpid(), str(secret_dir / "s.txt")))
    res = run_python(code, mode="basic", python=_world_runnable_python(), timeout_s=10)
    # The background sleeper (60 s) holds the pipes open: "passed", not "timeout", shows that the
    # run ended with the program itself instead of waiting for it.
    assert res.status == "passed" and res.sandbox_uid not in (None, 0), res
    assert res.stdout.split() == ["PermissionError"] * 4, res.stdout
    assert (secret_dir / "s.txt").read_text() == "x"
    assert survivors_of_uid(res.sandbox_uid) == []
