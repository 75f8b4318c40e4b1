"""Run untrusted, model-written Python and report what happened (the outside half; the inside
half is `launcher.py`, beside this file).

Threat model
------------
The code comes from a language model (evaluation samples, RL rollouts). We assume it may be
buggy or, by accident or by reward hacking, hostile: infinite loops, fork/memory/output bombs,
writing or deleting files, opening sockets, signalling its parent, reading the parent's
environment, `sys.exit(0)` / `os._exit(0)` before the tests run. It is *not* assumed to carry
kernel exploits: the sandbox relies on the Linux kernel (namespaces, rlimits, uid checks), it is
not a VM. Machines here (and many cluster nodes) run jobs as root, where file permissions protect
nothing, so isolation cannot rest on permissions alone.

What each run gets ("jail" mode, used automatically where `unshare` works; checked once per
process by running a probe program):
- `unshare --mount --net --pid --ipc --uts --fork` (plus `--user --map-root-user` when the caller
  is not root): a new network namespace with no interfaces up (every connect fails), a new pid
  namespace (the program sees only its own processes and cannot signal ours; when it ends, the
  kernel kills everything it left behind, even processes that called setsid), a private mount
  namespace.
- A fresh root file system on a size-limited tmpfs (`disk_mb`): read-only binds of /usr, /lib*,
  /etc and the Python installation, /dev/{null,zero,full,random,urandom}, a fresh /proc
  (hidepid=2), writable /tmp and /sandbox (the working directory). The host's files (the
  checkout, /root, /tmp, /work, ...) are not visible at all; whatever the program writes vanishes
  with the namespace. The host-side temporary directory is removed afterwards.
- As real root: the program runs under a fresh unprivileged uid/gid (random per run, no
  supplementary groups, no capabilities, no_new_privs), so it cannot remount, chroot out, or
  touch root-owned files, and `RLIMIT_NPROC` counts only *its own* processes (a fork bomb is
  capped at `max_procs` per run, without starving concurrent runs).
- Non-root callers (user namespace): the program is uid 0 of its namespace but holds no
  capabilities (bounding set emptied, SECBIT_NOROOT locked, no_new_privs), so it cannot undo the
  read-only binds; the launcher (pid 1) is not dumpable, so it cannot be ptraced either. Files are
  then also protected by the caller's own permissions; RLIMIT_NPROC is not applied (it would
  count all of the caller's processes).
- rlimits: address space (`memory_mb`, per process), CPU seconds (SIGXCPU), file size, open
  files, core dumps off. A wall-clock timeout kills the whole process group (`killpg`). No
  cgroup is used (no writable memory controller here: docs/SANDBOX.md, Memory): the worst-case
  memory of one run is memory_mb x max_procs plus disk_mb (root callers).
- Kernel objects: the ipc, net and pid namespaces keep SysV/POSIX IPC, abstract unix sockets,
  loopback (UDP/TCP, IPv4/IPv6) and signals inside; /dev/shm is on the jail's tmpfs; the program
  joins a fresh session keyring and, as root, has a fresh uid (its user keyrings are its own).
- Interpreter files: as root the program's uid has no groups, only "other" bits let it in. A
  prefix directory others cannot read (mkdtemp's 0700) is replaced by a 0755 directory with its
  entries bound one by one; a file that stays unreadable fails closed with its path and the fix.
- stdin is /dev/null; stdout/stderr are read incrementally and the run is killed once either
  exceeds `max_output_bytes`; the environment is a fixed minimal one (no parent variables);
  Python runs isolated (`-I`: no PYTHON* variables, no user site, no cwd on sys.path).
- A run counts as *passed* only when the program reached its last line: the runner writes a
  nonce (which is not in the program's source) to a pipe after the program's code returns, so a
  completion that calls `sys.exit(0)` or `os._exit(0)` before the appended tests is a failure.
  Deliberate introspection of the runner's frame could still forge it; that is outside the model.
- A concurrency limit (process-wide semaphore, `set_max_concurrency`) bounds the machine's load.

Fail closed: when the jail cannot be built, `sandbox_mode()` raises `SandboxUnavailableError`
(cause + fix) and nothing runs. "basic" mode runs ONLY when asked for (`set_allow_basic(True)`,
`--allow-basic-sandbox`, GRPO `reward_allow_basic_sandbox`, MDIFFU_ALLOW_BASIC_SANDBOX=1 or
MDIFFU_SANDBOX_MODE=basic), prints `BASIC_MODE_WARNING`, and as root refuses to run as uid 0.
Verdicts: the program only reports the candidate's outputs as data where a test decomposes (or is
replayed) and `verdicts.judge` decides in the caller (docs/SANDBOX.md); otherwise in-process.
Basic mode gets: fresh session + killpg, rlimits, temp working directory,
minimal environment, /dev/null stdin, output caps, the nonce check, and sockets refused by
patching the `socket` module in the runner. As root, when other users can run the interpreter
and reach the temp directory, the program still runs under a fresh uid (it cannot signal us or
write root's files, RLIMIT_NPROC applies, and afterwards `kill -9 -1` run as that uid removes
every process it left, setsid or not). Otherwise it is best effort only: files are protected
only by permissions, a program can signal its parent and escape killpg with setsid, and ctypes
can bypass the socket patch.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "crashed", "resource_limit")
# The launcher runs as a script by path (`python -I -S launcher.py SPEC`), never imported: it
# needs nothing but the standard library, and no package `__init__` runs in the sandbox's parent.
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
_UID_RANGE = (1 << 20, (1 << 31) - 2)  # far from system and human uids; random per run


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be built (not the program's fault): never scored as a fail."""


