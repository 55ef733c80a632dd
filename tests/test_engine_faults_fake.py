"""The engine's recovery rules against the fake backend and a fake clock: crash points and resume, jobs that fail,
expire or vanish, refused creates, line errors. The same faults stay drilled over the wire, through the CLI, in
tests/test_faults.py (the crash drill, the fallback's exit codes), tests/test_run.py and tests/test_hardening.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar

import pytest
from fakes import Crash, FakeClock, FakeGemini, crash_at
from test_engine_fake import prepared

import batchify

Hook, JobState = batchify.Hook, batchify.JobState


class Logged(batchify.NullReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def engine(store: batchify.RunStore, fake: FakeGemini, hook=None, reporter=None) -> batchify.Engine:
    clock = fake.clock
    return batchify.Engine(store, fake, reporter, clock=clock.now, sleep=clock.sleep, hook=hook, wall=clock.wall)


def run(store: batchify.RunStore, fake: FakeGemini, hook=None, reporter=None) -> batchify.Summary:
    return asyncio.run(engine(store, fake, hook, reporter).execute())


def crash(store: batchify.RunStore, fake: FakeGemini, point: Hook, nth: int = 1) -> None:
    """Run until the hook crashes the run at `point` (the CLI drills kill the process there with SIGKILL)."""
    with pytest.raises(BaseException) as e:  # Crash, alone or in a task group's BaseExceptionGroup
        run(store, fake, crash_at(point, nth))
    if isinstance(e.value, BaseExceptionGroup):
        assert e.value.split(Crash)[0] is not None, e.value
    else:
        assert isinstance(e.value, Crash), e.value


def all_ok_once(store: batchify.RunStore, fake: FakeGemini, n: int) -> None:
    """Every request answered ok, each paid for once (in one created job or one real-time call)."""
    paid = fake.batch_texts() + fake.generated
    assert sorted(paid) == sorted(set(paid)), "a request was paid for twice"
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(n)) and all(r["status"] == "ok" for r in rows), rows[:3]


def no_duplicate_creates(fake: FakeGemini) -> None:
    dupes = {k: v for k, v in fake.creates_by_display_name().items() if v > 1}
    assert not dupes, f"jobs created twice: {dupes}"


# -- crash points, then resume (was tests/test_run.py::test_crash_then_resume_creates_nothing_twice, 5 CLI pairs) ---
@pytest.mark.parametrize(
    ("point", "nth"),
    [(Hook.AFTER_INTENT, 1), (Hook.AFTER_CREATE, 1), (Hook.AFTER_CREATE, 2), (Hook.AFTER_UPLOAD, 1), (Hook.AFTER_DOWNLOAD, 1)],
)
def test_crash_then_resume_creates_nothing_twice(tmp_path, point, nth):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 15, poll_interval=1.0, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [5.0] * 10)
    crash(store, fake, point, nth)
    jobs = store.load_jobs()
    if point == Hook.AFTER_INTENT:
        assert [j.state for j in jobs].count(JobState.SUBMITTING) == 1 and not fake.jobs
    if point == Hook.AFTER_CREATE:  # created at the service, not yet recorded
        assert [j.state for j in jobs].count(JobState.SUBMITTING) == 1 and len(fake.jobs) == nth
    log = Logged()
    s = run(store, fake, reporter=log)
    assert s.ok == 60
    all_ok_once(store, fake, 60)
    no_duplicate_creates(fake)
    assert len(fake.jobs) == len(jobs) == 4
    if point == Hook.AFTER_CREATE:
        assert any("found remote job" in line for line in log.lines), log.lines


# -- a create sent by a run that ended before its answer was recorded: the settle window goes on across the resume ---
def _creates_of(fake: FakeGemini, display_name: str) -> list[float]:
    return [t for t, what, n in fake.calls if what == "create" and fake.jobs[n]["dn"] == display_name]


def test_a_resumed_create_that_took_effect_but_lists_late_is_adopted_not_paid_twice(tmp_path):
    """The create took effect, the process died before recording its answer, and batches.list shows the job only
    30 s after the create. Resumed 20 s later (inside CREATE_SETTLE_S of the create, by the wall clock kept in the
    sidecar), the first listing misses it: the job is looked for until the window ends, found and adopted. Exactly
    one remote job per batch; the run's other batches are created meanwhile, not held behind it."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 15, poll_interval=1.0, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [5.0] * 10)
    fake.list_lag = 30.0
    crash(store, fake, Hook.AFTER_CREATE)
    (stuck,) = [j for j in store.load_jobs() if j.state == JobState.SUBMITTING]
    assert len(fake.jobs) == 1
    on_disk = json.loads((store.jobs_dir / f"{stuck.name}.json").read_text())
    sent, sent_wall = clock.t, clock.wall()
    clock.t += 20.0  # the process was down 20 s
    log = Logged()
    s = run(store, fake, reporter=log)
    assert s.ok == 60
    assert _creates_of(fake, stuck.display_name) == [sent], "the batch was created twice"
    assert len(fake.jobs) == 4 and not [c for c in fake.calls if c[1] == "cancel"]
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)
    assert any("found remote job batches/0 created before the interruption" in line for line in log.lines), log.lines
    others = [t for t, what, n in fake.calls if what == "create" and n != "batches/0"]
    assert len(others) == 3 and max(others) < sent + fake.list_lag  # not held behind the job looked for
    lists = [t for t, what, _ in fake.calls if what == "list" and t >= sent + 20.0]
    assert len(lists) <= 8, lists  # looked for with back-off, not at every pass
    assert on_disk.get("create_sent_at") == sent_wall  # the send time went on disk with the intent (wall clock)


