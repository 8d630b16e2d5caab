"""Run untrusted Python code (an agent's ``python`` tool) in a separate, limited process.

Threat model
------------
The code comes from a language model: mostly well meant, sometimes buggy (endless loops, memory
bombs, floods of output), occasionally "creative" (deleting files, reaching the network, starting
shells), and in the worst case shaped by an adversarial prompt. :func:`run_python` runs it so that
a mistake or a naive escape attempt cannot hurt the machine, the caller or the network, and the
model is told plainly what was refused.

Layers (each one on its own is incomplete; together they are defence in depth)
------------------------------------------------------------------------------
1. **A separate process** (``python -I -B -u``: isolated mode, no environment variables, no user
   site, no bytecode files), in its own session, with an almost empty environment, stdin at
   ``/dev/null`` and a fresh temporary work folder as its current directory (removed afterwards
   unless the caller passes ``folder``). The parent enforces the wall-clock ``timeout`` by killing
   the whole process group, and reads stdout and stderr incrementally, keeping at most
   ``max_output`` characters of each (the rest is read and thrown away, so a process printing
   gigabytes cannot exhaust the caller's memory).
2. **Resource limits** set before the code runs: ``RLIMIT_CPU`` (CPU seconds, also bounding
   C extensions that ignore the timeout until the process is killed), ``RLIMIT_AS`` (address
   space: ``memory_mb``), ``RLIMIT_FSIZE`` (largest file), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0
   and, when the uid is dropped, ``RLIMIT_NPROC``.
3. **An unprivileged user.** When the caller is root (which ignores ``RLIMIT_NPROC`` and every
   file permission) the child is started through ``setpriv`` as uid/gid 65534 (nobody), with no
   supplementary groups and ``no_new_privs``; the work folder is handed to that user for the run.
   If that user cannot read the Python installation (e.g. it lives under a ``/root`` with mode
   700) the child keeps exactly one capability, ``CAP_DAC_READ_SEARCH`` (read any file, write
   none): still far less than root. Only when neither works does the child run as the caller.
4. **An audit hook** (:pep:`578`), installed by a small bootstrap before the user code is
   compiled, that refuses -- with a ``PermissionError``/``ImportError`` whose message starts with
   ``sandbox:`` -- network access (creating any socket but an ``AF_UNIX`` one, connecting,
   binding, ``sendto``, name lookups, the ``http``/``urllib``/``smtplib``... events), process
   creation (``os.fork``/``forkpty``/``posix_spawn``/``exec*``/``system``, ``subprocess.Popen``,
   ``pty.spawn``), signals to other processes (``os.kill`` of another pid, ``os.killpg``),
   ``ctypes.*`` and imports of modules that give raw memory, processes or unaudited file access
   (``ctypes``, ``_ctypes``, ``cffi``, ``_posixsubprocess``, ``mmap``, sub-interpreters, ``_test*``,
   ``sqlite3``, ``dbm``, ``readline``, ``pwd``/``grp``/``spwd`` ...), a second audit hook,
   ``gc.get_objects``/``get_referrers``/``get_referents`` (which could reach the hook), resource
   limit changes, symbolic links, ``chown``, setuid/setgid bits, and every file-system event on a
   path outside the allowed places: the work folder is the only writable place; the work folder,
   the Python installation (``sys.prefix``, ``sys.base_prefix`` ...), ``/usr/share/zoneinfo`` and
   a few devices (``/dev/null``, ``/dev/urandom`` ...) are the only readable ones, and directories
   outside the work folder cannot be opened (``os.open`` does not tell the hook its ``dir_fd``).
   Paths are resolved the way the kernel will (symbolic links followed, relative paths against
   the current directory, ``dir_fd`` arguments and file descriptors through ``/proc/self/fd``);
   ``..`` is refused in relative paths. Deliberately allowed: ``AF_UNIX`` socket pairs (asyncio's
   event loop needs one; connecting or binding them is refused), ``os.kill`` of the process itself,
   threads, and ``sys.settrace``/``sys.setprofile`` (CPython runs audit hooks with tracing
   disabled, and ``doctest`` needs ``sys.settrace``). ``subprocess`` is imported before the hook
   with its ``fork_exec`` taken away so that ``asyncio`` and libraries that import it still load.
5. **A network namespace.** When ``unshare -n`` (as root) or ``unshare -rn`` (otherwise) works,
   the child starts inside its own empty network namespace, so even code that got past the hook
   finds no network. When it does not work the hook alone refuses the network;
   :attr:`SandboxResult.network_namespace` records which.

What it does not protect against
--------------------------------
The audit hook runs inside the same interpreter as the code it watches, so it is *not* a security
boundary against a determined attacker: a CPython memory-corruption bug, a crafted code object
(``marshal``), races between threads that change a path after it was checked, an import spec
whose attributes change between two reads, or similar tricks can get around it (taking
``os.mknod``/``mkfifo``/``pidfd_open`` out of ``os`` only stops the naive). What then remains are
the operating-system layers: the unprivileged uid (no writes outside world-writable places; but
with ``CAP_DAC_READ_SEARCH`` every file is readable), the rlimits, the network namespace and the
timeout -- and where neither ``setpriv`` nor a user namespace works and the caller is root, only
the hook. Runs share uid 65534, so ``RLIMIT_NPROC`` counts all of them (and any other "nobody"
process) together. ``RLIMIT_FSIZE`` bounds each file but not their number, so a run can fill the
disk until the timeout stops it. CPU time spent in C extensions is only bounded by
``RLIMIT_CPU`` and the timeout. Modules whose C code opens files without audit events are
refused (``sqlite3``, ``dbm``, ``readline``, ``pwd``, ``grp``, ``spwd``), but other C extensions
installed in the environment are not vetted. For a real boundary against hostile code, put this
inside a VM or a container runtime with seccomp (gVisor, Firecracker).

Linux only (``/proc``, ``setpriv``, ``unshare``).
"""

