"""Merge from sidecars alone: results files in odd shapes, against a plain model of the resolution rules.

merge splices a primary results line's bytes into the output when the line has our own layout, and
re-encodes anything else; it reads each results file alongside its range. These tests hand it files
out of order, with holes, torn lines, foreign key orders and extra keys, plus real-time and retry
overrides, and check the output line by line against a model that decodes and re-encodes everything.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchify

S = batchify.JobState
TO_DOWNLOADED = (S.UPLOADING, S.UPLOADED, S.SUBMITTING, S.PENDING, S.SUCCEEDED, S.RESULTS_DOWNLOADED)
FIELDS = ("status", "result", "error", "source", "usage")


def prepared(tmp: Path, docs: int, batch_size: int) -> batchify.RunStore:
    inp = tmp / "in.jsonl"
    with open(inp, "wb") as f:
        for i in range(docs):
            f.write(orjson.dumps({"id": f"doc-{i:03d}", "text": f"Article {i} about markets."}) + b"\n")
    opts = batchify.RunOptions(calibrate=False, batch_size=batch_size, out=str(tmp / "out.jsonl"))
    store = batchify.RunStore(tmp / "st", "m")
    asyncio.run(batchify.prepare_run(store, inp, batchify.JobConfig(), opts))
    (store.dir / "results").mkdir(exist_ok=True)
    return store


CATEGORIES = ["markets", "companies", "other"]


def answer(n: int, shape: str) -> dict[str, Any]:
    """An ok answer of the news schema: its categorical fields whole, one left out, a list where a value
    belongs, a bool or a number (merge counts what is there, as analytics does, without re-checking the schema;
    true, 1 and 1.0 are one dict key in Python but three labels)."""
    a: dict[str, Any] = {"summary": f'answer {n} \u00e9 "quoted"'}
    if shape != "bare":
        a |= {"is_financial": "Yes" if n % 3 else "No", "category": CATEGORIES[n % 3], "sentiment": "neutral"}
    if shape == "missing":
        del a["category"]
    elif shape == "list":
        a["category"] = [CATEGORIES[n % 3], "other"]
    elif shape in ("bool", "number"):  # one category, so that true, 1 and 1.0 rows meet
        a["is_financial"] = True if shape == "bool" else 1 if n % 2 else 1.0
        a["category"] = "markets"
    return a


def result(n: int, ok: bool, source: str = "batch", shape: str = "whole") -> dict[str, Any]:
    return {
        "n": n,
        "status": "ok" if ok else "error",
        "result": answer(n, shape) if ok else None,
        "error": None if ok else f"Internal error (code 13) for {n}",
        "source": source,
        "usage": {"promptTokenCount": 100 + n, "candidatesTokenCount": 7, "totalTokenCount": 107 + n} if ok else None,
    }


def encode(r: dict[str, Any], layout: str) -> bytes:
    if layout == "ours":
        return orjson.dumps(r) + b"\n"
    if layout == "reordered":  # an older writer: usage before source
        return orjson.dumps({k: r[k] for k in ("n", "status", "result", "error", "usage", "source")}) + b"\n"
    if layout == "spaced":  # written by another JSON library
        return json.dumps(r).encode() + b"\n"
    if layout == "extra":  # an extra key the output must not carry
        return orjson.dumps({**r, "debug": [1, 2]}) + b"\n"
    raise AssertionError(layout)


def mark_downloaded(store: batchify.RunStore, job: batchify.Job) -> None:
    for s in TO_DOWNLOADED:
        job = batchify.advance(job, s, batchify.utcnow())
    store.save_job(job)


def expected_lines(store: batchify.RunStore, best: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [orjson.loads(line) for line in open(store.ids_path, "rb")]
    missing = {"status": "error", "result": None, "error": "no result (run not finished)", "source": "none", "usage": None}
    return [{"id": i, **{k: (best.get(n) or missing)[k] for k in FIELDS}} for n, i in enumerate(ids)]


def test_spliced_lines_are_byte_identical_to_encoded_ones(tmp_path):
    store = prepared(tmp_path, 30, 10)
    rng = random.Random(3)
    for job in store.load_jobs():
        with open(store.result_path(job), "wb") as f:
            for n in range(job.start or 0, job.end or 0):
                f.write(encode(result(n, rng.random() > 0.2), "ours"))
        mark_downloaded(store, job)
    summary = batchify.merge_run(store.state_dir, "m")
    out = Path(summary.out).read_bytes().splitlines()
    assert len(out) == 30
    for line in out:
        row = orjson.loads(line)
        assert list(row) == ["id", *FIELDS]  # the documented key order
        assert line == orjson.dumps(row), "a spliced line must be exactly what encoding the row gives"
    ok = sum(orjson.loads(x)["status"] == "ok" for x in out)
    assert (summary.ok, summary.errors) == (ok, 30 - ok)
    usage = [orjson.loads(x)["usage"] for x in out]
    assert summary.usage["promptTokenCount"] == sum(u["promptTokenCount"] for u in usage if u)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_merge_matches_the_model_whatever_the_results_files_look_like(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("merge")
    store = prepared(tmp, 24, 6)
    best: dict[int, dict[str, Any]] = {}
    realtime: list[dict[str, Any]] = []
    for job in store.load_jobs():
        ns = list(range(job.start or 0, job.end or 0))
        present = [n for n in ns if data.draw(st.integers(0, 5)) > 0]  # a hole now and then
        # in order, as a download writes them (merge's fast path), or shuffled
        order = sorted(present) if data.draw(st.booleans()) else data.draw(st.permutations(present))
        lines = []
        for n in order:
            shape = data.draw(st.sampled_from(["whole", "whole", "whole", "bare", "missing", "list", "bool", "number"]))
            r = result(n, data.draw(st.booleans()), shape=shape)
            layout = data.draw(st.sampled_from(["ours", "ours", "reordered", "spaced", "extra"]))
            lines.append(encode(r, layout))
            best[n] = r
        if lines and data.draw(st.booleans()):
            torn = lines.pop()  # a crash mid-write: the last line is cut short
            best.pop(orjson.loads(torn)["n"])
            lines.append(torn[: len(torn) // 2])
        if lines and data.draw(st.integers(0, 3)) == 0:  # lines that are no result at all are skipped
            lines.insert(data.draw(st.integers(0, len(lines) - 1)), b'{"x": 1}\n[1, 2]\n"n"\n')
        fate = data.draw(st.sampled_from(["downloaded", "downloaded", "failed", "running"]))
        if fate == "downloaded":
            store.result_path(job).write_bytes(b"".join(lines))
            mark_downloaded(store, job)
        else:  # a results file of a job that did not finish is never read
            store.result_path(job).write_bytes(b"".join(lines))
            for n in ns:
                best.pop(n, None)
            if fate == "failed":
                for state in (S.UPLOADING, S.UPLOADED, S.SUBMITTING, S.PENDING, S.FAILED):
                    job = batchify.advance(job, state, batchify.utcnow(), error="quota")
                store.save_job(job)
                for n in ns:
                    best[n] = {
                        "status": "error",
                        "result": None,
                        "error": f"batch job {job.name} ended FAILED: quota",
                        "source": "batch",
                        "usage": None,
                    }
        # real time answered some ids of some batches: an ok answer replaces an error, never the other way round
        share = data.draw(st.sampled_from([0, 0, 4]))
        for n in ns:
            if share and data.draw(st.integers(1, share)) == 1:
                rt = result(n, data.draw(st.booleans()), "realtime")
                realtime.append(rt)
                if n not in best or best[n]["status"] != "ok":
                    best[n] = rt
    store.realtime_path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in realtime))
    summary = batchify.merge_run(store.state_dir, "m")
    rows = [orjson.loads(line) for line in open(summary.out, "rb")]
    assert rows == expected_lines(store, best)
    assert all(list(r) == ["id", *FIELDS] for r in rows)
    assert summary.ok == sum(r["status"] == "ok" for r in rows)
    assert summary.by_source == {s: sum(r["source"] == s for r in rows) for s in {r["source"] for r in rows}}
    assert_tally(store, summary, rows)


def assert_tally(store: batchify.RunStore, summary: batchify.Summary, rows: list[dict[str, Any]]) -> None:
    """What merge counted while it wrote (its fast path counts most rows its own way) against a count of the
    written rows done one by one: the schema's categorical fields, error kinds, usage."""
    fields: dict[str, dict[str, int]] = {k: {} for k in ("is_financial", "category", "sentiment")}
    kinds: dict[str, int] = {}
    usage: dict[str, int] = {}
    for r in rows:
        if r["status"] == "ok" and isinstance(r["result"], dict):
            for k, counts in fields.items():
                v = r["result"].get(k)
                for item in v if isinstance(v, list) else [v]:
                    label = item if isinstance(item, str) else json.dumps(item)
                    counts[label] = counts.get(label, 0) + 1
        elif r["status"] != "ok":
            kind = r["error"].split(" (")[0].split(":")[0].strip()
            kinds[kind] = kinds.get(kind, 0) + 1
        for k, v in (r["usage"] or {}).items():
            usage[k] = usage.get(k, 0) + v
    assert store.load_run().summary["fields"] == fields
    assert summary.error_kinds == kinds
    assert summary.usage == usage