@pytest.mark.parametrize(
    ("down", "scale", "strip", "wait"),
    [
        (20.0, 1.0, False, batchify.CREATE_SETTLE_S),  # inside the window: looked for until it ends, from the send
        (120.0, 1.0, False, None),  # past the window: one listing, created again at once
        (20.0, 1.0, True, None),  # a sidecar of an older batchify (no send time): as before, created again at once
        (1.0, 0.02, False, batchify.CREATE_SETTLE_S * 0.02),  # --retry-scale (the drills) scales the window too
    ],
)
def test_a_resumed_create_that_did_not_happen_is_sent_again_once_the_window_has_passed(tmp_path, down, scale, strip, wait):
    """The process died after the intent, before the create was sent (nothing at the service). Resumed `down`
    seconds later: inside the settle window (counted from the send, by the wall clock in the sidecar) the job is
    looked for until the window ends and then created again, once, the run's other batches going on meanwhile;
    past it, or with no send time recorded, created again at once. Either way one remote job per batch."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 15, poll_interval=1.0, enqueued_limit=10**6, margin=0.0, retry_scale=scale)
    fake = FakeGemini(clock, [5.0] * 10)
    crash(store, fake, Hook.AFTER_INTENT)
    (stuck,) = [j for j in store.load_jobs() if j.state == JobState.SUBMITTING]
    assert not fake.jobs
    side = store.jobs_dir / f"{stuck.name}.json"
    on_disk = json.loads(side.read_text())
    if strip:  # as an older batchify wrote it
        side.write_text(json.dumps({k: v for k, v in on_disk.items() if k != "create_sent_at"}))
    sent, sent_wall = clock.t, clock.wall()
    clock.t += down
    resumed = clock.t
    log = Logged()
    assert run(store, fake, reporter=log).ok == 60
    (at,) = _creates_of(fake, stuck.display_name)  # created once
    if wait is None:
        assert at == resumed, (at, resumed)
        assert not any("was listed in" in line for line in log.lines), log.lines
    else:
        assert sent + wait <= at <= sent + wait + 0.1 * scale, (sent, at)  # on time: the look is on the wake schedule
        assert any(f"{stuck.name}: the run that sent its create ended" in line for line in log.lines), log.lines
        others = [t for t, what, n in fake.calls if what == "create" and fake.jobs[n]["dn"] != stuck.display_name]
        assert len(others) == 3 and max(others) < sent + wait  # the rest of the run did not wait for it
    assert len(fake.jobs) == 4
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)
    assert on_disk.get("create_sent_at") == sent_wall  # the send time went on disk with the intent (wall clock)


# -- jobs that end badly (tests/test_faults.py drills the same knobs over the wire) ---------------------------------
def test_failed_jobs_are_resubmitted(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 20, poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [3.0] * 10)
    fake.fates = {0: JobState.FAILED, 1: JobState.FAILED}
    assert run(store, fake).ok == 60
    jobs = store.load_jobs()
    assert [j.state for j in jobs].count(JobState.FAILED) == 2
    assert len(jobs) == 5 and all(j.display_name.endswith("-a2") for j in jobs if j.retry_of)
    assert len(fake.jobs) == 5
    no_duplicate_creates(fake)


def test_expired_job_is_resubmitted(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [3.0] * 10)
    fake.fates = {0: JobState.EXPIRED}
    assert run(store, fake).ok == 60
    jobs = store.load_jobs()
    assert [j.state for j in jobs].count(JobState.EXPIRED) == 1 and len(fake.jobs) == 3
    assert {j.retry_of for j in jobs if j.retry_of} == {"b0001"}
    no_duplicate_creates(fake)


def test_failed_beyond_attempts_falls_back_to_realtime(tmp_path):
    """Out of batch attempts, the failed job's ids go through Flex (the batch price), the rest stay batch."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="auto", max_attempts=1, waves=1)
    fake = FakeGemini(clock, [3.0] * 10)
    fake.fates = {0: JobState.FAILED}
    assert run(store, fake).ok == 60
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["source"] for r in rows] == ["flex"] * 30 + ["batch"] * 30
    assert [t for _t, what, t in fake.calls if what == "flex"] and len(fake.generated) == 30
    assert not [t for _t, what, t in fake.calls if what == "generate"], "the standard tier was used"
    assert len(fake.jobs) == 2, "no second batch attempt"


def test_failed_without_fallback_reports_errors(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch", max_attempts=1)
    fake = FakeGemini(clock, [3.0] * 10)
    fake.fates = {0: JobState.FAILED}
    s = run(store, fake)
    assert (s.ok, s.errors) == (30, 30) and not fake.generated and len(fake.jobs) == 2
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(60))
    assert sum(r["status"] == "error" and "FAILED" in r["error"] for r in rows) == 30


def test_a_job_the_service_lost_is_resubmitted(tmp_path):
    """Really gone (404 on get, and not in the list): three 404s in a row, then FAILED and tried again."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 60, poll_interval=1.0, max_poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [30.0, 3.0])
    lost = {"done": False}
    orig = fake.get_batch

    async def get_batch(name: str) -> batchify.RemoteJob:
        if not lost["done"]:  # the service loses the job after the first look
            lost["done"] = True
            fake.gone.add(name)
        return await orig(name)

    fake.get_batch = get_batch  # type: ignore[method-assign]
    assert run(store, fake).ok == 60
    jobs = {j.name: j for j in store.load_jobs()}
    assert set(jobs) == {"b0001", "b0001-r2"} and jobs["b0001-r2"].retry_of == "b0001"
    assert "404 3 times" in (jobs["b0001"].error or "")
    assert len(fake.jobs) == 2
    gets = [n for _t, what, n in fake.calls if what == "get" and n == "batches/0"]
    assert len(gets) == 3, gets


def test_a_running_job_answered_404_is_not_resubmitted(tmp_path):
    """Five 404s in a row for a job that still runs (a proxy, a routing blip): three before the job could count as
    gone, then the list still shows it: it is kept, not paid for twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, max_poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [20.0, 20.0])
    answered = {"404": 0}
    orig = fake.get_batch

    async def get_batch(name: str) -> batchify.RemoteJob:
        if answered["404"] < 5:
            answered["404"] += 1
            fake._log("get", name)
            raise batchify.RemoteError(f"get {name}: 404 NOT_FOUND (scripted)", code=404)
        return await orig(name)

    fake.get_batch = get_batch  # type: ignore[method-assign]
    log = Logged()
    assert run(store, fake, reporter=log).ok == 60
    assert answered["404"] == 5 and any("the service lists the job" in line for line in log.lines), log.lines
    assert len(fake.jobs) == 2 and not any(j.retry_of for j in store.load_jobs()), "a live job was resubmitted"


# -- refused creates ------------------------------------------------------------------------------------------------
def test_429_on_create_waits_and_retries(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 20, poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [3.0] * 10)
    fake.create_429 = 3
    assert run(store, fake).ok == 60
    all_ok_once(store, fake, 60)
    assert len([c for c in fake.calls if c[1] == "create-429"]) == 3 and len(fake.jobs) == 3
    assert [j.state for j in store.load_jobs()] == [JobState.RESULTS_DOWNLOADED] * 3, "a refused create failed its job"
    no_duplicate_creates(fake)


def test_concurrent_job_limit(tmp_path):
    """The service's cap on jobs pending or running (429s past it): waited out, every batch created once."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 6, poll_interval=1.0, mode="batch", enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [30.0] * 10)  # long jobs: many refusals in a row while two run
    fake.max_active = 2
    assert run(store, fake).ok == 60
    all_ok_once(store, fake, 60)
    assert len(fake.jobs) == 10 and [c for c in fake.calls if c[1] == "create-429"]
    no_duplicate_creates(fake)
    created = {n: t for t, what, n in fake.calls if what == "create"}
    for t, what, _n in fake.calls:
        if what == "create":
            live = [n for n, j in fake.jobs.items() if j["end"] > t and created[n] <= t]
            assert len(live) <= 2


def test_line_errors_retried_once_in_batch_without_fallback(tmp_path):
    """--no-fallback: one more batch try for exactly the failed lines; what fails twice stays an error line."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 60, poll_interval=1.0, fallback=False)
    fake = FakeGemini(clock, [3.0] * 10)
    tries: dict[int, int] = {}

    def fails(text: str) -> bool:  # ids 2, 7, 12, ... fail every time; id 3 only the first time
        i = int(re.search(r"number (\d+)", text)[1])  # type: ignore[index]
        tries[i] = tries.get(i, 0) + 1
        return i % 5 == 2 or (i == 3 and tries[i] == 1)

    fake.line_error = fails
    s = run(store, fake)
    jobs = {j.name: j for j in store.load_jobs()}
    always = {i for i in range(60) if i % 5 == 2}
    assert jobs["b0001"].failed == len(always) + 1 and jobs["x0002"].request_count == len(always) + 1
    assert jobs["x0002"].failed == len(always)
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(60))
    assert {r["id"] for r in rows if r["status"] != "ok"} == always  # failed twice: error lines, nothing dropped
    assert s.errors == len(always) and not fake.generated and len(fake.jobs) == 2