from __future__ import annotations

import functools
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

UNPRIVILEGED_ID = 65534  # "nobody": the uid and gid the child runs as when the caller is root
MAX_FILE_MB = 64  # RLIMIT_FSIZE: the largest file the code may write
MAX_OPEN_FILES = 128  # RLIMIT_NOFILE
MAX_PROCESSES = 256  # RLIMIT_NPROC (per uid, threads included), set only when the uid is dropped
MAX_LISTED_FILES = 1000  # SandboxResult.files lists at most this many files


@dataclass
class SandboxResult:
    """What a run of :func:`run_python` produced."""

    stdout: str
    stderr: str
    exit_code: int | None  # None when killed by the timeout; -N when killed by signal N
    timed_out: bool
    seconds: float
    truncated: bool  # stdout or stderr was cut at max_output
    network_namespace: bool  # the child ran inside its own network namespace
    files: list[str] = field(default_factory=list)  # files left in the work folder (relative paths), sorted

    @property
    def ok(self) -> bool:
        """The code ran to the end with exit code 0."""
        return self.exit_code == 0 and not self.timed_out

    def summary(self) -> str:
        """What the model is shown: stdout, then stderr (if any), then one line saying the exit code, the
        timeout or the signal, and whether output was cut. Never empty."""
        parts = []
        if self.stdout:
            parts.append(self.stdout if self.stdout.endswith("\n") else self.stdout + "\n")
        if self.stderr:
            parts.append("[stderr]\n" + (self.stderr if self.stderr.endswith("\n") else self.stderr + "\n"))
        if self.timed_out:
            status = f"timed out after {self.seconds:.1f} s: the process was killed"
        elif self.exit_code is not None and self.exit_code < 0:
            status = _describe_signal(-self.exit_code)
        else:
            status = f"exit code {self.exit_code}"
        notes = []
        if not self.stdout and not self.stderr:
            notes.append("no output")
        if self.truncated:  # the cut stream is exactly max_output characters long, the other one no longer
            longest = max(len(self.stdout), len(self.stderr))
            streams = (("stdout", self.stdout), ("stderr", self.stderr))
            cut = [f"{name} was cut at {longest} characters" for name, text in streams
                   if len(text) == longest]
            notes.append("output cut: " + ", ".join(cut))
        parts.append("[" + "; ".join([status, *notes]) + "]")
        return "".join(parts)