class SandboxUnavailableError(SandboxSetupError):
    """The jail cannot be built here and 'basic' mode was not asked for: untrusted code does not run."""


BASIC_MODE_WARNING = (
    "sandbox: running untrusted code in 'basic' mode (asked for explicitly). NOT protected in this "
    "mode: files the program's uid can reach (as a non-root caller: all of YOUR files), the network "
    "beyond Python's socket module (ctypes/subprocess can open sockets, loopback services are "
    "reachable), SysV/POSIX IPC, abstract unix sockets, /dev/shm, the session keyring, other "
    "processes of the same uid (signals), and background processes of a non-root caller that call "
    "setsid. Protected: rlimits (memory, CPU, file size, open files), wall-clock timeout, output "
    "caps, minimal environment, /dev/null stdin, the early-exit check, and verdicts judged outside "
    "the program where a test decomposes. As root it runs only under a fresh uid, never as uid 0.")


@dataclass
class SandboxResult:
    """What happened to one program.

    status: passed (ran to its end, exit 0) | failed (exception, assertion, non-zero exit, exited
    early) | timeout (wall or CPU limit) | crashed (killed by a signal, e.g. segfault) |
    resource_limit (memory, file size, output cap).
    """

    status: str
    returncode: Optional[int]
    stdout: str
    stderr: str
    error: str
    duration_s: float
    sandbox_uid: Optional[int] = None  # jail mode as root: the uid the program ran under

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


_semaphore_lock = threading.Lock()
_semaphore = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
_mode_cache: Optional[str] = None
_mode_error: Optional[str] = None  # why the jail could not be built (probed once)
_mode_lock = threading.Lock()
_allow_basic = False
_basic_warned = False


def set_allow_basic(allow: bool) -> None:
    """Allow 'basic' mode when the jail cannot be built (the `--allow-basic-sandbox` flag, the
    GRPO `reward_allow_basic_sandbox` key). Off by default: without a jail untrusted code does not run."""
    global _allow_basic
    _allow_basic = bool(allow)


def basic_allowed() -> bool:
    return _allow_basic or os.environ.get("MDIFFU_ALLOW_BASIC_SANDBOX", "") in ("1", "true", "yes")


def _warn_basic() -> None:
    global _basic_warned
    if not _basic_warned:
        _basic_warned = True
        logger.warning(BASIC_MODE_WARNING)
        print(BASIC_MODE_WARNING, file=sys.stderr, flush=True)


