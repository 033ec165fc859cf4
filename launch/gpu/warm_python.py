"""A `python` whose imports are already done: the dry run of first_call.sh on the CPU (DRY_RUN=1).

Each stage of first_call.sh is its own process (a stage that crashes or hangs cannot take the
others down), and a Python start-up that imports torch, transformers, peft and pg_train's model
costs ~4 s of CPU; on a GPU that is nothing beside the stage, in the dry run's tiny stages it is
most of the work. So the dry run starts one server that imports them once; every stage still runs
as its own command line and its own process, forked from the server:

    python launch/gpu/warm_python.py --serve SOCKET MODULE... &    # imports, then waits
    WARM_PYTHON=SOCKET python launch/gpu/warm_python.py -m pg_train.bench.step ...   # the client

The client (no torch: ~0.05 s) passes its argv, working directory, environment and its stdin,
stdout and stderr to the server, which forks a child that runs `-c CODE`, `-m MODULE` or `PATH`
as `python` would, in its own process group, and reports the exit status. The client exits with
that status; killed (first_call.sh's per-stage `timeout`), it kills the child's process group
first. The child's CPU seconds (and, for the first stage, the server's imports) are appended to
$WARM_CPU_FILE, which first_call.sh adds to the stage's `cpu_s`: the client's own CPU time says
nothing. Stages run one at a time, so the server serves one request at a time; it ends with
its parent (first_call.sh kills it on exit; if that shell is killed outright, within a second).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import resource
import signal
import socket
import sys
import time


def serve(path: str, preload: list[str]) -> list[str] | None:
    """Import `preload`, then answer requests until killed. Returns only in a forked child: the
    command line it is to run (its stdio, directory and environment are set)."""
    for name in preload:
        if name == "peft":  # as build_model imports it: without bitsandbytes (its own import costs ~1 s)
            from pg_train.model.arch.optional_bnb import bitsandbytes_hidden

            with bitsandbytes_hidden():
                importlib.import_module(name)
        else:
            importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    preload_cpu = usage.ru_utime + usage.ru_stime  # reported once, with the first request
    parent = os.getppid()
    server.settimeout(1.0)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # first_call.sh killed without its EXIT trap: do not linger
                raise SystemExit(0) from None
            continue
        conn.settimeout(None)
        with conn:
            header, fds, _, _ = socket.recv_fds(conn, 8, 3)
            size, data = int.from_bytes(header, "big"), b""
            while len(data) < size and (chunk := conn.recv(size - len(data))):
                data += chunk
            if len(header) < 8 or len(fds) != 3 or len(data) < size:  # a client gone mid-request
                for fd in fds:
                    os.close(fd)
                continue
            request = json.loads(data)
            # what the gc docs advise before fork() without exec(): the imported objects move out of
            # the collector's reach, so the child's collections (and its exit) do not write to, and
            # so copy, every page the server holds (a child's `-c pass`: 1.26 -> 0.35 s of CPU)
            gc.freeze()
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                os.setpgid(0, 0)  # the client's timeout kills the whole group
                for target, fd in enumerate(fds):
                    if fd != target:
                        os.dup2(fd, target)
                        os.close(fd)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                return request["argv"]
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):  # a client killed by its timeout reads nothing
                conn.sendall(f"{pid}\n".encode())
            _, status, usage = os.wait4(pid, 0)
            cpu = usage.ru_utime + usage.ru_stime + preload_cpu
            preload_cpu = 0.0
            with contextlib.suppress(OSError):
                conn.sendall(f"{os.waitstatus_to_exitcode(status)} {cpu:.3f}\n".encode())


def run_as_python(argv: list[str]) -> int:
    """`python ARGV` in this (forked) interpreter: -c CODE, -m MODULE or a script path."""
    import runpy
    import types

    if argv[:1] == ["-c"] and len(argv) >= 2:
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    elif argv[:1] == ["-m"] and len(argv) >= 2:
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv and not argv[0].startswith("-"):
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    else:
        print(f"warm_python: expected -c CODE, -m MODULE or a script path, got {argv[:2]}", file=sys.stderr)
        return 2
    return 0


def server_alive() -> bool:
    """False once the server named by $WARM_PYTHON_PID has ended (it failed to import, say)."""
    try:
        os.kill(int(os.environ.get("WARM_PYTHON_PID", "0")) or os.getpid(), 0)
    except ProcessLookupError:
        return False
    return True


def client(path: str, argv: list[str]) -> int:
    """Run ARGV in a child of the server at `path`; its exit status, its CPU to $WARM_CPU_FILE."""
    deadline = time.monotonic() + 120  # the server may still be importing
    while True:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline or not server_alive():
                print(f"warm_python: no server at {path} (it ended, or 120 s passed)", file=sys.stderr)
                return 1
            time.sleep(0.05)
    data = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [len(data).to_bytes(8, "big")], [0, 1, 2])
    conn.sendall(data)
    replies = conn.makefile("r")
    pid = int(replies.readline())

    def stop(signum, _frame):
        for kill in (os.killpg, os.kill):  # the group; the child itself if it had not made it yet
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    line = replies.readline().split()
    if not line:
        print("warm_python: the server closed the connection", file=sys.stderr)
        return 1
    code, cpu = int(line[0]), float(line[1])
    if os.environ.get("WARM_CPU_FILE"):
        with open(os.environ["WARM_CPU_FILE"], "a") as f:
            f.write(f"{cpu}\n")
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        argv = serve(sys.argv[2], sys.argv[3:])
        sys.exit(run_as_python(argv))  # a forked child: exits as `python ARGV` would (atexit, threads)
    if not os.environ.get("WARM_PYTHON"):
        print("warm_python: set WARM_PYTHON to the server's socket (or --serve SOCKET MODULE...)", file=sys.stderr)
        return 2
    return client(os.environ["WARM_PYTHON"], sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