def _describe_signal(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number == signal.SIGXCPU:
        return f"killed by {name}: the CPU time limit was reached"
    if number == signal.SIGKILL:
        return f"killed by {name} (CPU time or memory limit)"
    if number == signal.SIGXFSZ:
        return f"killed by {name}: the file size limit was reached"
    return f"killed by {name}"


# ---------------------------------------------------------------------------------------------------------
# The child: a bootstrap that sets the limits, installs the audit hook, then runs the code

# Run as ``python -I -B -u -X utf8 -c STUB BOOTSTRAP folder cpu memory fsize nofile nproc`` with the
# code on stdin. The hook keeps no mutable state and looks up no global or builtin name: everything
# it uses is bound as a default argument when it is made (immutable values and C functions only), so
# code that reaches its frame (through a traceback) or monkeypatches os, posixpath or builtins cannot
# change what it does. Errors raised by the hook abort the audited operation.
_STUB = "import sys; exec(compile(sys.argv[1], '<sandbox>', 'exec'))"

_BOOTSTRAP = r'''
import sys

_NETWORK = frozenset({
    "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyaddr", "socket.gethostbyname",
    "socket.gethostname", "socket.getnameinfo", "socket.getservbyname", "socket.getservbyport",
    "socket.sendto", "socket.sethostname", "http.client.connect", "http.client.send", "ftplib.connect",
    "smtplib.connect", "imaplib.open", "poplib.connect", "nntplib.connect", "telnetlib.Telnet.open",
    "urllib.Request",
})
_PROCESS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "webbrowser.open", "ensurepip.bootstrap",
})
_FILES = frozenset({
    "open", "os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "os.mkdir", "os.chmod", "os.remove",
    "os.rmdir", "os.rename", "os.link", "os.utime", "os.truncate", "os.setxattr", "os.removexattr",
    "os.chdir",
})
_REFUSED = {
    "gc.get_objects": "gc introspection is not allowed",
    "gc.get_referrers": "gc introspection is not allowed",
    "gc.get_referents": "gc introspection is not allowed",
    "resource.setrlimit": "changing resource limits is not allowed",
    "resource.prlimit": "changing resource limits is not allowed",
    "os.killpg": "sending signals to other processes is not allowed",
    "os.symlink": "symbolic links are not allowed",
    "os.chown": "changing file owners is not allowed",
    "shutil.chown": "changing file owners is not allowed",
    "mmap.__new__": "mmap is not allowed",
    "sqlite3.connect": "sqlite3 is not allowed (its C code opens files without audit events)",
    "sqlite3.enable_load_extension": "sqlite3 is not allowed",
    "sqlite3.load_extension": "sqlite3 is not allowed",
    "syslog.openlog": "syslog is not allowed",
    "syslog.syslog": "syslog is not allowed",
    "syslog.setlogmask": "syslog is not allowed",
    "syslog.closelog": "syslog is not allowed",
    "cpython.PyInterpreterState_New": "sub-interpreters are not allowed (they would run without this hook)",
    "setopencodehook": "replacing the open_code hook is not allowed",
}
_MODULES = frozenset({
    "ctypes", "_ctypes", "_ctypes_test", "cffi", "_cffi_backend", "_posixsubprocess", "mmap", "posix",
    "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues",
    "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testsinglephase",
    "_testimportmultiple", "_testclinic", "_xxtestfuzz", "_sqlite3", "_dbm", "_gdbm", "readline", "_curses",
    "_curses_panel", "_tkinter", "_posixshmem", "pwd", "grp", "spwd", "nis", "ossaudiodev",
})
_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})


class SandboxViolation(BaseException):
    """Raised by the audit hook where CPython would silently swallow an Exception (sys.addaudithook)."""


def _make_audit_hook(work, roots, pid, fs_encoding, write_mask):
    import posix

    def audit(event, args, _type=type, _str=str, _bytes=bytes, _int=int, _issub=issubclass, _len=len,
              _id=id, _sget=str.__getitem__, _bget=bytes.__getitem__, _index=int.__index__, _all=slice(None),
              _decode=bytes.decode, _fsenc=fs_encoding, _tget=tuple.__getitem__, _lstat=posix.lstat,
              _stat=posix.stat, _readlink=posix.readlink, _getcwd=posix.getcwd, _OSError=OSError,
              _PE=PermissionError, _IE=ImportError, _EACCES=13, _work=work, _work_dir=work + "/",
              _roots=tuple((r, r + "/") for r in roots), _devices=_DEVICES, _pid=pid, _wmask=write_mask,
              _files=_FILES, _network=_NETWORK, _process=_PROCESS, _modules=_MODULES,
              _refused=tuple(_REFUSED.items()), _refused_names=frozenset(_REFUSED), _SV=SandboxViolation,
              _me=0):
        if _type(event) is not _str:
            return  # a call of sys.audit() with a made-up event: nothing happens
        if event in _files:
            is_open = event == "open"
            if is_open:
                if _type(args[0]) is _int:
                    return  # open(fd) wraps a descriptor that an audited call opened
                flags = args[2]
                checks = ((args[0], -1, _type(flags) is not _int or (flags & _wmask) != 0),)
            elif (event == "os.listdir" or event == "os.scandir" or event == "os.getxattr"
                  or event == "os.listxattr"):
                checks = ((args[0], -1, False),)
            elif event == "os.mkdir":
                checks = ((args[0], args[2], True),)
            elif event == "os.chmod":
                if _type(args[1]) is not _int or args[1] & 0o6000:
                    raise _PE(_EACCES, "sandbox: setuid and setgid bits are not allowed")
                checks = ((args[0], args[2], True),)
            elif event == "os.remove" or event == "os.rmdir":
                checks = ((args[0], args[1], True),)
            elif event == "os.rename" or event == "os.link":
                checks = ((args[0], args[2], True), (args[1], args[3], True))
            elif event == "os.utime":
                checks = ((args[0], args[3], True),)
            else:  # os.truncate, os.setxattr, os.removexattr, os.chdir: inside the work folder only
                checks = ((args[0], -1, True),)
            for path, dir_fd, write in checks:
                kind = _type(path)
                if path is None:
                    path, kind = ".", _str
                elif kind is not _str and kind is not _bytes and kind is not _int:
                    if _issub(kind, _str):
                        path, kind = _sget(path, _all), _str
                    elif _issub(kind, _bytes):
                        path, kind = _bget(path, _all), _bytes
                    elif _issub(kind, _int):
                        path, kind = _index(path), _int
                    else:
                        raise _PE(_EACCES, "sandbox: paths must be str or bytes")
                if kind is _bytes:
                    path = _decode(path, _fsenc, "surrogateescape")
                elif kind is _int:  # a file descriptor: where it points
                    try:
                        path = _readlink("/proc/self/fd/%d" % path)
                    except _OSError:
                        raise _PE(_EACCES, "sandbox: cannot tell where file descriptor %d points"
                                  % path) from None
                    if not path.startswith("/") or path.endswith(" (deleted)"):
                        raise _PE(_EACCES, "sandbox: file descriptor %s is not a file in the work folder"
                                  % path)
                if not path.startswith("/"):
                    if ".." in path.split("/"):
                        raise _PE(_EACCES, "sandbox: '..' is not allowed in relative paths (use an absolute "
                                  "path): " + path)
                    try:
                        if _type(dir_fd) is _int and dir_fd != -1:
                            base = _readlink("/proc/self/fd/%d" % dir_fd)
                        else:
                            base = _getcwd()
                    except _OSError:
                        raise _PE(_EACCES, "sandbox: cannot resolve the relative path " + path) from None
                    if not base.startswith("/"):
                        raise _PE(_EACCES, "sandbox: cannot resolve the relative path " + path)
                    path = base + "/" + path
                # resolve symbolic links and "..", component by component, as the kernel will
                todo = path.split("/")
                todo.reverse()
                done = []
                hops = 0
                while todo:
                    part = todo.pop()
                    if part == "" or part == ".":
                        continue
                    if part == "..":
                        if done:
                            done.pop()
                        continue
                    done.append(part)
                    try:
                        mode = _tget(_lstat("/" + "/".join(done)), 0)
                    except _OSError:
                        continue
                    if mode & 0o170000 == 0o120000:
                        hops += 1
                        if hops > 40:
                            raise _PE(_EACCES, "sandbox: too many levels of symbolic links: " + path)
                        target = _readlink("/" + "/".join(done))
                        done.pop()
                        if target.startswith("/"):
                            done = []
                        more = target.split("/")
                        more.reverse()
                        todo.extend(more)
                full = "/" + "/".join(done)
                if full == _work or full.startswith(_work_dir) or (is_open and full in _devices):
                    continue
                if write:
                    raise _PE(_EACCES, "sandbox: writing " + full + " is not allowed (only the work folder "
                              + _work + " is writable)")
                readable = False
                for root, root_dir in _roots:
                    if full == root or full.startswith(root_dir):
                        readable = True
                        break
                if not readable:
                    raise _PE(_EACCES, "sandbox: reading " + full + " is not allowed (only the work folder "
                              "and the Python installation are readable)")
                if is_open:  # a directory descriptor would let a later dir_fd call escape the checks
                    try:
                        mode = _tget(_stat(full), 0)
                    except _OSError:
                        mode = 0
                    if mode & 0o170000 == 0o040000:
                        raise _PE(_EACCES, "sandbox: opening the directory " + full + " is not allowed "
                                  "(outside the work folder)")
            return
        if event == "import":
            name = args[0]
            if _type(name) is not _str:
                raise _IE("sandbox: module names must be str")
            if name.partition(".")[0] in _modules:
                raise _IE("sandbox: import of '" + name + "' is not allowed")
            if _len(args) > 1 and args[1] is not None:
                origin = args[1]
                if _type(origin) is not _str or origin.rpartition("/")[2].partition(".")[0] in _modules:
                    raise _IE("sandbox: import of '" + name + "' is not allowed")
            return
        if event == "socket.__new__":
            if _type(args[1]) is _int and args[1] == 1:  # AF_UNIX, e.g. socketpair() for asyncio
                return
            raise _PE(_EACCES, "sandbox: network access is not allowed")
        if event in _network or (event == "socket.sendmsg" and args[1] is not None):
            raise _PE(_EACCES, "sandbox: network access is not allowed")
        if event in _process:
            raise _PE(_EACCES, "sandbox: starting processes is not allowed")
        if event == "os.kill":
            if _type(args[0]) is _int and args[0] == _pid:
                return
            raise _PE(_EACCES, "sandbox: sending signals to other processes is not allowed")
        if event == "object.__setattr__" or event == "object.__delattr__":
            if _id(args[0]) == _me:
                raise _PE(_EACCES, "sandbox: changing the audit hook is not allowed")
            return
        if event == "sys.addaudithook":
            raise _SV("sandbox: adding audit hooks is not allowed")
        if event in _refused_names:
            for refused, reason in _refused:
                if refused == event:
                    raise _PE(_EACCES, "sandbox: " + reason)
        if event.startswith("ctypes."):
            raise _PE(_EACCES, "sandbox: ctypes is not allowed")

    return audit


def _sandbox_prepare():
    import atexit
    import linecache
    import os
    import posix
    import resource

    import _signal

    folder = sys.argv[2]
    cpu, memory, fsize, nofile, nproc = (int(value) for value in sys.argv[3:8])
    code = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    # os.mknod/mkfifo, os.pidfd_open and signal.pidfd_send_signal have no audit events: take them away
    for module in (os, posix):
        for name in ("mknod", "mkfifo", "pidfd_open"):
            module.__dict__.pop(name, None)
    _signal.__dict__.pop("pidfd_send_signal", None)
    # subprocess starts processes through _posixsubprocess.fork_exec, which has no audit event. Import it
    # now (asyncio and many libraries import it), take fork_exec away, and refuse later imports of
    # _posixsubprocess; Popen itself is refused through its "subprocess.Popen" audit event.
    import subprocess

    subprocess._fork_exec = None
    sys.modules.pop("_posixsubprocess", None)
    sys.modules["signal"].__dict__.pop("pidfd_send_signal", None)

    def limit(which, soft, hard=None):
        hard = soft if hard is None else hard
        old_hard = resource.getrlimit(which)[1]
        if old_hard != resource.RLIM_INFINITY:
            hard, soft = min(hard, old_hard), min(soft, old_hard)
        resource.setrlimit(which, (soft, hard))

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_AS, memory)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_NOFILE, nofile)
    if nproc:
        limit(resource.RLIMIT_NPROC, nproc)

    work = os.path.realpath(folder)
    os.chdir(work)
    roots = set()
    for root in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                 os.path.dirname(os.__file__), "/usr/share/zoneinfo"):
        root = os.path.realpath(root)
        if root != "/" and os.path.isdir(root):
            roots.add(root)
    write_mask = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    hook = _make_audit_hook(work, sorted(roots), os.getpid(), sys.getfilesystemencoding(), write_mask)
    hook.__defaults__ = hook.__defaults__[:-1] + (id(hook),)
    sys.addaudithook(hook)
    return code.decode("utf-8", "surrogatepass"), work, posix._exit, atexit, linecache


def _hide_sandbox_frames(report, seen):
    """Leave the audit hook's own frames out of a traceback: the model needs its code and the refusal."""
    import traceback

    if report is None or id(report) in seen:
        return
    seen.add(id(report))
    report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<sandbox>"])
    _hide_sandbox_frames(report.__cause__, seen)
    _hide_sandbox_frames(report.__context__, seen)
    for inner in getattr(report, "exceptions", None) or ():
        _hide_sandbox_frames(inner, seen)


def _sandbox_run(code, work, exit, atexit, linecache):
    import gc

    main = type(sys)("__main__")
    main.__builtins__ = sys.modules["builtins"]
    sys.modules["__main__"] = main
    sys.argv = ["<agent>"]
    sys.path.insert(0, work)
    linecache.cache["<agent>"] = (len(code), None, code.splitlines(True), "<agent>")
    try:
        exec(compile(code, "<agent>", "exec", dont_inherit=True), main.__dict__)
        status = 0
    except SystemExit as stop:
        status = stop.code
        if status is None:
            status = 0
        elif isinstance(status, int) and -2 ** 31 <= status < 2 ** 31:
            status = int(status)
        else:
            try:
                print(status, file=sys.stderr)
            except BaseException:
                pass
            status = 1
    except BaseException as error:
        status = 1
        if isinstance(error, MemoryError):
            main.__dict__.clear()  # free what the code holds so that the traceback can be printed
        try:
            import traceback

            report = traceback.TracebackException(type(error), error, error.__traceback__.tb_next,
                                                  compact=True)
            _hide_sandbox_frames(report, set())
            print("".join(report.format()), end="", file=sys.stderr)
        except BaseException:
            try:
                sys.__excepthook__(type(error), error, error.__traceback__.tb_next)
            except BaseException:
                pass
    # what interpreter shutdown would do (join threads, atexit, drop the code's objects so that their
    # __del__ runs), with the hook still in place; then leave without finalizing the interpreter
    for step in ("threads", "atexit", "objects"):
        try:
            if step == "threads" and "threading" in sys.modules:
                sys.modules["threading"]._shutdown()
            elif step == "atexit":
                atexit._run_exitfuncs()
            elif step == "objects":
                main.__dict__.clear()
                gc.collect()
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit(status)


_sandbox_run(*_sandbox_prepare())
'''


# ---------------------------------------------------------------------------------------------------------
# How the child is started: with or without a network namespace, as nobody or not


class _Launcher(NamedTuple):
    prefix: tuple[str, ...]  # the command in front of the interpreter
    drops_uid: bool  # the child runs as UNPRIVILEGED_ID
    read_cap: bool  # ... keeping CAP_DAC_READ_SEARCH (the installation is unreadable to nobody)
    network_namespace: bool


_PLAIN = _Launcher((), False, False, False)


@functools.cache
def _launchers() -> tuple[_Launcher, ...]:
    """The ways to start the child, best first (each still has to pass :func:`_works`)."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    found = []
    if os.geteuid() == 0 and setpriv:
        drop = (setpriv, f"--reuid={UNPRIVILEGED_ID}", f"--regid={UNPRIVILEGED_ID}", "--clear-groups",
                "--no-new-privs")
        no_caps = (*drop, "--inh-caps=-all", "--bounding-set=-all")
        read_caps = (*drop, "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
                     "--bounding-set=-all,+dac_read_search")
        networks = ([((unshare, "-n"), True)] if unshare else []) + [((), False)]
        for network, isolated in networks:
            found.append(_Launcher((*network, *no_caps), True, False, isolated))
            found.append(_Launcher((*network, *read_caps), True, True, isolated))
    if unshare:  # with a user namespace: works unprivileged (and as root, without init-namespace powers)
        found.append(_Launcher((unshare, "-rn"), False, False, True))
    found.append(_PLAIN)
    return tuple(found)


@functools.cache
def _works(launcher: _Launcher) -> bool:
    """Whether this way starts the same interpreter (same version, same installation)."""
    if launcher == _PLAIN:
        return True
    probe = "import sys; print(sys.version); print(sys.base_prefix)"
    try:
        done = subprocess.run([*launcher.prefix, sys.executable, "-I", "-B", "-c", probe],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              env=_environment("/"), cwd="/")
    except (OSError, subprocess.SubprocessError):
        return False
    expected = f"{sys.version}\n{sys.base_prefix}\n"
    return done.returncode == 0 and done.stdout.decode(errors="replace") == expected


def _reachable_by_others(path: Path) -> bool:
    """Whether a user that is neither the owner nor in the group can reach ``path`` (search permission on
    every folder above it)."""
    for parent in path.parents:
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _launcher_for(work: Path) -> _Launcher:
    for launcher in _launchers():
        if launcher.drops_uid and not launcher.read_cap and not _reachable_by_others(work):
            continue
        if _works(launcher):
            return launcher
    return _PLAIN


def _environment(work: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "USER": "sandbox", "LOGNAME": "sandbox",
            "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------
# The parent


class _Capture:
    """Keeps the first ``limit`` characters of a stream and counts (but drops) the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.keep = 4 * limit + 4  # enough bytes for `limit` characters of UTF-8
        self.data = bytearray()
        self.dropped = False

    def add(self, chunk: bytes) -> None:
        room = self.keep - len(self.data)
        if len(chunk) > room:
            self.dropped = True
            chunk = chunk[:max(room, 0)]
        self.data += chunk

    def text(self) -> tuple[str, bool]:
        text = self.data.decode("utf-8", errors="replace")
        if len(text) > self.limit:
            return text[:self.limit], True
        return text, self.dropped


def _check_arguments(code, timeout, cpu_seconds, memory_mb, max_output, folder, files) -> None:
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, not {type(code).__name__}")
    if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    if not isinstance(cpu_seconds, int) or cpu_seconds < 1:
        raise ValueError(f"cpu_seconds must be an int >= 1, not {cpu_seconds!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an int >= 64 (the interpreter needs that much), "
                         f"not {memory_mb!r}")
    if not isinstance(max_output, int) or max_output < 1:
        raise ValueError(f"max_output must be an int >= 1, not {max_output!r}")
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"folder {str(folder)!r} is not an existing folder")
    for name, content in (files or {}).items():
        pure = PurePosixPath(name) if isinstance(name, str) else None
        if (pure is None or not name or "\0" in name or pure.is_absolute() or ".." in pure.parts
                or pure == PurePosixPath(".")):
            raise ValueError(f"bad file name {name!r}: it must be a relative path inside the work folder, "
                             "without '..'")
        if not isinstance(content, (str, bytes)):
            raise ValueError(f"the content of {name!r} must be str or bytes, not {type(content).__name__}")


