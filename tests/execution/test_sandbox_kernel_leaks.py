"""No kernel-level leaks out of the jail (issue 13, item 3), one test per kind: the session keyring
(a program neither reads the caller's keys nor plants one), SysV and POSIX IPC, abstract unix
sockets, UDP and IPv6 loopback, /dev/shm, and signals to processes outside.

Each test plants something on the caller's side that ordinary permissions would NOT protect
(world-readable/writable modes, a listening socket), runs a program that tries to reach it, and
checks on the caller's side that nothing got through, in either direction."""
import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import subprocess
import time

import pytest

from megatron_diffu.execution import sandbox
from megatron_diffu.execution.sandbox import run_python

KERNEL_REFUSAL = sandbox.kernel_refusal()
pytestmark = pytest.mark.skipif(KERNEL_REFUSAL is not None,
                                reason=f"the kernel refuses the jail's namespaces: {KERNEL_REFUSAL}")
TAG = f"mdiffu-leak-{os.getpid()}"
LIBC = ctypes.CDLL(None, use_errno=True)
SYS = {"x86_64": {"add_key": 248, "keyctl": 250}, "aarch64": {"add_key": 217, "keyctl": 219}}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_REVOKE, KEYCTL_READ, KEYCTL_SEARCH = 1, 3, 11, 10
KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION = -3, -4, -5


def _jailed(code: str):
    res = run_python(code, timeout_s=20.0, mode="jail")
    assert res.status == "passed", res
    return res.stdout


# ----------------------------------------------------------------------------- keyring

def _search(keyring: int, desc: str) -> int:
    return LIBC.syscall(SYS["keyctl"], KEYCTL_SEARCH, keyring, b"user", desc.encode(), 0)


@pytest.fixture
def own_session_keyring():
    """A fresh session keyring for this (main) thread, so that the test's key touches nobody else's."""
    if SYS is None:
        pytest.skip(f"no keyctl syscall numbers for {os.uname().machine}")
    if LIBC.syscall(SYS["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        pytest.skip(f"keyctl(JOIN_SESSION_KEYRING) refused: {os.strerror(ctypes.get_errno())}")


KEY_PROGRAM = r'''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ADD, CTL = {add}, {ctl}
buf = ctypes.create_string_buffer(256)
# read the caller's key by its serial number, and search for it by name in every keyring we hold
got = libc.syscall(CTL, 11, {serial}, buf, 256)
print("read", got, ctypes.get_errno())
for ring in (-1, -2, -3, -4, -5):
    print("search", ring, libc.syscall(CTL, 10, ring, b"user", b"{tag}-secret", 0))
# plant keys in the keyrings we can reach
for ring in (-3, -4, -5):
    print("plant", ring, libc.syscall(ADD, b"user", b"{tag}-planted", b"x", 1, ring) > 0)
'''


def test_keyring_neither_read_nor_planted(own_session_keyring):
    serial = LIBC.syscall(SYS["add_key"], b"user", f"{TAG}-secret".encode(), b"the caller's secret", 19,
                          KEY_SPEC_SESSION)
    assert serial > 0, os.strerror(ctypes.get_errno())
    try:
        out = _jailed(KEY_PROGRAM.format(add=SYS["add_key"], ctl=SYS["keyctl"], serial=serial, tag=TAG))
        lines = out.splitlines()
        read = lines[0].split()
        assert read[0] == "read" and int(read[1]) < 0, out  # the caller's key cannot be read by serial
        assert all(int(ln.split()[2]) < 0 for ln in lines if ln.startswith("search")), out  # nor found by name
        # whatever the program planted (in its own, fresh keyrings) is not in the caller's
        for ring in (KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION):
            assert _search(ring, f"{TAG}-planted") < 0 and ctypes.get_errno() in (errno.ENOKEY, errno.EACCES), ring
        assert _search(KEY_SPEC_SESSION, f"{TAG}-secret") == serial  # the caller still has its own key
    finally:
        LIBC.syscall(SYS["keyctl"], KEYCTL_REVOKE, serial)


# ----------------------------------------------------------------------------- SysV / POSIX IPC

def test_sysv_ipc_is_private():
    key = 0x6D000000 + os.getpid() % 0xFFFF
    shmid = LIBC.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, world read/write
    msqid = LIBC.msgget(key, 0o1000 | 0o666)
    assert shmid >= 0 and msqid >= 0, os.strerror(ctypes.get_errno())
    try:
        code = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                f"print(libc.shmget({key}, 0, 0), libc.msgget({key}, 0), libc.semget({key}, 0, 0))\n"
                f"print(libc.shmget({key + 1}, 4096, 0o1666) >= 0, libc.msgget({key + 1}, 0o1666) >= 0)\n")
        out = _jailed(code).split()
        assert out[:3] == ["-1", "-1", "-1"], out  # the caller's segments and queues do not exist in there
        assert out[3:] == ["True", "True"], out  # it may make its own ...
        assert LIBC.shmget(key + 1, 0, 0) == -1 and LIBC.msgget(key + 1, 0) == -1  # ... which never reach us
    finally:
        LIBC.shmctl(shmid, 0, None)  # IPC_RMID
        LIBC.msgctl(msqid, 0, None)


def test_posix_message_queues_are_private():
    rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
    name = f"/{TAG}".encode()
    old = os.umask(0)
    try:
        mq = rt.mq_open(name, os.O_CREAT | os.O_RDWR, 0o666, None)
    finally:
        os.umask(old)
    if mq < 0:
        pytest.skip(f"mq_open refused here: {os.strerror(ctypes.get_errno())}")
    try:
        code = ("import ctypes, ctypes.util, os\n"
                "rt = ctypes.CDLL(ctypes.util.find_library('rt') or 'librt.so.1', use_errno=True)\n"
                f"print(rt.mq_open({name!r}, os.O_RDWR, 0, None))\n"
                f"print(rt.mq_open({name + b'-planted'!r}, os.O_CREAT | os.O_RDWR, 0o666, None) >= 0)\n")
        assert _jailed(code).split() == ["-1", "True"]
        assert rt.mq_open(name + b"-planted", os.O_RDWR, 0, None) == -1
    finally:
        os.close(mq)
        rt.mq_unlink(name)


# ----------------------------------------------------------------------------- sockets

def test_abstract_unix_socket_is_unreachable():
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + TAG)
    server.listen(1)
    server.setblocking(False)
    try:
        code = ("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                f"try:\n    s.connect({chr(0) + TAG!r}); print('connected')\nexcept OSError as e:\n    print(e.errno)\n")
        out = _jailed(code).strip()
        assert out != "connected" and int(out) in (errno.ECONNREFUSED, errno.ENOENT), out
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["udp-ipv4-loopback", "udp-ipv6-loopback"])
def test_udp_loopback_is_unreachable(family, host):
    try:
        server = socket.socket(family, socket.SOCK_DGRAM)
        server.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"no {host} on this machine: {exc}")
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket({int(family)}, socket.SOCK_DGRAM)\n"
                f"try:\n    s.sendto(b'{TAG}', ({host!r}, {port})); print('sent')\n"
                f"except OSError as e:\n    print(e.errno)\n")
        _jailed(code)  # sent or refused: either way nothing may arrive
        time.sleep(0.2)
        with pytest.raises(BlockingIOError):
            server.recvfrom(100)
    finally:
        server.close()


