"""Pure planners and the state machine: parametrized tables and hypothesis properties."""

from __future__ import annotations

import asyncio
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batchify as b
from batchify import JobState as S

# -- state machine ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "state"),
    [
        ("BATCH_STATE_PENDING", S.PENDING),
        ("JOB_STATE_PENDING", S.PENDING),
        ("BATCH_STATE_RUNNING", S.RUNNING),
        ("JOB_STATE_RUNNING", S.RUNNING),
        ("BATCH_STATE_SUCCEEDED", S.SUCCEEDED),
        ("JOB_STATE_SUCCEEDED", S.SUCCEEDED),
        ("BATCH_STATE_FAILED", S.FAILED),
        ("JOB_STATE_FAILED", S.FAILED),
        ("BATCH_STATE_CANCELLED", S.CANCELLED),
        ("JOB_STATE_CANCELLED", S.CANCELLED),
        ("BATCH_STATE_EXPIRED", S.EXPIRED),
        ("JOB_STATE_EXPIRED", S.EXPIRED),
        ("JobState.JOB_STATE_QUEUED", S.PENDING),
        ("job_state_succeeded", S.SUCCEEDED),
    ],
)
def test_parse_remote_state(wire, state):
    assert b.parse_remote_state(wire) == state


def test_parse_remote_state_refuses_unknown():
    with pytest.raises(b.StateError):
        b.parse_remote_state("BATCH_STATE_EXPLODED")


def job(state=S.CREATED):
    return b.Job(
        name="b0001",
        index=1,
        display_name="d",
        request_file="requests/b0001.jsonl",
        request_count=1,
        tokens=10,
        bytes=100,
        state=state,
    )


LEGAL = [
    (S.CREATED, S.UPLOADING),
    (S.UPLOADING, S.UPLOADED),
    (S.UPLOADED, S.SUBMITTING),
    (S.SUBMITTING, S.PENDING),
    (S.SUBMITTING, S.UPLOADED),
    (S.SUBMITTING, S.SUCCEEDED),
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.EXPIRED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.SUCCEEDED, S.RESULTS_DOWNLOADED),
]
ILLEGAL = [
    (S.CREATED, S.PENDING),
    (S.CREATED, S.SUBMITTING),
    (S.UPLOADED, S.RUNNING),
    (S.RUNNING, S.PENDING),
    (S.SUCCEEDED, S.RUNNING),
    (S.FAILED, S.SUCCEEDED),
    (S.RESULTS_DOWNLOADED, S.SUCCEEDED),
    (S.CANCELLED, S.RUNNING),
    (S.EXPIRED, S.PENDING),
    (S.PENDING, S.RESULTS_DOWNLOADED),
]


@pytest.mark.parametrize(("src", "dst"), LEGAL)
def test_advance_legal(src, dst):
    j = b.advance(job(src), dst, "2026-01-01T00:00:00Z")
    assert j.state == dst and j.timestamps[str(dst)] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(("src", "dst"), ILLEGAL)
def test_advance_refuses_illegal(src, dst):
    with pytest.raises(b.StateError):
        b.advance(job(src), dst, "t")


def test_every_state_has_a_row_and_terminal_states_are_final():
    assert set(b.TRANSITIONS) == set(S)
    for s in b.FINAL_STATES:
        assert b.TRANSITIONS[s] == frozenset()


def test_job_roundtrip_and_validation():
    j = b.advance(job(), S.UPLOADING, "t")
    assert b.Job.from_dict(j.to_dict()) == j
    d = j.to_dict()
    d["state"] = "NOPE"
    with pytest.raises(b.StateError):
        b.Job.from_dict(d)
    d = j.to_dict()
    d["schema_version"] = 99
    with pytest.raises(b.StateError):
        b.Job.from_dict(d)


# -- batches and waves ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "batch_size", "cap", "max_bytes", "expected"),
    [
        ([(10, 1)] * 5, 2, 100, 100, [(0, 2), (2, 4), (4, 5)]),
        ([(10, 1)] * 5, 10, 25, 100, [(0, 2), (2, 4), (4, 5)]),
        ([(10, 40)] * 5, 10, 1000, 100, [(0, 2), (2, 4), (4, 5)]),
        ([(10, 1)], 1000, 10, 10, [(0, 1)]),
        ([], 10, 10, 10, []),
    ],
)
def test_plan_batches_table(sizes, batch_size, cap, max_bytes, expected):
    assert [(p.start, p.end) for p in b.plan_batches(sizes, batch_size, cap, max_bytes)] == expected


@pytest.mark.parametrize(
    ("tokens", "limit", "waves", "expected"),
    [
        ([5, 5, 5, 5], 10, "auto", [[0, 1], [2, 3]]),
        ([5, 5, 5, 5], 20, "auto", [[0, 1, 2, 3]]),
        ([5, 5, 5, 5], 20, 4, [[0], [1], [2], [3]]),
        ([5, 5, 5, 5], 20, 2, [[0, 1], [2, 3]]),
        ([5, 5, 5, 5], 10, 1, [[0, 1], [2, 3]]),  # the limit wins over the wish
        ([9, 2, 9], 10, "auto", [[0], [1], [2]]),
    ],
)
def test_plan_waves_table(tokens, limit, waves, expected):
    assert b.plan_waves(tokens, limit, waves) == expected


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 500), st.integers(1, 2000)), min_size=1, max_size=300),
    batch_size=st.integers(1, 50),
    limit=st.integers(500, 5000),
    max_bytes=st.integers(2000, 20000),
    waves=st.one_of(st.just("auto"), st.integers(1, 10)),
)
def test_plan_properties(sizes, batch_size, limit, max_bytes, waves):
    batches = b.plan_batches(sizes, batch_size, limit, max_bytes)
    # every request is planned exactly once, in order
    covered = [i for p in batches for i in range(p.start, p.end)]
    assert covered == list(range(len(sizes)))
    for p in batches:
        assert p.count <= batch_size
        assert p.tokens == sum(t for t, _ in sizes[p.start : p.end])
        assert (p.tokens <= limit and p.bytes <= max_bytes) or p.count == 1
    plan = b.plan_waves([p.tokens for p in batches], limit, waves)
    assert sorted(i for w in plan for i in w) == list(range(len(batches)))
    for w in plan:  # no wave exceeds the limit
        assert sum(batches[i].tokens for i in w) <= limit


