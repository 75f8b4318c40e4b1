"""Inside half of the sandbox (see `sandbox.py` for the threat model). Standard library only.

Run by `sandbox.py` as a script, `python -I -S <this file> SPEC_JSON` (located by path beside
`sandbox.py`, never imported, so it must import nothing but the standard library), either
- "jail" mode: under `unshare --mount --net --pid --ipc --uts --fork` (optionally `--user
  --map-root-user` when the caller is not root). This process is then pid 1 of a fresh pid
  namespace, still (namespace-)root, in a private mount namespace without network. It builds a
  minimal root file system on a size-limited tmpfs (read-only binds of /usr, /lib*, /etc and the
  Python prefix; /dev/null & co; a fresh /proc; writable /tmp and /sandbox), pivots into it,
  forks the program, drops to an unprivileged uid (when it is real root), applies the rlimits and
  execs a fresh interpreter on the program. When the program exits this process exits too, and
  the kernel kills every process left in the pid namespace.
- "basic" mode (no namespaces available): applies the rlimits and execs the program directly.

It reports to the caller through the status fd (JSON, one line): {"setup_error": str} if the
sandbox could not be built, else {"exit_code": int|None, "signal": int|None}. The program never
holds that fd, so it cannot forge the report.
"""
import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_DUMPABLE = 38, 24, 28, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1, 2
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "ppc64le": 271, "s390x": 280}
KEYCTL_JOIN_SESSION_KEYRING = 1
_SPLIT_DEPTH = 3  # how deep `_bind_for_others` looks for a directory others can read
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}

# Runs in the sandboxed interpreter (`python -I -c RUNNER path nonce_fd done_fd basic`). It reads
# a nonce the program never sees in its source, runs the program as __main__, and writes the
# nonce to the done fd only if the program ran to its end: `sys.exit(0)` or `os._exit(0)` half
# way through (skipping the tests appended to it) is therefore *not* a pass.
RUNNER = r'''
import os, sys
def _sandbox_main(path, nonce_fd, done_fd, basic):
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    if basic:  # no network namespace here: refuse sockets at the Python level (best effort)
        import socket, _socket
        def _refuse(*a, **k):
            raise PermissionError("network access is disabled in the sandbox")
        for mod in (socket, _socket):
            for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server"):
                if hasattr(mod, name):
                    setattr(mod, name, _refuse)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    code = compile(src, path, "exec")
    sys.argv = [path]
    glb = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    exec(code, glb)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(done_fd, nonce)
    os._exit(0)
_sandbox_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
'''

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src} -> {target}")


def _bind_ro(src: str, target: str) -> None:
    """Bind `src` read-only; keep the source mount's nosuid/nodev/noexec (required in a userns)."""
    _mount(src, target, None, MS_BIND | MS_REC)
    keep = os.statvfs(src).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep)


def _bind_for_others(src: str, dst: str, depth: int = 0) -> None:
    """Bind `src` read-only at `dst` for a program that runs under a fresh uid with no groups,
    which only the "other" permission bits let in. A directory that others cannot list and
    traverse (e.g. a virtual environment made in a `mkdtemp` directory, mode 0700) is not bound
    as a whole: a fresh 0755 directory takes its place and its entries are bound one by one
    (symlinks copied), down to `_SPLIT_DEPTH` levels. The host's modes are never changed; a file
    or a deeper directory that others cannot read stays unreadable, and the launcher names it
    (`_access_problem`)."""
    st = os.stat(src)
    if not os.path.isdir(src) or (st.st_mode & 0o005) == 0o005 or depth >= _SPLIT_DEPTH:
        if not os.path.exists(dst):
            open(dst, "w").close()
        _bind_ro(src, dst)
        return
    os.chmod(dst, 0o755)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        elif os.path.isdir(s):
            os.mkdir(d, 0o755)
            _bind_for_others(s, d, depth + 1)
        elif os.path.isfile(s):
            open(d, "w").close()
            _bind_for_others(s, d, depth + 1)
        # sockets, fifos, devices inside a Python prefix: not exposed


