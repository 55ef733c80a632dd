"""Shared fixtures: a real emulator on a free loopback port, sample inputs, a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batchify

ROOT = Path(__file__).resolve().parent.parent
TINY_CA = ROOT / "tests" / "tiny_ca.pem"
STEERING = ("GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE", "GOOGLE_GEMINI_BASE_URL", "GOOGLE_API_KEY")


# Files of quick in-process tests (pure decisions, the fake backend, the catalog): hundreds of tests of a few
# milliseconds each, which fill the workers' last seconds evenly.
QUICK_FILES = {"test_planners.py", "test_catalog.py", "test_polling.py", "test_engine_fake.py", "test_engine_faults_fake.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first, as a scheduler packing three workers does best: the long drills (marked slow), then the
    end-to-end runs, then the quick tests. xdist hands tests out in collection order, and a 10-second drill
    started when the other workers are done is 10 seconds added to the suite."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is not None:
            return 0
        return 2 if item.path.name in QUICK_FILES else 1

    items.sort(key=rank)


def pytest_configure(config: pytest.Config) -> None:
    """The controller (or a run without workers) compiles batchify.py and rewrites the test modules' asserts once,
    and caches both as bytecode; the three workers and their zygotes then read them instead of each doing it again
    (2.5 s of CPU a worker, 10 s of the suite's start on two cores). With PYTHONDONTWRITEBYTECODE set, as on this
    machine, neither Python nor pytest writes a cache of its own; both read one. A cache that cannot be written
    (a read-only checkout, pytest's internals moved) only costs that time back."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    with contextlib.suppress(Exception):
        _cache_bytecode(config)


def _cache_bytecode(config: pytest.Config) -> None:
    import importlib.util
    import py_compile

    from _pytest.assertion import rewrite

    src = str(ROOT / "batchify.py")
    py_compile.compile(src, cfile=importlib.util.cache_from_source(src), doraise=True)
    state = config.stash[rewrite.assertstate_key]
    for fn in [*sorted((ROOT / "tests").glob("test_*.py")), ROOT / "tests" / "conftest.py"]:
        pyc = rewrite.get_cache_dir(fn) / (fn.name[:-3] + rewrite.PYC_TAIL)
        if rewrite._read_pyc(fn, pyc) is None and rewrite.try_makedirs(pyc.parent):
            source_hash, co = rewrite._rewrite_test(fn, config)
            rewrite._write_pyc(state, co, source_hash, pyc)


@pytest.fixture(autouse=True)
def _no_steering_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let the developer's environment steer the SDK somewhere else (in-process tests; CLI runs get
    cli_env(), which drops the same variables)."""
    for var in STEERING:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(TINY_CA))  # see tests/tiny_ca.pem: plain HTTP only, faster clients


class Emu:
    """A running emulator (own thread and loop) with helpers to read and change it."""

    def __init__(self, thread: batchify.EmulatorThread):
        self.thread = thread
        self.url = thread.url
        self.emulator = thread.emulator

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_emulator/stats", timeout=10) as r:
            return json.loads(r.read())

    def configure(self, **kw: Any) -> None:
        self.thread.call(lambda: self.emulator.configure(**kw))


@pytest.fixture
def emu_config() -> batchify.EmulatorConfig:
    return batchify.EmulatorConfig(job_seconds=0.3, pending_fraction=0.3)


@pytest.fixture
def emu(emu_config: batchify.EmulatorConfig):
    with batchify.EmulatorThread(emu_config) as t:
        yield Emu(t)


@pytest.fixture
def articles(tmp_path: Path) -> Path:
    p = tmp_path / "articles.jsonl"
    shutil.copy(ROOT / "examples" / "articles.jsonl", p)
    return p


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHIFY_") and k not in STEERING}
    env.update({"GEMINI_API_KEY": "test-key-123", "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "SSL_CERT_FILE": str(TINY_CA)})
    env.update(extra)
    return env


_zygote: Any = None


def zygote() -> Any:
    """This test process's warm forker of CLI runs (see tests/zygote.py): started on first use."""
    global _zygote
    if _zygote is None:
        import atexit

        from zygote import ZygoteClient

        _zygote = ZygoteClient()
        atexit.register(_zygote.close)
    return _zygote


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`batchify ARGS` in its own process (forked from the warm zygote), like `subprocess.run`."""
    p = zygote().spawn(args, cwd, cli_env(**env))
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    return subprocess.CompletedProcess(["batchify", *args], p.returncode, out, err)


def run_against(emu: Any, inp: Any, cwd: Path, *args: str, out: Any = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`batchify run INPUT ARGS` against this test's emulator, state in ./st, results in `out` if given."""
    extra = ["--out", str(out)] if out is not None else []
    # retry delays at a fiftieth: the retry rules are the same, the tests wait less
    return run_cli(
        ["run", str(inp), "--endpoint", emu.url, "--state-dir", "st", "--retry-scale", "0.02", *extra, *args], cwd, **env
    )


def spawn_cli(args: list[str], cwd: Path, capture: bool = True, **env: str) -> Any:
    """Start the CLI in the background (to interrupt or race it): a Popen-like handle."""
    return zygote().spawn(args, cwd, cli_env(**env), capture=capture)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def input_ids(path: Path) -> list[Any]:
    return [r["id"] for r in read_jsonl(path)]


def assert_complete(out: Path, inp: Path, source: str = "batch") -> list[dict]:
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == input_ids(inp), "exactly one line per input id, in input order"
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad[:3]
    for r in rows:
        assert set(r) == {"id", "status", "result", "error", "source", "usage"}
        assert r["result"]["is_financial"] in ("Yes", "No") and r["usage"]["promptTokenCount"] > 0
    assert {r["source"] for r in rows} == {source}
    return rows


def assert_no_duplicate_creates(stats: dict) -> None:
    dupes = {k: v for k, v in stats["creates_by_display_name"].items() if v > 1}
    assert not dupes, f"jobs created twice: {dupes}"


def wait_for(pred: Any, timeout: float = 60.0) -> None:
    """Poll a condition (an emulator stat, a file) until it holds; fail after `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def a_create_recorded(run_dir: Path) -> bool:
    """True once a job sidecar of the run records a remote job (its create answered and saved)."""
    return any('"remote_job": "' in f.read_text() for f in (run_dir / "jobs").glob("*.json") if f.stat().st_size)


def spawn_batch_run(emu: Any, inp: Path, cwd: Path, out: Path, poll: str = "30") -> subprocess.Popen[str]:
    """`batchify run INPUT --mode batch` in the background against this test's emulator (to interrupt or race it)."""
    args = ["run", str(inp), "--endpoint", emu.url, "--state-dir", "st", "--yes", "--mode", "batch", "--poll-interval", poll]
    args += ["--retry-scale", "0.02"]
    return spawn_cli([*args, "--out", str(out)], cwd)


def run_until_the_job_ended_remotely(emu: Any, inp: Path, cwd: Path, out: Path) -> None:
    """Start a batch run polling every 30 s, let its one job end at the service, then kill the run: the job
    is SUCCEEDED remotely and not yet seen, let alone downloaded, by the run."""
    p = spawn_batch_run(emu, inp, cwd, out)
    try:
        wait_for(lambda: emu.stats()["creates"] >= 1)
        wait_for(lambda: emu.stats()["active_jobs"] == 0)
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)
