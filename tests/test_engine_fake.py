"""The engine's scheduling rules against a fake backend and a fake clock: exact, no wall-clock thresholds."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from pathlib import Path

import pytest
from fakes import FakeClock, FakeGemini

import batchify


def prepared(tmp_path: Path, n: int, batch_size: int, schema: dict | None = None, **opts) -> batchify.RunStore:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"document number {i} " * 5}) + "\n" for i in range(n)))
    store = batchify.RunStore(tmp_path / "st", "fake")
    cfg = batchify.JobConfig(schema=schema or {"type": "object"})
    opts.setdefault("mode", "batch")
    o = batchify.RunOptions(batch_size=batch_size, calibrate=False, **opts)
    asyncio.run(batchify.prepare_run(store, inp, cfg, o))
    return store


def run_engine(store: batchify.RunStore, fake: FakeGemini, clock: FakeClock) -> batchify.Summary:
    async def go() -> batchify.Summary:
        return await batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep).execute()

    return asyncio.run(go())


@pytest.mark.parametrize("progress", [True, False])
def test_polls_back_off_yet_see_the_end_promptly(tmp_path, progress):
    """At most one get per job per base interval; far fewer than one per base interval over a long job (the
    interval backs off); yet, with progress counts to go by, each end is seen within a base interval of
    happening (polls are timed to the end the counts predict). Without counts the back-off costs latency,
    bounded by the longest interval."""
    base, longest = 2.0, 20.0
    clock = FakeClock()
    store = prepared(tmp_path, 300, 100, poll_interval=base, max_poll_interval=longest)
    fake = FakeGemini(clock, [41.0, 97.0, 153.0])
    fake.progress = progress
    assert run_engine(store, fake, clock).ok == 300
    for name in fake.jobs:
        gets = [t for t, what, n in fake.calls if what == "get" and n == name]
        assert min(b - a for a, b in itertools.pairwise(gets)) >= base  # never two gets within a base interval
        span = fake.end_of(name) - gets[0]
        assert len(gets) <= span / base / 2, (name, len(gets), span)  # backed off: under half of every-interval
        seen = min(t for t in gets if t >= fake.end_of(name)) - fake.end_of(name)
        assert seen <= (1.5 * base if progress else longest), (name, seen)


def test_a_job_whose_requests_are_all_done_is_polled_every_base_interval_until_it_ends(tmp_path):
    """Counts that say every request is done at the first look (a short job: the service then writes its output,
    which takes a while) give no rate to go by: the end is due, so the job is polled every base interval, not
    backed off (measured on bench/vertex_stream.py: the end was seen 13 s late after a 35 s output write)."""
    base, longest = 2.0, 60.0
    clock = FakeClock()
    store = prepared(tmp_path, 100, 100, poll_interval=base, max_poll_interval=longest)
    fake = FakeGemini(clock, [60.0])
    fake.progress, fake.writing = True, 59.5
    assert run_engine(store, fake, clock).ok == 100
    (name,) = fake.jobs
    gets = [t for t, what, n in fake.calls if what == "get" and n == name]
    assert min(b - a for a, b in itertools.pairwise(gets)) >= base
    seen = min(t for t in gets if t >= fake.end_of(name)) - fake.end_of(name)
    assert seen <= 1.5 * base, seen


def test_the_error_check_does_not_read_back_a_batch_answered_all_ok(tmp_path):
    """unresolved() (the check before a line retry or the real-time fallback) skips a batch whose first attempt
    answered every request ok: its results are not read (on --backend vertex each read is a download of the
    whole results object). Shown by removing one such batch's results: the check still finds nothing to do."""
    clock = FakeClock()
    store = prepared(tmp_path, 30, 10)
    fake = FakeGemini(clock, [5.0, 6.0, 7.0])
    assert run_engine(store, fake, clock).ok == 30
    engine = batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep)
    b1 = engine.jobs["b0001"]
    assert (b1.ok, b1.failed, b1.request_count) == (10, 0, 10)
    store.result_path(b1).unlink()
    assert engine.unresolved() == set()
    store.save_job(dataclasses.replace(b1, ok=9, failed=1))  # not all ok: read back (and, gone, unresolved)
    engine = batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep)
    assert engine.unresolved() == set(range(10))


def test_the_closing_report_is_counted_by_the_merge_not_read_back(tmp_path, monkeypatch):
    """The run's closing analytics (the schema's enum and boolean fields, error kinds) come from the merge's own
    count, recorded in run.json: the results file (on gs://, a download of all of it) is not read again."""
    clock = FakeClock()
    store = prepared(tmp_path, 30, 10, schema={"type": "object", "properties": {"ok": {"type": "boolean"}}})
    summary = run_engine(store, FakeGemini(clock, [5.0, 6.0, 7.0]), clock)
    read_back = batchify.analytics(store.state_dir, "fake")
    assert read_back["fields"] == {"ok": {"true": 30}}

    def no_read(*a, **k):
        raise AssertionError("the results file was read again")

    monkeypatch.setattr(batchify, "analytics", no_read)
    assert batchify.closing_analytics(store.state_dir, summary) == {"fields": read_back["fields"], "error_kinds": {}}