def _access_problem(paths: list) -> str:
    """As the program's uid, inside the jail: the first directory or file on the way to one of
    `paths` that it cannot traverse or read, with its mode and owner and the fix; "" if none."""
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                break  # not there (an optional path): nothing to diagnose
            except OSError:
                continue  # the parent already failed the check below
            is_dir = os.path.isdir(p) and not os.path.islink(p)
            last = i == len(parts)
            need = os.X_OK if is_dir and not last else os.R_OK | (os.X_OK if is_dir else 0)
            if not os.path.islink(p) and not os.access(p, need):
                return (f"the jail's program runs under a fresh uid ({os.getuid()}) with no groups, which cannot "
                        f"{'traverse' if need == os.X_OK else 'read'} {p} (mode {oct(st.st_mode & 0o7777)}, owner "
                        f"uid {st.st_uid}; needed for {path}). Fix: make it readable by other users "
                        f"(chmod o+{'x' if need == os.X_OK else 'rx' if is_dir else 'r'} {p}), or use an "
                        f"interpreter whose files other users can read")
    return ""


def _pivot(new_root: str) -> None:
    os.chdir(new_root)
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is not None:
        os.mkdir(".oldroot")
        _check(_libc.syscall(nr, b".", b".oldroot"), "pivot_root")
        os.chroot(".")
        os.chdir("/")
        _check(_libc.umount2(b"/.oldroot", MNT_DETACH), "umount old root")
        os.rmdir("/.oldroot")
    else:  # switch_root style: move the new root over / and chroot into it
        _mount(new_root, "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _build_root(spec: dict) -> None:
    root = spec["root_dir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['disk_mb']}m,mode=755")
    bound: list[str] = []
    for top in ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc"):
        if os.path.islink(top):  # merged-usr: /bin -> usr/bin
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            os.mkdir(root + top)
            _bind_ro(top, root + top)
            bound.append(top)
    os.mkdir(root + "/dev")
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(root + "/dev/" + dev, "w").close()
        _mount("/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
    # The fixed directories first, the interpreter's prefixes after: a prefix may live under one of
    # them (a virtual environment in /tmp, a conda prefix in /opt, a home directory).
    for d, mode in (("/tmp", 0o1777), ("/dev/shm", 0o1777), ("/sandbox", 0o700), ("/proc", 0o555)):
        os.mkdir(root + d)
        os.chmod(root + d, mode)
    for prefix in spec["python_prefixes"]:  # the interpreter may live outside /usr (pyenv, conda, venv)
        if _covered(prefix, bound):
            continue
        if _covered(prefix, ["/proc", "/dev", "/sandbox"]) or prefix in ("/", "/tmp"):
            raise OSError(f"the Python prefix {prefix} cannot be mapped into the jail (it would cover "
                          f"one of /, /tmp, /proc, /dev, /sandbox)")
        os.makedirs(root + prefix, mode=0o755, exist_ok=True)
        if spec["uid"] is not None:
            _bind_for_others(prefix, root + prefix)
        else:  # user-namespace mode: the program has the caller's uid, the caller's permissions
            _bind_ro(prefix, root + prefix)
        bound.append(prefix)
    # A fresh proc for our pid namespace; hidepid keeps the program from reading pid 1's details.
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    except OSError:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with open(spec["program_path"], "rb") as f:
        program = f.read()
    dst = root + "/sandbox/main.py"
    with open(dst, "wb") as f:
        f.write(program)
    uid = spec["uid"]
    if uid is not None:
        for p in (root + "/sandbox", dst):
            os.chown(p, uid, uid)
    _pivot(root)


def _apply_limits(spec: dict) -> None:
    mb = 1024 * 1024
    lim = [(resource.RLIMIT_AS, spec["memory_mb"] * mb), (resource.RLIMIT_FSIZE, spec["file_size_mb"] * mb),
           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, spec["max_open_files"])]
    cpu = spec["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu, SIGKILL one later
    if spec["max_procs"] is not None:
        lim.append((resource.RLIMIT_NPROC, spec["max_procs"]))
    for which, value in lim:
        resource.setrlimit(which, (value, value))


def _drop_privileges(uid) -> None:
    """Leave the program no capabilities, now or after any exec."""
    if uid is None:
        # User-namespace mode: we stay uid 0 of the namespace, whose capabilities would let the
        # program undo our read-only binds: exec() must not grant capabilities to uid 0.
        _check(_libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0), "securebits")
    for cap in range(64):  # empty the bounding set (needs CAP_SETPCAP, so before setuid)
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # the kernel clears the capability sets on this transition
    # A fresh, empty session keyring: the caller's keys are not reachable by possession, and a key
    # the program adds is gone with it (the keyring is not namespaced by unshare).
    nr = SYS_KEYCTL.get(os.uname().machine)
    if nr is not None and _libc.syscall(nr, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        if err != 38:  # ENOSYS: a kernel without keys support has none to leak
            raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no setuid binary gives any back


def _program_argv(spec: dict, path: str) -> list:
    flags = ["-I"] + (["-S"] if spec["no_site"] else [])
    return [spec["python"], *flags, "-c", RUNNER, path, str(spec["nonce_fd"]), str(spec["done_fd"]),
            "0" if spec["mode"] == "jail" else "1"]


def _exec_program(spec: dict, path: str) -> None:
    """Become the program (never returns). Errors end in exit code 125 with a message on stderr."""
    try:
        os.set_inheritable(spec["nonce_fd"], True)
        os.set_inheritable(spec["done_fd"], True)
        _apply_limits(spec)
        # RLIMIT_NPROC counts per uid: it only bites once we are not root any more.
        _drop_privileges(spec["uid"])
        os.chdir(spec["cwd"])
        if spec["uid"] is not None and spec["mode"] == "jail":
            problem = _access_problem(spec["needed_paths"])
            if problem:
                raise PermissionError(problem)
        os.execve(spec["python"], _program_argv(spec, path), spec["env"])
    except PermissionError as exc:
        os.write(2, f"sandbox: could not start the program: PermissionError: {exc}\n".encode())
        os._exit(125)
    except BaseException as exc:  # noqa: BLE001 - report anything, never run the program half set up
        os.write(2, f"sandbox: could not start the program: {exc!r}\n".encode())
        os._exit(125)


def _report(fd: int, payload: dict) -> None:
    os.write(fd, (json.dumps(payload) + "\n").encode())


def main() -> None:
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
    if spec["mode"] == "basic":
        os.close(status_fd)  # nothing to report after exec; the caller reads the exit status
        _exec_program(spec, spec["program_path"])
    # Not dumpable: in user-namespace mode the program has our uid, and must not ptrace us (we
    # keep the namespace's capabilities); the exec'd program gets its own dumpable flag back.
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        _build_root(spec)
    except BaseException as exc:  # noqa: BLE001
        _report(status_fd, {"setup_error": f"{type(exc).__name__}: {exc}"})
        os._exit(125)
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        _exec_program(spec, "/sandbox/main.py")
    os.close(spec["nonce_fd"])
    os.close(spec["done_fd"])
    # As pid 1 we inherit every orphan: reap them all until our program itself has exited.
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            status = None
            break
        except InterruptedError:
            continue
        if got == pid:
            break
    if status is None:
        _report(status_fd, {"setup_error": "lost track of the program process"})
    elif os.WIFSIGNALED(status):
        _report(status_fd, {"exit_code": None, "signal": os.WTERMSIG(status)})
    else:
        _report(status_fd, {"exit_code": os.WEXITSTATUS(status), "signal": None})
    os._exit(0)  # pid 1 leaving: the kernel kills whatever the program left behind


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