@given(active=st.integers(0, 100), cand=st.integers(1, 100), limit=st.integers(1, 200), jobs=st.integers(0, 5))
def test_admit_says_yes_exactly_when_it_fits(active, cand, limit, jobs):
    assert b.admit(active, jobs, cand, limit, 5) == (active + cand <= limit and jobs < 5)


# -- the run loop's decisions (pure: the engine only applies them) -----------------------------------


def mkjob(i: int, state: S = S.UPLOADED, tokens: int = 10, wave: int = 0, lane: str = "batch", **kw) -> b.Job:
    return b.Job(f"b{i:04d}", i, f"dn{i}", f"requests/b{i:04d}.jsonl", 1, tokens, 1, wave=wave, state=state, lane=lane, **kw)


@pytest.mark.parametrize(
    ("jobs", "limit", "max_jobs", "barrier", "expected"),
    [
        # fills the limit from the head, in order
        ([mkjob(1), mkjob(2), mkjob(3)], 25, 10, False, ["b0001", "b0002"]),
        # live jobs count against it
        ([mkjob(1, S.RUNNING), mkjob(2), mkjob(3)], 25, 10, False, ["b0002"]),
        ([mkjob(1, S.SUBMITTING, tokens=20), mkjob(2)], 25, 10, False, []),
        # the job cap
        ([mkjob(1, S.PENDING), mkjob(2), mkjob(3)], 100, 2, False, ["b0002"]),
        # the head not uploaded yet: nothing overtakes it
        ([mkjob(1, S.UPLOADING), mkjob(2)], 100, 10, False, []),
        ([mkjob(1, S.CREATED), mkjob(2)], 100, 10, False, []),
        # a big head blocks smaller later ones (order is kept)
        ([mkjob(1, tokens=30), mkjob(2, tokens=1)], 25, 10, False, []),
        # finished and Flex-owned jobs are skipped
        ([mkjob(1, S.RESULTS_DOWNLOADED), mkjob(2, lane="flex"), mkjob(3)], 10, 10, False, ["b0003"]),
        ([mkjob(1, S.FLEXED), mkjob(2)], 10, 10, False, ["b0002"]),
        # rolling: a later wave starts while the earlier one runs...
        ([mkjob(1, S.RUNNING, wave=0), mkjob(2, wave=1)], 100, 10, False, ["b0002"]),
        # ...but not with --barrier
        ([mkjob(1, S.RUNNING, wave=0), mkjob(2, wave=1)], 100, 10, True, []),
        ([mkjob(1, S.RESULTS_DOWNLOADED, wave=0), mkjob(2, wave=1), mkjob(3, wave=2)], 100, 10, True, ["b0002"]),
        ([mkjob(1, wave=0), mkjob(2, wave=0), mkjob(3, wave=1)], 100, 10, True, ["b0001", "b0002"]),
    ],
)
def test_plan_admission_table(jobs, limit, max_jobs, barrier, expected):
    assert b.plan_admission(jobs, limit, max_jobs, barrier) == expected


@settings(max_examples=200)
@given(
    toks=st.lists(st.integers(1, 50), min_size=1, max_size=12),
    live=st.lists(st.integers(1, 50), max_size=4),
    limit=st.integers(1, 200),
    max_jobs=st.integers(1, 8),
)
def test_plan_admission_properties(toks, live, limit, max_jobs):
    jobs = [mkjob(100 + i, S.RUNNING, tokens=t) for i, t in enumerate(live)] + [mkjob(i, tokens=t) for i, t in enumerate(toks)]
    got = b.plan_admission(jobs, limit, max_jobs, barrier=False)
    names = [j.name for j in jobs[len(live) :]]
    assert got == names[: len(got)], "a prefix of the queue, in order"
    admitted = sum(toks[: len(got)])
    assert sum(live) + admitted <= limit or not got
    assert len(live) + len(got) <= max_jobs or not got
    if len(got) < len(toks):  # it stopped because the next one does not fit: never out of timidity
        assert sum(live) + admitted + toks[len(got)] > limit or len(live) + len(got) >= max_jobs


def test_jobs_to_retry():
    jobs = [
        mkjob(1, S.FAILED),
        mkjob(2, S.EXPIRED),
        mkjob(3, S.FAILED, cancelled_by_user=True),
        mkjob(4, S.FAILED, no_retry=True),
        mkjob(5, S.FAILED, attempt=3),
        mkjob(6, S.FAILED),
        b.Job("b0006-r2", 6, "dn6r2", "requests/b0006.jsonl", 1, 10, 1, attempt=2, retry_of="b0006"),
        mkjob(7, S.CANCELLED),
        mkjob(8, S.RESULTS_DOWNLOADED),
    ]
    assert [j.name for j in b.jobs_to_retry(jobs, 3, run_cancelled=False)] == ["b0001", "b0002"]
    assert b.jobs_to_retry(jobs, 3, run_cancelled=True) == []
    assert [j.name for j in b.jobs_to_retry(jobs, 1, run_cancelled=False)] == []


@pytest.mark.parametrize(
    ("states", "next_poll", "timed", "now", "expected"),
    [
        # live jobs due now, or within a fifth of the base interval (10 s here), ride along
        ([S.RUNNING, S.PENDING, S.RUNNING], {"b0001": 5.0, "b0002": 11.5, "b0003": 13.0}, set(), 10.0, ["b0001", "b0002"]),
        # a job timed to its predicted end is not polled early
        ([S.RUNNING], {"b0001": 11.0}, {"b0001"}, 10.0, []),
        ([S.RUNNING], {"b0001": 10.0}, {"b0001"}, 10.0, ["b0001"]),
        # never polled yet: due
        ([S.PENDING], {}, set(), 0.0, ["b0001"]),
        # SUCCEEDED without its output file yet (it appears later) is polled; with it, not
        ([S.SUCCEEDED], {"b0001": 0.0}, set(), 1.0, ["b0001"]),
        ([S.UPLOADED, S.RESULTS_DOWNLOADED, S.FAILED], {}, set(), 1.0, []),
    ],
)
def test_due_for_poll_table(states, next_poll, timed, now, expected):
    assert b.due_for_poll([mkjob(i + 1, st_) for i, st_ in enumerate(states)], next_poll, timed, now, 10.0) == expected


