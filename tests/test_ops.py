"""The operations fixes: a resume after the model's shutdown date, cleanup --local of a run whose results file
another run replaced, `results` on a full disk, `results` during a live run, hand-edited run.json."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    a_create_recorded,
    assert_complete,
    read_jsonl,
    run_against,
    run_cli,
    spawn_batch_run,
    spawn_cli,
    wait_for,
)

import batchify

LITE = ["--model", "gemini-3.1-flash-lite", "--enqueued-limit", "3000000"]  # shuts down 2027-05-07 (catalog)
AFTER_SHUTDOWN = "2027-05-07T08:00:00.000Z"


@pytest.fixture
def emu_config() -> batchify.EmulatorConfig:
    # The service's own date stays before the shutdown: only the resuming process's catalog date moves past it.
    return batchify.EmulatorConfig(job_seconds=0.3, pending_fraction=0.3, today="2026-11-30")


def _after_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "Today" for the catalog check (model_retired reads utcnow() when not told a date) is past the shutdown."""
    monkeypatch.setattr(batchify, "utcnow", lambda: AFTER_SHUTDOWN)


# -- A. a resume after the model's shutdown date fetches what the service already has -------------------------
def test_resume_after_the_shutdown_date_downloads_and_merges_jobs_that_succeeded(emu, articles, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    args = ["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", "--yes", "--mode", "batch"]
    p = spawn_cli([*args, *LITE, "--poll-interval", "30", "--retry-scale", "0.02", "--out", str(out)], tmp_path)
    try:  # the run's one job is created, then ends at the service; the run is killed before it looks again
        wait_for(lambda: emu.stats()["creates"] >= 1)
        wait_for(lambda: emu.stats()["active_jobs"] == 0)
    finally:
        p.kill()
        p.wait()
    assert not out.exists()
    _after_shutdown(monkeypatch)
    summary = asyncio.run(batchify.resume_run("articles", tmp_path / "st", endpoint=emu.url, api_key="k", poll_interval=0.2))
    assert summary.status == "done" and summary.errors == 0
    assert_complete(out, articles)
    assert emu.stats()["creates"] == 1  # nothing created again


def test_resume_after_the_shutdown_date_sends_nothing_new_and_names_what_is_left(emu, articles, tmp_path, monkeypatch):
    st = tmp_path / "st"
    opts = batchify.RunOptions(enqueued_limit=3_000_000, out=str(tmp_path / "out.jsonl"))
    cfg = batchify.JobConfig(model="gemini-3.1-flash-lite")
    batchify.prepare_sync(articles, name="arts", config=cfg, options=opts, state_dir=st, endpoint=emu.url)
    _after_shutdown(monkeypatch)
    with pytest.raises(batchify.UsageError) as e:
        asyncio.run(batchify.resume_run("arts", st, endpoint=emu.url, api_key="k", poll_interval=0.2))
    msg = str(e.value)
    assert "b0001" in msg and "not done" in msg and "shut down" in msg and "gemini-3.5-flash-lite" in msg, msg
    assert e.value.exit_code == 2
    stats = emu.stats()
    assert stats["uploads"] == 0 and stats["creates"] == 0
    assert batchify.RunStore(st, "arts").load_run().status == "interrupted"
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 60 and {r["status"] for r in rows} == {"error"}


# -- B. cleanup --local never deletes the last copy of a run's results ---------------------------------------
def test_cleanup_local_refuses_when_another_run_replaced_the_results_file(emu, articles, tmp_path):
    shared = tmp_path / "shared.jsonl"
    fast = ["--poll-interval", "0.2", "--yes"]
    assert run_against(emu, articles, tmp_path, *fast, "--system-instruction", "Answer in French.", out=shared).returncode == 0
    a_rows = read_jsonl(shared)
    same_dir = run_against(emu, articles, tmp_path, *fast, "--name", "articles-b", out=shared)  # refused: see below
    assert same_dir.returncode == 2 and "is run 'articles''s results file" in same_dir.stderr, same_dir.stderr
    # another state dir knows nothing of the first run: its run replaces the file
    assert run_against(emu, articles, tmp_path, *fast, "--name", "articles-b", "--state-dir", "st2", out=shared).returncode == 0
    p = run_cli(["cleanup", "articles", "--local", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
    assert p.returncode == 2, p.stderr
    assert str(shared) in p.stderr and "batchify results articles >" in p.stderr, p.stderr
    assert (tmp_path / "st" / "articles" / "run.json").exists()
    saved = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)  # the fix it names works
    assert saved.returncode == 0 and [json.loads(x) for x in saved.stdout.splitlines()] == a_rows
    lib = batchify.results("articles", state_dir=tmp_path / "st")  # the library reads this run's own, too
    assert [(r.id, r.result, r.usage) for r in lib] == [(r["id"], r["result"], r["usage"]) for r in a_rows]
    assert run_cli(["cleanup", "articles-b", "--local", "--state-dir", "st2", "--endpoint", emu.url], tmp_path).returncode == 0
    assert not (tmp_path / "st2" / "articles-b").exists()  # the run whose file it is may still clean up


# -- C. a full disk under --out ---------------------------------------------------------------------------------
def _disk_full_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The results file's writer finds the disk full at its first write (as write() says it: no file name)."""
    real = batchify.atomic_file

    class Full:
        def write(self, b: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def full(path: Path, unique: bool = True) -> Iterator[Any]:
        with real(path, unique) as f:
            yield Full() if path.suffix == ".jsonl" else f

    monkeypatch.setattr(batchify, "atomic_file", full)


def test_results_prints_from_the_sidecars_when_the_out_disk_is_full(emu, articles, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    assert run_against(emu, articles, tmp_path, "--poll-interval", "0.2", "--yes", out=out).returncode == 0
    rows = read_jsonl(out)
    out.unlink()
    run_json = (tmp_path / "st" / "articles" / "run.json").read_bytes()
    _disk_full_writer(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = batchify.main(["results", "articles", "--state-dir", "st"])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert [json.loads(x) for x in got.out.splitlines()] == rows
    assert "could not be written" in got.err and "out.jsonl" in got.err, got.err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))
    assert (tmp_path / "st" / "articles" / "run.json").read_bytes() == run_json


def test_disk_full_names_the_file_and_never_advises_another_state_dir(tmp_path, capsys):
    target = tmp_path / "out.jsonl"
    with pytest.raises(OSError) as e, batchify.atomic_file(target) as f:
        f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises on a full disk
    assert batchify._os_error_exit(e.value) == batchify.DISK_EXIT
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot write {target}: the disk is full" in err, err
    assert "free space" in err and "--out at another disk" in err
    assert "--state-dir/" not in err and "point --state-dir" not in err
    assert "another one starts a new run" in err


# -- D. `results` during a live run writes none of its files ------------------------------------------------------
def test_results_during_a_live_run_leaves_run_json_alone(emu, articles, tmp_path):
    out = tmp_path / "out.jsonl"
    p = spawn_batch_run(emu, articles, tmp_path, out)  # polls every 30 s: live, and not merged yet
    try:
        wait_for(lambda: a_create_recorded(tmp_path / "st" / "articles"))
        run_json = tmp_path / "st" / "articles" / "run.json"
        before = run_json.read_bytes()
        got = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
        assert got.returncode == 0, got.stderr
        assert "in use by another process" in got.stderr, got.stderr
        rows = [json.loads(x) for x in got.stdout.splitlines()]
        assert len(rows) == 60 and {r["error"] for r in rows} == {"no result (run not finished)"}
        assert run_json.read_bytes() == before
        assert not out.exists()
        assert [r.status for r in batchify.results("articles", tmp_path / "st")] == ["error"] * 60  # the library too
        assert run_json.read_bytes() == before and not out.exists()
        shown = run_cli(["status", "articles", "--state-dir", "st", "--json"], tmp_path)
        assert json.loads(shown.stdout)["runs"][0]["status"] == "running", shown.stdout
    finally:
        p.kill()
        p.wait()


def test_results_files_get_a_temp_name_of_their_own_and_dead_writers_leftovers_go(tmp_path):
    """A results write removes what dead writers left beside the output, and never a live writer's. Live is told by
    the exclusive flock a writer holds on its temp (atomic_file), not by its pid: a pid from another PID namespace
    (two containers sharing a volume) or host says nothing, and in a container batchify is often pid 1, always
    alive. A temp younger than TEMP_GRACE_S is left too (its writer may not have locked it yet)."""
    import fcntl

    out = tmp_path / "out.jsonl"
    dead = tmp_path / ".out.jsonl.999999999.1.tmp"  # no such pid: a writer that crashed
    dead_pid1 = tmp_path / ".out.jsonl.1.1.tmp"  # pid 1 answers, yet its writer crashed (a container's batchify)
    legacy = tmp_path / ".out.jsonl.tmp"  # the fixed name older versions used
    live = tmp_path / ".out.jsonl.999999998.1.tmp"  # another namespace's live writer: its pid means nothing here
    fresh = tmp_path / ".out.jsonl.999999997.1.tmp"  # just made, not locked yet
    old = time.time() - 60
    for f in (dead, dead_pid1, legacy, live, fresh):
        f.write_bytes(b"partial")
        if f is not fresh:
            os.utime(f, (old, old))
    writer = os.open(live, os.O_RDWR)
    fcntl.flock(writer, fcntl.LOCK_EX)
    try:
        with batchify.results_writer(out) as a:
            a.write(b"a\n")
            temps = {p.name for p in tmp_path.glob(".out.jsonl*")}
            assert [t for t in temps if t.startswith(f".out.jsonl.{os.getpid()}.")], temps  # its own name, not the fixed one
            assert not dead.exists() and not dead_pid1.exists() and not legacy.exists()
            assert live.exists() and fresh.exists()
    finally:
        os.close(writer)
    assert out.read_bytes() == b"a\n" and live.read_bytes() == b"partial"


# -- E. a hand-edited run.json is a named StateError (exit 3), never a traceback --------------------------------
EDITS = [
    ("plan.batch_ranges", lambda d: d["plan"].update(batch_ranges=None)),
    ("plan.batch_ranges", lambda d: d["plan"].update(batch_ranges=[[0, "60"]])),
    ("plan.effective_limit", lambda d: d["plan"].update(effective_limit="big")),
    ("plan.estimated_cost_usd", lambda d: d["plan"].update(estimated_cost_usd=None)),
    ("out", lambda d: d.update(out="")),
    ("summary", lambda d: d.update(summary=None)),
    ("notes", lambda d: d.update(notes=[])),
    ("status", lambda d: d.update(status=None)),
    ("rejected", lambda d: d.update(rejected="0")),
    ("chars_per_token", lambda d: d.pop("chars_per_token")),
    ("endpoint", lambda d: d.update(endpoint=5)),
    ("records", lambda d: d.update(records=True)),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("done")
    inp = cwd / "articles.jsonl"
    inp.write_bytes((Path(__file__).parent.parent / "examples" / "articles.jsonl").read_bytes())
    args = ["run", str(inp), "--endpoint", "local", "--poll-interval", "0.2", "--yes", "--state-dir", "st", "--out", "out.jsonl"]
    assert run_cli(args, cwd).returncode == 0
    return cwd


@pytest.mark.parametrize(("field", "edit"), EDITS, ids=[f"{f}-{i}" for i, (f, _e) in enumerate(EDITS)])
@pytest.mark.parametrize("command", ["results", "resume", "status"])
def test_a_hand_edited_run_json_names_the_field(finished_run, tmp_path, field, edit, command):
    (tmp_path / "st").mkdir()
    import shutil

    shutil.copytree(finished_run / "st" / "articles", tmp_path / "st" / "articles")
    run_json = tmp_path / "st" / "articles" / "run.json"
    d = json.loads(run_json.read_text())
    edit(d)
    run_json.write_text(json.dumps(d))
    p = run_cli([command, "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "damaged run.json" in p.stderr and f"'{field}'" in p.stderr, p.stderr
    assert "Fix:" in p.stderr


def test_a_moved_project_folder_is_not_written_in_its_old_place(emu, articles, tmp_path):
    """The project folder is renamed while a run is unfinished. resume used to write the results to the old absolute
    path: it made the old folder again (or overwrote whatever lives there now). Now it stops (exit 2) and says how to
    name the new place; `resume --out` continues there."""
    proj = tmp_path / "proj"
    proj.mkdir()
    p = run_against(emu, articles, proj, "--mode", "batch", "--yes", out="o.jsonl", BATCHIFY_CRASH_AT="after_create")
    assert p.returncode == -9, p.stderr
    moved = tmp_path / "proj2"
    proj.rename(moved)
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], moved)
    assert r.returncode == 2 and "no longer exists" in r.stderr and "--out FILE" in r.stderr, r.stderr
    assert not proj.exists()
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2", "--out", "o.jsonl"], moved)
    assert r.returncode == 0, r.stderr
    assert_complete(moved / "o.jsonl", articles)
    assert not proj.exists() and emu.stats()["creates"] == 1


def test_a_status_look_at_the_lock_does_not_refuse_a_resume(tmp_path, monkeypatch):
    """`status` takes a run's lock shared for a moment (RunLock.held) to see whether a process holds it; a resume
    landing in that moment was refused (exit 4, 'in use by another process'): 51 of 16,481 tries with status
    polling alongside. acquire now tries again for a moment. Deterministic: the look ends at the first wait."""
    import fcntl

    lock = batchify.RunLock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    look = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)  # status looking, right now
    waited: list[float] = []

    def the_look_ends(seconds: float) -> None:
        waited.append(seconds)
        fcntl.flock(look, fcntl.LOCK_UN)

    monkeypatch.setattr(batchify.time, "sleep", the_look_ends)
    lock.acquire("resume")
    assert waited and lock.fd is not None
    lock.release()
    os.close(look)


# -- where --out may point (adversary findings: /dev/null replaced, a run's own sidecar, a shared file) --------------
@pytest.mark.parametrize("where", ["fifo", "run-sidecar", "other-run"])
def test_out_is_refused_where_the_results_file_would_replace_what_is_not_its_own(where, tmp_path):
    """The merge replaces the file at --out (write a temp, rename over it). As root, --out /dev/null replaced the
    system's /dev/null with a regular file; --out a run's own ids.jsonl overwrote that sidecar; two runs of one state
    dir given one --out both said ok, the file holding only the last one's rows. Each is refused (exit 2) before
    anything is sent, naming why."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"text {i}"}) + "\n" for i in range(3)))
    st = tmp_path / "st"
    opts = batchify.RunOptions(calibrate=False, mode="batch")
    asyncio.run(batchify.prepare_run(batchify.RunStore(st, "first"), inp, batchify.JobConfig(), opts))
    if where == "fifo":
        out = tmp_path / "pipe"
        os.mkfifo(out)
        why = "not a regular file"
    elif where == "run-sidecar":
        out, why = st / "first" / "ids.jsonl", "inside run 'first''s folder"
    else:
        out, why = Path(batchify.RunStore(st, "first").load_run().out), "is run 'first''s results file"
    with pytest.raises(batchify.UsageError, match=why):
        asyncio.run(
            batchify.prepare_run(
                batchify.RunStore(st, "second"), inp, batchify.JobConfig(), dataclasses.replace(opts, out=str(out))
            )
        )
    assert not (st / "second" / "run.json").exists()


def test_out_with_a_tilde_is_written_in_the_home_folder(tmp_path, monkeypatch):
    """--out ~/r.jsonl was checked against the home folder but recorded (and written) as ./~/r.jsonl."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert batchify.out_uri("~/r.jsonl") == str(tmp_path / "home" / "r.jsonl")
    # and a pathlib.Path, as state_dir takes one, is the flag's text (it raised a raw AttributeError)
    assert batchify.RunOptions(out=tmp_path / "r.jsonl").checked().out == str(tmp_path / "r.jsonl")  # type: ignore[arg-type]


def test_the_same_run_again_with_other_rates_says_they_are_not_applied(emu, tmp_path):
    """The same `run` command again on an existing run, with --rpm and --concurrency of its own: the run went on
    with its own, silently (adversary finding 13). It is now said, with what resume takes instead."""

    class Logged(batchify.NullReporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"text {i}"}) + "\n" for i in range(3)))
    kw = dict(state_dir=tmp_path / "st", endpoint=emu.url, api_key="k", dry_run=True)
    asyncio.run(batchify.run_file(inp, options=batchify.RunOptions(mode="batch"), **kw))
    again = batchify.RunOptions(mode="batch", rpm=6, concurrency=2)
    asyncio.run(batchify.run_file(inp, options=again, reporter=(log := Logged()), **kw))
    assert any("--rpm 6, --concurrency 2 are not applied" in line and "resume" in line for line in log.lines), log.lines
    asyncio.run(batchify.run_file(inp, options=batchify.RunOptions(mode="batch"), reporter=(log := Logged()), **kw))
    assert not log.lines  # the same command: nothing to say


