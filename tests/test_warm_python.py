"""launch/gpu/warm_python.py, the forking `python` of first_call.sh's dry run: each form of
command line behaves as CPython itself runs it (the reference: the same command under
sys.executable), a stage that times out or crashes takes only its own process down, and the
stage's CPU seconds reach $WARM_CPU_FILE."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WARM = str(REPO / "launch/gpu/warm_python.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("warm") / "warm.sock")
    proc = subprocess.Popen([sys.executable, WARM, "--serve", sock, "json"], cwd=REPO)
    for _ in range(600):
        if Path(sock).exists():
            break
        time.sleep(0.1)
    yield {"WARM_PYTHON": sock, "WARM_PYTHON_PID": str(proc.pid)}
    proc.kill()
    proc.wait()


def both(server, args, cwd, stdin="", extra_env=None):
    """(plain CPython, warm) results of `python ARGS`: exit status, stdout, stderr's last line."""
    env = {**os.environ, **(extra_env or {})}
    runs = []
    for cmd, e in (([sys.executable, *args], env), ([sys.executable, WARM, *args], {**env, **server})):
        p = subprocess.run(cmd, cwd=cwd, env=e, input=stdin, capture_output=True, text=True, timeout=60)
        runs.append((p.returncode, p.stdout, (p.stderr.strip().splitlines() or [""])[-1]))
    return runs


def test_c_m_and_script_forms_run_as_cpython_runs_them(server, tmp_path):
    code = "import os, sys; print(sys.argv, repr(sys.path[0]), os.getcwd(), os.environ['PROBE'], __name__); sys.exit(3)"
    plain, warm = both(server, ["-c", code, "a", "b"], tmp_path, extra_env={"PROBE": "seen"})
    assert plain == warm and plain[0] == 3 and "seen" in plain[1]
    plain, warm = both(server, ["-m", "json.tool", "--indent", "3"], tmp_path, stdin='{"a": [1, 2]}')
    assert plain == warm and plain[0] == 0 and '   "a"' in plain[1]  # stdin and the module's argv
    script = tmp_path / "sub" / "script.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint(__name__, sys.argv, sys.path[0])\nraise ValueError('boom')\n")
    plain, warm = both(server, [str(script), "x"], tmp_path)
    assert plain == warm and plain[0] == 1 and plain[2] == "ValueError: boom"


def test_a_timed_out_or_crashing_stage_ends_alone_and_reports_its_cpu(server, tmp_path):
    pid_file, cpu_file = tmp_path / "pid", tmp_path / "cpu"
    env = {**os.environ, **server, "WARM_CPU_FILE": str(cpu_file)}
    hang = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    proc = subprocess.run(["timeout", "2", sys.executable, WARM, "-c", hang], env=env, timeout=60)
    assert proc.returncode == 124
    child = int(pid_file.read_text())
    for _ in range(50):  # killed by the client, reaped by the server
        if not Path(f"/proc/{child}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists()
    crash = subprocess.run([sys.executable, WARM, "-c", "import os; os.abort()"], env=env, timeout=60)
    assert crash.returncode == 128 + 6  # SIGABRT, as a shell reports a killed `python`
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    cpu_file.unlink(missing_ok=True)
    assert subprocess.run([sys.executable, WARM, "-c", busy], env=env, timeout=60).returncode == 0
    assert float(cpu_file.read_text()) >= 0.3  # the child's CPU, not the client's


def test_the_server_ends_when_its_parent_is_killed_outright(tmp_path):
    """first_call.sh kills the server on exit; a shell killed with SIGKILL runs no trap."""
    sock = tmp_path / "warm.sock"
    shell = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} {WARM} --serve {sock} json & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = int(shell.stdout.readline())
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.1)
    assert sock.exists()
    shell.kill()
    shell.wait()

    def alive() -> bool:
        try:
            return "\tZ" not in Path(f"/proc/{server}/status").read_text().split("State:")[1][:4]
        except (FileNotFoundError, IndexError):
            return False

    for _ in range(50):
        if not alive():
            break
        time.sleep(0.1)
    assert not alive()


def test_a_client_gone_mid_request_leaves_the_server_serving(server):
    import socket

    for payload in (b"", b"\x00\x00\x00\x00\x00\x00\x01\x00{"):  # nothing; a header then half a request
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(server["WARM_PYTHON"])
        conn.sendall(payload)
        conn.close()
    env = {**os.environ, **server}
    proc = subprocess.run(
        [sys.executable, WARM, "-c", "print(6 * 7)"], env=env, capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (0, "42\n")
