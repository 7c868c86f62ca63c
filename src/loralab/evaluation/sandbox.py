"""Run untrusted, model-written Python (MBPP / HumanEval checks) in a guarded child process.

Layers (``tests/test_sandbox.py`` runs hostile programs against all of them together):

- **OS**: a fresh Python (``-I``) in its own session, in an empty temporary folder that is its
  working directory and ``HOME``, stdin from ``/dev/null``, a minimal environment, stdout / stderr
  to size-limited files; resource limits on address space (memory), CPU time, file size, open files
  and processes (``RLIMIT_NPROC`` 0: no fork); a wall-clock timeout after which its whole process
  group is killed.
- **Network**: a new, empty network namespace (``unshare -n``, as root; or ``unshare -rn``, a user
  namespace, where unprivileged ones are allowed) when the machine allows it, else the socket
  functions are disabled in the guard. :func:`isolation` says which applied.
- **User**: started as root (CI), the child drops to ``nobody`` (uid 65534) after the interpreter
  and the common standard-library modules are loaded, so it cannot write anything it does not own.
- **Guard** (human-eval's ``reliability_guard``, extended): destructive ``os`` / ``posix`` /
  ``shutil`` / ``subprocess`` functions, ``ctypes`` and ``multiprocessing`` are disabled,
  ``faulthandler`` is off, and ``open`` refuses writes outside the working folder.

A program passes when it exits 0 within the limits; anything else (assertion, exception, killed by a
limit, timeout) is a failed sample. The guard is not a security boundary on its own (Python can be
escaped); the OS layers are what hold.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NOBODY = 65534
OUTPUT_LIMIT = 1 << 20  # bytes of stdout / stderr kept (the file-size limit caps what is written)


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``timeout_s`` is wall clock; CPU time is capped at ``timeout_s`` + 1."""

    timeout_s: float = 5.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed (by a limit's signal)
    returncode: int | None
    stderr_tail: str


# The child: limits, privilege drop, guard, then the program. Runs as `python -I -c BOOTSTRAP`.
BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
# the standard library may live where `nobody` cannot read (e.g. under /root): load it first
import bisect, builtins, cmath, collections, copy, dataclasses, datetime, decimal, enum
import fractions, functools, hashlib, heapq, io, itertools, math, numbers, operator, random, re
import statistics, string, textwrap, time, typing, unicodedata, shutil, subprocess, socket
import faulthandler, posix, pathlib, collections.abc
if cfg["drop_to"] is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
faulthandler.disable()
here = os.path.realpath(os.getcwd())
_open = builtins.open

def _inside(path):
    return os.path.realpath(os.path.join(here, os.fspath(path))).startswith(here + os.sep)

def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, int) or (set(mode) & set("wax+") and not _inside(file)):
        raise PermissionError(f"sandbox: no writing outside the working folder ({file!r})")
    return _open(file, mode, *args, **kwargs)

class GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if isinstance(file, int) or (set(mode) & set("wax+") and not _inside(file)):
            raise PermissionError(f"sandbox: no writing outside the working folder ({file!r})")
        super().__init__(file, mode, *args, **kwargs)

import _io
builtins.open = io.open = _io.open = guarded_open
io.FileIO = _io.FileIO = GuardedFileIO
for module in (os, posix):
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
                 "chdir", "open", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
                 "posix_spawn", "posix_spawnp", "link", "symlink", "mkfifo", "mknod", "popen",
                 "setgid", "setgroups", "register_at_fork"):
        if hasattr(module, name):
            setattr(module, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.run = subprocess.call = None
builtins.exit = builtins.quit = builtins.help = None
if not cfg["network_isolated"]:
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, None)
for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "_socket", "resource",
             "psutil", "ipdb", "joblib", "tkinter", "pty"):
    sys.modules[name] = None
del cfg, module, name
source = _open(sys.argv[2], encoding="utf-8").read()
exec(compile(source, "candidate.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace, or () if none works."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            done = subprocess.run(
                [*prefix, "true"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return ()


@functools.cache
def isolation() -> dict[str, str]:
    """Which isolation applies on this machine (logged once, recorded with the results)."""
    prefix = _namespace_prefix()
    if prefix == ("unshare", "-n"):
        network = "network namespace (unshare -n)"
    elif prefix:
        network = "network namespace in a user namespace (unshare -rn)"
    else:
        network = "no namespace available: socket functions disabled in the guard"
    user = "nobody (uid 65534)" if _drop_to() is not None else f"same user (uid {os.getuid()})"
    out = {"network": network, "user": user, "guard": "reliability_guard + rlimits"}
    log.info("code sandbox: %s", out)
    return out


def _drop_to() -> int | None:
    # root drops to nobody, but not inside a user namespace (uid 65534 is not mapped there)
    return NOBODY if os.geteuid() == 0 and _namespace_prefix() != ("unshare", "-rn") else None


def run_program(source: str, limits: Limits = Limits()) -> SandboxResult:
    """Run ``source`` in the sandbox; passed = exit status 0 within the limits."""
    prefix = _namespace_prefix()
    drop_to = _drop_to()
    cpu = int(limits.timeout_s) + 1
    config = {
        "rlimits": {
            "RLIMIT_AS": limits.memory_bytes,
            "RLIMIT_CPU": cpu,
            "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_NPROC": 0,
            "RLIMIT_CORE": 0,
        },
        "drop_to": drop_to,
        "network_isolated": bool(prefix),
    }
    with tempfile.TemporaryDirectory(prefix="loralab-sandbox-") as tmp:
        work = Path(tmp)
        program = work / "candidate.py"
        program.write_text(source, encoding="utf-8")
        if drop_to is not None:
            os.chown(work, drop_to, drop_to)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        command = [*prefix, sys.executable, "-I", "-c", BOOTSTRAP, json.dumps(config), str(program)]
        with (work / "stdout").open("wb") as out, (work / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: killed whole on timeout
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        stderr = (work / "stderr").read_bytes()[-OUTPUT_LIMIT:].decode("utf-8", "replace")
    if returncode is None:
        status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif returncode < 0:
        status = f"killed (signal {-returncode})"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, returncode, stderr[-2000:])


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def check_program(
    code: str,
    tests: str | Sequence[str],
    setup: str = "",
    entry_point: str | None = None,
) -> str:
    """The program to run: ``setup``, the candidate ``code``, the test source (MBPP's assert lines,
    or HumanEval's ``def check(candidate): ...``), then ``check(<entry_point>)`` when given."""
    test_source = tests if isinstance(tests, str) else "\n".join(tests)
    parts = [setup, code, test_source]
    if entry_point is not None:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point {entry_point!r} is not a Python identifier")
        parts.append(f"check({entry_point})")
    return "\n".join(parts) + "\n"


def run_checks(
    code: str,
    tests: str | Sequence[str],
    setup: str = "",
    timeout_s: float = 5.0,
    entry_point: str | None = None,
) -> bool:
    """True when ``code`` passes its checks in the sandbox (see :func:`check_program`)."""
    result = run_program(
        check_program(code, tests, setup, entry_point), Limits(timeout_s=timeout_s)
    )
    return result.passed