def set_max_concurrency(n: int) -> None:
    """At most `n` sandboxed programs run at once in this process (default: number of CPUs)."""
    global _semaphore
    if n < 1:
        raise ValueError(f"max concurrency must be >= 1, got {n}")
    with _semaphore_lock:
        _semaphore = threading.BoundedSemaphore(n)


def _python_prefixes(python: Optional[str] = None) -> list[str]:
    """Directories the interpreters need inside the jail: each prefix both as spelled (a venv's
    `bin/python` is a symlink whose venv must be visible at its own path, for pyvenv.cfg) and
    resolved (where the binary and the stdlib really are)."""
    found = set()
    for exe in filter(None, (sys.executable, python)):
        found.add(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
        found.add(_prefix_of(exe))
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        found |= {os.path.abspath(p), os.path.realpath(p)}
    # a prefix inside another one is covered by the outer bind
    found = {p for p in found if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in found)}
    return sorted(found, key=len)


def _minimal_env(home: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if home == "/sandbox" else home,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def _unshare_argv() -> list[str]:
    exe = shutil.which("unshare") or "/usr/bin/unshare"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [exe, *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]


def sandbox_mode() -> str:
    """'jail' when it can be built here (probed once). Fails closed: if it cannot be built, this
    raises `SandboxUnavailableError` naming the cause and the fix, unless 'basic' mode was asked
    for (`set_allow_basic(True)`, MDIFFU_ALLOW_BASIC_SANDBOX=1, or MDIFFU_SANDBOX_MODE=basic)."""
    global _mode_cache, _mode_error
    forced = os.environ.get("MDIFFU_SANDBOX_MODE")
    if forced:
        if forced not in ("jail", "basic"):
            raise ValueError(f"MDIFFU_SANDBOX_MODE must be 'jail' or 'basic', got {forced!r}")
        if forced == "basic":
            _warn_basic()
        return forced
    with _mode_lock:
        if _mode_cache is None and _mode_error is None:
            _mode_error = _probe_jail()
            _mode_cache = "jail" if _mode_error is None else None
    if _mode_cache == "jail":
        return "jail"
    if basic_allowed():
        _warn_basic()
        return "basic"
    if "PermissionError" in (_mode_error or "") and "Fix:" in (_mode_error or ""):
        raise SandboxUnavailableError(  # the namespaces work; a file the program needs is not readable
            f"the sandbox's jail is built but the program cannot start in it: {_mode_error}. Untrusted code is "
            f"not run without the jail (or, knowing what it does not protect, pass --allow-basic-sandbox).")
    raise SandboxUnavailableError(
        f"the sandbox's jail cannot be built here: {_mode_error}. Untrusted code is not run without it. "
        f"Fix: allow namespaces (run as root with CAP_SYS_ADMIN, or enable unprivileged user namespaces: "
        f"sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0; in a container: "
        f"--cap-add SYS_ADMIN or a seccomp profile that allows unshare/mount), or, knowing what it does "
        f"not protect, pass --allow-basic-sandbox (GRPO: reward_allow_basic_sandbox: true).")


def kernel_refusal() -> Optional[str]:
    """Why the kernel refuses the namespaces the jail needs (None when it allows them): runs
    `unshare` with the jail's namespaces and nothing else. Tests skip on this only."""
    argv = _unshare_argv() + ["/bin/true"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv)}: {exc}"
    if proc.returncode != 0:
        return f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:300]}"
    return None