def test_due_for_poll_skips_a_succeeded_job_that_has_its_output():
    assert b.due_for_poll([mkjob(1, S.SUCCEEDED, output_file="files/o")], {}, set(), 0.0, 10.0) == []


def test_due_for_retrieval_is_the_same_pass_that_saw_the_end():
    done = mkjob(1, S.SUCCEEDED, output_file="files/o1")
    later = mkjob(2, S.SUCCEEDED, output_file="files/o2")
    busy = mkjob(3, S.SUCCEEDED, output_file="files/o3")
    running = mkjob(4, S.RUNNING)
    jobs = [done, later, busy, running]
    # b0001 was polled in this pass (its next poll already pushed out): retrieved now, not at that next poll
    got = b.due_for_retrieval(jobs, {"b0001", "b0003", "b0004"}, {"b0001": 99.0, "b0002": 50.0}, 10.0, {"b0003"})
    assert got == ["b0001"]
    # a failed download is tried again when it is due
    assert b.due_for_retrieval(jobs, set(), {"b0001": 99.0, "b0002": 50.0, "b0003": 99.0}, 50.0, set()) == ["b0002"]


@pytest.mark.parametrize(
    ("states", "next_poll", "retrieving", "create_after", "freed", "expected"),
    [
        # the earliest poll due among live jobs
        ([S.RUNNING, S.RUNNING], {"b0001": 30.0, "b0002": 17.0}, set(), 0.0, False, 17.0),
        # finished and downloading jobs do not set the time
        ([S.RESULTS_DOWNLOADED, S.SUCCEEDED], {"b0001": 12.0, "b0002": 13.0}, {"b0002"}, 0.0, False, 20.0),
        # a job waits for admission: one base interval (or the create back-off, if later)...
        ([S.RUNNING, S.UPLOADED], {"b0001": 40.0}, set(), 0.0, False, 20.0),
        ([S.RUNNING, S.UPLOADED], {"b0001": 40.0}, set(), 35.0, False, 35.0),
        # ...but at once when a job just left the enqueued set
        ([S.RUNNING, S.UPLOADED], {"b0001": 40.0}, set(), 35.0, True, 10.0),
        # overdue polls: now, never in the past
        ([S.RUNNING], {"b0001": 3.0}, set(), 0.0, False, 10.0),
    ],
)
def test_next_wake_table(states, next_poll, retrieving, create_after, freed, expected):
    jobs = [mkjob(i + 1, st_) for i, st_ in enumerate(states)]
    assert b.next_wake(jobs, next_poll, retrieving, 10.0, 10.0, create_after, freed) == expected


def test_next_wake_includes_the_next_look_for_an_ambiguous_create():
    jobs = [mkjob(1, S.RUNNING), mkjob(2, S.SUBMITTING)]
    assert b.next_wake(jobs, {"b0001": 40.0}, set(), 10.0, 10.0, 0.0, False, [14.5]) == 14.5
    assert b.next_wake(jobs, {"b0001": 12.0}, set(), 10.0, 10.0, 0.0, False, [14.5]) == 12.0
    assert b.next_wake(jobs[1:], {}, set(), 10.0, 10.0, 0.0, False, [3.0]) == 10.0  # overdue: now
    assert b.next_wake(jobs[1:], {}, set(), 10.0, 10.0, 0.0, False) == 20.0  # no look: one base interval


def test_effective_limit_and_tables():
    assert b.effective_limit(3_000_000, 0.1) == 2_700_000
    cat = b.builtin_catalog()
    spec = lambda m: b.resolve_model(cat, m, cat.as_of)  # noqa: E731
    assert b.enqueued_limit_for(spec("gemini-2.5-flash"), 1, None) == 3_000_000
    assert b.enqueued_limit_for(spec("models/gemini-2.5-flash-lite"), 1, None) == 10_000_000
    assert b.enqueued_limit_for(spec("gemini-3-flash-preview"), 1, None) == 3_000_000
    assert b.enqueued_limit_for(spec("gemini-2.5-pro"), 1, None) == 5_000_000
    assert b.enqueued_limit_for(spec("gemini-2.5-flash"), 1, 1234) == 1234


@pytest.mark.parametrize(
    ("model", "inp", "out", "service", "usd"),
    [
        ("gemini-2.5-flash", 1_000_000, 0, "standard", 0.30),
        ("gemini-2.5-flash", 1_000_000, 0, "batch", 0.15),
        ("gemini-2.5-flash", 0, 1_000_000, "batch", 1.25),
        ("gemini-2.5-flash-lite", 2_000_000, 1_000_000, "standard", 0.60),
        ("gemini-2.5-pro", 1_000_000, 1_000_000, "batch", 5.625),
    ],
)
def test_cost_table(model, inp, out, service, usd):
    cat = b.builtin_catalog()
    usage = {"promptTokenCount": inp, "candidatesTokenCount": out}
    assert b.cost_usd(cat.spec(model, cat.as_of), usage, service) == pytest.approx(usd)  # Google's own figures


@pytest.mark.parametrize(
    "amount, shown",
    [
        (0, "$0.0000"),
        (1.23456, "$1.2346"),
        (0.0001, "$0.0001"),
        (0.00002, "$0.00002"),
        (0.0000123, "$0.000012"),
        (1e-6, "$0.000001"),
        (1e-12, "$0.000000000001"),
    ],
)
def test_usd_never_shows_a_small_cost_as_zero(amount, shown):
    assert b.usd(amount) == shown


def test_usage_cost_counts_thoughts_as_output():
    u = {"promptTokenCount": 1_000_000, "candidatesTokenCount": 500_000, "thoughtsTokenCount": 500_000}
    cat = b.builtin_catalog()
    assert b.cost_usd(cat.spec("gemini-2.5-flash", cat.as_of), u, "batch") == pytest.approx((0.30 + 2.50) / 2)


@pytest.mark.parametrize(("cur", "changed", "expected"), [(30, True, 30), (30, False, 45), (250, False, 300)])
def test_poll_backoff(cur, changed, expected):
    assert b.next_poll_interval(cur, changed, 30, 300) == expected


def test_calibration():
    assert b.calibrate_chars_per_token([(400, 100), (800, 200)]) == 4.0
    assert b.calibrate_chars_per_token([]) == b.CHARS_PER_TOKEN_OFFLINE
    assert b.estimate_tokens(10, 4.0) == 3


