"""Polling cost: at most one batches.get per job per base interval, backing off while a job's state
stays put, and a finished job still noticed promptly (its progress tells when to look)."""

from __future__ import annotations

import asyncio

import pytest

import batchify


@pytest.fixture
def emu_config() -> batchify.EmulatorConfig:
    return batchify.EmulatorConfig(job_seconds=4.0, pending_fraction=0.1)


def test_polls_back_off_yet_see_the_end_promptly(emu, articles, tmp_path):
    base, maximum = 0.2, 1.0
    opts = batchify.RunOptions(batch_size=20, poll_interval=base, max_poll_interval=maximum)
    _run, summary = asyncio.run(
        batchify.run_file(articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k")
    )
    assert summary is not None and summary.ok == 60
    s = emu.stats()
    gets = s["gets_by_job"]
    assert len(gets) == 3
    # One get per job per base interval at most (jobs due within 20% of a base interval ride along).
    assert s["min_get_gap"] >= 0.8 * base - 0.01, s["min_get_gap"]
    # Polling every base interval would take ~20 gets per 4 s job; backing off takes far fewer.
    assert max(gets.values()) <= 12, gets
    # Yet each end is seen within about a base interval of happening.
    assert max(s["job_end_seen_after"]) <= 1.5 * base, s["job_end_seen_after"]


@pytest.mark.parametrize(
    ("first", "last", "total", "eta"),
    [
        ((0.0, 0), (10.0, 11), 100, 89.0),  # 10 requests per 10 s at the slowest the counts allow
        ((0.0, 10), (10.0, 11), 100, None),  # one request apart: no rate to go by
        ((5.0, 0), (5.0, 50), 100, None),  # no time passed
        ((0.0, 0), (10.0, 100), 100, 0.0),  # all done
        ((0.0, 0), (10.0, 5), 0, None),  # no total
    ],
)
def test_progress_eta(first, last, total, eta):
    assert batchify.progress_eta(first, last, total) == eta


@pytest.mark.parametrize(
    ("interval", "eta", "base", "delay"),
    [
        (300, None, 30, 300),  # no progress to go by: the backed-off interval
        (300, 500, 30, 300),  # done after the next poll plus one more: keep to the interval
        (300, 80, 30, 81.5),  # done before the next poll: look just after
        (300, 200, 30, 141.5),  # ... but more than 3 base intervals off: one look 2 intervals before, first
        (300, 320, 30, 261.5),  # done just after the next poll would come: skip that poll, look close to it
        (300, 88.5, 30, 90.0),  # exactly 3 intervals off: no look before
        (300, 5, 30, 30),  # done very soon: still not sooner than the base interval
        (30, 10, 30, 30),
    ],
)
def test_poll_delay(interval, eta, base, delay):
    assert batchify.poll_delay(interval, eta, base) == pytest.approx(delay)
