"""The code sandbox: hostile programs are stopped and reported as failed samples, nothing outside
the sandbox's folder changes, correct programs (MBPP and HumanEval formats) still pass."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from loralab.evaluation.generation import extract_code
from loralab.evaluation.sandbox import Limits, check_program, isolation, run_checks, run_program

FAST = Limits(timeout_s=2.0)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    path = folder / "sentinel.txt"
    path.write_text("keep me")
    return path


DELETE = [
    "import os; os.remove({p!r})",
    "import os; os.unlink({p!r})",
    "import posix; posix.unlink({p!r})",
    "import pathlib; pathlib.Path({p!r}).unlink()",
    "import shutil; shutil.rmtree({d!r})",
    "import os; os.rename({p!r}, {p!r} + '.moved')",
    "open({p!r}, 'w').write('')",
    "import io; io.FileIO({p!r}, 'w')",
    "import pathlib; pathlib.Path({p!r}).write_text('')",
    "import os; os.system('rm -f {p}')",
    "import ctypes; ctypes.CDLL(None).unlink({p!r}.encode())",
]


@pytest.mark.parametrize("program", DELETE)
def test_deleting_or_changing_a_file_outside_its_folder_fails(program, sentinel):
    result = run_program(program.format(p=str(sentinel), d=str(sentinel.parent)), FAST)
    assert not result.passed and result.status == "failed", result
    assert sentinel.read_text() == "keep me"
    assert sorted(p.name for p in sentinel.parent.iterdir()) == ["sentinel.txt"]


SPAWN = [
    "import os\nif os.fork() == 0:\n    open({m!r}, 'w')",
    "import posix\nposix.fork()\nopen({m!r}, 'w')",
    "import subprocess; subprocess.run(['touch', {m!r}])",
    "import subprocess; subprocess.Popen(['touch', {m!r}]).wait()",
    "import os; os.system('touch {m}')",
    "import os; os.posix_spawn('/usr/bin/touch', ['touch', {m!r}], {{}})",
    "import multiprocessing; multiprocessing.Process(target=print).start()",
    "import pty; pty.fork()",
]


@pytest.mark.parametrize("program", SPAWN)
def test_forking_or_spawning_a_process_fails(program, tmp_path):
    marker = tmp_path / "spawned"
    result = run_program(program.format(m=str(marker)), FAST)
    assert not result.passed, result
    time.sleep(0.2)  # a spawned child would have written by now
    assert not marker.exists()


def test_opening_a_socket_fails_and_reaches_no_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3.0)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the timeout: nobody connected
            accepted.append(server.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    programs = [
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
        f"import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', {port}))",
    ]
    try:
        for program in programs:
            result = run_program(program, FAST)
            assert not result.passed and result.status == "failed", result
    finally:
        thread.join()
        server.close()
    assert accepted == []


def test_allocating_10_gb_fails_fast():
    start = time.perf_counter()
    result = run_program("x = bytearray(10 * 2**30)\nx[-1] = 1", FAST)
    assert not result.passed and "MemoryError" in result.stderr_tail
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(120)"])
def test_a_program_that_never_returns_is_stopped(program):
    start = time.perf_counter()
    result = run_program(program, Limits(timeout_s=1.0))
    assert not result.passed and (result.status == "timeout" or "killed" in result.status)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "program",
    [
        "open('big.bin', 'wb').write(b'0' * (64 << 20))",  # in its own folder: the size limit
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",  # output is a file too
    ],
)
def test_writing_a_huge_file_is_stopped_at_the_size_limit(program):
    result = run_program(program, Limits(timeout_s=5.0, file_bytes=4 << 20))
    assert not result.passed, result
    # Python ignores SIGXFSZ, so the write past the limit raises EFBIG instead of killing it
    assert "File too large" in result.stderr_tail or result.status == "killed (signal 25)"


def test_writing_outside_its_folder_is_refused(tmp_path):
    target = tmp_path / "big.bin"
    result = run_program(f"open({str(target)!r}, 'wb').write(b'0' * 1024)", FAST)
    assert not result.passed and "PermissionError" in result.stderr_tail
    assert not target.exists()


def test_correct_programs_pass_and_wrong_ones_fail():
    code = "import heapq\ndef smallest(xs, k):\n    return heapq.nsmallest(k, xs)\n"
    assert run_checks(code, ["assert smallest([5, 1, 4], 2) == [1, 4]"])
    assert not run_checks(code, ["assert smallest([5, 1, 4], 2) == [1, 5]"])
    assert run_checks(code, "assert smallest([3], 1) == [3]", setup="import math")
    # HumanEval: prompt + completion, a `check(candidate)` test, then the entry-point call
    prompt = "from typing import List\n\ndef add(xs: List[int]) -> int:\n"
    test = "def check(candidate):\n    assert candidate([1, 2]) == 3\n"
    assert run_checks("    return sum(xs)\n", test, setup=prompt, entry_point="add")
    assert not run_checks("    return 0\n", test, setup=prompt, entry_point="add")
    assert check_program("    return 0", test, prompt, "add").endswith("check(add)\n")
    with pytest.raises(ValueError, match="identifier"):
        check_program("x", test, entry_point="add); import os; (")
    assert extract_code("Here:\n```python\nprint(1)\n```\nDone") == "print(1)\n"
    assert extract_code("print(2)") == "print(2)"


def test_isolation_says_what_applied():
    applied = isolation()
    assert applied["network"].startswith(("network namespace", "no namespace available"))
    assert applied["user"].startswith(("nobody", "same user"))


def test_without_a_network_namespace_the_guard_disables_sockets(monkeypatch):
    from loralab.evaluation import sandbox

    monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: ())
    result = run_program("import socket; socket.socket()", FAST)
    assert not result.passed and "'NoneType' object is not callable" in result.stderr_tail
    assert run_program("import socket; print(socket.gethostname())", FAST).passed