class _UploadsRefused(FakeGemini):
    async def upload(self, path: Path, display_name: str) -> batchify.RemoteFile:
        self._log("upload-400", display_name)
        raise batchify.RemoteError("upload: 400 INVALID_ARGUMENT Unsupported MIME type (scripted)", code=400)


def test_upload_always_refused_fails_the_job_then_falls_back(tmp_path):
    """Every upload refused: each job fails (after --max-attempts batches), never created; Flex finishes them."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="auto", max_attempts=2, waves=1)
    fake = _UploadsRefused(clock, [])
    assert run(store, fake).ok == 60
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(60)) and {r["source"] for r in rows} == {"flex"}
    jobs = store.load_jobs()
    assert len(jobs) == 4 and all(j.state == JobState.FAILED and "upload refused" in (j.error or "") for j in jobs)
    assert not fake.jobs and len(fake.generated) == 60 == len(set(fake.generated))


def test_create_429_with_nothing_enqueued_goes_to_the_fallback_after_the_timeout(tmp_path):
    """Creates refused for longer than --create-timeout with nothing of the run enqueued: waiting will not help, the
    jobs fail and the fallback finishes them (in fake time: the timeout is exact)."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="auto", waves=1, create_timeout=5.0)
    fake = FakeGemini(clock, [])
    fake.create_429 = 10**9
    assert run(store, fake).ok == 60
    assert not fake.jobs and len(fake.generated) == 60 == len(set(fake.generated))
    refused = [t for t, what, _n in fake.calls if what == "create-429"]
    first_flex = min(t for t, what, _n in fake.calls if what == "flex")
    assert refused[-1] - refused[0] >= 5.0 and first_flex >= 5.0, "the fallback came before --create-timeout"
    assert all(j.state == JobState.FAILED and j.no_retry for j in store.load_jobs())


def test_resume_after_creates_were_refused_tries_them_again(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch", create_timeout=5.0, fallback=False)
    fake = FakeGemini(clock, [3.0] * 10)
    fake.create_429 = 10**9
    with pytest.raises(batchify.BatchifyError):
        run(store, fake)
    assert not fake.jobs and store.load_run().notes.get("create_refused")
    fake.create_429 = 0
    assert run(store, fake).ok == 60
    all_ok_once(store, fake, 60)
    assert len(fake.jobs) == 2


# -- attempts and lost sidecars (were CLI runs in tests/test_hardening.py; its crash drill with lost sidecars stays) --
def test_max_attempts_is_the_number_of_batches_tried(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 60, poll_interval=1.0, mode="batch", max_attempts=3)
    fake = FakeGemini(clock, [3.0] * 10)
    fake.fates = {i: JobState.FAILED for i in range(10)}
    s = run(store, fake)
    assert len(fake.jobs) == 3, "three attempts, no fourth batch for the same ids"
    assert (s.ok, s.errors) == (0, 60)
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(60))


def test_deleted_job_sidecar_and_results_file_are_recovered_from_the_service(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 60, 15, poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [3.0] * 10)
    assert run(store, fake).ok == 60
    (store.dir / "jobs" / "b0002.json").unlink()  # SUCCEEDED and downloaded
    (store.dir / "results" / "b0003.jsonl").unlink()
    Path(store.load_run().out).unlink()
    log = Logged()
    assert run(store, fake, reporter=log).ok == 60
    said = "\n".join(log.lines)
    assert "b0002: sidecar missing; adopted" in said and "b0003: results file" in said and "again" in said, said
    all_ok_once(store, fake, 60)
    assert len(fake.jobs) == 4 and not fake.generated


def test_a_power_cut_after_prepare_that_empties_or_loses_created_job_sidecars_is_repaired(tmp_path):
    """Prepare writes its CREATED job sidecars without fsync (run.json, fsynced after them, is the durable
    record; _save_first_jobs): a power cut may leave one empty and another gone. The run mends them from the plan
    after asking the service, and every batch is created once."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 15, poll_interval=1.0, mode="batch")
    (store.dir / "jobs" / "b0001.json").write_bytes(b"")
    (store.dir / "jobs" / "b0003.json").unlink()
    fake = FakeGemini(clock, [3.0] * 4)
    log = Logged()
    assert run(store, fake, reporter=log).ok == 60
    said = "\n".join(log.lines)
    assert "b0001.json: unreadable, moved aside" in said and "b0003: sidecar missing and no job at the service" in said, said
    assert len(fake.jobs) == 4
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_lost_sidecar_of_a_pending_job_adopts_it_instead_of_creating_another(tmp_path, damage):
    """The 2nd create went through and the crash came before its answer was saved (SUBMITTING on disk); the 1st
    job is PENDING: its sidecar is lost. Resume adopts it from the service instead of paying for it again."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch", enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [20.0] * 4)
    crash(store, fake, Hook.AFTER_CREATE, 2)
    side = store.dir / "jobs" / "b0001.json"
    if damage == "delete":
        side.unlink()
    else:
        side.write_bytes(side.read_bytes()[:40])
    log = Logged()
    assert run(store, fake, reporter=log).ok == 60
    assert any("adopted" in line for line in log.lines), log.lines
    assert len(fake.jobs) == 2
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)
    if damage == "truncate":
        assert (store.dir / "jobs" / "b0001.json.damaged").exists()


# -- refused lists and downloads (tests/test_models_e2e.py keeps the few refusals one call's retries absorb) ---------
def test_429_on_list_during_reconcile_past_one_calls_retries_is_looked_at_again(tmp_path):
    """A crash after the intent leaves a job SUBMITTING; resume lists the service's jobs to find it, and the list is
    refused again and again (past the client's own retries): never fatal, looked at again on the next pass, and
    the job is created once."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 60, poll_interval=1.0, mode="batch")
    fake = FakeGemini(clock, [3.0])
    crash(store, fake, Hook.AFTER_INTENT)
    refusals = {"left": 12}
    orig = fake.list_batches

    async def list_batches() -> list[batchify.RemoteJob]:
        if refusals["left"]:
            refusals["left"] -= 1
            fake._log("list-429", "")
            raise batchify.RemoteError("list batches: 429 RESOURCE_EXHAUSTED (scripted)", code=429)
        return await orig()

    fake.list_batches = list_batches  # type: ignore[method-assign]
    assert run(store, fake).ok == 60
    assert refusals["left"] == 0 and len(fake.jobs) == 1
    all_ok_once(store, fake, 60)


class _DownloadsRefused(FakeGemini):
    """Downloads answered 404 the first `refused` times (the output not readable), then as the fake does."""

    refused = 0

    def download(self, name: str):  # type: ignore[override]
        if self.refused:
            self.refused -= 1
            return self._refuse(name)
        return super().download(name)

    async def _refuse(self, name: str):
        self._log("download-404", name)
        raise batchify.RemoteError("download: 404 NOT_FOUND (scripted)", code=404)
        yield b""


def test_download_refused_round_after_round_is_waited_out_with_one_job(tmp_path):
    """An output refused round after round (SUCCEEDED before it is readable) is tried again, backing off, and
    never failed over to a new job: its answers are paid for (OUTPUT_PATIENCE_S bounds the wait)."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 60, poll_interval=1.0, mode="batch")
    fake = _DownloadsRefused(clock, [3.0, 3.0])
    fake.refused = 5
    assert run(store, fake).ok == 60
    jobs = {j.name: j for j in store.load_jobs()}
    assert jobs["b0001"].state == JobState.RESULTS_DOWNLOADED and len(fake.jobs) == 1
    assert len([c for c in fake.calls if c[1] == "download-404"]) == 5
    no_duplicate_creates(fake)