def _probe_jail() -> Optional[str]:
    """Run a trivial program in the jail: None if it works, else why not."""
    try:
        probe = _run("print('ok')", mode="jail", timeout_s=20.0, memory_mb=512, cpu_s=10, file_size_mb=1,
                     max_procs=8, max_output_bytes=1024, disk_mb=8, no_site=True)
        if probe.status == "passed" and probe.stdout.strip() == "ok":
            return None
        why = probe.error or probe.stderr[-500:] or probe.status
        if ("Permission denied" in why or "PermissionError" in why) and "Fix:" not in why:
            why += (f" (the program runs under a fresh unprivileged uid with no groups: the files of the "
                    f"interpreter under {_python_prefixes()} must be readable by other users. Fix: chmod -R o+rX "
                    f"on the directory named above)")
        return why
    except (SandboxSetupError, OSError) as exc:
        return str(exc)


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    *,
    cpu_s: Optional[int] = None,
    file_size_mb: int = 16,
    max_procs: int = 16,
    max_output_bytes: int = 1 << 20,
    disk_mb: int = 64,
    no_site: bool = False,
    mode: Optional[str] = None,
    python: Optional[str] = None,
) -> SandboxResult:
    """Run `code` as `__main__` of a fresh sandboxed interpreter; see the module docstring.

    timeout_s: wall clock for the whole run (interpreter start included). cpu_s: CPU-seconds limit
    (default: ceil(timeout_s)). memory_mb: address space per process. max_procs: processes +
    threads of this run (as root; for non-root callers the limit counts all their processes and
    is not applied). max_output_bytes: stdout and stderr each; beyond it the run is killed.
    disk_mb: size of the jail's tmpfs. no_site: `-S` (stdlib only, faster start). python: the
    interpreter for the program (default: this one). mode: 'jail' | 'basic' (default: probed).
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    invalid = invalid_code(code)
    if invalid:
        return SandboxResult("failed", None, "", "", invalid, 0.0)
    mode = mode or sandbox_mode()
    if mode == "basic":
        _warn_basic()
    with _semaphore:
        return _run(code, mode=mode, timeout_s=timeout_s, memory_mb=memory_mb,
                    cpu_s=cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999)),
                    file_size_mb=file_size_mb, max_procs=max_procs, max_output_bytes=max_output_bytes,
                    disk_mb=disk_mb, no_site=no_site, python=python)


def run_many(codes: Sequence[str], max_workers: int = 2, **kwargs) -> list[SandboxResult]:
    """Run many programs, at most `max_workers` at once (and never more than the global limit).

    Results come back in input order; kwargs go to `run_python`.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not codes:
        return []
    sandbox_mode()  # probe once, before the threads race for it
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda c: run_python(c, **kwargs), codes))


def invalid_code(code: str) -> str:
    """A named reason why `code` cannot even be handed to an interpreter, or ""."""
    if not isinstance(code, str):
        return f"invalid completion: not a string ({type(code).__name__})"
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"invalid completion: not UTF-8 encodable ({exc.reason} at position {exc.start})"
    if "\x00" in code:
        return f"invalid completion: contains a NUL character (position {code.index(chr(0))})"
    return ""


