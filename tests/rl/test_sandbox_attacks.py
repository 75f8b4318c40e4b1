"""The sandbox contains hostile programs and leaves the machine as it was.

After every attack we check, independently of the sandbox's own report: this process is alive,
a sentinel file outside the sandbox is unchanged, no process of the run's uid is left anywhere
on the machine, and the temporary directory is gone.
"""
import os
import socket
import sys
import tempfile
import time

import pytest

from megatron_diffu.rl import sandbox
from megatron_diffu.rl.sandbox import run_many, run_python

JAIL = sandbox.sandbox_mode() == "jail"
needs_jail = pytest.mark.skipif(not JAIL, reason="namespaces (unshare) unavailable: basic mode only")
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


def check_clean(res):
    os.kill(os.getpid(), 0)  # we are alive
    if res.sandbox_uid is not None:
        assert processes_of_uid(res.sandbox_uid) == []


@needs_jail
def test_infinite_loop_times_out(machine):
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout_s=1.5)
    assert res.status == "timeout", res
    assert time.monotonic() - t0 < 8
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
def test_printing_gigabytes_is_cut(machine, mode):
    if mode == "jail" and not JAIL:
        pytest.skip("no namespaces")
    t0 = time.monotonic()
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", max_output_bytes=100_000,
                     timeout_s=20, mode=mode)
    assert res.status == "resource_limit" and "output" in res.error, res
    assert len(res.stdout) == 100_000
    assert time.monotonic() - t0 < 10
    check_clean(res)


@pytest.mark.parametrize("mode", ["jail", "basic"])
@pytest.mark.parametrize("exit_call", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_early_is_not_a_pass(machine, mode, exit_call):
    if mode == "jail" and not JAIL:
        pytest.skip("no namespaces")
    res = run_python(f"{exit_call}\nassert False, 'the tests would fail'\n", mode=mode)
    assert res.status == "failed" and "before its end" in res.error, res


@pytest.mark.parametrize("mode", ["jail", "basic"])
def test_environment_secrets_are_not_visible(machine, monkeypatch, mode):
    if mode == "jail" and not JAIL:
        pytest.skip("no namespaces")
    monkeypatch.setenv("MDIFFU_TEST_SECRET", "hunter2")
    code = "import os\nprint(os.environ.get('MDIFFU_TEST_SECRET'))\nprint(open('/proc/self/environ').read())\n"
    res = run_python(code, mode=mode)
    assert res.status == "passed", res
    assert "hunter2" not in res.stdout and res.stdout.startswith("None\n")


def test_basic_mode_refuses_sockets_and_times_out(machine):
    res = run_python("import socket; socket.socket()", mode="basic")
    assert res.status == "failed" and "network access is disabled" in res.error, res
    res = run_python("while True: pass", mode="basic", timeout_s=1.0)
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


def _live_processes_of_uid(uid):
    live = []
    for pid in processes_of_uid(uid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead already
                    live.append(pid)
        except OSError:
            pass
    return live


@pytest.mark.skipif(os.geteuid() != 0 or _world_runnable_python() is None or not _others_can_reach_tmp(),
                    reason="needs root and an interpreter other users can run")
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
    t0 = time.monotonic()
    res = run_python(code, mode="basic", python=_world_runnable_python(), timeout_s=10)
    assert time.monotonic() - t0 < 8  # the background sleeper does not hold us up
    assert res.status == "passed" and res.sandbox_uid not in (None, 0), res
    assert res.stdout.split() == ["PermissionError"] * 4, res.stdout
    assert (secret_dir / "s.txt").read_text() == "x"
    assert _live_processes_of_uid(res.sandbox_uid) == []