# -- records, prompts, answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"id": 1, "text": "x"}, None),
        ({"id": "a", "text": "x", "title": "t"}, None),
        ([1], "not an object"),
        ({"text": "x"}, "no 'id'"),
        ({"id": "", "text": "x"}, "non-empty"),
        ({"id": 1.5, "text": "x"}, "non-empty string"),
        ({"id": True, "text": "x"}, "non-empty string"),
        ({"id": 1}, "no 'text'"),
        ({"id": 1, "text": "  "}, "empty"),
        ({"id": 1, "text": 5}, "empty or not a string"),
    ],
)
def test_check_record(obj, problem):
    got = b.check_record(obj, "id", "text", ["title", "url", "text"])
    assert (got is None) if problem is None else (problem in got)


class _NotQuiteDict(dict):
    """A dict subclass: check_record's and render_prompt's fast paths step aside for it."""


_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8))
_records = st.dictionaries(st.sampled_from(["id", "text", "title", "url", "lang", "body"]), _values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(_records, st.sampled_from(["text", "body"]), st.lists(st.sampled_from(["title", "url", "text", "lang"]), max_size=4))
def test_check_record_fast_path_agrees_with_the_full_check(rec, text_field, fields):
    # The hot loop of prepare takes a shortcut for plain dicts; it must never accept what the full check refuses.
    assert b.check_record(rec, "id", text_field, fields) == b.check_record(_NotQuiteDict(rec), "id", text_field, fields)


_templates = ["{text}", "Title: {title}\nURL: {url}\n\n{text}", "{lang}: {title!r} {text:>3}", "{url:d} {body} {text}"]


@settings(max_examples=600, deadline=None)
@given(_records, st.sampled_from(_templates), st.sampled_from(["text", "body", "url"]), st.booleans())
def test_render_prompt_fast_paths_agree_with_the_template_rules(rec, template, text_field, subclass):
    # the hot loop's shortcuts (the record itself; a plain dict of the template's values) fill the template as
    # _PromptValues does, and raise what it raises (the same type and message: prepare quotes it)
    values = b._PromptValues(rec)
    values.text_field = text_field
    given = _NotQuiteDict(rec) if subclass else rec
    try:
        want = template.format_map(values)
    except (KeyError, ValueError, TypeError) as e:
        with pytest.raises(type(e)) as got:
            b.render_prompt(template, given, text_field)
        assert str(got.value) == str(e)
        return
    assert b.render_prompt(template, given, text_field) == want


def test_template_field_missing_is_reported():
    assert "template uses {lang}" in b.check_record({"id": 1, "text": "x"}, "id", "text", ["lang"])


def test_build_request_shape():
    cfg = b.JobConfig()
    cat = b.builtin_catalog()
    gen = b.generation_config(cfg, b.resolve_model(cat, cfg.model, cat.as_of))
    req = b.build_request(cfg, b.render_prompt(cfg.prompt_template, {"id": 1, "text": "Body"}, "text"), gen)
    assert req["contents"][0]["parts"][0]["text"] == "Title: \nURL: \n\nBody"
    gc = req["generationConfig"]
    assert gc["responseMimeType"] == "application/json" and gc["responseJsonSchema"] == b.NEWS_SCHEMA
    assert gc["thinkingConfig"] == {"thinkingLevel": "MINIMAL"} and "systemInstruction" in req


_configs = st.builds(
    b.JobConfig,
    system_instruction=st.one_of(st.just(""), st.text(max_size=20)),
    schema=st.one_of(
        st.none(), st.just(dict(b.NEWS_SCHEMA)), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
    ),
    temperature=st.one_of(st.none(), st.floats(0, 2)),
)


@settings(max_examples=300, deadline=None)
@given(_configs, st.text(), st.integers(0, 10**7), st.booleans())
def test_request_lines_are_the_bytes_of_the_request_dict(cfg, prompt, n, entry):
    # prepare splices its request lines from parts encoded once; they must be byte for byte what orjson writes for
    # the dict (prompts with quotes, backslashes, control characters, non-ASCII, the marker's own \x00 included)
    gen = b.generation_config(cfg, b.builtin_catalog().spec(cfg.model, "2026-12-01"))
    lines = b.RequestLines(cfg, gen, entry=entry)
    req = b.build_request(cfg, prompt, gen)
    line, got_entry = lines.make(n, prompt)
    assert line == b.orjson.dumps({"key": str(n), "request": req}, option=b.NL)
    assert got_entry == ((str(n), req) if entry else None)
    assert lines.parts is None or not entry  # the spliced path is taken when no entry is wanted


def resp(text, finish="STOP"):
    return {"candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": finish}]}


@pytest.mark.parametrize(
    ("response", "ok", "err"),
    [
        (resp('{"a": "x"}'), True, None),
        (resp('{"a": 1}'), False, "does not match"),
        (resp("nope"), False, "not valid JSON"),
        (resp('{"a": "x'), False, "not valid JSON"),
        (resp('{"a": "x"', "MAX_TOKENS"), False, "max_output_tokens"),
        ({"candidates": []}, False, "no candidates"),
        (resp("", "SAFETY"), False, "empty answer"),
        ({"candidates": [{"content": {"parts": [{"text": "thinking", "thought": True}, {"text": '{"a": "y"}'}]}}]}, True, None),
    ],
)
def test_parse_answer(response, ok, err):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    _value, e = b.parse_answer(response, schema)
    assert (e is None) == ok
    if err:
        assert err in e