class _Capture:
    """Incremental reader of one pipe with a byte cap."""

    def __init__(self, cap: int):
        self.cap, self.chunks, self.size, self.over = cap, [], 0, False

    def feed(self, data: bytes) -> None:
        room = self.cap - self.size
        if room > 0:
            self.chunks.append(data[:room])
        self.size += len(data)
        self.over = self.size > self.cap

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _run(code: str, *, mode: str, timeout_s: float, memory_mb: int, cpu_s: int, file_size_mb: int,
         max_procs: int, max_output_bytes: int, disk_mb: int, no_site: bool,
         python: Optional[str] = None) -> SandboxResult:
    python = python or sys.executable
    tmp = tempfile.mkdtemp(prefix="mdiffu-sandbox-")
    fds: list[int] = []
    uid: Optional[int] = None
    try:
        os.chmod(tmp, 0o700)
        program_path = os.path.join(tmp, "main.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        root_dir = os.path.join(tmp, "root")
        os.mkdir(root_dir)
        status_r, status_w = os.pipe()
        nonce_r, nonce_w = os.pipe()
        done_r, done_w = os.pipe()
        fds += [status_r, status_w, nonce_r, nonce_w, done_r, done_w]
        nonce = secrets.token_hex(16).encode()
        os.write(nonce_w, nonce)
        jail = mode == "jail"
        # As root, drop to a fresh uid: always in the jail (its root holds a private copy of the
        # interpreter's directories), in basic mode when other users can run the interpreter.
        drop = os.geteuid() == 0 and (jail or (_others_can_run(python) and _others_can_reach(tmp)))
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if drop else None
        if not jail and os.geteuid() == 0 and uid is None:
            raise SandboxSetupError(
                f"basic mode refuses to run untrusted code as uid 0: the interpreter {python} (or the "
                f"temporary directory {tmp}) is not reachable by an unprivileged uid. Fix: build the jail, "
                f"or give basic mode a world-runnable interpreter (python=..., e.g. /usr/bin/python3) "
                f"and a world-traversable TMPDIR")
        if uid is not None and not jail:
            for path in (tmp, program_path):
                os.chown(path, uid, uid)
        prefixes = _python_prefixes(python)
        needed = [python, os.path.realpath(python)] + (
            [os.path.dirname(os.__file__)] if os.path.realpath(python) == os.path.realpath(sys.executable) else [])
        cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(python))), "pyvenv.cfg")
        needed += [cfg] if os.path.exists(cfg) else []
        spec = dict(mode=mode, root_dir=root_dir, program_path=program_path, disk_mb=disk_mb,
                    python_prefixes=prefixes, needed_paths=needed, python=python, uid=uid,
                    cwd="/sandbox" if jail else tmp, env=_minimal_env("/sandbox" if jail else tmp),
                    memory_mb=memory_mb, cpu_s=cpu_s, file_size_mb=file_size_mb, max_open_files=256,
                    max_procs=max_procs if uid is not None else None, no_site=no_site,
                    status_fd=status_w, nonce_fd=nonce_r, done_fd=done_w)
        argv = [sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec)]
        if jail:
            argv = _unshare_argv() + argv
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w, nonce_r, done_w), env=_minimal_env(tmp), cwd=tmp,
                                start_new_session=True, close_fds=True)
        for fd in (status_w, nonce_r, nonce_w, done_w):  # only the children hold these now
            os.close(fd)
            fds.remove(fd)
        return _collect(proc, start, timeout_s, max_output_bytes, status_r, done_r, nonce, uid, jail)
    finally:
        for fd in fds:
            os.close(fd)
        if uid is not None and not jail:
            _kill_uid(uid)  # no pid namespace: background processes (even after setsid) die here
        shutil.rmtree(tmp, ignore_errors=True)