def test_tcp_ipv6_loopback_is_unreachable():
    try:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no ::1 on this machine: {exc}")
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ntry:\n    socket.create_connection(('::1', {port}), timeout=2); print('connected')\n"
                f"except OSError as e:\n    print('refused', e.errno)\n")
        assert _jailed(code).startswith("refused")
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


# ----------------------------------------------------------------------------- /dev/shm

def test_dev_shm_is_private():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    secret, planted = f"/dev/shm/{TAG}-secret", f"/dev/shm/{TAG}-planted"
    with open(secret, "w") as f:
        f.write("the caller's secret")
    os.chmod(secret, 0o666)
    try:
        code = (f"import os\nprint(os.path.exists({secret!r}), sorted(os.listdir('/dev/shm')))\n"
                f"open({planted!r}, 'w').write('x')\n"
                "from multiprocessing import shared_memory\n"
                "m = shared_memory.SharedMemory(create=True, size=64, name='" + TAG + "-posix')\nm.close()\n")
        assert _jailed(code).split("\n")[0] == "False []"
        assert not os.path.exists(planted) and not os.path.exists(f"/dev/shm/{TAG}-posix")
    finally:
        os.remove(secret)


# ----------------------------------------------------------------------------- signals

def test_signals_cannot_reach_processes_outside():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = ("import os, signal\nhits = 0\n"
                f"for pid in [-1, {victim.pid}, {os.getpid()}, 1] + list(range(2, 4096)):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL if pid != 1 else signal.SIGTERM)\n"
                "        hits += pid > 1\n    except OSError:\n        pass\nprint(hits)\n")
        res = run_python(code, timeout_s=20.0, mode="jail")
        assert res.status in ("passed", "crashed"), res  # kill(-1) may take down its own processes
        time.sleep(0.2)
        assert victim.poll() is None  # alive
        os.kill(os.getpid(), 0)
    finally:
        victim.kill()
        victim.wait()


# ----------------------------------------------------------------------------- memory of a process tree

MEMORY_PROGRAM = r'''
import os, time
ok = 0
pids = []
for i in range(12):
    try:
        pid = os.fork()
    except OSError:
        break  # RLIMIT_NPROC: no more processes for this run
    if pid == 0:
        try:
            b = bytearray(150 * 1024 * 1024)  # under the per-process cap ...
            for j in range(0, len(b), 4096):
                b[j] = 1
            os.write(1, b"A")
            time.sleep(2)
        except MemoryError:
            os.write(1, b"M")
        os._exit(0)
    pids.append(pid)
for p in pids:
    os.waitpid(p, 0)
try:
    bytearray(300 * 1024 * 1024)  # ... and one process over it
    print(" big")
except MemoryError:
    print(" capped", len(pids))
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="RLIMIT_NPROC is applied only to a root caller's fresh uid")
def test_memory_of_a_process_tree_is_bounded_by_memory_mb_times_max_procs():
    """No cgroup (docs/SANDBOX.md, Memory): the whole tree is bounded by max_procs processes of at
    most memory_mb address space each. Twelve children of 150 MiB (1.8 GiB together) are asked for;
    at most max_procs - 1 exist at once, each within the 256 MiB cap, and one 300 MiB block fails."""
    res = run_python(MEMORY_PROGRAM, timeout_s=30.0, memory_mb=256, max_procs=4, mode="jail")
    assert res.status == "passed", res
    allocated, tail = res.stdout.split(" ", 1)
    n_children = int(tail.split()[1])
    assert tail.startswith("capped") and n_children <= 3, res.stdout
    assert allocated.count("A") == n_children  # each child within the cap got its 150 MiB ...
    assert allocated.count("A") * 150 <= 256 * 4  # ... and together they stay under memory_mb x max_procs