def test_a_prepare_cancelled_after_its_run_exists_keeps_the_input(tmp_path, monkeypatch):
    """Cancelled as its client closed, after run.json was written: prepare raised CancelledError and deleted the
    records' input file ("a refused payload is not kept"), leaving a prepared run with no input, which no retry
    could mend (adversary finding 15). A run that exists keeps its input: submit(name) runs it."""
    real = batchify.open_client

    @contextlib.asynccontextmanager
    async def cancelled_on_close(*a: Any, **kw: Any) -> Any:
        async with real(*a, **kw) as client:
            yield client
        raise asyncio.CancelledError

    monkeypatch.setattr(batchify, "open_client", cancelled_on_close)
    records = [{"id": i, "text": f"text {i}"} for i in range(3)]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(batchify.prepare(records, name="p1", state_dir=tmp_path / "st"))
    run = batchify.RunStore(tmp_path / "st", "p1").load_run()
    assert run.status == "prepared" and Path(run.input_path).exists()


def test_a_run_held_by_this_same_process_is_refused_at_once_without_kill_advice(tmp_path, monkeypatch):
    """Two library calls on one run in one process (a notebook cell run again): the loser time.sleep()t on the event
    loop for 0.5 s (the owner's pid was this process's, so it was waited for), then said `kill -INT <own pid>`."""
    held = batchify.RunLock(tmp_path / "run")
    held.acquire("run")
    slept: list[float] = []
    monkeypatch.setattr(batchify.time, "sleep", slept.append)

    async def two_calls() -> str:
        with pytest.raises(batchify.LockedError) as e:
            await batchify.RunLock(tmp_path / "run").acquire_async("cancel")
        return str(e.value)

    t = time.monotonic()
    msg = asyncio.run(two_calls())
    assert time.monotonic() - t < LOCK_QUICK and not slept
    assert "another call in this same process" in msg and "kill" not in msg and "(run)" in msg, msg
    with pytest.raises(batchify.LockedError, match="same process"):
        batchify.RunLock(tmp_path / "run").acquire("cancel")  # the sync form too
    assert not slept
    held.release()