def test_lines_not_quite_ours_are_re_encoded_and_override_keys_that_are_no_ordinal_are_ignored(tmp_path):
    """A results line whose "n" is 1.0, or with a blank before it, is re-encoded (its null source reads "batch", as
    counted) rather than spliced; real-time lines whose "n" is a string or null are no ordinal's and do not stop the
    merge."""
    store = prepared(tmp_path, 6, 3)
    for job in store.load_jobs():
        lines = []
        for n in range(job.start or 0, job.end or 0):
            r = result(n, True)
            if n == 1:
                lines.append(orjson.dumps({**r, "n": 1.0, "source": None}) + b"\n")
            elif n == 2:
                lines.append(b" " + encode(r, "ours"))
            else:
                lines.append(encode(r, "ours"))
        store.result_path(job).write_bytes(b"".join(lines))
        mark_downloaded(store, job)
    odd = {**result(5, True, "realtime"), "n": "5"}
    store.realtime_path.write_bytes(orjson.dumps(odd) + b"\n" + orjson.dumps({**odd, "n": None}) + b"\n")
    summary = batchify.merge_run(store.state_dir, "m")
    out = Path(summary.out).read_bytes().splitlines()
    assert all(line == orjson.dumps(orjson.loads(line)) for line in out), "every line in the canonical encoding"
    rows = [orjson.loads(line) for line in out]
    assert rows == expected_lines(store, {n: {**result(n, True)} for n in range(6)})
    assert summary.by_source == {"batch": 6}


