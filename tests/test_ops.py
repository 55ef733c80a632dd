"""The operations fixes: a resume after the model's shutdown date, cleanup --local of a run whose results file
another run replaced, `results` on a full disk, `results` during a live run, hand-edited run.json."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import assert_complete, read_jsonl, run_against, run_cli, spawn_cli, wait_for

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
    assert run_against(emu, articles, tmp_path, *fast, "--name", "articles-b", out=shared).returncode == 0
    p = run_cli(["cleanup", "articles", "--local", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
    assert p.returncode == 2, p.stderr
    assert str(shared) in p.stderr and "batchify results articles >" in p.stderr, p.stderr
    assert (tmp_path / "st" / "articles" / "run.json").exists()
    saved = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)  # the fix it names works
    assert saved.returncode == 0 and [json.loads(x) for x in saved.stdout.splitlines()] == a_rows
    assert run_cli(["cleanup", "articles-b", "--local", "--state-dir", "st", "--endpoint", emu.url], tmp_path).returncode == 0
    assert not (tmp_path / "st" / "articles-b").exists()  # the run whose file it is may still clean up