@pytest.mark.parametrize("poll", [2.0, 30.0])
def test_a_job_seen_finished_is_downloaded_in_the_same_pass(tmp_path, poll):
    """End-to-download lag is the poll that sees the end, not one more poll interval (issue 13.11)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 10, poll_interval=poll)
    fake = FakeGemini(clock, [7.0, 95.0])
    s = run_engine(store, fake, clock)
    assert s.ok == 20
    for name in fake.jobs:
        seen = min(t for t, what, n in fake.calls if what == "get" and n == name and t >= fake.end_of(name))
        downloaded = min(t for t, what, n in fake.calls if what == "download" and n.endswith(name.split("/")[1]))
        assert downloaded == seen, (name, seen, downloaded)


def test_admission_never_passes_the_limit_and_fills_it_again_when_a_job_ends(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 40, 10, poll_interval=5.0, enqueued_limit=10**6, margin=0.0)
    run = store.load_run()
    per_batch = run.plan["batch_ranges"][0][2]
    # room for exactly two batches at once
    run.plan["effective_limit"] = 2 * per_batch
    store.save_run(run)
    fake = FakeGemini(clock, [50.0, 20.0, 30.0, 10.0])
    assert run_engine(store, fake, clock).ok == 40
    creates = [(t, n) for t, what, n in fake.calls if what == "create"]
    assert len(creates) == 4
    for t, _ in creates:  # at every create, at most one other job is live
        live = [n for n in fake.jobs if fake.jobs[n]["end"] > t and any(c == n and ct <= t for ct, c in creates)]
        assert len(live) <= 2
    # the 3rd batch goes in when the 2nd job (20 s) is seen finished, not later
    second_end = fake.end_of("batches/1")
    seen = min(t for t, what, n in fake.calls if what == "get" and n == "batches/1" and t >= second_end)
    assert creates[2][0] == seen


@pytest.mark.parametrize("duration", [3.0, 7.0])
def test_told_the_true_limit_a_run_is_no_slower_than_learning_it_from_429s(tmp_path, duration):
    """Issue 13: told the account's real enqueued-token limit, a run ends no later than one told far more,
    which finds the limit through refused creates. The fake shows no progress counts (no end to time a poll
    by), and its nine jobs of `duration` base intervals make three waves under the limit."""
    ends = {}
    for told in (True, False):
        clock = FakeClock()
        (tmp_path / str(told)).mkdir()
        store = prepared(tmp_path / str(told), 90, 10, poll_interval=1.0, enqueued_limit=10**6, margin=0.0)
        if told:
            run = store.load_run()
            run.plan["effective_limit"] = 3 * max(r[2] for r in run.plan["batch_ranges"])
            store.save_run(run)
        fake = FakeGemini(clock, [duration] * 9, limit=30)  # the fake counts a request as one token: 3 jobs at once
        assert run_engine(store, fake, clock).ok == 90
        refused = [n for _t, what, n in fake.calls if what == "create-429"]
        assert bool(refused) is not told  # told: never above the limit; learned: it met the limit
        assert sorted(fake.creates_by_display_name().values()) == [1] * 9, "a job created twice"
        ends[told] = max(t for t, what, _n in fake.calls if what == "download")
    assert ends[True] <= ends[False], ends


@pytest.mark.parametrize("yields", [0, 1, 3, 10])
def test_hybrid_never_pays_for_a_request_twice_when_flex_claims_during_a_create(tmp_path, yields):
    """A Flex lane claims a batch from the tail while the scheduler awaits an earlier create; the scheduler
    must not then create the batch the lane took (CI caught it: "illegal transition PENDING -> FLEXED")."""
    clock = FakeClock()
    store = prepared(tmp_path, 40, 2, poll_interval=5.0, mode="hybrid", flex_lanes=3, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [30.0] * 20)
    fake.create_yields = yields
    fake.generate_seconds = 0.0
    s = run_engine(store, fake, clock)
    assert s.ok == 40
    paid = fake.batch_texts() + fake.generated
    assert sorted(paid) == sorted(set(paid)), "a request was paid for twice"
    assert len(paid) == 40
    jobs = {j.name: j for j in store.load_jobs()}
    assert any(j.state == batchify.JobState.FLEXED for j in jobs.values())
    assert any(j.state == batchify.JobState.RESULTS_DOWNLOADED for j in jobs.values())
    # each batch owned by one lane, the Flex lanes from the tail (was tests/test_models_e2e.py's hybrid run)
    flexed = {n for n, j in jobs.items() if j.state == batchify.JobState.FLEXED}
    assert all(jobs[n].lane == "flex" and not jobs[n].remote_job for n in flexed)
    assert len(fake.jobs) + len(flexed) == len(jobs) and max(int(n[1:]) for n in flexed) == len(jobs)


def _waves_overlap(store: batchify.RunStore, fake: FakeGemini) -> bool:
    """Was a job of a later wave created before every job of an earlier wave had ended (in fake time)?"""
    wave_of = {j.display_name: j.wave for j in store.load_jobs()}
    created = {n: t for t, what, n in fake.calls if what == "create"}
    ends = {fake.jobs[n]["dn"]: fake.end_of(n) for n in fake.jobs}
    starts = {fake.jobs[n]["dn"]: created[n] for n in fake.jobs}
    return any(starts[b] < ends[a] for a in ends for b in starts if wave_of[b] > wave_of[a])


@pytest.mark.parametrize("barrier", [False, True])
def test_rolling_admission_overlaps_waves_and_barrier_does_not(tmp_path, barrier):
    """Rolling admission creates a batch the moment it fits, so a later wave starts while an earlier one
    still runs; --barrier waits for the whole earlier wave. Both keep every create under the limit."""
    clock = FakeClock()
    store = prepared(tmp_path, 60, 10, poll_interval=5.0, enqueued_limit=10**6, margin=0.0, barrier=barrier)
    run = store.load_run()
    per_batch = max(r[2] for r in run.plan["batch_ranges"])
    run.plan["effective_limit"] = 2 * per_batch  # two batches at once: three waves of two
    store.save_run(run)
    jobs = store.load_jobs()
    for j in jobs:  # the waves as the planner would number them for that limit
        store.save_job(batchify.dataclasses.replace(j, wave=(j.index - 1) // 2))
    fake = FakeGemini(clock, [10.0, 60.0, 10.0, 60.0, 10.0, 60.0])
    assert run_engine(store, fake, clock).ok == 60
    assert _waves_overlap(store, fake) is (not barrier)
    for t, what, _n in fake.calls:
        if what == "create":
            live = [n for n in fake.jobs if fake.jobs[n]["end"] > t and min(c for c, w, x in fake.calls if x == n) <= t]
            assert len(live) <= 2


def test_a_batch_bigger_than_the_real_limit_is_split_and_the_limit_learned(tmp_path):
    """Told a limit far above the account's, every batch is refused (429) with nothing of the run enqueued:
    the refused batch is cut in halves (again, until the parts fit), the limit learned and kept in the plan
    for `status`, and every request is created exactly once, never above the real limit."""
    clock = FakeClock()
    store = prepared(tmp_path, 40, 20, poll_interval=5.0, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [10.0] * 40, limit=8)  # the fake counts a request as one token
    s = run_engine(store, fake, clock)
    assert s.ok == 40
    texts = fake.batch_texts()
    assert sorted(texts) == sorted(set(texts)) and len(texts) == 40, "every request in exactly one created job"
    refused = [n for _t, what, n in fake.calls if what == "create-429"]
    assert refused, "the real limit was met"
    jobs = {j.name: j for j in store.load_jobs()}
    assert jobs["b0001"].state == batchify.JobState.SPLIT and jobs["b0002"].state == batchify.JobState.SPLIT
    parts = [j for j in jobs.values() if j.part]
    assert all(j.request_count <= 8 for j in parts if j.state == batchify.JobState.RESULTS_DOWNLOADED)
    assert len({j.display_name for j in jobs.values()}) == len(jobs)
    run = store.load_run()
    assert "refused" in run.plan["limit_learned"] and run.plan["effective_limit"] < 10**6
    assert batchify.run_status(tmp_path / "st", "fake")["runs"][0]["plan"]["limit_learned"] == run.plan["limit_learned"]


def test_a_crash_between_split_and_parts_makes_the_same_parts_on_resume(tmp_path):
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=5.0, enqueued_limit=10**6, margin=0.0)
    (job,) = store.load_jobs()
    now = batchify.utcnow()
    store.save_job(batchify.advance(job, batchify.JobState.SPLIT, now, split_cap=job.tokens // 3))  # and then the crash
    fake = FakeGemini(clock, [10.0] * 10)
    assert run_engine(store, fake, clock).ok == 20
    texts = fake.batch_texts()
    assert sorted(texts) == sorted(set(texts)) and len(texts) == 20
    assert len([j for j in store.load_jobs() if j.part]) == len(fake.jobs) >= 3


def test_a_flex_shed_storm_backs_the_rate_off_and_it_recovers(tmp_path):
    """Flex sheds calls 20-199 with 503 (a storm over several rate windows): every id still ends ok (each shed
    request goes back with back-off), the lane's rate drops while the storm lasts (once a window) and climbs
    back once answers come again."""
    clock = FakeClock()
    store = prepared(
        tmp_path, 200, 200, mode="flex", poll_interval=1.0, retry_scale=0.01, rpm=6000, concurrency=8, rate_window=0.25
    )
    fake = FakeGemini(clock, [])
    fake.generate_seconds = 0.5
    fake.shed = set(range(20, 200))
    engine = batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep)
    factors: list[float] = []
    fake.observe = lambda: factors.append(engine._senders["flex"].rpm_l.factor)
    s = asyncio.run(engine.execute())
    assert s.ok == 200 and s.by_source == {"flex": 200}
    assert engine._senders["flex"].view.shed == 180
    # at least two cuts (x0.8 each; four on a quiet machine): the windows are counted on the fake clock, but the
    # lanes' wake-up still waits on a real-time timeout, so under load one window's cut can be missed (seen in CI)
    assert min(factors) < 0.7, "sustained shedding lowers the rate"
    assert engine._senders["flex"].rpm_l.factor > min(factors) + 0.2, "answers raise it again"
    assert len(fake.generated) == 200 and len(set(fake.generated)) == 200


def test_a_graceful_stop_keeps_every_answer_in_flight_and_sends_nothing_new(tmp_path):
    """GracefulStop.request() in a hybrid run while Flex requests are in flight: no request is sent after it, every
    one sent is answered and saved, the batch side stops, the run ends Interrupted; its resume pays for no
    request twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 40, 2, poll_interval=5.0, mode="hybrid", flex_lanes=3, enqueued_limit=10**6, margin=0.0)
    fake = FakeGemini(clock, [30.0] * 20)
    fake.generate_seconds = 50.0
    stop = batchify.GracefulStop()
    waited_for: list[int] = []
    fake.observe = lambda: waited_for.append(stop.request()) if fake.generate_calls == 4 else None
    engine = batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep, stop=stop)
    with pytest.raises(batchify.Interrupted) as e:
        asyncio.run(engine.execute())
    assert fake.generate_calls == 4, "a request was sent after the stop"
    kept = [json.loads(line) for line in store.realtime_path.read_text().splitlines()]
    assert len(kept) == len(fake.generated) == 4, "an answer paid for was not saved"
    assert waited_for[0] >= 1 and e.value.kept == waited_for[0]
    assert store.load_run().status == "interrupted"
    s = run_engine(store, fake, clock)
    assert s.ok == 40
    paid = fake.batch_texts() + fake.generated
    assert sorted(paid) == sorted(set(paid)) and len(paid) == 40, "a request was paid for twice"