def _write_files(work: Path, files: dict[str, str | bytes]) -> None:
    root = os.path.realpath(work)
    for name, content in files.items():
        target = work / name
        if not os.path.realpath(target).startswith(root + os.sep):
            raise ValueError(f"file name {name!r} leads outside the work folder (through a symbolic link)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")


def _owners(root: Path) -> dict[str, tuple[int, int]]:
    """(uid, gid) of the folder and of everything in it."""
    found = {}
    for path in [str(root), *(os.path.join(folder, name) for folder, dirs, names in os.walk(root)
                              for name in dirs + names)]:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        found[path] = (info.st_uid, info.st_gid)
    return found


def _chown_tree(root: Path, owners: dict[str, tuple[int, int]] | tuple[int, int]) -> None:
    """Give the folder and everything in it to one (uid, gid), or back to the owners recorded by
    :func:`_owners` (what was not there then goes to the folder's owner)."""
    for path in _owners(root):
        owner = owners if isinstance(owners, tuple) else owners.get(path, owners.get(str(root)))
        try:
            if owner is not None:
                os.lchown(path, *owner)
        except OSError:
            pass


def _list_files(root: Path) -> list[str]:
    found: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            found.append(os.path.relpath(os.path.join(folder, name), root))
            if len(found) >= MAX_LISTED_FILES:
                return sorted(found)
    return sorted(found)