class _GetsUnanswered(FakeGemini):
    """Every get fails as a network error does while the clock is inside one of `dark` ((from, to) pairs): the service,
    or the way to it, is down."""

    dark: tuple[tuple[float, float], ...] = ()

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        if any(a <= self.clock.now() < b for a, b in self.dark):
            self._log("get-down", name)
            raise batchify.RemoteError(f"get {name}: network error (scripted)", code=0)
        return await super().get_batch(name)


def test_polls_unanswered_for_an_hour_stop_the_run_and_resume_finishes(tmp_path):
    """No failure waits forever: a job's polls failing for POLL_SILENCE_S in a row stop the run (ServiceSilent, exit 3),
    soon after that hour, with every job kept (not failed: it goes on at the service, and creating it again would pay
    twice). Once the service answers again, resume finishes the run, nothing created twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch")
    fake = _GetsUnanswered(clock, [3 * 3600.0, 3 * 3600.0])  # long jobs: they outlast the outage
    fake.dark = ((0.0, 5 * 3600.0),)
    with pytest.raises(batchify.ServiceSilent) as e:
        run(store, fake)
    assert e.value.exit_code == 3 and re.search(r"no poll of it was answered for 6\d min", str(e.value)), e.value
    assert "batchify resume fake" in str(e.value), e.value
    downs = [t for t, what, _n in fake.calls if what == "get-down"]
    assert batchify.POLL_SILENCE_S <= clock.now() - downs[0] <= batchify.POLL_SILENCE_S + batchify.MAX_POLL_INTERVAL
    jobs = store.load_jobs()
    assert len(jobs) == 2 and all(j.state == JobState.PENDING and j.remote_job for j in jobs), "a job was not kept as it was"
    assert store.load_run().status == "interrupted", "status would show a stopped run as running"
    clock.t = 5 * 3600.0  # the service answers again
    assert run(store, fake).ok == 60
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)


def test_polls_failing_for_most_of_an_hour_again_and_again_do_not_stop_the_run(tmp_path):
    """An answer between two outages starts the hour again: outages of 50 minutes, one after another with ten minutes
    of answers between them (more than the longest poll interval), never stop the run."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 30, poll_interval=1.0, mode="batch")
    fake = _GetsUnanswered(clock, [4 * 3600.0, 4 * 3600.0])
    fake.dark = tuple((k * 3600.0, k * 3600.0 + 3000.0) for k in range(5))
    assert run(store, fake).ok == 60
    assert len([c for c in fake.calls if c[1] == "get-down"]) > 10
    no_duplicate_creates(fake)


# -- real time: a crash and resume (was a CLI pair in tests/test_realtime.py; the Flex Ctrl-C drills stay there) -----
@pytest.mark.parametrize(("mode", "source"), [("realtime", "standard"), ("flex", "flex")])
def test_realtime_resume_never_resends(tmp_path, mode, source):
    """Crash after the 30th answer saved: resume sends exactly the requests with no answer on disk (only those in
    flight at the crash may have been sent twice; nothing on disk is). The flex case was a CLI pair in
    tests/test_models_e2e.py (test_flex_run_killed_and_resumed_sends_no_id_twice)."""
    clock = FakeClock()
    store = prepared(tmp_path, 80, 80, mode=mode, concurrency=4)
    fake = FakeGemini(clock, [])
    crash(store, fake, Hook.AFTER_REALTIME, 30)
    sent_before, answered_before = fake.generate_calls, len(fake.generated)
    on_disk = {json.loads(line)["n"] for line in store.realtime_path.read_text().splitlines()}
    assert 30 <= len(on_disk) <= sent_before
    s = run(store, fake)
    assert s.ok == 80 and s.by_source == {source: 80}
    assert all(what == ("flex" if mode == "flex" else "generate") for _t, what, _n in fake.calls)
    assert fake.generate_calls - sent_before == 80 - len(on_disk)
    resent = {int(re.search(r"number (\d+)", t)[1]) for t in fake.generated[answered_before:]} & on_disk  # type: ignore[index]
    assert not resent, f"answers on disk were paid for again: {resent}"


