"""lmforge.agent.sandbox: untrusted Python in a separate, limited process.

Every escape attempt is checked twice: the model is told (the summary carries the refusal), and nothing
happened outside (no file written, no connection received, no secret in the output)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)

from lmforge.agent.sandbox import SandboxResult, _launcher_for, run_python  # noqa: E402

SECRET = "correct horse battery staple"


def run(code: str, **kwargs) -> SandboxResult:
    kwargs.setdefault("timeout", 10.0)
    return run_python(textwrap.dedent(code), **kwargs)


def refused(result: SandboxResult, words: str) -> None:
    """The run failed, and the model reads why."""
    assert not result.ok
    assert result.exit_code == 1
    assert "sandbox: " + words in result.summary()


# ---------------------------------------------------------------------------------------------------------
# Ordinary code


def test_output_comes_back():
    result = run("print(6 * 7)\nprint('second line')")
    assert result.ok and result.exit_code == 0 and not result.timed_out and not result.truncated
    assert result.stdout == "42\nsecond line\n" and result.stderr == ""
    assert result.summary() == "42\nsecond line\n[exit code 0]"
    assert 0 < result.seconds < 5
    assert result.files == []


def test_an_exception_gives_a_traceback_and_exit_code_1():
    result = run("""
        def divide(a, b):
            return a / b
        divide(1, 0)
    """)
    assert not result.ok and result.exit_code == 1 and result.stdout == ""
    summary = result.summary()
    assert "Traceback (most recent call last)" in summary and 'File "<agent>", line 4' in summary
    assert "return a / b" in summary  # the source lines are shown
    assert summary.rstrip().endswith("ZeroDivisionError: division by zero\n[exit code 1]")
    assert "<sandbox>" not in summary  # the bootstrap's frames are left out


def test_syntax_errors_and_exit_codes():
    assert "SyntaxError" in run("x = (").stderr
    assert run("import sys; sys.exit(3)").exit_code == 3
    assert run("import sys; sys.exit(False)").ok  # what unittest.main() does on success
    quit_with_text = run("raise SystemExit('bye')")
    assert quit_with_text.exit_code == 1 and quit_with_text.stderr == "bye\n"
    silent = run("pass")
    assert silent.ok and silent.summary() == "[exit code 0; no output]"


def test_useful_standard_library_works():
    result = run("""
        import collections, datetime, decimal, fractions, itertools, json, math, random, re, statistics
        import asyncio, dataclasses, pickle
        from concurrent.futures import ThreadPoolExecutor

        @dataclasses.dataclass
        class Point:
            x: int

        async def twice(x):
            return 2 * x

        print(math.comb(5, 2), json.loads(json.dumps({"a": [1]})), re.findall(r"\\d", "a1b2"))
        print(collections.Counter("aab").most_common(1), list(itertools.islice(itertools.count(), 3)))
        print(fractions.Fraction(1, 3) * 3, decimal.Decimal("0.1") + decimal.Decimal("0.2"))
        print(statistics.median([3, 1, 2]), datetime.date(2024, 1, 31).isoformat(), 0 <= random.random() < 1)
        print(pickle.loads(pickle.dumps(Point(3))), asyncio.run(twice(21)))
        with ThreadPoolExecutor(2) as pool:
            print(sum(pool.map(abs, [-1, -2])))
    """)
    assert result.ok, result.summary()
    assert result.stdout.splitlines() == ["10 {'a': [1]} ['1', '2']", "[('a', 2)] [0, 1, 2]", "1 0.3",
                                          "2 2024-01-31 True", "Point(x=3) 42", "3"]


def test_no_environment_and_no_stdin(monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_SECRET", SECRET)
    result = run("import os\nprint(sorted(os.environ))\nprint(repr(input()))")
    assert SECRET not in result.summary() and "LMFORGE_TEST_SECRET" not in result.stdout
    assert "EOFError" in result.stderr  # stdin is empty


# ---------------------------------------------------------------------------------------------------------
# The work folder


def test_writes_inside_the_work_folder_work_and_are_listed():
    result = run("""
        import os, pathlib, shutil, tempfile
        pathlib.Path("out").mkdir()
        pathlib.Path("out/a.txt").write_text("hello")
        shutil.copy("out/a.txt", "b.txt")
        with open("b.txt", "a") as f:
            f.write(" world")
        with tempfile.TemporaryDirectory() as scratch:  # TMPDIR is the work folder
            open(os.path.join(scratch, "gone.txt"), "w").close()
        os.makedirs("empty/dir")
        print(open("b.txt").read(), sorted(os.listdir(".")))
        print(os.getcwd())
    """)
    assert result.ok, result.summary()
    assert result.stdout.splitlines()[0] == "hello world ['b.txt', 'empty', 'out']"
    assert result.files == ["b.txt", "out/a.txt"]
    assert not os.path.exists(result.stdout.splitlines()[1])  # the temporary work folder is removed


def test_input_files_are_visible_and_a_caller_folder_is_kept(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "existing.txt").write_text("was here")
    result = run("""
        print(open("data/in.txt").read(), open("existing.txt").read())
        open("data/out.txt", "w").write("made")
    """, folder=folder, files={"data/in.txt": "given"})
    assert result.ok, result.summary()
    assert result.stdout == "given was here\n"
    assert result.files == ["data/in.txt", "data/out.txt", "existing.txt"]
    assert (folder / "data" / "out.txt").read_text() == "made"  # kept
    owner = os.stat(folder).st_uid
    assert {os.stat(p).st_uid for p in [folder, *folder.rglob("*")]} == {owner}  # ownership given back


def test_a_unittest_file_passed_in_files_runs():
    tests = textwrap.dedent("""
        import unittest
        import solution

        class TestAdd(unittest.TestCase):
            def test_add(self):
                self.assertEqual(solution.add(2, 3), 5)

            def test_negative(self):
                self.assertEqual(solution.add(-2, 1), -1)
    """)
    runner = "import unittest\nunittest.main(module='test_solution', verbosity=2)"
    good = run(runner, files={"solution.py": "def add(a, b):\n    return a + b\n", "test_solution.py": tests})
    assert good.ok, good.summary()
    assert "Ran 2 tests" in good.stderr and "OK" in good.stderr
    bad = run(runner, files={"solution.py": "def add(a, b):\n    return a - b\n", "test_solution.py": tests})
    assert bad.exit_code == 1 and "FAILED (failures=2)" in bad.stderr and "AssertionError" in bad.stderr
    discover = "import unittest\nunittest.main(module=None, argv=['unittest', 'discover', '-s', 'tests'])"
    discovered = run(discover, files={"solution.py": "def add(a, b):\n    return a + b\n",
                                      "tests/test_solution.py": tests})
    assert discovered.ok and "Ran 2 tests" in discovered.stderr, discovered.summary()


# ---------------------------------------------------------------------------------------------------------
# Limits


def test_the_timeout_kills_an_endless_loop_and_keeps_earlier_output():
    started = time.monotonic()
    result = run("print('started', flush=True)\nwhile True:\n    pass", timeout=1.0, cpu_seconds=30)
    assert time.monotonic() - started < 1.0 + 2.0
    assert result.timed_out and result.exit_code is None and not result.ok
    assert result.stdout == "started\n"
    assert "timed out" in result.summary()


def test_the_cpu_limit_stops_a_busy_loop():
    result = run("while True:\n    pass", timeout=30.0, cpu_seconds=1)
    assert not result.timed_out and result.seconds < 10
    assert result.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)
    assert "CPU time" in result.summary()


@pytest.mark.parametrize("bomb", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_a_memory_bomb_fails_with_memory_error(bomb):
    result = run(bomb, memory_mb=128)
    assert result.exit_code == 1 and not result.timed_out
    assert "MemoryError" in result.stderr


def test_an_output_flood_is_cut():
    result = run("print('x' * 10**8)\nprint('end')", max_output=1000)
    assert result.ok and result.truncated
    assert result.stdout == "x" * 1000
    assert "stdout was cut at 1000 characters" in result.summary()
    endless = run("while True:\n    print('spam')", timeout=1.0, max_output=500)
    assert endless.timed_out and endless.truncated and len(endless.stdout) == 500
    assert "cut" in endless.summary() and "timed out" in endless.summary()


def test_files_have_a_size_limit():
    result = run("f = open('big', 'wb')\nfor _ in range(200):\n    f.write(b'x' * 2**20)")
    assert result.exit_code == 1 and "File too large" in result.stderr
    assert result.files == ["big"]


# ---------------------------------------------------------------------------------------------------------
# Processes


def test_a_fork_bomb_is_refused():
    result = run("import os\nwhile True:\n    os.fork()")
    refused(result, "starting processes is not allowed")
    assert result.seconds < 5


def test_subprocess_is_refused(tmp_path):
    marker = tmp_path / "from_subprocess"
    result = run(f"""
        import subprocess
        subprocess.run(["touch", {str(marker)!r}])
        print(subprocess.run(["echo", "hi"], capture_output=True).stdout)
    """)
    refused(result, "starting processes is not allowed")
    assert "hi" not in result.stdout and not marker.exists()


def test_os_system_is_refused(tmp_path):
    marker = tmp_path / "from_system"
    result = run(f"import os\nos.system('touch {marker}')")
    refused(result, "starting processes is not allowed")
    assert not marker.exists()


def test_os_system_reached_through_object_subclasses_is_refused(tmp_path):
    marker = tmp_path / "from_subclasses"
    result = run(f"""
        wrap_close = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "_wrap_close"][0]
        wrap_close.__init__.__globals__["system"]("touch {marker}")
    """)
    refused(result, "starting processes is not allowed")
    assert not marker.exists()


def test_signals_to_other_processes_are_refused():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        result = run(f"import os, signal\nos.kill({sleeper.pid}, signal.SIGKILL)")
        refused(result, "sending signals to other processes is not allowed")
        assert sleeper.poll() is None  # still alive
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("module", ["ctypes", "_ctypes", "_posixsubprocess", "mmap"])
def test_dangerous_modules_are_refused(module):
    result = run(f"import {module}\nprint('imported')")
    assert result.exit_code == 1 and "imported" not in result.stdout
    assert f"ImportError: sandbox: import of '{module}' is not allowed" in result.summary()


def test_a_second_audit_hook_is_refused():
    result = run("import sys\nsys.addaudithook(lambda *args: None)\nprint('added')")
    assert result.exit_code == 1 and "added" not in result.stdout
    assert "sandbox: adding audit hooks is not allowed" in result.summary()


# ---------------------------------------------------------------------------------------------------------
# Files outside the work folder


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret" / "key.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


@pytest.mark.parametrize("how", [
    "print(open({path!r}).read())",
    "import os\nprint(os.read(os.open({path!r}, os.O_RDONLY), 100))",
    "print(open({path!r}.encode(), 'rb').read())",
    "import pathlib\nprint(pathlib.Path({path!r}).read_text())",
    "print(open('/proc/self/root' + {path!r}).read())",
    "import os\nos.link({path!r}, 'copy')\nprint(open('copy').read())",
    "class Sneaky(str):\n    def startswith(self, *args):\n        return True\n"
    "print(open(Sneaky({path!r})).read())",
])
def test_reading_a_secret_outside_the_folder_is_refused(secret, how):
    result = run(how.format(path=str(secret)))
    assert result.exit_code == 1
    assert "sandbox: " in result.summary() and "not allowed" in result.summary()
    assert SECRET not in result.summary()


def test_reading_system_files_and_listings_is_refused():
    passwd = run("print(open('/etc/passwd').read())")
    refused(passwd, "reading /etc/passwd is not allowed")
    assert "root:" not in passwd.stdout
    listing = run("import os\nprint(os.listdir('/'))")
    refused(listing, "reading / is not allowed")
    assert "etc" not in listing.stdout
    code = run("import lmforge")  # the caller's own source tree is outside too
    assert code.exit_code == 1 and "sandbox: reading" in code.summary()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_writing_outside_the_folder_is_refused(tmp_path, how):
    target = tmp_path / "outside.txt"
    code = {
        "absolute": f"open({str(target)!r}, 'w').write('x')",
        "dotdot": "open('../outside.txt', 'w').write('x')",
        "symlink": f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
    }[how]
    folder = tmp_path / "work"
    folder.mkdir()
    result = run(code, folder=folder)
    assert result.exit_code == 1 and "sandbox: " in result.summary() and "not allowed" in result.summary()
    assert not target.exists() and not (folder / "link").exists()


def test_a_directory_descriptor_cannot_carry_writes_outside():
    """os.open(name, dir_fd=...) does not tell the audit hook its dir_fd: directories outside the work
    folder (here: the readable standard library) cannot be opened at all."""
    stdlib = os.path.dirname(os.__file__)
    target = os.path.join(stdlib, "lmforge_sandbox_test.py")
    try:
        result = run(f"""
            import os
            fd = os.open({stdlib!r}, os.O_RDONLY)
            os.write(os.open("lmforge_sandbox_test.py", os.O_WRONLY | os.O_CREAT, dir_fd=fd), b"x")
        """)
        refused(result, "opening the directory")
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)
    inside = run("import os\nos.mkdir('d')\nfd = os.open('d', os.O_RDONLY)\n"
                 "os.close(os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\nprint(os.listdir(fd))")
    assert inside.ok and inside.stdout == "['x']\n" and inside.files == ["d/x"]


def test_the_hook_survives_tampering():
    """Monkeypatching os, posixpath and builtins, or reaching the hook's frame through a traceback, does
    not change what it allows."""
    result = run("""
        import builtins, os, posixpath
        try:
            open("/etc/passwd")
        except PermissionError as error:
            tb = error.__traceback__
            while tb.tb_next:
                tb = tb.tb_next
            tb.tb_frame.f_globals["_DEVICES"] = frozenset(["/etc/passwd"])
        os.lstat = lambda *args: os.stat("/")
        posixpath.realpath = lambda *args, **kwargs: os.getcwd()
        builtins.issubclass = lambda *args: False
        print(open("/etc/passwd").read())
    """)
    refused(result, "reading /etc/passwd is not allowed")
    assert "root:" not in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Network


def test_a_tcp_connection_is_refused_and_the_server_gets_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = run(f"""
            import socket
            connection = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            connection.sendall(b"leak")
        """)
        refused(result, "network access is not allowed")
        with pytest.raises(TimeoutError):
            server.accept()


def test_a_unix_socket_connection_is_refused(tmp_path):
    path = str(tmp_path / "server.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        server.settimeout(0.3)
        result = run(f"import socket\nsocket.socket(socket.AF_UNIX).connect({path!r})")
        refused(result, "network access is not allowed")
        with pytest.raises(TimeoutError):
            server.accept()


def test_name_lookups_are_refused():
    refused(run("import socket\nsocket.getaddrinfo('example.com', 80)"), "network access is not allowed")


def test_the_network_namespace_is_used_when_unshare_works():
    command = ["unshare", "-n", "true"] if os.geteuid() == 0 else ["unshare", "-rn", "true"]
    try:
        works = bool(shutil.which("unshare")) and subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        works = False
    result = run("print('hi')")
    assert result.ok and isinstance(result.network_namespace, bool)
    if works:
        assert result.network_namespace


def test_root_runs_the_code_as_nobody(tmp_path):
    if not _launcher_for(tmp_path).drops_uid:
        pytest.skip("the caller is not root, or setpriv cannot start Python as nobody here")
    result = run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
    assert result.stdout == "65534 65534 []\n"


# ---------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("kwargs, words", [
    ({"timeout": 0}, "timeout"),
    ({"timeout": -1.0}, "timeout"),
    ({"memory_mb": 32}, "memory_mb"),
    ({"cpu_seconds": 0}, "cpu_seconds"),
    ({"max_output": 0}, "max_output"),
    ({"files": {"/etc/evil": "x"}}, "bad file name"),
    ({"files": {"../evil": "x"}}, "bad file name"),
    ({"files": {"a/../../evil": "x"}}, "bad file name"),
    ({"folder": "/nonexistent/lmforge-sandbox"}, "not an existing folder"),
])
def test_bad_arguments_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        run_python("print(1)", **kwargs)