def test_a_brief_look_at_the_lock_is_waited_for_off_the_event_loop(tmp_path):
    """A coroutine that meets a lock held for a moment (a status look) waits with asyncio.sleep: the loop's other
    tasks go on (time.sleep froze them for up to LOCK_PROBE_WAIT_S)."""
    import fcntl

    (tmp_path / "run").mkdir()
    lock = batchify.RunLock(tmp_path / "run")
    look = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)  # status looking, right now

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tk = asyncio.ensure_future(ticker())
        asyncio.get_running_loop().call_later(0.2, fcntl.flock, look, fcntl.LOCK_UN)  # the look ends
        await lock.acquire_async("resume")
        tk.cancel()
        return ticks

    assert asyncio.run(main()) >= 5 and lock.fd is not None  # the ticker ran while the resume waited
    lock.release()
    os.close(look)


LOCK_QUICK = 0.25  # well under LOCK_PROBE_WAIT_S (0.5 s)


# -- resume_run's overrides are held to the flags' rules before anything is saved -------------------------------
@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"poll_interval": -1}, "--poll-interval"),  # was saved to run.json: batches.get in a tight loop
        ({"poll_interval": float("inf")}, "finite"),  # was saved: the run never polled again
        ({"poll_interval": float("nan")}, "finite"),
        ({"max_cost": -5}, "above 0"),  # was a CostCapError ("above --max-cost $-5.0000") after the lock
        ({"max_cost": float("nan")}, "above 0"),
        ({"allow_standard": "yes"}, "True or False"),
    ],
)
def test_resume_overrides_are_checked_before_anything_is_saved(emu, articles, tmp_path, given, says):
    st = tmp_path / "st"
    batchify.prepare_sync(articles, name="r", state_dir=st, endpoint=emu.url)
    before = (st / "r" / "run.json").read_bytes()
    with pytest.raises(batchify.UsageError, match="resume_run") as e:
        asyncio.run(batchify.resume_run("r", st, endpoint=emu.url, api_key="k", **given))
    assert says in str(e.value) and e.value.exit_code == 2
    assert (st / "r" / "run.json").read_bytes() == before
    assert emu.stats()["uploads"] == 0 and emu.stats()["gets"] == 0