# JSON values as orjson gives them, and schemas in and out of fast_schema_check's subset: the fast check may only
# pass what jsonschema passes, and schema_problem must say what jsonschema says.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.0, 1.0, 2.5]) | st.sampled_from(["a", "b", "Yes", ""]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), kids, max_size=3),
    max_leaves=8,
)
_types = st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"])
_schemas = st.recursive(
    st.fixed_dictionaries({}, optional={"type": _types | st.lists(_types, min_size=1, max_size=2)})
    | st.fixed_dictionaries(
        {"enum": st.lists(st.none() | st.booleans() | st.integers(0, 2) | st.just(1.0) | st.just("a"), max_size=3)}
    )
    | st.booleans()
    | st.just({"type": "string", "minLength": 1}),  # outside the subset: jsonschema alone
    lambda kids: st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["object", "array"]),
            "properties": st.dictionaries(st.sampled_from(["a", "b"]), kids, max_size=2),
            "required": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
            "additionalProperties": kids,
            "items": kids,
            "minItems": st.integers(0, 2),
            "maxItems": st.integers(0, 3),
            "description": st.just("annotation"),
        },
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(_schemas, _json)
def test_fast_schema_check_passes_only_what_jsonschema_passes(schema, value):
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(value))
    fast = b.fast_schema_check(schema)
    if fast is not None and fast(value):
        assert not errors, (schema, value, errors[0].message)
    got = b.schema_problem(value, schema) if isinstance(schema, dict) else None
    if isinstance(schema, dict):
        assert (got is None) == (not errors)


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        ({"type": "integer"}, True),  # a bool is no integer to jsonschema
        ({"type": "number"}, False),
        ({"type": "integer"}, 1.0),  # ... but 1.0 is one (jsonschema says so: the fast check defers)
        ({"enum": [1]}, True),
        ({"enum": [True]}, 1),
        ({"enum": [1]}, 1.0),
        ({"enum": ["a"]}, ["a"]),
        ({"type": "object", "additionalProperties": False, "properties": {"a": {}}}, {"a": 1, "b": 2}),
        ({"type": "array", "items": {"type": "string"}, "maxItems": 1}, ["a", "b"]),
        ({"required": ["a"]}, {"b": 1}),
        ({"required": ["a"]}, "not an object"),
        ({"type": ["string", "null"]}, None),
    ],
)
def test_fast_schema_check_edges(schema, value):
    import jsonschema

    valid = not list(jsonschema.Draft202012Validator(schema).iter_errors(value))
    fast = b.fast_schema_check(schema)
    assert fast is not None and (fast(value) is False or valid)
    assert (b.schema_problem(value, schema) is None) == valid


def test_fast_schema_check_covers_the_news_schema():
    fast = b.fast_schema_check(b.NEWS_SCHEMA)
    good = {"page_title": "t", "is_financial": "No", "category": "other", "sentiment": "neutral", "companies": [], "summary": "s"}
    assert fast is not None and fast(good)
    assert not fast({**good, "category": "weather"}) and not fast({**good, "companies": [1]}) and not fast({"page_title": "t"})
    assert b.schema_problem({**good, "category": "weather"}, b.NEWS_SCHEMA).startswith("category: 'weather' is not one of")


def test_schema_problem_judges_each_schema_by_its_own_validator_in_turn():
    """schema_problem remembers the schema object it was last asked about (not encoding it once per answer): a
    different schema, asked about in turn with the same value, is still judged by its own validators."""
    x, y, value = {"type": "object", "required": ["x"]}, {"type": "object", "required": ["y"]}, {"x": 1}
    for _ in range(2):
        assert b.schema_problem(value, x) is None
        assert "'y' is a required property" in (b.schema_problem(value, y) or "")
    assert b.schema_problem(value, dict(x)) is None and b.schema_problem({}, dict(x)) is not None


def test_merge_choice_prefers_first_ok():
    ok1, ok2, e1, e2 = (
        {"status": "ok", "v": 1},
        {"status": "ok", "v": 2},
        {"status": "error", "v": 3},
        {"status": "error", "v": 4},
    )
    assert b.merge_choice(ok1, ok2) is ok1
    assert b.merge_choice(e1, ok2) is ok2
    assert b.merge_choice(e1, e2) is e2
    assert b.merge_choice(None, e1) is e1


# -- the limiter with a clock the test moves --------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    async def sleep(self, d):
        self.t += d
        await asyncio.sleep(0)


@pytest.mark.parametrize(("limit", "window"), [(100, 60.0), (2000, 60.0), (50, 1.0)])
async def test_limiter_never_exceeds_window_and_sustains_rate(limit, window):
    clock = FakeClock()
    lim = b.RateLimiter(limit * 0.99 / window, 1.0, clock, clock.sleep)
    times = []
    for _ in range(limit * 3):
        await lim.acquire(1)
        times.append(clock.t)
    # no window of length `window` holds more than the limit (sliding, starting at every grant)
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        assert i - j + 1 <= limit
    achieved = len(times) / (times[-1] - times[0]) * window
    assert achieved >= 0.97 * limit


@pytest.mark.parametrize(
    ("grants", "total", "amount", "expected"),
    [
        ([], 0, 10, 100.0),  # empty: now
        ([(50.0, 40)], 40, 60, 100.0),  # fits exactly
        ([(50.0, 40)], 40, 61, 110.0),  # over by one: when the grant at 50 leaves (50 + 60)
        ([(45.0, 30), (50.0, 30), (90.0, 30)], 90, 40, 105.0),  # one must leave: the oldest, at 105
        ([(45.0, 30), (50.0, 30), (90.0, 30)], 90, 41, 110.0),  # two must leave: the second at 110
        ([(45.0, 30), (50.0, 30), (90.0, 30)], 90, 10, 100.0),
        ([(45.0, 30), (90.0, 30)], 60, 150, 150.0),  # over the cap on its own: once every grant has left
        ([(30.0, 100)], 100, 1, 100.0),  # a grant that left at 90 (30 + 60) but was not dropped yet: never before now
    ],
)
def test_window_room_at(grants, total, amount, expected):
    assert b.window_room_at(grants, total, amount, 100, 60.0, 100.0) == expected


def _busiest_window(grants, window):
    busiest, j, inside = 0.0, 0, 0.0
    for t, a in grants:
        inside += a
        while grants[j][0] + window <= t:
            inside -= grants[j][1]
            j += 1
        busiest = max(busiest, inside)
    return busiest


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_limiter_makes_up_time_a_held_up_loop_lost_and_no_window_passes_the_cap(seed):
    """The TPM bucket as a Flex sender builds it: paced at 97% of the limit, up to a tenth of it made up at once
    after the event loop was held up, never over 98% in any sliding window. A bucket without the ledger
    loses every held-up second (the old one, 95% and a 1% burst: 90% of the limit here)."""
    rng = random.Random(seed)
    clock = FakeClock()
    window, limit = 60.0, 1_000_000
    lim = b.tpm_bucket(limit, window, clock, clock.sleep)
    grants = []
    for i in range(4000):
        if i % 300 == 150:
            clock.t += rng.uniform(2.0, 5.0)  # the loop held up for seconds, about once a minute
        amount = rng.randint(2000, 3600)
        await lim.acquire(amount)
        grants.append((clock.t, amount))
    assert _busiest_window(grants, window) <= limit * 0.98
    sent = sum(a for _t, a in grants[:-1])
    assert sent / (grants[-1][0] - grants[0][0]) * window >= 0.96 * limit