class _ScriptedGets(FakeGemini):
    """A fake whose job gets answer the scripted errors first (codes), then as the fake does."""

    def __init__(self, clock: FakeClock, durations: list[float], codes: list[int]):
        super().__init__(clock, durations)
        self.codes = list(codes)

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        if self.codes:
            code = self.codes.pop(0)
            self._log("get", name)
            raise batchify.RemoteError(f"scripted {code}", code=code)
        return await super().get_batch(name)


@pytest.mark.parametrize("codes", [[403, 503, 403, 503, 403], [404, 503, 404, 503, 404], [403, 404, 403, 404, 403, 404]])
def test_a_job_counts_as_refused_or_gone_only_on_answers_in_a_row(tmp_path, codes):
    """Refusals (400/403) and 404s scattered among other answers never add up to FAILED: a job resubmitted while it
    still runs is paid twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_poll_interval=1.0)
    fake = _ScriptedGets(clock, [60.0], codes)
    assert run_engine(store, fake, clock).ok == 20
    assert len(fake.jobs) == 1, "a live job was created again"
    assert [j.state for j in store.load_jobs()] == [batchify.JobState.RESULTS_DOWNLOADED]


class _DownloadsFail(FakeGemini):
    """Every download answered `code` (a 503 by default: the service's bad moment)."""

    code, text = 503, "503 UNAVAILABLE (scripted)"

    async def download(self, name: str):  # type: ignore[override]
        self._log("download", name)
        raise batchify.RemoteError(self.text, code=self.code)
        yield b""


def test_a_cut_results_file_is_not_marked_lost_on_a_transient_error(tmp_path):
    """Repair downloads a cut results file again; a 503 there is the service's bad moment, not a gone output: the run
    stops before anything is sent (marking the ids lost would send them again, paid twice), and a later resume mends."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0)
    fake = FakeGemini(clock, [5.0])
    assert run_engine(store, fake, clock).ok == 20
    res = store.dir / "results" / "b0001.jsonl"
    whole = res.read_bytes()
    res.write_bytes(whole[: len(whole) // 2])
    failing = _DownloadsFail(clock, [5.0])
    failing.jobs, failing.files = fake.jobs, fake.files
    with pytest.raises(batchify.RemoteError, match="resume again later"):
        run_engine(store, failing, clock)
    assert failing.generate_calls == 0 and fake.generate_calls == 0
    assert "result lost" not in res.read_text()
    assert run_engine(store, fake, clock).ok == 20


class _OutputNotReadable(_DownloadsFail):
    code, text = 403, "403 PERMISSION_DENIED (scripted: SUCCEEDED, output not readable yet)"


def test_a_succeeded_job_whose_output_stays_unreadable_is_waited_for_an_hour_then_sent_again(tmp_path):
    """A SUCCEEDED job's output refused (403/404) is tried again, backing off, for OUTPUT_PATIENCE_S of the clock,
    and only then counts as gone (after one more look at the job): FAILED and sent again, said loudly. It used
    to fail over after 3 rounds (40 s of a late output cost every request 3-4 times); an output gone for good no
    longer stops the run at each resume either."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=2)
    refusing = _OutputNotReadable(clock, [5.0, 5.0])
    s = run_engine(store, refusing, clock)
    assert s.ok == 0 and s.errors == 20 and refusing.generate_calls == 0
    tries = [t for t, what, _ in refusing.calls if what == "download"]
    creates = [t for t, what, _ in refusing.calls if what == "create"]
    assert len(creates) == 2 and creates[1] - creates[0] >= batchify.OUTPUT_PATIENCE_S  # sent again only after the hour
    assert all(b - a <= batchify.MAX_POLL_INTERVAL + 1.0 for a, b in itertools.pairwise(tries))  # tried all along
    jobs = {j.name: j for j in store.load_jobs()}
    assert jobs["b0001"].state == batchify.JobState.FAILED and "gone: it could not be downloaded for 60 min" in (
        jobs["b0001"].error or ""
    )


class _NoOutputNamed(FakeGemini):
    """The first job created reads SUCCEEDED but names no output, ever (Vertex: no outputInfo and nothing under its
    prefix); past three patiences the test stops (the engine used to poll it for ever)."""

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        if self.clock.now() > 3 * batchify.OUTPUT_PATIENCE_S:
            raise AssertionError("still polling a SUCCEEDED job that names no output: no bound")
        rj = await super().get_batch(name)
        first = next(iter(self.jobs))
        return dataclasses.replace(rj, output_file=None) if name == first else rj


def test_a_succeeded_job_naming_no_output_is_waited_for_a_bounded_time_then_sent_again(tmp_path):
    """A job SUCCEEDED at the service whose output is nowhere to be found is looked for at each poll, for
    OUTPUT_PATIENCE_S (like an output refused), then counts as gone: FAILED and sent again, said loudly; it used to be
    polled for ever, silently (the progress bar full, the run never ending)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=2)
    fake = _NoOutputNamed(clock, [5.0, 5.0])
    s = run_engine(store, fake, clock)
    assert s.ok == 20
    creates = [t for t, what, _ in fake.calls if what == "create"]
    assert len(creates) == 2 and creates[1] - creates[0] >= batchify.OUTPUT_PATIENCE_S
    jobs = {j.name: j for j in store.load_jobs()}
    assert jobs["b0001"].state == batchify.JobState.FAILED
    assert "SUCCEEDED without any output found for 60 min" in (jobs["b0001"].error or "")


@pytest.mark.parametrize(
    ("transient", "rounds", "failing_for", "refused_for", "verdict"),
    [
        (False, 1, 0.0, 0.0, ("again", 30.0)),  # a refusal: the poll interval first
        (False, 2, 30.0, 30.0, ("again", 60.0)),  # doubling
        (False, 5, 500.0, 500.0, ("again", 300.0)),  # at most the longest poll interval
        (False, 9, 3500.0, 3500.0, ("again", 100.0)),  # never past the end of the patience
        (False, 9, 3600.0, 3600.0, ("gone", 0.0)),  # refused for the whole patience: gone (sent again, said loudly)
        (False, 9, 9000.0, 100.0, ("again", 300.0)),  # an hour on the way, then a refusal: its own patience starts
        (True, 9, 3600.0, None, ("silent", 0.0)),  # an hour on the way: the run stops, resumably, the job kept
        (True, 9, 3600.0, 3600.0, ("silent", 0.0)),  # the last failure on the way: never "gone"
        (True, 9, 3500.0, None, ("again", 100.0)),  # never past the end of the silence
    ],
)
def test_download_failure_verdict_table(transient, rounds, failing_for, refused_for, verdict):
    assert batchify.download_failure_verdict(transient, rounds, failing_for, refused_for, 30.0, 300.0, 3600.0, 3600.0) == verdict


class _Offline(FakeGemini):
    """Every call fails on the way (code 0: the network is down) while the clock is inside `dark`; the output and the
    jobs stay intact at the service. `dark_from_first_download`: the outage begins at the first download."""

    dark: tuple[float, float] = (0.0, 0.0)
    dark_from_first_download = False

    def _down(self, what: str, name: str) -> None:
        if self.dark[0] <= self.clock.now() < self.dark[1]:
            self._log(f"{what}-down", name)
            raise batchify.RemoteError(f"{what}: network error (scripted: offline)", code=0)

    async def upload(self, path: Path, display_name: str) -> batchify.RemoteFile:
        self._down("upload", display_name)
        return await super().upload(path, display_name)

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        self._down("get", name)
        return await super().get_batch(name)

    async def download(self, name: str):  # type: ignore[override]
        if self.dark_from_first_download and self.dark == (0.0, 0.0):
            self.dark = (self.clock.now(), self.clock.now() + 3_700.0)
        self._down("download", name)
        async for chunk in super().download(name):
            yield chunk


def test_an_hour_offline_with_a_finished_job_stops_the_run_and_never_pays_twice(tmp_path):
    """A SUCCEEDED job's output failing to download on the way (the network down a little over an hour, the output
    intact at the service) stops the run, resumably (ServiceSilent, exit 3), the job kept SUCCEEDED; resume downloads
    it. It used to count toward OUTPUT_PATIENCE_S like a refusal: the job FAILED after the hour, its paid answers
    thrown away, its requests sent again (paid twice; in batch mode all lost once the retries' uploads failed too)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0)
    fake = _Offline(clock, [9.0, 9.0, 9.0])
    fake.dark_from_first_download = True
    with pytest.raises(batchify.ServiceSilent, match=r"b0001.*could not be downloaded for 6\d min.*batchify resume fake"):
        run_engine(store, fake, clock)
    assert {j.name: j.state for j in store.load_jobs()} == {"b0001": batchify.JobState.SUCCEEDED}
    clock.t = fake.dark[1]  # the network is back: the user resumes
    assert run_engine(store, fake, clock).ok == 20
    assert len([c for c in fake.calls if c[1] == "create"]) == 1 and fake.generate_calls == 0


def test_an_upload_outage_spends_no_attempt_and_the_run_goes_on_when_it_ends(tmp_path):
    """Uploads failing on the way (a laptop awake before its network, ~90 s) put the job back to CREATED and are tried
    again after the uploader's back-off: no attempt is spent, the job is created once, every answer comes back. They
    used to fail the job at once: every --max-attempts spent in the outage, the whole run errors."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=3)
    fake = _Offline(clock, [5.0, 5.0, 5.0])
    fake.dark = (0.0, 90.0)
    s = run_engine(store, fake, clock)
    assert s.ok == 20 and s.errors == 0
    creates = [t for t, what, _ in fake.calls if what == "create"]
    assert len(creates) == 1 and creates[0] >= 90.0
    assert [j.name for j in store.load_jobs()] == ["b0001"]  # no retry job: no attempt was spent


def test_uploads_failing_for_an_hour_stop_the_run_and_resume_finishes(tmp_path):
    """No failure waits forever: uploads failing on the way for POLL_SILENCE_S stop the run (ServiceSilent), nothing
    created and no attempt spent; resume, once the network is back, finishes it."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0)
    fake = _Offline(clock, [5.0])
    fake.dark = (0.0, 10_000.0)
    with pytest.raises(batchify.ServiceSilent, match=r"uploads failed on the way for 6\d min.*Nothing was created"):
        run_engine(store, fake, clock)
    assert fake.jobs == {} and [j.state for j in store.load_jobs()] == [batchify.JobState.CREATED]
    clock.t = 10_000.0
    assert run_engine(store, fake, clock).ok == 20


class _EndedLongAgo(_OutputNotReadable):
    """The job ended three days ago, says the service (endTime), and its output is refused: deleted by retention."""

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        rj = await super().get_batch(name)
        return (
            dataclasses.replace(rj, ended_at=self.clock.wall() - 3 * 86_400.0) if rj.state == batchify.JobState.SUCCEEDED else rj
        )


def test_an_output_refused_of_a_job_that_ended_days_ago_is_gone_at_once(tmp_path):
    """A resume days later: the service says the job ended longer ago than it keeps files (OUTPUT_RETENTION_S), and
    its output is refused: it is gone, sent again at once (said loudly), not after an hour of retries."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=2)
    fake = _EndedLongAgo(clock, [5.0, 5.0])
    asyncio.run(batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep, wall=clock.wall).execute())
    creates = [t for t, what, _ in fake.calls if what == "create"]
    assert len(creates) == 2 and creates[1] - creates[0] < 60.0
    assert any("ended over 48 h ago (the service's endTime)" in (j.error or "") for j in store.load_jobs()), store.load_jobs()


class _OutputRefusedThenGetsDown(_OutputNotReadable):
    """The output refused for the whole patience, and the job's own get failing on the way at that moment."""

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        if self.clock.now() >= batchify.OUTPUT_PATIENCE_S:
            self._log("get-down", name)
            raise batchify.RemoteError("get: network error (scripted)", code=0)
        return await super().get_batch(name)


def test_no_answer_from_the_jobs_get_is_no_proof_its_output_is_gone(tmp_path):
    """After OUTPUT_PATIENCE_S of refused downloads, the service is asked once more for the job; that look failing on
    the way does not fail the job (it used to: taken as gone, sent again): it is looked at again, as a poll is, and
    after POLL_SILENCE_S of that the run stops, resumably, the job kept."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=2)
    fake = _OutputRefusedThenGetsDown(clock, [5.0, 5.0])
    with pytest.raises(batchify.ServiceSilent, match=r"b0001 .*no poll of it was answered for 6\d min"):
        run_engine(store, fake, clock)
    assert clock.now() >= batchify.OUTPUT_PATIENCE_S + batchify.POLL_SILENCE_S  # the look had its own hour
    assert len([c for c in fake.calls if c[1] == "create"]) == 1
    assert [j.state for j in store.load_jobs()] == [batchify.JobState.SUCCEEDED]


class _StaleReplica(FakeGemini):
    """Every other get of a running job answers PENDING, as a replica behind would."""

    async def get_batch(self, name: str) -> batchify.RemoteJob:
        rj = await super().get_batch(name)
        gets = sum(1 for _, what, n in self.calls if what == "get" and n == name)
        if rj.state == batchify.JobState.RUNNING and gets % 2 == 0:
            return dataclasses.replace(rj, state=batchify.JobState.PENDING)
        return rj


def test_a_stale_pending_after_running_is_ignored_not_a_crash(tmp_path):
    """RUNNING -> PENDING is no transition: it used to stop the run with "illegal transition" (exit 3)."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 10, poll_interval=1.0, max_poll_interval=1.0)
    fake = _StaleReplica(clock, [30.0, 30.0])
    assert run_engine(store, fake, clock).ok == 20
    assert len([c for c in fake.calls if c[1] == "get"]) >= 10 and len([c for c in fake.calls if c[1] == "create"]) == 2


@pytest.mark.parametrize(
    ("current", "remote", "kept"),
    [
        ("RUNNING", "PENDING", "RUNNING"),  # stale
        ("PENDING", "RUNNING", "RUNNING"),
        ("RUNNING", "SUCCEEDED", "SUCCEEDED"),
        ("SUCCEEDED", "RUNNING", "SUCCEEDED"),  # stale, after the end
        ("RUNNING", "RUNNING", "RUNNING"),
    ],
)
def test_observed_state_table(current, remote, kept):
    S = batchify.JobState
    assert batchify.observed_state(S(current), S(remote)) == S(kept)


@pytest.mark.parametrize(
    ("value", "state"),
    [(None, "PENDING"), ("", "PENDING"), ("BATCH_STATE_RUNNING", "RUNNING"), ("JobState.JOB_STATE_SUCCEEDED", "SUCCEEDED")],
)
def test_a_missing_state_is_pending(value, state):
    """proto3 JSON leaves out an enum's value 0 (BATCH_STATE_UNSPECIFIED): a create answered without a state
    used to stop the run ("unknown remote batch state 'None'") after the job was created."""
    assert batchify.parse_remote_state(value) == batchify.JobState(state)


def test_a_listed_job_in_a_state_batchify_does_not_know_does_not_break_the_list():
    assert batchify.listed_state("BATCH_STATE_SOMETHING_NEW") == batchify.JobState.PENDING
    with pytest.raises(batchify.StateError):
        batchify.parse_remote_state("BATCH_STATE_SOMETHING_NEW")


class _CutDownloads(FakeGemini):
    """The first `cut` downloads of each output answer 200 with half the lines (or none)."""

    def __init__(self, clock: FakeClock, durations: list[float], cut: int, keep: float):
        super().__init__(clock, durations)
        self.progress, self.cut, self.keep = True, cut, keep  # progress: batchStats counts, as the service gives

    async def download(self, name: str):  # type: ignore[override]
        whole = b"".join([chunk async for chunk in super().download(name)])
        if sum(1 for _, what, n in self.calls if what == "download" and n == name) > self.cut:
            yield whole
            return
        lines = whole.splitlines(keepends=True)
        yield b"".join(lines[: int(len(lines) * self.keep)])


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_an_output_shorter_than_its_batch_stats_is_downloaded_again(tmp_path, keep):
    """An empty or cut 200 to a download is not the output (adversarial pass F3): its ids used to be marked
    missing and sent again (Flex or a retry job: paid twice). Now fewer lines than batchStats counts is a failed
    download, tried again; nothing is sent twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0)
    fake = _CutDownloads(clock, [5.0], cut=1, keep=keep)
    assert run_engine(store, fake, clock).ok == 20
    assert len([c for c in fake.calls if c[1] == "create"]) == 1 and fake.generate_calls == 0
    assert len([c for c in fake.calls if c[1] == "download"]) == 2


def test_an_output_that_stays_short_is_taken_as_it_is_after_some_rounds(tmp_path):
    """A service whose counts never match its output (or one that lost lines for good) is not waited for an
    hour: after SHORT_OUTPUT_ROUNDS downloads the output is taken as it is, its missing ids retried."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=1)
    fake = _CutDownloads(clock, [5.0], cut=10**6, keep=0.5)
    s = run_engine(store, fake, clock)
    assert s.ok == 10 and len([c for c in fake.calls if c[1] == "download"]) == batchify.SHORT_OUTPUT_ROUNDS
    (store.dir / "results" / "b0001.jsonl").unlink()  # lost: repair downloads it again and takes it as it was
    assert run_engine(store, fake, clock).ok == 10  # (it used to ask for the batchStats' count forever: exit 3)


@pytest.mark.parametrize(
    ("stats", "requests", "want"),
    [
        ({}, 20, 0),  # no counts: no check
        ({"successfulRequestCount": 18, "failedRequestCount": 2}, 20, 20),
        ({"successfulRequestCount": 20, "failedRequestCount": 2}, 20, 20),  # counts that overlap: at most the requests
        ({"successfulRequestCount": 5}, 20, 5),
    ],
)
def test_expected_output_lines_table(stats, requests, want):
    assert batchify.expected_output_lines(stats, requests) == want


class _HalfRefused(FakeGemini):
    """Every output line is billed (100 prompt tokens); the even keys are answered finishReason SAFETY."""

    async def download(self, name: str):  # type: ignore[override]
        job = self.jobs[f"batches/{name.rsplit('-', 1)[1]}"]
        self._log("download", name)
        out = bytearray()
        for line in open(self.files[job["src"]], "rb"):
            key = batchify.orjson.loads(line)["key"]
            ok = int(key) % 2 == 1
            cand = (
                {"content": {"parts": [{"text": '{"ok": true}'}]}, "finishReason": "STOP"} if ok else {"finishReason": "SAFETY"}
            )
            usage = {"promptTokenCount": 100, "candidatesTokenCount": 5 if ok else 0, "totalTokenCount": 105 if ok else 100}
            out += batchify.orjson.dumps({"key": key, "response": {"candidates": [cand], "usageMetadata": usage}}) + b"\n"
        yield bytes(out)


def test_the_closing_report_counts_batch_answers_billed_and_done_again(tmp_path):
    """A batch line answered (and billed) but not usable, then answered again by the Flex fallback, is paid twice:
    the report counted only the row kept (the adversarial pass's F9), understating the money spent."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=1, mode="auto")  # one wave: batch + fallback
    fake = _HalfRefused(clock, [5.0])
    s = run_engine(store, fake, clock)
    assert s.ok == 20 and s.by_source == {"batch": 10, "flex": 10} and fake.generate_calls == 10
    assert s.usage["promptTokenCount"] == 20 * 100 + 10 * 10  # every batch line billed, and the Flex answers


def test_the_retry_note_is_the_commands_own_and_is_reset_after_it():
    """The CLI's run sets RETRY_NOTE to its log for that run only: a later call (a test, a library caller in the
    same process) must not log into a reporter that is gone."""
    seen: list[object] = []

    async def work() -> str:
        seen.append(batchify.RETRY_NOTE.get())
        return "done"

    assert batchify._run_stoppable(work(), batchify.GracefulStop(), print) == "done"
    assert seen == [print] and batchify.RETRY_NOTE.get() is None


class _LateCreates(FakeGemini):
    """A fake whose scripted creates (1-based, in call order) answer 504 yet take effect: the job is made, and
    batches.list shows it only `lag` fake seconds later (a create that committed after its answer, a list that lags)."""

    def __init__(self, clock: FakeClock, durations: list[float], late: set[int], lag: float):
        super().__init__(clock, durations)
        self.late, self.lag, self.creates = late, lag, 0
        self.hidden: dict[str, float] = {}  # job -> fake time it is listed from

    async def create_batch(self, model: str, src, display_name: str) -> batchify.RemoteJob:
        self.creates += 1
        rj = await super().create_batch(model, src, display_name)
        if self.creates in self.late:
            self.hidden[rj.name] = self.clock.now() + self.lag
            raise batchify.RemoteError("create batch: 504 DEADLINE_EXCEEDED (fake, took effect)", code=504)
        return rj

    async def list_batches(self) -> list[batchify.RemoteJob]:
        return [r for r in await super().list_batches() if self.hidden.get(r.name, 0.0) <= self.clock.now()]


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def update(self, view) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)


def _run_logged(store: batchify.RunStore, fake: FakeGemini, clock: FakeClock) -> tuple[batchify.Summary, _Log]:
    log = _Log()

    async def go() -> batchify.Summary:
        return await batchify.Engine(store, fake, clock=clock.now, sleep=clock.sleep, reporter=log).execute()

    return asyncio.run(go()), log


@pytest.mark.parametrize("lag", [3.0, 60.0])
def test_a_create_that_answered_504_but_took_effect_is_adopted_not_created_again(tmp_path, lag):
    """F2: a create answered 504 that the service carried out (listed only `lag` s later) is found by display name
    within CREATE_SETTLE_S and adopted: one job per batch, none paid twice."""
    clock = FakeClock()
    store = prepared(tmp_path, 30, 10, poll_interval=1.0)
    fake = _LateCreates(clock, [30.0] * 6, late={1}, lag=lag)
    summary, log = _run_logged(store, fake, clock)
    assert summary.ok == 30
    assert len(fake.jobs) == 3, "a batch was created twice"
    assert not [c for c in fake.calls if c[1] == "cancel"]
    assert any("took effect: adopted batches/0" in line for line in log.lines), log.lines
    lists = [t for t, what, _ in fake.calls if what == "list"]
    assert len(lists) <= 8, lists  # looked for with back-off, not at every pass


def test_a_create_that_took_effect_after_the_window_is_cancelled_and_said(tmp_path):
    """F2's safety net: listed only after CREATE_SETTLE_S, the first create counted as not done and the batch was
    created again; the late one, found at the run's last listing, is cancelled and the log says so."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 10, poll_interval=1.0)
    lag = batchify.CREATE_SETTLE_S + 30.0
    fake = _LateCreates(clock, [10_000.0, 300.0, 300.0], late={1}, lag=lag)
    summary, log = _run_logged(store, fake, clock)
    assert summary.ok == 20
    assert len(fake.jobs) == 3
    cancels = [(t, n) for t, what, n in fake.calls if what == "cancel"]
    assert [n for _, n in cancels] == ["batches/0"] and cancels[0][0] >= lag
    assert any("cancelled batches/0" in line for line in log.lines), log.lines
    first = [t for t, what, n in fake.calls if what == "create" and fake.jobs[n]["dn"] == fake.jobs["batches/0"]["dn"]]
    assert len(first) == 2 and first[1] - first[0] >= batchify.CREATE_SETTLE_S  # looked for over the whole window first


