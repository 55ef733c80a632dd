"""Polling cost: at most one batches.get per job per base interval, backing off while a job's state
stays put, and a finished job still noticed promptly (its progress tells when to look)."""

from __future__ import annotations

import pytest

import batchify


@pytest.fixture
def emu_config() -> batchify.EmulatorConfig:
    return batchify.EmulatorConfig(job_seconds=4.0, pending_fraction=0.1)


@pytest.mark.parametrize(
    ("first", "last", "total", "eta"),
    [
        ((0.0, 0), (10.0, 11), 100, 89.0),  # 10 requests per 10 s at the slowest the counts allow
        ((0.0, 10), (10.0, 11), 100, None),  # one request apart: no rate to go by
        ((5.0, 0), (5.0, 50), 100, None),  # no time passed
        ((0.0, 0), (10.0, 100), 100, 0.0),  # all done
        ((5.0, 100), (5.0, 100), 100, 0.0),  # all done at the first look (no rate yet): the end is due
        ((0.0, 100), (10.0, 100), 100, 0.0),  # still all done, not ended yet (writing its output): due
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


@pytest.mark.parametrize(
    ("interval", "eta", "room_wanted", "delay"),
    [
        (300, None, True, 30),  # no progress to go by, a batch waits for room: every base interval
        (45, None, True, 30),
        (300, None, False, 300),  # nothing waits: the backed-off interval, as before
        (300, 80, True, 81.5),  # progress to go by: timed to the end, as before
        (300, 500, True, 300),  # ... which is after the next poll plus one more: keep to the interval
    ],
)
def test_poll_delay_while_a_batch_waits_for_room(interval, eta, room_wanted, delay):
    assert batchify.poll_delay(interval, eta, 30, room_wanted) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("transient", "in_a_row", "failing_for", "verdict"),
    [
        (False, 1, 0.0, "again"),  # one 400/403 on a get: poll it again
        (False, batchify.POLL_REFUSALS - 1, 9e9, "again"),  # refusals count answers, not time
        (False, batchify.POLL_REFUSALS, 0.0, "refused"),  # the account: stop at once
        (True, 1, 0.0, "again"),  # a network error or a 5xx: poll it again
        (True, 10_000, 3_599.0, "again"),  # transient failures count time, not answers
        (True, 2, 3_600.0, "silent"),  # an hour without an answer: stop, resumably
    ],
)
def test_poll_failure_verdict(transient, in_a_row, failing_for, verdict):
    assert batchify.poll_failure_verdict(transient, in_a_row, failing_for, 3_600.0) == verdict
