"""A fake clock and a fake Gemini backend for the engine's rules: scripted job durations in fake time, so
admission, polling and retrieval timing are asserted exactly, with no wall clock. (The wire protocol is
tested against the emulator through the real SDK; this is for the engine's decisions.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

import batchify


class FakeClock:
    EPOCH = 1_800_000_000.0  # what wall() reads at fake time 0

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        """The wall clock (epoch seconds, the engine's `wall`): moves with fake time. A test moves both at once
        (`clock.t += s`) for a process that was down `s` seconds, as the service's time went on meanwhile."""
        return self.EPOCH + self.t

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        if self.t > 10**5:  # a day and more: a run that never ends (a broken rule) fails here, not at the suite's timeout
            raise AssertionError(f"fake time passed {self.t:.0f} s: the run does not end")
        await asyncio.sleep(0)


class FakeGemini:
    """Implements batchify.Backend (what the engine calls). Job i (in create order) takes durations[i] fake
    seconds; every call is logged with the fake time it happened at."""

    def __init__(self, clock: FakeClock, durations: list[float], limit: int | None = None):
        self.clock = clock
        self.durations = list(durations)
        self.limit = limit
        self.files: dict[str, Path] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[float, str, str]] = []
        self.create_yields = 0
        self.generate_seconds = 1.0
        self.generated: list[str] = []  # the text of every request answered by generateContent
        self.generate_calls = 0
        self.shed: set[int] = set()  # generateContent calls (1-based) answered 503
        self.observe: Any = None  # called at each generateContent call (a test reads the engine's state)
        self.progress = False  # report batchStats that grow evenly over a job's duration
        self.writing = 0.0  # ... less its last `writing` seconds: every request counted done, the output being written
        # faults, as the emulator's knobs (tests/test_faults.py keeps the drills over the wire):
        self.fates: dict[int, batchify.JobState] = {}  # job i (create order) ends FAILED or EXPIRED, not SUCCEEDED
        self.create_429 = 0  # the next N creates are refused (429) whatever the load
        self.max_active: int | None = None  # creates refused (429) while this many jobs are pending or running
        self.line_error: Any = None  # a predicate on a request's text: its result line is an error (500 INTERNAL)
        self.gone: set[str] = set()  # jobs the service lost: a get answers 404, the list leaves them out
        self.list_lag = 0.0  # a job created is left out of batches.list for this many seconds (the list lags creates)
        self.models_gone: set[str] = set()  # models shut down: models.get, creates and generateContent answer 404
        self.no_batch: set[str] = set()  # models served without a Batch API: a create answers 404

    def _log(self, what: str, name: str) -> None:
        self.calls.append((self.clock.now(), what, name))

    async def upload(self, path: Path, display_name: str) -> batchify.RemoteFile:
        name = f"files/up{len(self.files)}"
        self.files[name] = Path(path)
        self._log("upload", name)
        return batchify.RemoteFile(name, Path(path).stat().st_size, "ACTIVE")

    async def get_model(self, model: str, replacement: str | None = None) -> batchify.ModelInfo:
        self._log("get-model", model)
        if model in self.models_gone:  # as GeminiClient.get_model turns the service's 404
            raise batchify.UsageError(f"the service does not serve model {model!r} (get model: 404 NOT_FOUND (fake)).")
        return batchify.ModelInfo(f"models/{model}", None, None)

    async def create_batch(self, model: str, src: Any, display_name: str) -> batchify.RemoteJob:
        for _ in range(self.create_yields):  # a create is a network call: other tasks run meanwhile
            await asyncio.sleep(0)
        if model in self.models_gone | self.no_batch:
            self._log("create-404", display_name)
            raise batchify.BatchRefusedError(f"create batch: 404 NOT_FOUND models/{model} (fake)", code=404)
        tokens = sum(1 for _ in open(self.files[src], "rb"))
        live = sum(j["tokens"] for n, j in self.jobs.items() if self.clock.now() < j["end"] and n not in self.gone)
        active = sum(1 for n, j in self.jobs.items() if self.clock.now() < j["end"] and n not in self.gone)
        refused = self.create_429 > 0 or (self.max_active is not None and active >= self.max_active)
        self.create_429 = max(0, self.create_429 - 1)
        if refused or (self.limit is not None and live + tokens > self.limit):
            self._log("create-429", display_name)
            raise batchify.RemoteError("create batch: 429 RESOURCE_EXHAUSTED (fake)", code=429)
        name = f"batches/{len(self.jobs)}"
        self.jobs[name] = {
            "src": src,
            "dn": display_name,
            "end": self.clock.now() + self.durations[len(self.jobs)],
            "tokens": tokens,
            "listed_from": self.clock.now() + self.list_lag,
        }
        self._log("create", name)
        return batchify.RemoteJob(name, display_name, batchify.JobState.PENDING)

    def _state(self, name: str) -> batchify.RemoteJob:
        j = self.jobs[name]
        done = self.clock.now() >= j["end"]
        index = int(name.split("/")[1])
        fate = self.fates.get(index, batchify.JobState.SUCCEEDED)
        if done and fate != batchify.JobState.SUCCEEDED:
            return batchify.RemoteJob(name, j["dn"], fate, error=f"{fate} (fake)")
        stats = {}
        if self.progress:
            start = j["end"] - self.durations[int(name.split("/")[1])]
            share = min(1.0, (self.clock.now() - start) / max(1e-9, j["end"] - self.writing - start))
            stats = {"requestCount": j["tokens"], "successfulRequestCount": int(j["tokens"] * share)}
        return batchify.RemoteJob(
            name,
            j["dn"],
            batchify.JobState.SUCCEEDED if done else batchify.JobState.RUNNING,
            output_file=f"files/out-{name.split('/')[1]}" if done else None,
            stats=stats,
        )

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        self._log("get", name)
        if name in self.gone:
            raise batchify.RemoteError(f"get {name}: 404 NOT_FOUND (fake: the job is gone)", code=404)
        return self._state(name)

    async def list_batches(self) -> list[batchify.RemoteJob]:
        self._log("list", "")
        now = self.clock.now()
        return [self._state(n) for n, j in self.jobs.items() if n not in self.gone and j["listed_from"] <= now]

    async def download(self, name: str) -> AsyncIterator[bytes]:
        self._log("download", name)
        job = self.jobs[f"batches/{name.rsplit('-', 1)[1]}"]
        out = bytearray()
        for line in open(self.files[job["src"]], "rb"):
            row = orjson.loads(line)
            key = row["key"]
            if self.line_error is not None and self.line_error(row["request"]["contents"][0]["parts"][0]["text"]):
                out += orjson.dumps({"key": key, "error": {"code": 13, "message": "Internal error (fake line error)"}}) + b"\n"
                continue
            resp = {"candidates": [{"content": {"parts": [{"text": '{"ok": true}'}]}, "finishReason": "STOP"}]}
            out += orjson.dumps({"key": key, "response": resp}) + b"\n"
        yield bytes(out)

    async def generate(self, model: str, request: dict[str, Any], flex: bool = False) -> dict[str, Any]:
        text = request["contents"][0]["parts"][0]["text"]
        self._log("flex" if flex else "generate", text)
        self.generate_calls += 1
        if model in self.models_gone:
            raise batchify.RemoteError(f"generate: 404 NOT_FOUND models/{model} (fake)", code=404)
        if self.observe is not None:
            self.observe()
        if self.generate_calls in self.shed:  # Flex at capacity: 503, as the real service sheds
            raise batchify.RemoteError("generate: 503 UNAVAILABLE (fake Flex shed)", code=503)
        await self.clock.sleep(self.generate_seconds)
        self.generated.append(text)
        return {
            "candidates": [{"content": {"parts": [{"text": '{"ok": true}'}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 3, "totalTokenCount": 13},
        }

    def batch_texts(self) -> list[str]:
        """The text of every request in every batch job created."""
        out = []
        for j in self.jobs.values():
            for line in open(self.files[j["src"]], "rb"):
                out.append(orjson.loads(line)["request"]["contents"][0]["parts"][0]["text"])
        return out

    async def cancel_batch(self, name: str) -> None:
        self._log("cancel", name)

    async def delete_batch(self, name: str) -> None:
        self._log("delete-batch", name)

    async def delete_file(self, name: str) -> None:
        self._log("delete-file", name)

    async def close(self) -> None:
        pass

    def end_of(self, name: str) -> float:
        return float(self.jobs[name]["end"])

    def creates_by_display_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs.values():
            out[j["dn"]] = out.get(j["dn"], 0) + 1
        return out


class Crash(BaseException):
    """What a crash hook raises in place of the CLI drills' SIGKILL: nothing of the engine catches it."""


def crash_at(point: batchify.Hook, nth: int = 1) -> Any:
    """An engine hook that crashes the run at the nth pass of `point` (as BATCHIFY_CRASH_AT=point:nth)."""
    seen = [0]

    def hook(p: batchify.Hook) -> None:
        if p == point:
            seen[0] += 1
            if seen[0] >= nth:
                raise Crash(f"{point}:{nth}")

    return hook


def _conforms(clock: FakeClock) -> batchify.Backend:
    return FakeGemini(clock, [])  # mypy (run by .ci/run) checks the fake implements the Backend protocol