def test_ambiguous_create_verdict_and_looks():
    W = batchify.CREATE_SETTLE_S
    for listed, since, now, want in [
        (True, 0.0, 0.0, "adopt"),
        (True, 0.0, W + 1, "adopt"),
        (False, 0.0, 0.0, "wait"),
        (False, 10.0, 10.0 + W - 0.1, "wait"),
        (False, 10.0, 10.0 + W, "resend"),
        (False, 0.0, 10 * W, "resend"),
    ]:
        assert batchify.ambiguous_create_verdict(listed, since, now) == want, (listed, since, now)
    f = batchify.CREATE_LOOK_FIRST_S
    for since, looks, now, want in [
        (0.0, 1, 0.0, f),
        (0.0, 2, f, 3 * f),
        (0.0, 3, 3 * f, 7 * f),
        (0.0, 20, 50.0, min(50.0 + W / 4, W)),  # at most a quarter window apart
        (0.0, 20, W - 1, W),  # never past the window: the last look is at its end
    ]:
        assert batchify.next_create_look(since, looks, now) == want, (since, looks, now)


def test_the_settle_window_scales_and_a_resumed_create_keeps_its_age():
    W, f = 10.0, 0.5  # a window and first look scaled down (--retry-scale)
    assert batchify.ambiguous_create_verdict(False, 0.0, W - 0.01, W) == "wait"
    assert batchify.ambiguous_create_verdict(False, 0.0, W, W) == "resend"
    assert batchify.next_create_look(0.0, 1, 0.0, W, f) == f
    assert batchify.next_create_look(0.0, 3, 1.5, W, f) == 1.5 + 4 * f
    assert batchify.next_create_look(0.0, 9, 9.0, W, f) == W  # at most a quarter window apart, never past its end
    assert batchify.next_create_look(0.0, 10**6, 1.0, W, f) == 1.0 + W / 4  # no overflow however many looks
    for since in (0.1, 0.7, 1.3, 2.9, 17.3):  # the last look is the moment the verdict turns: never a look that waits on
        last = batchify.next_create_look(since, 50, since + W - 1e-9, W, f)
        assert batchify.ambiguous_create_verdict(False, since, last, W) == "resend", since
    E, S = 1_800_000_000.0, batchify.CREATE_SETTLE_S
    for sent_at, wall_now, now, want in [
        (None, E, 500.0, None),  # an older batchify's sidecar: no send time, one listing decides
        (E, E, 500.0, 500.0),  # sent this instant: the whole window from now
        (E, E + 20, 500.0, 480.0),  # sent 20 s ago: 70 s left, counted on this process's clock
        (E, E + S - 0.5, 500.0, 500.0 - S + 0.5),
        (E, E + S, 500.0, None),  # the window has passed
        (E, E + 10 * S, 3.0, None),
        (E + 3_600, E, 500.0, 500.0),  # sent "in the future" (the clock was set back): the window from now, no longer
    ]:
        assert batchify.resumed_create_since(sent_at, wall_now, now, S) == want, (sent_at, wall_now, now)
    assert batchify.resumed_create_since(E, E + 1.0, 50.0, 0.0) is None  # --retry-scale 0: no window