@pytest.mark.parametrize("late", [0.0, 0.001, 0.003])
async def test_the_rpm_bucket_makes_up_late_wake_ups_and_no_window_passes_98_percent(late):
    """The real-time path's requests bucket as RequestSender builds it: a sleep that wakes `late` s after it was
    due (a busy event loop) costs no rate, and no sliding window holds over 98% of the limit. The bucket of one
    it replaced lost every late wake-up (0.86 of the limit on bench/realtime.py; 0.63 here at 3 ms)."""
    clock = FakeClock()

    async def late_sleep(d):
        clock.t += d + late
        await asyncio.sleep(0)

    limit, window = 2000, 10.0
    lim = b.rpm_bucket(limit, window, clock, late_sleep)
    grants = []
    for _ in range(limit * 3):
        await lim.acquire(1)
        grants.append((clock.t, 1))
    assert _busiest_window(grants, window) <= limit * 0.98
    assert (len(grants) - 1) / (grants[-1][0] - grants[0][0]) * window >= 0.97 * limit
    assert grants[1][0] - grants[0][0] >= 1 / (limit / window), "paced from the first request: no burst at the start"


async def test_limiter_gives_back_a_grant_the_server_refused():
    """A 429 is not counted by the server: the ledger forgets the refused attempt, so its retry does not wait
    for room the server never used (the old bucket made every retry pay twice)."""
    clock = FakeClock()
    lim = b.RateLimiter(100 / 60.0, 100, clock, clock.sleep, 60.0, 100)
    granted = [await lim.acquire(30) for _ in range(3)]
    assert clock.t == 0.0 and lim.in_ledger == 90
    lim.give_back(granted[1], 30)
    assert lim.in_ledger == 60
    await lim.acquire(40)  # fits now: 60 + 40 <= 100, and the bucket's time came back too
    assert clock.t == 0.0
    lim.give_back(123.0, 30)  # never granted: nothing changes
    assert lim.in_ledger == 100
    await lim.acquire(30)  # the window is full: waits for the first grant to leave it
    assert clock.t == 60.0


async def test_a_pause_forfeits_the_time_saved_up():
    """After a 429 the bucket waits out the server's delay, then paces without the burst it had saved up (a
    burst into a window the server says is full would only be refused again, and each refusal given back)."""
    clock = FakeClock()
    lim = b.RateLimiter(1.0, 10.0, clock, clock.sleep, 60.0, 100)
    clock.t = 100.0  # idle: ten units of time saved up
    for _ in range(5):
        await lim.acquire(1)
    assert clock.t == 100.0  # the saved-up burst
    lim.pause(2.0)
    grants = [await lim.acquire(1) for _ in range(3)]
    assert grants[0] >= 102.0
    assert grants[2] - grants[0] == pytest.approx(2.0)  # one a second: no burst


@pytest.mark.parametrize(
    ("longest_seen", "expected"),
    [
        (0.0, 450.0),  # no answer yet: the middle of Google's 1-15 min target
        (70.0, 450.0),  # the first answers are the quick ones: not a reason for a pipe sized for 70 s
        (449.0, 450.0),
        (600.0, 600.0),  # an answer took longer: the pipe follows it
        (900.0, 900.0),
    ],
)
def test_flex_latency_estimate(longest_seen, expected):
    assert b.flex_latency_estimate(longest_seen) == expected
    assert b.flex_latency_estimate(longest_seen / 10, 6.0) == expected / 10  # a drill's minute of 6 s


async def test_limiter_pause_and_slowdown():
    clock = FakeClock()
    lim = b.RateLimiter(10.0, 1.0, clock, clock.sleep)
    await lim.acquire()
    lim.pause(5.0)
    await lim.acquire()
    assert clock.t >= 5.0
    lim.slow_down()
    assert lim.rate < 10.0
    for _ in range(1000):
        lim.recover()
    assert lim.rate == 10.0


# -- calibration sample and margin --------------------------------------------------------------


def test_calibration_sample_spreads_over_the_file(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join(b'{"id": %d, "text": "%s"}\n' % (i, b"x" * (i % 50 + 1)) for i in range(1000)))
    ids = [r["id"] for r in b.calibration_sample(p, 64)]
    assert len(ids) == 64 and len(set(ids)) == 64
    assert min(ids) == 0 and max(ids) > 960, "from the head to the tail, not just the head"


def test_calibration_sample_small_bad_and_array_files(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'\xef\xbb\xbf{"id": 1, "text": "a"}\n{oops\n\n{"id": 2, "text": "b"}\n')
    assert [r["id"] for r in b.calibration_sample(small, 64)] == [1, 2]  # each line once, bad ones skipped
    arr = tmp_path / "in.json"
    arr.write_bytes(b'[{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 3, "text": "c"}]')
    assert [r["id"] for r in b.calibration_sample(arr, 2)] == [1, 2]
    assert list(b.calibration_sample(tmp_path / "missing.jsonl", 8)) == []


@pytest.mark.parametrize(
    ("asked", "warranted", "margin"),
    [(None, 0.017, 0.017), (None, None, b.DEFAULT_MARGIN), (0.2, 0.017, 0.2), (0.0, None, 0.0)],
)
def test_margin_for(asked, warranted, margin):
    assert b.margin_for(asked, warranted) == margin