def test_a_hybrid_batch_that_becomes_unstarted_late_is_still_drained_by_flex(tmp_path):
    """Hybrid, resumed inside an interrupted create's settle window: the job waits SUBMITTING while the rest of the
    run is done by batch and Flex; when the window ends it is UPLOADED again, and admission (jobs seen finished,
    Flex quicker) leaves it to the Flex lanes. They used to have ended as soon as nothing was claimable: the run
    then polled forever, nothing left to take the batch (the crash drill hung this way). The lanes now stay while
    the batch side runs, and drain it."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 5, poll_interval=1.0, mode="hybrid", flex_lanes=2, enqueued_limit=2_000, margin=0.0)
    fake = FakeGemini(clock, [5.0] * 40)
    crash(store, fake, Hook.AFTER_INTENT, 2)
    (stuck,) = [j for j in store.load_jobs() if j.state == JobState.SUBMITTING]
    clock.t += 1.0

    async def bounded() -> batchify.Summary:  # a hang is a failure, not a stuck suite (fake time runs instantly)
        return await asyncio.wait_for(engine(store, fake).execute(), 20)

    s = asyncio.run(bounded())
    assert s.ok == 60
    assert {j.name: j.state for j in store.load_jobs()}[stuck.name] in (JobState.FLEXED, JobState.RESULTS_DOWNLOADED)
    no_duplicate_creates(fake)
    all_ok_once(store, fake, 60)


def test_hybrid_line_errors_get_their_one_more_try_and_the_run_ends(tmp_path):
    """Hybrid, batch answers a few lines with an error: the errored ids go into a retry batch (x...) after the hybrid
    phase. Admission there left it to the Flex lanes (Flex the quicker way), but they had ended with that phase: the
    batch sat UPLOADED and the run polled forever (an adversary's reproducer). The retry batch now goes through
    the hybrid phase again: Flex drains it, at the batch price, each id paid once more only."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 5, poll_interval=1.0, mode="hybrid", flex_lanes=2, enqueued_limit=2_000, margin=0.0)
    fake = FakeGemini(clock, [5.0] * 40)
    fake.line_error = lambda text: "document number 3 " in text  # in the head: a batch job answers it

    async def bounded() -> batchify.Summary:  # a hang is a failure, not a stuck suite (fake time runs instantly)
        return await asyncio.wait_for(engine(store, fake).execute(), 20)

    s = asyncio.run(bounded())
    assert (s.ok, s.errors) == (60, 0)
    retry = [j for j in store.load_jobs() if j.name.startswith("x")]
    assert len(retry) == 1 and retry[0].state in (JobState.FLEXED, JobState.RESULTS_DOWNLOADED), retry
    texts = fake.batch_texts() + fake.generated
    assert sum("document number 3 " in t for t in texts) == 2, "the errored id was not tried exactly once more"
    assert len(texts) == 61, "an id other than the errored one was paid twice"
    no_duplicate_creates(fake)


# -- refusals about the account, and those about one request (the reviewer's cases) ---------------------------------
class _Refusing(FakeGemini):
    """generateContent answers `refusal` (a RemoteError) for the requests whose text holds `marker` ("" = all)."""

    refusal: batchify.RemoteError | None = None
    marker = ""

    async def generate(self, model, request, flex=False):
        if self.refusal is not None and self.marker in request["contents"][0]["parts"][0]["text"]:
            raise self.refusal
        return await super().generate(model, request, flex)


def test_a_403_that_names_a_file_is_that_requests_error_not_a_stop(tmp_path):
    """403 "You do not have permission to access the File ... or it may not exist" is about one request (a fileData
    URI expired or another project's): recorded against that id, the run finishes. Counted as an account refusal, it
    stopped the run at that id at every resume, the ids after it never sent."""
    store = prepared(tmp_path, 20, 5, mode="flex")
    fake = _Refusing(FakeClock(), [])
    fake.marker = "document number 7 "
    fake.refusal = batchify.RemoteError(
        "generate: 403 PERMISSION_DENIED You do not have permission to access the File abc or it may not exist.",
        code=403,
        status="PERMISSION_DENIED",
    )
    s = run(store, fake)
    assert (s.ok, s.errors) == (19, 1)


def test_an_account_refusal_stops_this_run_not_the_callers_stop(tmp_path):
    """A location refusal stops the run (ServiceRefused) without marking the caller's GracefulStop as requested:
    the same object passed to the resume after the fix used to stop it at once, nothing sent."""
    store = prepared(tmp_path, 20, 5, mode="flex")
    fake = _Refusing(FakeClock(), [])
    fake.refusal = batchify.RemoteError(
        "generate: 400 FAILED_PRECONDITION User location is not supported", code=400, status="FAILED_PRECONDITION"
    )
    stop = batchify.GracefulStop()
    with pytest.raises(batchify.ServiceRefused):
        asyncio.run(batchify.Engine(store, fake, clock=fake.clock.now, sleep=fake.clock.sleep, stop=stop).execute())
    assert not stop.requested and store.load_run().status == "interrupted"
    fake.refusal = None  # mended
    s = asyncio.run(batchify.Engine(store, fake, clock=fake.clock.now, sleep=fake.clock.sleep, stop=stop).execute())
    assert s.ok == 20 and len(fake.generated) == 20


def test_a_retired_models_resume_adopts_a_job_whose_sidecar_was_lost(tmp_path):
    """Collect-only (the model shut down) still repairs: a job sidecar lost while its job ran at the service is
    adopted and downloaded, not reported as 'not done, run those ids again' (paying twice)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 10, poll_interval=1.0, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [5.0] * 10)
    crash(store, fake, Hook.AFTER_POLL)
    victim = next(j for j in store.load_jobs() if j.remote_job)
    (store.jobs_dir / f"{victim.name}.json").unlink()
    clock.t += 10
    s = asyncio.run(batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep, retired="shut down.").execute())
    assert s.ok == 20 and len(fake.jobs) == 2


def test_a_retired_models_resume_with_ids_left_leaves_the_run_unfinished(tmp_path):
    """Collect-only with a job that ended EXPIRED (its retry would need a new create): the UsageError names the
    batch, and the run stays 'interrupted', not 'done' (done, a later resume skipped the retirement check and
    created the retry on the shut-down model; cleanup --local was allowed)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 10, poll_interval=1.0, enqueued_limit=10**6, margin=0.0, max_attempts=3)
    fake = FakeGemini(clock, [2.0] * 10)
    crash(store, fake, Hook.AFTER_POLL)
    side = next(p for p in store.jobs_dir.glob("*.json") if json.loads(p.read_text())["index"] == 1)
    side.write_text(json.dumps({**json.loads(side.read_text()), "state": "EXPIRED"}))
    clock.t += 10
    with pytest.raises(batchify.UsageError, match="b0001"):
        asyncio.run(batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep, retired="shut down.").execute())
    assert store.load_run().status == "interrupted"


class _ShutDownAfterFirstCreate(FakeGemini):
    """The model is shut down once the first job is created: models.get, creates and generateContent answer 404."""

    async def create_batch(self, model, src, display_name):
        if self.jobs:
            self.models_gone.add(model)
        return await super().create_batch(model, src, display_name)