def test_a_create_that_did_not_take_effect_is_sent_again_when_the_window_ends_not_a_poll_later(tmp_path):
    """The looks for an ambiguous create are on the scheduler's wake-up schedule: with a 40 s poll interval the
    create goes again at CREATE_SETTLE_S, not at the first pass after it (it went at 120 s)."""
    clock = FakeClock()
    store = prepared(tmp_path, 10, 10, poll_interval=40.0)
    fake = _LateCreates(clock, [300.0, 300.0], late={1}, lag=10**4)
    summary, log = _run_logged(store, fake, clock)
    assert summary.ok == 10
    first, again = [t for t, what, _ in fake.calls if what == "create"]
    assert batchify.CREATE_SETTLE_S <= again - first <= batchify.CREATE_SETTLE_S + 1.0, (first, again)
    assert any("its create answered an error and no job named" in line for line in log.lines), log.lines


def test_orphan_action_table():
    S = batchify.JobState
    dn = "batchify-r-x-b0001-a1"

    def job(state, remote=None, lane="batch"):
        return batchify.Job("b0001", 1, dn, "requests/b0001.jsonl", 10, 10, 10, state=state, remote_job=remote, lane=lane)

    def remote(state, name="batches/9"):
        return batchify.RemoteJob(name, dn, state)

    for j, r, want in [
        (None, remote(S.RUNNING), None),  # no record of that name: repair's business
        (job(S.RUNNING, "batches/9"), remote(S.RUNNING), None),  # owned
        (job(S.SUBMITTING), remote(S.PENDING), "adopt"),
        (job(S.UPLOADED), remote(S.RUNNING), "adopt"),
        (job(S.UPLOADED), remote(S.SUCCEEDED), "adopt"),
        (job(S.UPLOADED, lane="flex"), remote(S.RUNNING), "cancel"),
        (job(S.FLEXED), remote(S.PENDING), "cancel"),
        (job(S.RUNNING, "batches/1"), remote(S.RUNNING), "cancel"),
        (job(S.SUBMITTING, "batches/1"), remote(S.RUNNING), "cancel"),
        (job(S.RESULTS_DOWNLOADED, "batches/1"), remote(S.SUCCEEDED), "paid"),
        (job(S.RESULTS_DOWNLOADED, "batches/1"), remote(S.FAILED), None),
        (job(S.CANCELLED), remote(S.CANCELLED), None),
    ]:
        assert batchify.orphan_action(j, r) == want, (j.state, j.remote_job, j.lane, r.state)