@pytest.mark.parametrize(
    ("samples", "margin"),
    [
        ([(36_000, 10_000)] * 8, b.MARGIN_FLOOR),  # every call the same ratio: the floor
        ([(36_000, 10_000)] * 3, b.CALIBRATED_MARGIN),  # too few calls to see a spread
        ([(36_000, 10_000), (0, 0), (36_000, 0), (36_000, 10_000)], b.CALIBRATED_MARGIN),  # empty calls do not count
        # ratios 0.27 and 0.29 (+-3.6%), 8 calls: relative standard error 3.84% / sqrt(8); three of them
        ([(100, 27), (100, 29)] * 4, round(3 * statistics.stdev([0.27, 0.29] * 4) / 0.28 / math.sqrt(8), 4)),
        ([(100, 10), (100, 40)] * 4, b.DEFAULT_MARGIN),  # wild: capped at the offline guess's margin
    ],
)
def test_estimate_margin(samples, margin):
    assert b.estimate_margin(samples) == pytest.approx(margin)


@given(
    st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), min_size=4, max_size=16),
    st.integers(1, 1000),
)
def test_estimate_margin_bounds_and_scale(samples, k):
    m = b.estimate_margin(samples)
    assert b.MARGIN_FLOOR <= m <= b.DEFAULT_MARGIN
    # counting in other units (k times the characters, or k times the tokens) changes nothing
    assert b.estimate_margin([(c * k, t) for c, t in samples]) == pytest.approx(m, abs=1e-4)
    assert b.estimate_margin([(c, t * k) for c, t in samples]) == pytest.approx(m, abs=1e-4)


@pytest.mark.parametrize(
    ("eff", "batch_size", "per_doc", "max_jobs", "cap"),
    [
        (9_700_000, 1000, 2900.0, 100, 2_425_000),  # 3 x 2.9M would idle 0.9M: 4 batches of 2.425M fill it
        (9_700_000, 100, 2900.0, 100, 9_700_000 // 34),  # 33.4 -> 34 batches
        (8_700_000, 1000, 2900.0, 100, 2_900_000),  # already a whole number: unchanged
        (9_700_000, 10_000, 2900.0, 100, 9_700_000),  # one batch would exceed the limit: the limit caps it
        (400_000_000, 1000, 2900.0, 100, 400_000_000),  # 138 batches > 100 concurrent jobs: the job count binds
        (9_700_000, 1000, 0.0, 100, 9_700_000),  # nothing sampled
        (1000, 1, 6.0, 167, 1000),  # 167 batches of 5 (1000 // 167) would be 200 jobs at once: the job count binds
    ],
)
def test_batch_token_cap(eff, batch_size, per_doc, max_jobs, cap):
    assert b.batch_token_cap(eff, batch_size, per_doc, max_jobs) == cap


@settings(max_examples=200, deadline=None)
@given(st.integers(1_000, 10**9), st.integers(1, 5000), st.floats(1, 50_000), st.integers(1, 200))
def test_batch_token_cap_fills_the_limit_with_whole_batches(eff, batch_size, per_doc, max_jobs):
    cap = b.batch_token_cap(eff, batch_size, per_doc, max_jobs)
    assert 1 <= cap <= eff
    if cap < eff:  # k batches at the cap fit, and the cap is not below the next size down
        k = eff // cap
        assert k <= max_jobs and k * cap <= eff and cap <= batch_size * per_doc


def test_batch_cutter_gives_request_less_ordinals_to_the_batch_before():
    """prepare's streaming pass and plan_batches share this cutter; ordinals with no request (a URL that
    could not be fetched) stay inside the ranges, so every ordinal belongs to exactly one batch."""
    c = b.BatchCutter(batch_size=2, token_cap=100, max_bytes=1000)
    starts = [c.add(n, 10, 10) for n in (0, 1, 3, 4, 7)]  # 2, 5, 6 carry no request
    assert starts == [True, False, True, False, True]
    got = [(p.start, p.end, p.tokens) for p in c.finish(9)]  # 8 carries none either
    assert got == [(0, 3, 20), (3, 7, 20), (7, 9, 10)]
    assert [(p.start, p.end) for p in b.BatchCutter(2, 100, 1000).finish(3)] == [(0, 3)]  # no request at all
    assert b.BatchCutter(2, 100, 1000).finish(0) == []


@pytest.mark.parametrize(
    ("mode", "flex", "waves", "expected"),
    [
        ("auto", True, 1, "batch"),  # one wave: everything is enqueued at once, batch alone
        ("auto", True, 3, "hybrid"),  # later waves would wait for capacity Flex does not need
        ("auto", False, 3, "batch"),  # no Flex tier
        ("batch", True, 3, "batch"),
        ("hybrid", True, 1, "hybrid"),
        ("flex", True, 3, "none"),
        ("realtime", True, 3, "none"),
    ],
)
def test_lanes_for(mode, flex, waves, expected):
    assert b.lanes_for(mode, flex, waves) == expected


def test_random_flex_sheds_do_not_cut_the_rate_sustained_shedding_does():
    """A few % of Flex requests shed at random is Google's best effort, not a capacity signal: no cut. Over a
    fifth of a window's attempts shed: the rate is cut, once a window."""
    clock = [0.0]
    sender = b.RequestSender.__new__(b.RequestSender)
    sender.window = 60.0
    sender.window_counts = [0.0, 0, 0]
    for i in range(100):  # 5% shed
        sender._count_attempt(clock[0])
        if i % 20 == 0:
            assert not sender._shedding()
    sender.window_counts = [0.0, 0, 0]
    verdicts = []
    for i in range(100):  # 30% shed
        sender._count_attempt(clock[0])
        if i % 10 < 3:
            verdicts.append(sender._shedding())
    assert verdicts[-1] and not verdicts[0]  # not on the first few attempts of a window: too few to tell


# -- which job is a batch's primary (its results are read in input order, by range) ---------------------------
@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"start": 10, "end": 15}, range(10, 15)),  # the first job of a batch, as prepare cut it
        ({"start": 10, "end": 15, "attempt": 2, "retry_of": "b0001"}, None),  # a retry (sidecars never give it a range)
        ({"start": 10, "end": 15, "retry_of": "b0001"}, None),
        ({"part": ".1"}, None),  # a split part: its own request file
        ({}, None),  # the line retry (x0001): its own request file
    ],
)
def test_primary_range_names_the_first_job_of_a_batch_only(changes, expected):
    import dataclasses

    job = dataclasses.replace(b.Job("b0001", 1, "dn", "requests/b0001.jsonl", 5, 50, 500), **changes)
    assert job.primary_range == expected