def test_true_1_and_1_0_are_counted_apart(tmp_path):
    """The analytics label true, 1 and 1.0 apart, as analytics() does, though Python takes them for one dict key
    (merge's fast path counts rows by their values taken at once; an integer enum is a valid schema)."""
    store = prepared(tmp_path, 4, 4)
    (job,) = store.load_jobs()
    shapes = ["bool", "number", "number", "whole"]  # is_financial: true, 1, 1.0, "No"
    store.result_path(job).write_bytes(b"".join(encode(result(n, True, shape=sh), "ours") for n, sh in enumerate(shapes)))
    mark_downloaded(store, job)
    summary = batchify.merge_run(store.state_dir, "m")
    rows = [orjson.loads(line) for line in open(summary.out, "rb")]
    assert [r["result"]["is_financial"] for r in rows] == [True, 1, 1.0, "No"]
    assert store.load_run().summary["fields"]["is_financial"] == {"true": 1, "1": 1, "1.0": 1, "No": 1}
    assert_tally(store, summary, rows)


USAGE = st.dictionaries(
    st.sampled_from(["promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount", "cachedTokens"]),
    st.integers(0, 10**9),
)


@given(st.lists(USAGE, max_size=40))
def test_bulk_usage_sum_equals_one_by_one(usages):
    one: dict[str, int] = {"promptTokenCount": 5}
    bulk = dict(one)
    for u in usages:
        batchify.add_usage(one, u)
    batchify.add_usages(bulk, usages)
    assert bulk == one


def test_bulk_usage_sum_counts_only_ints_on_foreign_values():
    usages: list = [
        {"promptTokenCount": 10, "totalTokenCount": 12},
        {"promptTokenCount": 1.5, "totalTokenCount": "7"},  # a foreign writer
        {"promptTokenCount": 3, "candidatesTokenCount": None},
        ["not", "a", "dict"],
    ]
    total: dict[str, int] = {}
    batchify.add_usages(total, usages)
    assert total == {"promptTokenCount": 13, "totalTokenCount": 12}
