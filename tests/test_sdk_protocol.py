"""The unmodified google-genai SDK, sync and async, against the emulator over loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from google import genai
from google.genai import errors, types

import batchify

LINES = [
    {
        "key": "a",
        "request": {
            "contents": [{"parts": [{"text": "Title: Stocks rise\n\nMarkets rallied."}]}],
            "generation_config": {"temperature": 0.1},
        },
    },
    {
        "key": "b",
        "request": {
            "contents": [{"parts": [{"text": "Hello there"}], "role": "user"}],
            "generationConfig": {
                "responseMimeType": "application/json",
                "responseJsonSchema": {"type": "object", "properties": {"ok": {"type": "string", "enum": ["Yes", "No"]}}},
            },
        },
    },
]


def client(url: str) -> genai.Client:
    return genai.Client(api_key="k", vertexai=False, http_options=types.HttpOptions(base_url=url))


def write_jsonl(tmp_path, lines=LINES):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def wait_done(c: genai.Client, name: str, timeout: float = 10):
    import time

    end = time.time() + timeout
    while time.time() < end:
        j = c.batches.get(name=name)
        if j.done:
            return j
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_sync_file_batch_lifecycle(emu, tmp_path):
    c = client(emu.url)
    f = c.files.upload(file=str(write_jsonl(tmp_path)), config=types.UploadFileConfig(mime_type="jsonl", display_name="in"))
    assert f.name.startswith("files/") and f.state.name == "ACTIVE" and int(f.size_bytes) > 0
    assert c.files.get(name=f.name).display_name == "in"
    assert f.name in [x.name for x in c.files.list()]
    job = c.batches.create(model="gemini-2.5-flash", src=f.name, config={"display_name": "job-1"})
    assert job.name.startswith("batches/") and len(job.name.split("/")[1]) == 36
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "job-1"
    assert not job.done
    done = wait_done(c, job.name)
    assert done.state == types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest.file_name.startswith("files/batch-")
    out = [json.loads(x) for x in c.files.download(file=done.dest.file_name).decode().splitlines()]
    assert [o["key"] for o in out] == ["a", "b"]
    assert json.loads(out[1]["response"]["candidates"][0]["content"]["parts"][0]["text"])["ok"] in ("Yes", "No")
    assert out[0]["response"]["usageMetadata"]["promptTokenCount"] > 0
    assert "emulator" in out[0]["response"]["modelVersion"]
    assert job.name in [j.name for j in c.batches.list(config={"page_size": 1})]  # paging works
    c.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as e:
        c.batches.get(name=job.name)
    assert e.value.code == 404
    c.files.delete(name=f.name)
    with pytest.raises(errors.ClientError) as e:
        c.files.get(name=f.name)
    assert e.value.code == 403
    s = emu.stats()
    assert s["uploads"] == 1 and s["creates"] == 1 and s["creates_by_display_name"] == {"job-1": 1}


def test_raw_operation_has_batch_stats_as_strings(emu, tmp_path):
    c = client(emu.url)
    f = c.files.upload(file=str(write_jsonl(tmp_path)), config={"mime_type": "jsonl"})
    job = c.batches.create(model="gemini-2.5-flash", src=f.name)
    req = urllib.request.Request(f"{emu.url}/v1beta/{job.name}", headers={"x-goog-api-key": "k"})
    op = json.loads(urllib.request.urlopen(req).read())
    assert op["metadata"]["batchStats"]["requestCount"] == "2"
    assert op["metadata"]["state"] == "BATCH_STATE_PENDING" and "done" not in op
    wait_done(c, job.name)
    op = json.loads(urllib.request.urlopen(req).read())
    assert op["done"] is True and op["metadata"]["output"] == {"responsesFile": op["response"]["responsesFile"]}
    assert op["metadata"]["batchStats"]["successfulRequestCount"] == "2"
    assert "pendingRequestCount" not in op["metadata"]["batchStats"]  # zero counts are omitted


async def test_async_inline_batch_cancel_generate_count(emu):
    c = client(emu.url)
    inline = [
        {"contents": [{"parts": [{"text": "one"}], "role": "user"}], "metadata": {"key": "x"}},
        types.InlinedRequest(contents="two", metadata={"key": "y"}),
    ]
    job = await c.aio.batches.create(model="gemini-2.5-flash-lite", src=inline, config={"display_name": "inl"})
    for _ in range(100):
        job = await c.aio.batches.get(name=job.name)
        if job.done:
            break
        import asyncio

        await asyncio.sleep(0.1)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert [r.metadata["key"] for r in job.dest.inlined_responses] == ["x", "y"]
    assert job.dest.inlined_responses[0].response.text
    names = [j.name async for j in await c.aio.batches.list()]
    assert job.name in names
    job2 = await c.aio.batches.create(model="gemini-2.5-flash", src=inline)
    await c.aio.batches.cancel(name=job2.name)
    assert (await c.aio.batches.get(name=job2.name)).state == types.JobState.JOB_STATE_CANCELLED
    r = await c.aio.models.generate_content(
        model="gemini-2.5-flash",
        contents="Why is the sky blue?",
        config=types.GenerateContentConfig(system_instruction="Be brief", temperature=0.2),
    )
    assert r.text and r.usage_metadata.prompt_token_count > 0
    n = await c.aio.models.count_tokens(model="gemini-2.5-flash", contents="x" * 36)
    assert n.total_tokens == 10
    await c.aio.aclose()


def test_sync_generate_with_schema_and_count(emu):
    c = client(emu.url)
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "n": {"type": "integer"}},
        "required": ["label", "n"],
    }
    r = c.models.generate_content(
        model="gemini-2.5-flash",
        contents="classify me",
        config={"response_mime_type": "application/json", "response_json_schema": schema},
    )
    val = json.loads(r.text)
    assert val["label"] in ("a", "b") and isinstance(val["n"], int)
    assert c.models.count_tokens(model="gemini-2.5-flash", contents="hello").total_tokens == 2


def test_errors_are_google_shaped(emu):
    c = client(emu.url)
    with pytest.raises(errors.ClientError) as e:
        c.models.generate_content(model="not-a-model", contents="x")
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"
    emu.configure(unavailable_burst=1)
    with pytest.raises(errors.ServerError) as e:
        c.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert e.value.code == 503
    emu.configure(rpm=1, rate_window=60.0)
    c.models.generate_content(model="gemini-2.5-flash", contents="x")
    with pytest.raises(errors.ClientError) as e:
        c.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert e.value.code == 429 and e.value.status == "RESOURCE_EXHAUSTED"
    assert batchify._retry_delay(e.value.details) is not None
    # a request without an API key is refused
    req = urllib.request.Request(f"{emu.url}/v1/batches")
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req)
    assert he.value.code == 403


def test_enqueued_limit_answers_429(emu, tmp_path):
    emu.configure(enqueued_limit=30, job_seconds=30)
    c = client(emu.url)
    f = c.files.upload(file=str(write_jsonl(tmp_path)), config={"mime_type": "jsonl"})
    c.batches.create(model="gemini-2.5-flash", src=f.name)  # ~10 tokens
    c.batches.create(model="gemini-2.5-flash", src=f.name)
    with pytest.raises(errors.ClientError) as e:
        for _ in range(3):
            c.batches.create(model="gemini-2.5-flash", src=f.name)
    assert e.value.code == 429 and "enqueued tokens" in e.value.message
    assert emu.stats()["peak_enqueued_tokens"] <= 30


def test_concurrent_job_limit_answers_429_naming_it(emu, tmp_path):
    emu.configure(max_active_jobs=2, job_seconds=30)
    c = client(emu.url)
    f = c.files.upload(file=str(write_jsonl(tmp_path)), config={"mime_type": "jsonl"})
    c.batches.create(model="gemini-2.5-flash", src=f.name)
    c.batches.create(model="gemini-2.5-flash", src=f.name)
    with pytest.raises(errors.ClientError) as e:
        c.batches.create(model="gemini-2.5-flash", src=f.name)
    assert e.value.code == 429 and "2 batch jobs pending or running" in e.value.message


def test_unknown_request_field_is_a_line_error(emu, tmp_path):
    bad = [{"key": "z", "request": {"contents": [{"parts": [{"text": "x"}]}], "config": {"temperature": 1}}}]
    c = client(emu.url)
    f = c.files.upload(file=str(write_jsonl(tmp_path, bad)), config={"mime_type": "jsonl"})
    job = wait_done(c, c.batches.create(model="gemini-2.5-flash", src=f.name).name)
    line = json.loads(c.files.download(file=job.dest.file_name))
    assert line["error"]["code"] == 3 and "Unknown name" in line["error"]["message"]


async def test_seam_reads_batch_stats(emu, tmp_path):
    g = batchify.GeminiClient("k", emu.url)
    f = await g.upload(write_jsonl(tmp_path), "seam")
    rj = await g.create_batch("gemini-2.5-flash", f.name, "seam-1")
    assert rj.state == batchify.JobState.PENDING
    got = await g.get_batch(rj.name)
    assert got.stats["requestCount"] == 2 and got.display_name == "seam-1"
    assert [r.display_name for r in await g.list_batches()] == ["seam-1"]
    with pytest.raises(batchify.RemoteError) as e:
        await g.get_batch("batches/doesnotexist")
    assert e.value.code == 404
    await g.close()
