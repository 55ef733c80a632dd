"""Helpers shared by the bench scripts: a separate emulator process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(cmd: list[str], port: int, ready: Callable[[str], object]) -> Iterator[str]:
    """Run a local server process; yield its URL once `ready(url)` stops raising (10 s at most); stop it after."""
    with serving_process(cmd, port, ready) as (url, _proc):
        yield url


@contextlib.contextmanager
def serving_process(cmd: list[str], port: int, ready: Callable[[str], object]) -> Iterator[tuple[str, subprocess.Popen]]:
    """serving(), yielding the process too (to read its CPU time)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(Exception):
                ready(url)
                break
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """A live process's user + system CPU time so far (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def emulator_process(*args: str) -> Iterator[str]:
    """Start `batchify.py emulator` in its own process (so it does not share our GIL)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "batchify.py"), "emulator", "--port", str(port), *args]
    with serving(cmd, port, lambda url: urllib.request.urlopen(url + "/_emulator/stats", timeout=1)) as url:
        yield url


def child(code: str, *args: str) -> dict:
    """Run a measuring snippet in a fresh interpreter (its own peak RSS); it prints JSON last."""
    p = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT)), *args], capture_output=True, text=True, check=True)
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/_emulator/stats", timeout=10) as r:
        return json.loads(r.read())