def _prepared_lite(tmp_path: Path, **opts) -> batchify.RunStore:
    """40 documents in 4 batches on gemini-3.1-flash-lite (the catalog: shuts down 2027-05-07, replacement
    gemini-3.5-flash-lite), auto mode, one job at a time."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"document number {i} " * 5}) + "\n" for i in range(40)))
    store = batchify.RunStore(tmp_path / "st", "fake")
    cfg = batchify.JobConfig(model="gemini-3.1-flash-lite", schema={"type": "object"})
    o = {"mode": "auto", "poll_interval": 1.0, "enqueued_limit": 10**6, "margin": 0.0, "max_active_jobs": 1, **opts}
    asyncio.run(batchify.prepare_run(store, inp, cfg, batchify.RunOptions(batch_size=10, calibrate=False, **o)))
    return store


@pytest.mark.parametrize("mode", ["auto", "batch", "hybrid"])
def test_a_model_shut_down_mid_run_is_collected_and_named_not_sent_to_the_fallback(tmp_path, mode):
    """The model shut down while the run was under way: its next create answered 404, taken as "this model has no
    Batch API ... --mode realtime", and the fallback sent every remaining request to Flex, each answered 404 again
    (adversary reproducer 06). A 404 on create now asks models.get: the model is gone, so the run takes the path a
    resume on a retired model takes: what the service has is collected, nothing is sent, exit 2 naming the
    replacement."""
    hybrid = {"flex_lanes": 1, "max_active_jobs": 2} if mode == "hybrid" else {}  # (the 2nd create before Flex drains all)
    store = _prepared_lite(tmp_path, mode=mode, **hybrid)
    fake = _ShutDownAfterFirstCreate(FakeClock(), [5.0] * 4)
    with pytest.raises(batchify.UsageError, match=r"would need new requests.*--model gemini-3\.5-flash-lite") as e:
        run(store, fake)
    assert "no Batch API" not in str(e.value) and "--mode realtime" not in str(e.value)
    flex_404 = [c for c in fake.calls if c[1] == "flex" and c[0] > next(t for t, what, _ in fake.calls if what == "create-404")]
    assert not flex_404, f"requests sent to the shut-down model after its create was refused: {len(flex_404)}"
    assert len(fake.jobs) == 1 and [c[1] for c in fake.calls].count("get-model") == 1
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in rows) >= 10 and len(rows) == 40  # the job created was collected
    assert store.load_run().status == "interrupted" and not store.load_run().notes.get("batch_refused")


def test_a_create_404_for_a_model_still_served_keeps_the_fallback(tmp_path):
    """A 404 on create for a model models.get still serves (no Batch API for it): the refusal stands, and auto mode
    finishes through Flex as before."""
    store = _prepared_lite(tmp_path)
    fake = FakeGemini(FakeClock(), [5.0] * 4)
    fake.no_batch.add("gemini-3.1-flash-lite")
    s = run(store, fake)
    assert s.ok == 40 and len(fake.generated) == 40 and not fake.jobs
    assert [c[1] for c in fake.calls].count("get-model") == 1 and store.load_run().notes.get("batch_refused")


# -- an error that ends the run waits for the requests already sent (the adversary's paid-twice cases) ---------------
def sent_once_or_saved(store: batchify.RunStore, fake: FakeGemini, refused: str = "") -> None:
    """Every real-time request sent (the real service bills it, whether or not the client waits for the answer) was
    sent once and has its answer saved in realtime.jsonl, except those answered with `refused`."""
    sent = [text for _t, what, text in fake.calls if what in ("flex", "generate") and not (refused and refused in text)]
    assert len(sent) == len(set(sent)), "a request was sent twice"
    rt = store.realtime_path
    saved = len(rt.read_text().splitlines()) if rt.exists() else 0
    assert saved == len(sent), f"{len(sent)} request(s) sent (billed), {saved} answer(s) saved"


class _RefusedWhileOthersWait(FakeGemini):
    """generateContent: the first `held` requests wait (in flight, sent: billed by a real service); the next one is
    answered `refusal`, and they are answered a few turns of the event loop later. Without a refusal, as the fake
    does."""

    held = 8
    refusal: Exception | None = None

    async def generate(self, model, request, flex=False):
        if self.refusal is None:
            return await super().generate(model, request, flex)
        if not hasattr(self, "release"):
            self.release, self.started = asyncio.Event(), 0
        text = request["contents"][0]["parts"][0]["text"]
        self.started += 1
        if self.started > self.held:
            self._log("refused", text)
            loop = asyncio.get_running_loop()

            def later(turns: int) -> None:  # a few turns of the loop on: after the refusal has been dealt with
                if turns:
                    loop.call_soon(later, turns - 1)
                else:
                    self.release.set()

            later(5)
            raise self.refusal
        self._log("flex" if flex else "generate", text)
        await self.release.wait()
        self.generated.append(text)
        return {"candidates": [{"content": {"parts": [{"text": '{"ok": true}'}]}, "finishReason": "STOP"}]}


@pytest.mark.parametrize(
    "refusal",
    [
        batchify.AuthError("generate: the service refused the API key (400 API_KEY_INVALID)", code=400),
        batchify.RemoteError("generate: 403 PERMISSION_DENIED (the account)", code=403, status="PERMISSION_DENIED"),
    ],
    ids=["key", "account"],
)
def test_an_error_that_ends_the_run_waits_for_the_requests_in_flight(tmp_path, refusal):
    """The key revoked mid-run (400 API_KEY_INVALID: AuthError) while 8 Flex requests are in flight: it used to be
    raised out of that request's task, and the TaskGroup cancelled the 8 (billed, never saved: the resume paid for
    them again). The run now stops as a graceful stop does (as it already did for an account refusal), then raises
    it; resume with a good key finishes, nothing sent twice."""
    store = prepared(tmp_path, 40, 5, mode="flex")
    fake = _RefusedWhileOthersWait(FakeClock(), [])
    fake.refusal = refusal
    with pytest.raises(batchify.AuthError):
        run(store, fake)
    assert len([c for c in fake.calls if c[1] == "flex"]) == fake.held
    sent_once_or_saved(store, fake)
    fake.refusal = None
    assert run(store, fake).ok == 40
    sent_once_or_saved(store, fake)


class _BatchRefusedWhileFlexWaits(FakeGemini):
    """Creates refused for good (403 billing), the first once `held` Flex requests are in flight; those are answered
    a few turns of the event loop after it. Later Flex requests as the fake answers them."""

    held = 3

    async def generate(self, model, request, flex=False):
        if not hasattr(self, "release"):
            self.release, self.started, self.in_flight = asyncio.Event(), 0, asyncio.Event()
        self.started += 1
        if self.started > self.held:
            return await super().generate(model, request, flex)
        text = request["contents"][0]["parts"][0]["text"]
        self._log("flex", text)
        if self.started == self.held:
            self.in_flight.set()
        await self.release.wait()
        self.generated.append(text)
        return {"candidates": [{"content": {"parts": [{"text": '{"ok": true}'}]}, "finishReason": "STOP"}]}

    async def create_batch(self, model, src, display_name):
        if not hasattr(self, "release"):
            self.release, self.started, self.in_flight = asyncio.Event(), 0, asyncio.Event()
        await self.in_flight.wait()
        self._log("create-403", display_name)
        loop = asyncio.get_running_loop()

        def later(turns: int) -> None:
            if turns:
                loop.call_soon(later, turns - 1)
            else:
                self.release.set()

        later(5)
        raise batchify.BatchRefusedError("create batch: 403 PERMISSION_DENIED billing (scripted)", code=403)


def test_hybrid_batch_refused_for_good_leaves_the_rest_to_the_flex_lanes(tmp_path):
    """Hybrid, batch refused for good (403 billing): it used to be raised out of the batch side's task, which
    cancelled the Flex lanes' requests in flight (billed, never saved), and the fallback sent them again. The batch
    side now ends alone: the lanes take every batch it had not started; every id is sent once."""
    store = prepared(tmp_path, 60, 5, poll_interval=1.0, mode="hybrid", flex_lanes=3, enqueued_limit=2_000, margin=0.0)
    fake = _BatchRefusedWhileFlexWaits(FakeClock(), [5.0] * 40)
    s = run(store, fake)
    assert s.ok == 60 and not fake.jobs
    sent_once_or_saved(store, fake)
    assert store.load_run().notes.get("batch_refused"), "the refusal is not noted"


def test_requests_shed_past_their_tries_are_sent_again_by_resume(tmp_path):
    """Flex sheds every attempt of every request until their tries are spent (best effort: a busy hour), then
    recovers. Each id got an error line, and realtime.jsonl counted it answered: resume (and the same `run` again, and
    the fallback) sent nothing, those ids errors for good (adversary reproducer). A request that got no answer is now
    a NO_ANSWER error, which resume sends again; an answered error (SAFETY, a bad request) still is not."""
    store = prepared(tmp_path, 10, 5, mode="flex", max_attempts=1, retry_scale=0.0)
    fake = FakeGemini(FakeClock(), [])
    fake.shed = set(range(1, 41))  # 10 requests x 4 tries (a shed gets 4x --max-attempts)
    log = Logged()
    s = run(store, fake, reporter=log)
    assert (s.ok, s.errors) == (0, 10) and fake.generate_calls == 40
    rows = [json.loads(line) for line in Path(store.load_run().out).read_text().splitlines()]
    assert all(r["error"].startswith(batchify.NO_ANSWER) for r in rows), rows[0]
    assert store.load_run().status == "interrupted", "a run with requests to send again shows as done"
    assert any("10 request(s) got no answer" in line and "resume fake" in line for line in log.lines), log.lines
    s = run(store, fake)
    assert (s.ok, s.errors) == (10, 0) and len(fake.generated) == 10
    all_ok_once(store, fake, 10)


class _SlowerThanTheTimeout(FakeGemini):
    """The first Flex request of each text times out at the client (FLEX_TIMEOUT_S passed); later ones are answered."""

    async def generate(self, model, request, flex=False):
        text = request["contents"][0]["parts"][0]["text"]
        if "document number 3 " in text and not getattr(self, "answering", False):
            self._log("flex", text)  # sent: the service may answer, and bill, it after the client gave up
            err = batchify.RemoteError("generate: no answer within the client's timeout (scripted)", code=0)
            err.timed_out = True
            raise err
        return await super().generate(model, request, flex)


def test_a_flex_request_that_times_out_is_not_sent_again_by_the_run_but_by_resume(tmp_path):
    """A Flex answer slower than the client's timeout (20 min) was sent again at once, as a network error is, up to 3
    times: each may be answered and billed by the service, none saved (adversary finding 07: paid 3x, no result). It
    is now a NO_ANSWER after one try, saying so; resume sends it again, once the user asks."""
    store = prepared(tmp_path, 10, 5, mode="flex", retry_scale=0.0)
    fake = _SlowerThanTheTimeout(FakeClock(), [])
    s = run(store, fake)
    assert (s.ok, s.errors) == (9, 1)
    assert sum("document number 3 " in text for _t, what, text in fake.calls if what == "flex") == 1
    fake.answering = True
    assert run(store, fake).ok == 10


def test_status_counts_what_the_flex_lanes_answered(tmp_path):
    """A batch drained by the Flex lanes (FLEXED) showed done 0/N, ok 0, failed 0 in status, its table and the
    progress view (adversary finding 14). Its answers are now counted on it when it ends."""
    store = prepared(tmp_path, 60, 5, poll_interval=1.0, mode="hybrid", flex_lanes=2, enqueued_limit=2_000, margin=0.0)
    fake = FakeGemini(FakeClock(), [5.0] * 40)
    fake.shed = {1}  # shed once (asked again): still one answer
    assert run(store, fake).ok == 60
    flexed = [j for j in store.load_jobs() if j.state == JobState.FLEXED]
    assert flexed and all(j.ok == j.request_count and j.failed == 0 for j in flexed), flexed
    assert all(batchify.job_entry(j)["done"] == j.request_count for j in flexed)


class _LongAnswers(FakeGemini):
    """Batch answers that report `output` candidate tokens each (far more than the plan assumes)."""

    output = 5_000

    async def download(self, name):
        async for chunk in super().download(name):
            lines = []
            for line in chunk.splitlines():
                row = json.loads(line)
                row["response"]["usageMetadata"] = {"promptTokenCount": 10, "candidatesTokenCount": self.output}
                lines.append(json.dumps(row).encode())
            yield b"\n".join(lines) + b"\n"


def test_max_cost_stops_creating_jobs_once_answers_cost_more_than_estimated(tmp_path):
    """Answers far longer than the plan assumed: --max-cost was checked only against the plan's estimate before the
    run, so every wave was created and the cap passed several times over, exit 0, no word (adversary finding 10).
    Admission now scales each next job's estimate by what the finished ones actually cost: it stops creating, the
    jobs created are collected, and the run ends with CostCapError (exit 5) saying how to go on."""
    store = prepared(tmp_path, 60, 10, poll_interval=1.0, mode="batch", enqueued_limit=600, margin=0.0)
    plan = store.load_run().plan
    cap = plan["estimated_cost_usd"] * 1.2  # the plan fits; the answers' real cost does not
    run_ = store.load_run()
    store.save_run(dataclasses.replace(run_, options={**run_.options, "max_cost": cap}))
    fake = _LongAnswers(FakeClock(), [5.0] * 10)
    with pytest.raises(batchify.CostCapError, match="resume fake --max-cost"):
        run(store, fake)
    jobs = store.load_jobs()
    assert 0 < len(fake.jobs) < len(jobs), "every job was created (or none)"
    assert all(j.state in (JobState.RESULTS_DOWNLOADED, JobState.UPLOADED, JobState.CREATED) for j in jobs), jobs


class _CostlyFlex(FakeGemini):
    """Answers of 100k input and 10k output tokens each, Flex and batch alike: $0.05625 at gemini-3.8-flash's
    Flex/batch prices until 2026-12-31, $0.1125 from 2027-01-01 (the catalog's dated price change)."""

    usage: ClassVar[dict[str, int]] = {"promptTokenCount": 100_000, "candidatesTokenCount": 10_000}

    async def generate(self, model, request, flex=False):
        return {**await super().generate(model, request, flex), "usageMetadata": self.usage}

    async def download(self, name):
        async for chunk in super().download(name):
            rows = [json.loads(line) for line in chunk.splitlines()]
            yield b"".join(
                json.dumps({**r, "response": {**r["response"], "usageMetadata": self.usage}}).encode() + b"\n" for r in rows
            )


def _prepared_before_new_year(tmp_path: Path, n: int = 20, **opts) -> batchify.RunStore:
    tmp_path.mkdir(exist_ok=True)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"document number {i} " * 5}) + "\n" for i in range(n)))
    store = batchify.RunStore(tmp_path / "st", "fake")
    cfg = batchify.JobConfig(model="gemini-3.8-flash", schema={"type": "object"})
    o = batchify.RunOptions(batch_size=10, calibrate=False, **{"mode": "flex", **opts})
    asyncio.run(batchify.prepare_run(store, inp, cfg, o, today="2026-12-30"))
    return store


