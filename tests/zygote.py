"""A warm process that forks CLI runs for the tests.

Every `batchify` command a test runs is a separate process (exit codes, signals, SIGKILL at a crash point,
the lock held by a live PID), and each such process used to spend ~1.7 s importing google-genai before it
did anything: most of the suite's time. The zygote imports batchify and the SDK once, then forks a child
per command; the child gets its own argv, cwd, environment and stdin/stdout/stderr (passed as file
descriptors), runs `batchify.main()` exactly as `python batchify.py` would, and exits with its code. The
SDK and batchify are not patched: the child is an ordinary process running the unmodified code.

The test side (`ZygoteClient.spawn`) returns a `Child` with the parts of `subprocess.Popen` the tests use
(pid, poll, wait, send_signal, kill, communicate, returncode). A few tests still start
`python batchify.py` itself, so the real entry point stays covered.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# -- the zygote process ------------------------------------------------------------------------------
def _child(req: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become `python batchify.py ARGS` and never return."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at startup: a closed reader is EPIPE
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = [str(ROOT / "batchify.py"), *req["args"]]
        import batchify

        try:
            code = batchify.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # as CPython does: die of SIGINT
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
    finally:
        os._exit(code)


def serve(path: str, parent: int) -> None:
    # What a CLI run imports, imported once here (no threads are started by any of it).
    import click  # noqa: F401
    import google.genai
    import google.genai.types
    import rich.console
    import rich.live
    import rich.progress
    import rich.table  # noqa: F401

    import batchify

    google.genai.Client(api_key="warm-up", http_options={"base_url": "http://127.0.0.1:9"})  # builds its modules
    # What each child would otherwise do again on first use (a profile of the suite: ~30% of the children's CPU):
    # the SDK's pydantic models build their validators lazily, on first use (472 models, 0.4 s here once);
    # httpx loads anyio's asyncio backend on its first request; batchify imports jsonschema to check a schema, and
    # the Vertex backend's Cloud Storage client (none of it starts a thread: the fork stays safe).
    import anyio._backends._asyncio  # noqa: F401
    import jsonschema  # noqa: F401
    import pydantic

    with contextlib.suppress(ImportError):  # the [vertex] extra: google-cloud-storage
        import google.api_core.client_options
        import google.cloud.storage
        import google.oauth2.credentials

    for model in vars(google.genai.types).values():
        if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
            model.model_rebuild()
    del batchify
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        ready, _, _ = select.select([srv], [], [], 0.02)
        if ready:
            conn, _ = srv.accept()
            msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                srv.close()
                conn.close()
                _child(json.loads(msg), fds)
            for fd in fds:
                os.close(fd)
            conn.send(str(pid).encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.send(str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass
            conn.close()


# -- the test side -----------------------------------------------------------------------------------
class Child:
    """One forked CLI run, with the Popen interface the tests use."""

    def __init__(self, conn: socket.socket, pid: int, out: int | None, err: int | None, text: bool):
        self._conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self.args = ["batchify"]
        self._text = text
        self.stdout: Any = os.fdopen(out, "r" if text else "rb") if out is not None else None
        self.stderr: Any = os.fdopen(err, "r" if text else "rb") if err is not None else None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], 0)
            if ready:
                self._finish()
        return self.returncode

    def _finish(self) -> None:
        data = self._conn.recv(64)
        self._conn.close()
        self.returncode = int(data) if data else -9

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                import subprocess

                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._finish()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read stdout and stderr to their ends (both at once: neither pipe can fill and stall the child),
        then wait for the exit code."""
        chunks: dict[int, list[bytes]] = {}
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        fds = {s.fileno(): s for s in streams}
        for fd in fds:
            chunks[fd] = []
        end = None if timeout is None else time.monotonic() + timeout
        while fds:
            left = None if end is None else max(0.0, end - time.monotonic())
            ready, _, _ = select.select(list(fds), [], [], left)
            if not ready:
                import subprocess

                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    fds.pop(fd)
        out = [b"".join(chunks[s.fileno()]) if s is not None else None for s in (self.stdout, self.stderr)]
        for s in streams:
            s.close()
        self.wait(None if end is None else max(0.1, end - time.monotonic()))
        if self._text:
            return tuple(o.decode() if o is not None else None for o in out)  # type: ignore[return-value]
        return out[0], out[1]


class ZygoteClient:
    def __init__(self) -> None:
        import subprocess
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="bfz-")
        self.path = os.path.join(self._dir, "z.sock")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, self.path, str(os.getpid())],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("the test zygote did not start")
        self._lock = threading.Lock()

    def spawn(
        self,
        args: list[str],
        cwd: Path | str,
        env: dict[str, str],
        capture: bool = True,
        text: bool = True,
        stdin: int | None = None,
        output: int | None = None,
    ) -> Child:
        """Fork `batchify ARGS`. stdin: a descriptor to read (a terminal's, say), else /dev/null; output: one
        descriptor for both stdout and stderr (a terminal), else pipes (capture) or /dev/null. The caller keeps
        the descriptors it passes."""
        devnull = os.open(os.devnull, os.O_RDWR)
        out_r = err_r = None
        if output is not None:
            out_w, err_w = os.dup(output), os.dup(output)
        elif capture:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
        else:
            out_w, err_w = os.dup(devnull), os.dup(devnull)
        in_fd = os.dup(stdin) if stdin is not None else os.dup(devnull)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(self.path)
            msg = json.dumps({"args": [str(a) for a in args], "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(conn, [msg], [in_fd, out_w, err_w])
            pid = int(conn.recv(64))
        finally:
            for fd in (devnull, in_fd, out_w, err_w):
                os.close(fd)
        return Child(conn, pid, out_r, err_r, text)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    serve(sys.argv[1], int(sys.argv[2]))