def _prefix_of(python: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


def _others_can_reach(path: str) -> bool:
    """Whether a uid with no rights of its own can traverse every directory above `path`."""
    d = os.path.dirname(os.path.realpath(path))
    try:
        while d not in ("/", ""):
            if not os.stat(d).st_mode & 0o001:
                return False
            d = os.path.dirname(d)
    except OSError:
        return False
    return True


def _others_can_run(python: str) -> bool:
    """Whether a uid with no rights of its own can start `python` (o+x path, o+rx stdlib)."""
    exe, stdlib = os.path.realpath(python), os.path.join(_prefix_of(python), "lib")
    try:
        return (_others_can_reach(exe) and _others_can_reach(stdlib) and bool(os.stat(exe).st_mode & 0o001)
                and (os.stat(stdlib).st_mode & 0o005) == 0o005)
    except OSError:
        return False


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: `kill -9 -1` run as that uid signals exactly those."""
    kill = shutil.which("kill") or "/bin/kill"
    for _ in range(3):  # a fork racing the first pass is caught by the next
        subprocess.run([kill, "-9", "-1"], user=uid, group=uid, extra_groups=[], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _collect(proc: subprocess.Popen, start: float, timeout_s: float, cap: int, status_r: int, done_r: int,
             nonce: bytes, uid: Optional[int], jail: bool) -> SandboxResult:
    out, err = _Capture(cap), _Capture(cap)
    status_buf, done_buf = _Capture(4096), _Capture(4096)
    sel = selectors.DefaultSelector()
    for fileobj, sink in ((proc.stdout, out), (proc.stderr, err), (status_r, status_buf), (done_r, done_buf)):
        sel.register(fileobj, selectors.EVENT_READ, sink)
    deadline = start + timeout_s
    timed_out = overflow = False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # Once our child has exited, only drain what is buffered: a background process that
            # escaped the group (basic mode) may hold the pipes open, and is killed afterwards.
            exited = proc.poll() is not None
            ready = sel.select(timeout=0 if exited else min(remaining, 0.1))
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                key.data.feed(data)
            if out.over or err.over:
                overflow = True
                break
            if exited and not ready:
                break
    finally:
        sel.close()
        if timed_out or overflow:
            _kill_group(proc)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pipes closed yet still alive: make sure it is gone
            _kill_group(proc)
            proc.wait()
        _kill_group(proc)  # anything left in the group (basic mode: background children)
        proc.stdout.close()
        proc.stderr.close()
    duration = time.monotonic() - start
    finished = done_buf.text().encode() == nonce
    report = _parse_report(status_buf.text(), jail, proc.returncode)
    status, returncode, error = _classify(report, finished, timed_out, overflow, err.text(), timeout_s, cap)
    return SandboxResult(status, returncode, out.text(), err.text(), error, round(duration, 4), uid)


def _parse_report(text: str, jail: bool, launcher_rc: Optional[int]) -> dict:
    """The launcher's JSON report (jail) or the plain exit status (basic)."""
    if not jail:
        rc = launcher_rc if launcher_rc is not None else -signal.SIGKILL
        return {"exit_code": rc, "signal": None} if rc >= 0 else {"exit_code": None, "signal": -rc}
    line = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        report = json.loads(line) if line else None
    except json.JSONDecodeError:  # killed half way through writing it
        report = None
    if not isinstance(report, dict):  # killed before reporting (our timeout / output kill), or died
        return {"exit_code": None, "signal": signal.SIGKILL, "unreported": True}
    if "setup_error" in report:
        raise SandboxSetupError(f"sandbox setup failed: {report['setup_error']}")
    return report


def signal_name(sig: int) -> str:
    """SIGSEGV, SIGRTMIN+6, or "unknown signal" for numbers this Python does not name."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        lo, hi = getattr(signal, "SIGRTMIN", 34), getattr(signal, "SIGRTMAX", 64)
        return f"SIGRTMIN+{sig - lo}" if lo <= sig <= hi else "unknown signal"


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:500] if lines else ""


def _classify(report: dict, finished: bool, timed_out: bool, overflow: bool, stderr: str, timeout_s: float,
              cap: int) -> tuple[str, Optional[int], str]:
    sig, code = report.get("signal"), report.get("exit_code")
    returncode = code if sig is None else -sig
    if finished:
        return "passed", returncode, ""
    if timed_out:
        return "timeout", returncode, f"timed out after {timeout_s:g} s (wall clock)"
    if overflow:
        return "resource_limit", returncode, f"output exceeded {cap} bytes"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and "CPU" in stderr):
        return "timeout", returncode, "CPU time limit exceeded"
    if sig == signal.SIGXFSZ:
        return "resource_limit", returncode, "file size limit exceeded"
    last = _last_line(stderr)
    if sig is not None:
        return "crashed", returncode, f"crashed: signal {sig} ({signal_name(sig)})" + (f": {last}" if last else "")
    if "File too large" in last:  # Python ignores SIGXFSZ: the write raises EFBIG instead
        return "resource_limit", returncode, f"file size limit exceeded: {last}"
    if last.startswith("MemoryError") or "Cannot allocate memory" in last:
        return "resource_limit", returncode, f"memory limit exceeded: {last}"
    if code == 0:
        return "failed", returncode, "program exited before its end (sys.exit / os._exit / exit)"
    if code == 125 and last.startswith("sandbox: could not start"):
        return "crashed", returncode, last
    return "failed", returncode, last or f"exit code {code}"