def _remove_tree(root: Path) -> None:
    def retry(function, path, _info):
        try:  # code may have taken away its own permissions
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass

    shutil.rmtree(root, onerror=retry)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        process.kill()
    except OSError:
        pass


def _pump(selector: selectors.BaseSelector, process: subprocess.Popen, pending: list[memoryview],
          captures: dict[int, _Capture], until: float) -> bool:
    """Feed stdin and read stdout/stderr until they are all closed (True) or ``until`` passes (False)."""
    while selector.get_map():
        left = until - time.monotonic()
        if left <= 0:
            return False
        for key, _events in selector.select(left):
            if key.fileobj is process.stdin:
                try:
                    written = os.write(key.fd, pending[0][:65536])
                except BlockingIOError:
                    continue
                except OSError:  # the child went away before reading all of it
                    written = len(pending[0])
                pending[0] = pending[0][written:]
                if not pending[0]:
                    selector.unregister(process.stdin)
                    process.stdin.close()
                continue
            try:
                chunk = os.read(key.fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                captures[key.fd].add(chunk)
            else:
                selector.unregister(key.fileobj)
    return True


def _execute(argv: list[str], code: bytes, work: Path, timeout: float, max_output: int):
    """Run the child; returns (stdout, stderr, exit_code, timed_out, seconds, truncated)."""
    started = time.monotonic()
    deadline = started + timeout
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=work, env=_environment(str(work)), start_new_session=True, close_fds=True)
    out_fd, err_fd = process.stdout.fileno(), process.stderr.fileno()
    captures = {out_fd: _Capture(max_output), err_fd: _Capture(max_output)}
    try:
        with selectors.DefaultSelector() as selector:
            for stream in (process.stdin, process.stdout, process.stderr):
                os.set_blocking(stream.fileno(), False)
                wanted = selectors.EVENT_WRITE if stream is process.stdin else selectors.EVENT_READ
                selector.register(stream, wanted)
            pending = [memoryview(code)]
            if not code:
                selector.unregister(process.stdin)
                process.stdin.close()
            finished = _pump(selector, process, pending, captures, deadline)
            if finished:  # output closed; the process may still be running
                try:
                    process.wait(max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    finished = False
            if not finished:
                _kill(process)
                process.wait()
                _pump(selector, process, pending, captures, time.monotonic() + 1.0)  # what it printed before
    finally:
        if process.returncode is None:  # an error in the parent: never leave the child behind
            _kill(process)
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if not stream.closed:
                stream.close()
    seconds = time.monotonic() - started
    stdout, stdout_cut = captures[out_fd].text()
    stderr, stderr_cut = captures[err_fd].text()
    return (stdout, stderr, None if not finished else process.returncode, not finished, seconds,
            stdout_cut or stderr_cut)


def run_python(code: str, *, timeout: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 512,
               max_output: int = 10_000, folder: str | Path | None = None, files: dict[str, str] | None = None
               ) -> SandboxResult:
    """Run ``code`` in a sandboxed Python process (see the module docstring) and return what it did.

    ``timeout``: wall-clock seconds before the process group is killed; ``cpu_seconds``: RLIMIT_CPU;
    ``memory_mb``: RLIMIT_AS; ``max_output``: characters kept of stdout and of stderr each. ``folder``: an
    existing folder to use (and keep) as the work folder, instead of a temporary one; ``files``: name ->
    content, written into the work folder before the code runs (names are relative paths, no "..").
    The code runs as ``__main__`` with the work folder as current directory and first on ``sys.path``.
    Raises ValueError for bad arguments; what the code does (errors, refusals, timeouts) is in the result."""
    _check_arguments(code, timeout, cpu_seconds, memory_mb, max_output, folder, files)
    own = folder is None
    work = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-")) if own else Path(os.path.realpath(folder))
    owners = None
    try:
        if files:
            _write_files(work, files)
        launcher = _launcher_for(work)
        if launcher.drops_uid:
            owners = _owners(work)
            _chown_tree(work, (UNPRIVILEGED_ID, UNPRIVILEGED_ID))
        argv = [*launcher.prefix, sys.executable, "-I", "-B", "-u", "-X", "utf8", "-c", _STUB, _BOOTSTRAP,
                str(work), str(cpu_seconds), str(memory_mb << 20), str(MAX_FILE_MB << 20),
                str(MAX_OPEN_FILES), str(MAX_PROCESSES if launcher.drops_uid else 0)]
        outcome = _execute(argv, code.encode("utf-8", "surrogatepass"), work, timeout, max_output)
        return SandboxResult(*outcome, network_namespace=launcher.network_namespace, files=_list_files(work))
    finally:
        if own:
            _remove_tree(work)
        elif owners is not None and work.exists():
            _chown_tree(work, owners)