class _KeylessOutput(FakeGemini):
    """A fake whose output lines carry no key (each answer names its request's key), less the lines at `drop`
    (0-based places), plus `extra` keyless error lines at the end."""

    def __init__(self, clock: FakeClock, durations: list[float], drop: set[int], extra: int, keep_key: set[int]):
        super().__init__(clock, durations)
        self.drop, self.extra, self.keep_key = drop, extra, keep_key

    async def download(self, name: str):  # type: ignore[override]
        self._log("download", name)
        job = self.jobs[f"batches/{name.rsplit('-', 1)[1]}"]
        out = bytearray()
        for i, line in enumerate(open(self.files[job["src"]], "rb")):
            key = json.loads(line)["key"]
            if i in self.drop:
                continue
            text = json.dumps({"answer_for": str(key)})
            resp = {"candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": "STOP"}]}
            out += json.dumps({"key": key, "response": resp} if i in self.keep_key else {"response": resp}).encode() + b"\n"
        for _ in range(self.extra):
            out += b'{"error": {"code": 13, "message": "internal"}}\n'
        yield bytes(out)


def _rows(store: batchify.RunStore) -> list[dict]:
    return [json.loads(x) for x in (store.dir / "results" / "b0001.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "drop, extra, keep_key, ok",
    [
        (set(), 0, set(), 20),  # one line per request, in order: keyless lines map by place
        (set(), 0, {0, 5}, 20),  # some keyed, at their own places: still by place
        ({7}, 0, set(), 0),  # one line missing: every place after it is off; no keyless line can be told apart
        # ... even when an extra line makes the count come right, if a keyed line shows the places are off (with no
        # keyed line at all, a line missing and one extra cannot be told from an output in order: not detectable)
        ({7}, 1, {12}, 1),
        ({7}, 0, {0, 3, 12}, 3),  # the keyed lines are still attributed by their keys
        (set(), 1, set(), 0),  # one line too many
    ],
)
def test_keyless_output_lines_are_matched_by_place_only_when_the_places_hold(tmp_path, drop, extra, keep_key, ok):
    """F5: an output line with no key takes its place's id only when the output has one line per request and every
    keyed line sat at its own place; otherwise its id counts as missing from the output, never another id's answer."""
    clock = FakeClock()
    store = prepared(tmp_path, 20, 20, poll_interval=1.0, max_attempts=1, fallback=False)
    fake = _KeylessOutput(clock, [5.0], drop, extra, keep_key)
    summary, log = _run_logged(store, fake, clock)
    rows = _rows(store)
    assert [r["n"] for r in rows] == list(range(20))
    for r in rows:
        if r["status"] == "ok":
            assert r["result"] == {"answer_for": str(r["n"])}, r  # never another id's answer
        else:
            assert "missing from the output" in r["error"], r
    assert sum(r["status"] == "ok" for r in rows) == ok
    assert summary.ok == ok
    if ok < 20:
        assert any("carry no key" in line for line in log.lines), log.lines


def test_positions_trusted_table():
    for lines, requests, aligned, want in [
        (10, 10, True, True),
        (9, 10, True, False),
        (11, 10, True, False),
        (10, 10, False, False),
        (0, 0, True, True),
    ]:
        assert batchify.positions_trusted(lines, requests, aligned) == want