def test_status_never_shows_a_negative_age_and_names_a_job_past_its_48_hours():
    """`status` shows each job's "since" as an age from its sidecar's stamp. After the wall clock was set back (a VM
    restored from a snapshot, a clock NTP corrected after it ran fast) the stamps are ahead of now, and it showed
    "-7199s ago" (adversary reproducer 05). A job pending or running at the service for more than 48 h has likely
    ended EXPIRED (the service's limit): its "since" says so."""
    from datetime import datetime, timedelta, timezone

    ahead = (datetime.now(timezone.utc) + timedelta(hours=2)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert not batchify._age(ahead).startswith("-"), batchify._age(ahead)
    now = datetime(2027, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert batchify._age("2027-03-01T14:00:00.000Z", now) == "0s ago (the clock was set back since)"
    assert batchify._age("2027-03-01T12:00:30.000Z", now) == "0s ago"  # half a minute ahead: clocks differ that much
    assert batchify._age("2027-03-01T11:58:00.000Z", now) == "2m ago"
    job = batchify.Job("b0001", 0, "batchify-x-b0001", "requests/b0001.jsonl", 10, 10, 10, state=batchify.JobState.RUNNING)
    job = dataclasses.replace(job, timestamps={"PENDING": "2027-02-27T11:00:00.000Z", "RUNNING": "2027-02-28T12:00:00.000Z"})
    entry = batchify.job_entry(job, batchify.BATCH_EXPIRY_S)
    assert batchify._since_words(entry, now) == "1d ago; at the service over 48 h: likely EXPIRED"
    assert batchify._since_words(batchify.job_entry(job, None), now) == "1d ago"  # Vertex: no one figure (72 h/24 h)
    young = dataclasses.replace(job, state=batchify.JobState.PENDING, timestamps={"PENDING": "2027-02-28T12:00:00.000Z"})
    assert batchify._since_words(batchify.job_entry(young, batchify.BATCH_EXPIRY_S), now) == "1d ago"
    done = batchify.job_entry(dataclasses.replace(job, state=batchify.JobState.SUCCEEDED), batchify.BATCH_EXPIRY_S)
    assert "EXPIRED" not in batchify._since_words(done, now)