# -- library callers' options are held to the flags' rules ----------------------------------------------------
@pytest.mark.parametrize(
    "changes, says",
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_size": "x"}, "--batch-size"),
        ({"mode": "bogus"}, "is not one of"),
        ({"max_attempts": 0}, "--max-attempts"),
        ({"concurrency": 0}, "--concurrency"),
        ({"poll_interval": -1}, "--poll-interval"),
        ({"max_cost": -5}, "above 0"),
        ({"max_cost": "x"}, "must be a number"),
        ({"waves": 0}, "at least 1"),
        ({"barrier": "yes"}, "True or False"),
        ({"id_field": 3}, "must be a string"),
        ({"fallback": 1}, "True or False"),
    ],
)
def test_run_options_a_flag_would_refuse_are_refused_in_the_library_too(changes, says):
    with pytest.raises(b.UsageError, match="RunOptions") as e:
        b.RunOptions(**changes).checked()
    assert says in str(e.value)


@pytest.mark.parametrize("field", ["margin", "poll_interval", "create_timeout", "retry_scale", "rate_window", "max_cost"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_infinity_are_refused_for_every_float_option(field, value):
    """A range only compares: NaN passed every range (margin=nan then a raw ValueError deep in planning) and inf
    any lower bound (poll_interval=inf or nan: the run never polled again and hung)."""
    with pytest.raises(b.UsageError, match=f"RunOptions {field}=") as e:
        b.RunOptions(**{field: value}).checked()
    assert "--" + field.replace("_", "-") in str(e.value) and any(w in str(e.value) for w in ("finite", "above 0", "range"))
    with pytest.raises(b.UsageError, match="max_poll_interval"):
        b.RunOptions(max_poll_interval=value).checked()


def test_the_cli_refuses_nan_and_infinity_too():
    from click.testing import CliRunner

    for args in (
        ["run", "x.jsonl", "--poll-interval", "nan"],
        ["run", "x.jsonl", "--margin", "nan"],
        ["resume", "r", "--poll-interval", "inf"],
    ):
        r = CliRunner().invoke(b.cli, args)
        assert r.exit_code == 2 and "not a finite number" in r.output, (args, r.output)


def test_run_options_the_flags_accept_pass_and_are_taken_as_the_flags_take_them():
    for changes in ({}, {"waves": 3}, {"max_cost": 1}, {"poll_interval": None}):
        opts = b.RunOptions(**changes)
        assert opts.checked() is opts  # nothing to convert: the same object
    assert b.RunOptions(mode="standard").checked().mode == "realtime"  # as --mode standard is (every request, 2x)
    assert b.RunOptions(waves="2").checked().waves == 2
    assert b.RunOptions(batch_size=3.0).checked().batch_size == 3
    with pytest.raises(b.UsageError, match="whole number"):
        b.RunOptions(batch_size=2.7).checked()
    with pytest.raises(b.UsageError, match="must be a path"):
        b.RunOptions(out=5).checked()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("files/abc-1", "files/abc-1"),
        ("https://generativelanguage.googleapis.com/v1beta/files/abc-1:download?alt=media", "files/abc-1"),
        ("https://generativelanguage.googleapis.com/v1beta/files/abc-1", "files/abc-1"),
        (None, None),
    ],
)
def test_a_responses_file_given_as_a_uri_is_read_as_its_file_name(given, name):
    """A full URI used to reach the SDK, which cut it to "files/batch" and was refused on every try (9 creates)."""
    op = {"name": "batches/1", "metadata": {"state": "BATCH_STATE_SUCCEEDED", "output": {"responsesFile": given}}}
    assert b.operation_to_job(op).output_file == name


@pytest.mark.parametrize(
    "response",
    [
        {"candidates": [None]},
        {"candidates": {"0": {"content": {"parts": [{"text": "x"}]}}}},
        {"candidates": [{"content": "x"}]},
        {"candidates": [{"content": {"parts": {"text": "x"}}}]},
        {"candidates": [{"content": {"parts": [{"text": 5}]}}]},
        {"candidates": [], "promptFeedback": "blocked"},
    ],
)
def test_an_answer_of_an_unknown_shape_is_that_ids_error_not_a_crash(response):
    """Shapes no Gemini answer should have (a proxy's, a changed API's): the id gets an error, the run goes on. Each
    raised AttributeError / KeyError / TypeError out of the Flex request's task, which cancelled every other request
    in flight (adversary reproducer)."""
    result, error = b.parse_answer(response, {"type": "object"})
    assert result is None and error


def test_merge_continuation_joins_the_hops_as_the_sdk_does():
    def hop(text, finish, token=None, out=0):
        cand = {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish}
        if token:
            cand["continuationToken"] = token
        return {"candidates": [cand], "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": out}}

    first, last = hop('{"a": ', "CONTINUATION", "tok", 3), hop("1}", "STOP", out=2)
    assert b.continuation_token(first) == "tok" and b.continuation_token(last) is None
    assert b.continuation_token(hop("x", "STOP", "tok")) is None  # a token without CONTINUATION: complete
    assert b.continuation_token({"candidates": [None]}) is None
    merged = b.merge_continuation([first, last])
    assert b.parse_answer(merged, {"type": "object"}) == ({"a": 1}, None)
    assert merged["usageMetadata"] == {"promptTokenCount": 20, "candidatesTokenCount": 5}
    assert merged["candidates"][0]["finishReason"] == "STOP"
    assert b.merge_continuation([last]) is last


@pytest.mark.parametrize(
    ("spent", "committed", "next_cost", "overrun", "cap", "allows"),
    [
        (0.0, 0.0, 1.0, 1.0, None, True),  # no cap
        (5.0, 3.0, 2.0, 1.0, 10.0, True),  # exactly at the cap
        (5.0, 3.0, 2.1, 1.0, 10.0, False),
        (5.0, 1.0, 1.0, 2.0, 10.0, True),  # answers twice the estimate: 5 + 2 x 2 = 9
        (5.0, 2.0, 1.0, 2.0, 10.0, False),  # 5 + 3 x 2 = 11
        (5.0, 3.0, 2.0, 0.5, 10.0, True),  # cheaper than estimated: estimates are not scaled down
        (5.0, 3.0, 2.1, 0.5, 10.0, False),
    ],
)
def test_cost_cap_allows(spent, committed, next_cost, overrun, cap, allows):
    assert b.cost_cap_allows(spent, committed, next_cost, overrun, cap) is allows