def test_a_run_resumed_after_a_dated_price_change_is_costed_and_capped_at_the_prices_in_force(tmp_path):
    """Prepared on 2026-12-30, sent on 2027-01-15 (FakeClock's wall), after gemini-3.8-flash's prices doubled on
    2027-01-01: the plan froze the spec without its dated changes and run_model_spec applied none, so the run was
    costed, and --max-cost enforced, at half what is billed (adversary reproducer 04). The plan now keeps the dated
    changes ahead of its day, and the engine prices at those in force on its wall clock's day."""
    cat = batchify.builtin_catalog()
    new = batchify.request_cost(batchify.resolve_model(cat, "gemini-3.8-flash", "2027-01-15"), _CostlyFlex.usage, "flex")
    old = batchify.request_cost(batchify.resolve_model(cat, "gemini-3.8-flash", "2026-12-30"), _CostlyFlex.usage, "flex")
    assert new == pytest.approx(2 * old)
    store = _prepared_before_new_year(tmp_path / "flex")
    assert batchify.run_model_spec(store.load_run()).input_price == 0.75  # the plan's own figures: prepare's day
    s = run(store, _CostlyFlex(FakeClock(), []))
    assert s.ok == 20 and s.cost_flex_usd == pytest.approx(20 * new)
    # 4 jobs of 10: $2.25 at the old prices, $4.50 billed. --max-cost 3: all 4 fitted; at the prices billed, 2 do
    store = _prepared_before_new_year(
        tmp_path / "batch", 40, mode="batch", max_cost=3.0, max_active_jobs=1, enqueued_limit=10**6, margin=0.0
    )
    fake = _CostlyFlex(FakeClock(), [5.0] * 4)
    with pytest.raises(batchify.CostCapError, match=r"spent \$2\.25"):
        run(store, fake)
    assert len(fake.jobs) == 2 and not fake.generated


def test_the_prices_move_on_when_the_wall_clock_passes_a_change_and_old_plans_load(tmp_path):
    """A process that crosses a dated price change goes on at the new prices (Engine.spec is looked up again when
    the wall clock's day changes); a plan written before the dated changes were kept (no price_changes) takes the
    catalog's dated changes after its prepare day (an older batchify's run resumed after the change was costed and
    capped at half what is billed: the upgrade adversary's reproducer 03), unless the catalog priced its model
    otherwise that day (a model a --models table defined: its plan's prices stay)."""
    store = _prepared_before_new_year(tmp_path)
    plan = store.load_run().plan
    assert [c["from"] for c in plan["model_spec"]["price_changes"]] == ["2027-01-01"]
    wall = [1_798_761_590.0]  # 2026-12-31 23:59:50 UTC
    engine = batchify.Engine(store, None, wall=lambda: wall[0])
    assert (engine.spec.input_price, engine.spec.output_price) == (0.75, 3.75)
    wall[0] += 20
    assert (engine.spec.input_price, engine.spec.output_price, engine.spec.cached_input_price) == (1.5, 7.5, 0.15)
    run_ = store.load_run()
    old_plan = {**run_.plan, "model_spec": {k: v for k, v in run_.plan["model_spec"].items() if k != "price_changes"}}
    store.save_run(dataclasses.replace(run_, plan=old_plan))
    assert batchify.Engine(store, None, wall=lambda: wall[0]).spec.input_price == 1.5
    assert batchify.run_model_spec(store.load_run()).input_price == 0.75  # on its prepare day
    other = {**old_plan, "model_spec": {**old_plan["model_spec"], "input_price": 0.8}}  # not the catalog's model
    store.save_run(dataclasses.replace(run_, plan=other))
    assert batchify.Engine(store, None, wall=lambda: wall[0]).spec.input_price == 0.8
    # a prepare begun before midnight UTC on the change's eve, its run.json made just after: priced the day before
    store.save_run(dataclasses.replace(run_, plan=old_plan, created_at="2027-01-01T00:00:05.000Z"))
    assert batchify.Engine(store, None, wall=lambda: wall[0]).spec.input_price == 1.5


class _HybridTimeout(FakeGemini):
    """Flex: the request of document 59 (the tail: a Flex lane takes it) times out at the client, every time."""

    async def generate(self, model, request, flex=False):
        text = request["contents"][0]["parts"][0]["text"]
        if "document number 59 " in text:
            self._log("flex", text)
            err = batchify.RemoteError("generate: no answer within the client's timeout (scripted)", code=0)
            err.timed_out = True
            raise err
        return await super().generate(model, request, flex)


def test_hybrid_never_sends_a_timed_out_request_again_in_the_same_run(tmp_path):
    """A Flex request that timed out (it may yet be answered and billed) was sent again by the same run twice more: in
    the line-retry batch and by the fallback, each a possible payment (the reviewer's reproducer). The run leaves it
    to resume; it ends not done (interrupted), so every form of resume takes it up; the other Flex-drained batches
    count their answers."""
    store = prepared(tmp_path, 60, 5, poll_interval=1.0, mode="hybrid", flex_lanes=2, enqueued_limit=2_000, margin=0.0)
    fake = _HybridTimeout(FakeClock(), [5.0] * 40)
    s = run(store, fake)
    assert (s.ok, s.errors) == (59, 1)
    sends = [c for c in fake.calls if c[1] == "flex" and "document number 59 " in c[2]]
    assert len(sends) == 1, f"a timed-out request was sent again by the same run: {sends}"
    assert store.load_run().status == "interrupted"
    flexed = [j for j in store.load_jobs() if j.state == JobState.FLEXED]
    assert sum(j.ok for j in flexed) == sum(j.request_count for j in flexed) - 1


class _LongSlowAnswers(_LongAnswers):
    """_LongAnswers whose outputs take `slow` fake seconds to download (a big file): jobs end before their cost shows."""

    slow = 50.0

    async def download(self, name):
        t0 = self.clock.now()
        while self.clock.now() < t0 + self.slow:  # the scheduler's own sleeps move the fake time meanwhile
            await asyncio.sleep(0)
        async for chunk in super().download(name):
            yield chunk


def test_max_cost_waits_for_the_cost_of_a_finished_job_before_creating_the_next(tmp_path):
    """A job seen finished but not downloaded yet counted neither as spent nor as under way: with downloads slower
    than jobs, every job was created at the plan's estimate and the cap passed ~20x (the reviewer's reproducer).
    Admission now waits for a finished job's cost, and counts it as under way meanwhile."""
    store = prepared(tmp_path, 60, 10, poll_interval=1.0, mode="batch", max_active_jobs=1, margin=0.0)
    run_ = store.load_run()
    cap = run_.plan["estimated_cost_usd"] * 1.2
    store.save_run(dataclasses.replace(run_, options={**run_.options, "max_cost": cap}))
    fake = _LongSlowAnswers(FakeClock(), [5.0] * 10)
    with pytest.raises(batchify.CostCapError):
        run(store, fake)
    assert len(fake.jobs) < len(store.load_jobs()), "every job was created"


def test_max_cost_in_flex_mode_is_checked_again_when_a_request_leaves_the_buckets(tmp_path):
    """--max-cost with Flex under a tight RPM limit: every request was checked once, when it took its slot, then waited
    at the RPM bucket; answers showing the real cost (here far above the estimate) arrived while the rest waited, and
    every one of them was sent anyway (40 of 40: ~90x the cap). The cap is checked again as each request leaves
    the buckets: the run stops with CostCapError after the first answers, the rest unsent (resume sends them)."""
    store = prepared(tmp_path, 40, 10, poll_interval=1.0, mode="flex", rpm=10)
    run_ = store.load_run()
    store.save_run(dataclasses.replace(run_, options={**run_.options, "max_cost": run_.plan["estimated_cost_usd"] * 2}))
    fake = _CostlyFlex(FakeClock(), [])
    fake.generate_seconds = 1.0
    with pytest.raises(batchify.CostCapError, match="resume fake --max-cost"):
        run(store, fake)
    assert 1 <= fake.generate_calls <= 3, fake.generate_calls


def test_a_batch_held_back_for_max_cost_then_created_when_answers_cost_less_ends_the_run_ok(tmp_path):
    """Prepared before gemini-3.8-flash's prices doubled, sent after: the plan's estimate fits --max-cost, admission at
    the prices in force holds a batch back; the first answers cost less than estimated, so a later look creates it,
    and every id ends ok. The run still ended "stopped at --max-cost: 0 batch(es) not sent", exit 5 (the upgrade
    adversary's reproducer 05): the held-back mark was never cleared."""
    store = _prepared_before_new_year(tmp_path, 40, mode="batch", enqueued_limit=10**6, margin=0.0)
    run_ = store.load_run()
    store.save_run(dataclasses.replace(run_, options={**run_.options, "max_cost": run_.plan["estimated_cost_usd"] * 1.6}))
    fake = FakeGemini(FakeClock(), [5.0, 5.0, 8.0, 8.0])
    log = Logged()
    s = run(store, fake, reporter=log)
    assert any("not created" in line for line in log.lines), log.lines  # it was held back once
    assert (s.ok, s.errors) == (40, 0) and len(fake.jobs) == 4
    assert store.load_run().status == "done"
