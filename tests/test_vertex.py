"""--backend vertex: Vertex AI batch prediction over Cloud Storage, on loopback only.

Cloud Storage is a real HTTP storage emulator (gcp-storage-emulator, in-memory, in this process) reached through
the real google-cloud-storage client; Vertex is batchify's emulator (its batchPredictionJobs routes read and write
that storage emulator), driven through the unmodified google-genai SDK in Vertex mode."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import pytest
from conftest import ROOT, Emu, a_create_recorded, read_jsonl, run_cli, spawn_cli, wait_for
from google import genai
from google.api_core.client_options import ClientOptions
from google.cloud import storage
from google.genai import errors, types
from hypothesis import given, settings
from hypothesis import strategies as st

import batchify

PROJECT, LOCATION = "test-proj", "us-central1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gcs_url() -> Iterator[str]:
    """A gcp-storage-emulator (in memory) on a free loopback port, for this module."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_url: str) -> storage.Client:
    return storage.Client(project="test", client_options=ClientOptions(api_endpoint=gcs_url), use_auth_w_custom_endpoint=False)


@pytest.fixture
def bucket(gcs: storage.Client) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    return name


@pytest.fixture
def vemu(gcs_url: str) -> Iterator[Emu]:
    cfg = batchify.EmulatorConfig(job_seconds=0.3, pending_fraction=0.3, gcs_endpoint=gcs_url)
    with batchify.EmulatorThread(cfg) as t:
        yield Emu(t)


def sdk(url: str) -> genai.Client:
    """The unmodified SDK in Vertex mode: project and location (both needed with a custom base URL) and a static
    OAuth token (AnonymousCredentials cannot be refreshed: docs/VERTEX_NOTES.md A2)."""
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=google.oauth2.credentials.Credentials(token="test-token"),
        http_options=types.HttpOptions(base_url=url),
    )


def vclient(emu: Emu, gcs_url: str, bucket: str) -> batchify.VertexClient:
    return batchify.VertexClient(
        PROJECT, LOCATION, f"gs://{bucket}", base_url=emu.url, storage_endpoint=gcs_url, retry_scale=0.01
    )


def request(i: int, **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": f"document {i}: markets and weather"}]}], **extra}


def write_requests(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps({"key": k, "request": request(i)}).encode() + b"\n" for i, k in enumerate(keys)))
    return path


async def downloaded(c: batchify.VertexClient, name: str) -> bytes:
    """A job's result lines as one bytes (download streams them in chunks of whole lines)."""
    return b"".join([chunk async for chunk in c.download(name)])


async def until_final(c: batchify.VertexClient, name: str, timeout: float = 20.0) -> batchify.RemoteJob:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        j = await c.get_batch(name)
        if j.state in (
            batchify.JobState.SUCCEEDED,
            batchify.JobState.FAILED,
            batchify.JobState.CANCELLED,
            batchify.JobState.EXPIRED,
        ):
            return j
        await asyncio.sleep(0.05)
    raise AssertionError("the job did not end")


# -- the SDK against the emulator's Vertex routes --------------------------------------------------------------


def test_sdk_vertex_batch_lifecycle(vemu: Emu, gcs: storage.Client, bucket: str) -> None:
    lines = [{"request": {**request(i), "labels": {"batchify_key": str(i)}}} for i in range(30)]
    lines[7] = {"request": {"contents": [], "labels": {"batchify_key": "7"}}}  # no contents: a row error
    gcs.bucket(bucket).blob("in/x.jsonl").upload_from_string("".join(json.dumps(x) + "\n" for x in lines))
    c = sdk(vemu.url)
    job = c.batches.create(
        model="gemini-2.5-flash",
        src=f"gs://{bucket}/in/x.jsonl",
        config=types.CreateBatchJobConfig(dest=f"gs://{bucket}/out/run1", display_name="batchify-run1"),
    )
    assert job.name.startswith(f"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/")
    assert job.name.rsplit("/", 1)[1].isdigit()
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "batchify-run1"
    assert job.model == "publishers/google/models/gemini-2.5-flash"
    assert job.src.gcs_uri == [f"gs://{bucket}/in/x.jsonl"]
    end = time.time() + 20
    while (job := c.batches.get(name=job.name)).state != types.JobState.JOB_STATE_SUCCEEDED:
        assert time.time() < end and job.state in (types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING)
        time.sleep(0.05)
    assert job.completion_stats.successful_count == 29 and job.completion_stats.failed_count == 1
    assert job.completion_stats.incomplete_count == 0
    out_dir = job.output_info.gcs_output_directory
    assert out_dir.startswith(f"gs://{bucket}/out/run1/prediction-model-")
    blobs = list(gcs.list_blobs(bucket, prefix=out_dir.split("/", 3)[3] + "/"))
    assert [b.name.rsplit("/", 1)[1] for b in blobs] == ["predictions.jsonl"]
    rows = [json.loads(x) for x in blobs[0].download_as_text().splitlines()]
    assert len(rows) == 30
    assert [r["request"]["labels"]["batchify_key"] for r in rows] != [str(i) for i in range(30)], "output order is shuffled"
    by_key = {r["request"]["labels"]["batchify_key"]: r for r in rows}
    assert set(by_key) == {str(i) for i in range(30)}
    ok = by_key["3"]
    assert list(ok)[:3] == ["status", "processed_time", "request"] and ok["status"] == ""
    assert ok["request"] == lines[3]["request"], "the request is echoed as it was sent"
    assert ok["response"]["candidates"][0]["content"]["parts"][0]["text"]
    assert ok["response"]["usageMetadata"]["promptTokenCount"] > 0
    assert by_key["7"]["status"] and "response" not in by_key["7"]
    # list: paging and the filter the SDK passes through
    for k in range(2):
        c.batches.create(
            model="gemini-2.5-flash",
            src=f"gs://{bucket}/in/x.jsonl",
            config=types.CreateBatchJobConfig(dest=f"gs://{bucket}/out/other{k}", display_name=f"other-{k}"),
        )
    names = [j.display_name for j in c.batches.list(config={"page_size": 1})]
    assert sorted(names) == ["batchify-run1", "other-0", "other-1"]
    assert [j.display_name for j in c.batches.list(config={"filter": 'display_name:"batchify-*"'})] == ["batchify-run1"]
    # cancel a live job, delete a finished one
    live = next(j for j in c.batches.list() if j.display_name == "other-0")
    c.batches.cancel(name=live.name)
    assert c.batches.get(name=live.name).state == types.JobState.JOB_STATE_CANCELLED
    c.batches.delete(name=job.name)
    with pytest.raises(errors.ClientError) as e:
        c.batches.get(name=job.name)
    assert e.value.code == 404
    assert vemu.stats()["vertex_creates"] == 3


def test_sdk_vertex_create_refusals(vemu: Emu, bucket: str) -> None:
    c = sdk(vemu.url)
    cfg = types.CreateBatchJobConfig(dest=f"gs://{bucket}/out/r", display_name="r")
    with pytest.raises(errors.ClientError) as e:  # the input object is not there
        c.batches.create(model="gemini-2.5-flash", src=f"gs://{bucket}/nope.jsonl", config=cfg)
    assert e.value.code == 400 and "does not exist" in str(e.value)
    with pytest.raises(errors.ClientError) as e:
        c.batches.create(model="no-such-model", src=f"gs://{bucket}/nope.jsonl", config=cfg)
    assert e.value.code == 404
    vemu.configure(forbid_batch=True)
    with pytest.raises(errors.ClientError) as e:
        c.batches.create(model="gemini-2.5-flash", src=f"gs://{bucket}/nope.jsonl", config=cfg)
    assert e.value.code == 403


# -- VertexClient: the Backend the engine drives ---------------------------------------------------------------


def test_label_key_encoding_is_reversible() -> None:
    for key in ["0", "1234", "abc_d-e", "Art-000001", "x-1", "é", "a b", "x" * 63]:
        enc = batchify.encode_label_key(key)
        assert batchify._LABEL_SAFE.fullmatch(enc), enc
        assert batchify.decode_label_key(enc) == key
    assert batchify.encode_label_key("1234") == "1234"  # the engine's keys (ordinals) ride as they are
    with pytest.raises(batchify.UsageError):
        batchify.encode_label_key("Ä" * 40)
    line = json.dumps({"key": "Q9", "request": request(0, labels={"team": "news"})}).encode()
    out = json.loads(batchify.vertex_request_line(line))
    assert set(out) == {"request"} and out["request"]["labels"] == {"team": "news", "batchify_key": "x-5139"}
    assert out["request"]["contents"] == request(0)["contents"]
    for key, req in [("Q9", request(0, labels={"team": "news"})), ("17", request(1))]:  # prepare hands its entry over
        line = json.dumps({"key": key, "request": req}).encode()
        assert batchify.vertex_request_line(line, (key, req)) == batchify.vertex_request_line(line)
        assert "batchify_key" not in (req.get("labels") or {})  # the caller's request is left as it was


async def test_round_trip_keys_survive_shuffled_output(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    keys = [str(n) for n in range(1000, 1300)]
    path = write_requests(tmp_path / "st" / "myrun" / "requests" / "b0001.jsonl", keys)
    c = vclient(vemu, gcs_url, bucket)
    try:
        f = await c.upload(path, "batchify-myrun-abc123-b0001-a1")
        assert f.name == f"gs://{bucket}/batchify/myrun/requests/batchify-myrun-abc123-b0001-a1.jsonl"
        staged = gcs.bucket(bucket).blob(f.name.split("/", 3)[3]).download_as_text().splitlines()
        assert [json.loads(x)["request"]["labels"]["batchify_key"] for x in staged] == keys
        assert f.size_bytes == sum(len(x) + 1 for x in staged)
        rj = await c.create_batch("gemini-2.5-flash", f.name, "batchify-myrun-abc123-b0001-a1")
        assert rj.state == batchify.JobState.PENDING and rj.stats.get("requestCount") == 300
        done = await until_final(c, rj.name)
        assert done.state == batchify.JobState.SUCCEEDED, done
        assert done.stats == {"requestCount": 300, "successfulRequestCount": 300}
        assert done.output_file and done.output_file.startswith(
            f"gs://{bucket}/batchify/myrun/output/batchify-myrun-abc123-b0001-a1/prediction-model-"
        )
        raw = []
        for b in gcs.list_blobs(bucket, prefix=done.output_file.split("/", 3)[3] + "/"):
            raw += [json.loads(x)["request"]["labels"]["batchify_key"] for x in b.download_as_text().splitlines()]
        assert sorted(raw) == keys and raw != keys, "the service's order is not the input's"
        rows = [json.loads(x) for x in (await downloaded(c, done.output_file)).splitlines()]
        assert sorted(r["key"] for r in rows) == keys
        for r in rows:
            assert set(r) == {"key", "response"}
            n = int(r["key"]) - 1000
            assert f"document {n}:" in r["response"]["candidates"][0]["content"]["parts"][0]["text"], "answer of its own request"
        assert [j.name for j in await c.list_batches()] == [rj.name]
        answer = await c.generate("gemini-2.5-flash", request(7))  # real time, on the publisher model
        assert "document 7:" in answer["candidates"][0]["content"]["parts"][0]["text"]
        with pytest.raises(batchify.RemoteError, match="Flex"):
            await c.generate("gemini-2.5-flash", request(7), flex=True)
    finally:
        await c.close()


async def test_line_errors_surface_as_error_lines(vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path) -> None:
    vemu.configure(line_error_rate=0.2, seed=3)
    keys = [str(n) for n in range(200)]
    path = write_requests(tmp_path / "r" / "requests" / "b0001.jsonl", keys)
    c = vclient(vemu, gcs_url, bucket)
    try:
        f = await c.upload(path, "dn-1")
        done = await until_final(c, (await c.create_batch("gemini-2.5-flash", f.name, "dn-1")).name)
        rows = [json.loads(x) for x in (await downloaded(c, done.output_file or "")).splitlines()]
        errs = [r for r in rows if "error" in r]
        assert sorted(r["key"] for r in rows) == sorted(keys)
        assert 10 < len(errs) < 80 and len(errs) == done.stats["failedRequestCount"]
        assert all(set(r) == {"key", "error"} and r["error"]["code"] == 13 for r in errs)
        assert all("emulated line error" in r["error"]["message"] for r in errs)
    finally:
        await c.close()


def test_result_line_conversion() -> None:
    ok = {"status": "", "processed_time": "t", "request": {"labels": {"batchify_key": "x-41"}}, "response": {"candidates": []}}
    assert json.loads(batchify.vertex_result_line(json.dumps(ok)) or b"") == {"key": "A", "response": {"candidates": []}}
    bad = {"status": "Bad request: 400", "processed_time": "t", "request": {"labels": {"batchify_key": "5"}}}
    assert json.loads(batchify.vertex_result_line(json.dumps(bad)) or b"") == {
        "key": "5",
        "error": {"code": 2, "message": "Bad request: 400"},
    }
    assert batchify.vertex_result_line(json.dumps({"status": "", "request": {}, "response": {}})) is None  # no key: not placed
    # a torn line (not JSON) is not placed either: its id reads as missing and is tried again on its own, instead of
    # failing the download, then the job, and sending every request of the job again
    assert batchify.vertex_result_line(b'{"request": {"labels": {"batchify_key": "A"}}, "resp') is None


async def test_cancel_delete_and_cleanup_of_staged_objects(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    vemu.configure(job_seconds=30)
    path = write_requests(tmp_path / "r" / "requests" / "b0001.jsonl", ["0", "1"])
    c = vclient(vemu, gcs_url, bucket)
    try:
        f = await c.upload(path, "dn-c")
        rj = await c.create_batch("gemini-2.5-flash", f.name, "dn-c")
        with pytest.raises(batchify.RemoteError) as e:  # a live job cannot be deleted
            await c.delete_batch(rj.name)
        assert e.value.code == 400
        await c.cancel_batch(rj.name)
        got = await c.get_batch(rj.name)
        assert got.state == batchify.JobState.CANCELLED and got.error and "code 1" in got.error
        await c.delete_batch(rj.name)
        with pytest.raises(batchify.RemoteError) as e:
            await c.get_batch(rj.name)
        assert e.value.code == 404
        await c.delete_file(f.name)
        await c.delete_file(f.name)  # already gone is fine
        assert list(gcs.list_blobs(bucket)) == []
    finally:
        await c.close()


async def test_failed_job_and_transient_errors(vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path) -> None:
    vemu.configure(fail_jobs=1, unavailable_burst=2)  # the first two calls answer 503: retried by the policy
    path = write_requests(tmp_path / "r" / "requests" / "b0001.jsonl", ["0"])
    c = vclient(vemu, gcs_url, bucket)
    try:
        f = await c.upload(path, "dn-f")
        with pytest.raises(batchify.RemoteError) as e:  # create is tried once: the engine looks the job up instead
            await c.create_batch("gemini-2.5-flash", f.name, "dn-f")
        assert e.value.code == 503
        assert await c.list_batches() == []  # the 2nd 503 is retried away
        done = await until_final(c, (await c.create_batch("gemini-2.5-flash", f.name, "dn-f")).name)
        assert done.state == batchify.JobState.FAILED and done.output_file is None and "code 13" in (done.error or "")
        with pytest.raises(batchify.RemoteError) as e:
            await downloaded(c, f"gs://{bucket}/batchify/r/output/dn-f/prediction-model-x")
        assert e.value.code == 404
    finally:
        await c.close()


# -- the engine end to end, through the CLI ---------------------------------------------------------------------


def test_cli_run_on_vertex_every_id_once_in_order(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import make_articles

    rng = random.Random(16)
    inp = tmp_path / "news.jsonl"
    inp.write_bytes(b"".join(json.dumps(make_articles.article(i, rng, 120)).encode() + b"\n" for i in range(200)))
    out = tmp_path / "news.results.jsonl"
    vemu.configure(seed=5)
    args = _vx_args(inp, bucket, vemu.url, "--batch-size", "60")
    p = run_cli([*args, "--out", str(out)], tmp_path, STORAGE_EMULATOR_HOST=gcs_url)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [json.loads(x)["id"] for x in inp.read_text().splitlines()]
    assert all(r["status"] == "ok" and r["source"] == "batch" for r in rows), [r for r in rows if r["status"] != "ok"][:2]
    stats = vemu.stats()
    assert stats["vertex_creates"] == 4 and stats["creates"] == 0, "4 Vertex jobs, no Developer-API batch"
    assert all(v == 1 for v in stats["vertex_creates_by_display_name"].values())
    run_id = json.loads((tmp_path / "st" / "news" / "run.json").read_text())["run_id"]
    staged = [b.name for b in gcs.list_blobs(bucket, prefix="batchify/news/requests/")]
    assert staged == [f"batchify/news/requests/{run_id}-b{i:04d}.jsonl" for i in range(1, 5)], "written by prepare"
    assert len({b.name.split("/")[4] for b in gcs.list_blobs(bucket, prefix="batchify/news/output/")}) == 4
    # Each id got the answer to its own request: the same run on the Developer API (same emulator, same answer
    # generator, answers in input order) gives the same result per id.
    gemini_out = tmp_path / "gemini.results.jsonl"
    gemini = ["run", str(inp), "--endpoint", vemu.url, "--state-dir", "st2", "--yes", "--mode", "batch", "--batch-size", "60"]
    p = run_cli([*gemini, "--poll-interval", "0.1", "--out", str(gemini_out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(r["id"], r["result"]) for r in rows] == [(r["id"], r["result"]) for r in read_jsonl(gemini_out)]
    assert len({json.dumps(r["result"], sort_keys=True) for r in rows}) > 20, "answers differ from one article to the next"
    # cleanup: the run's jobs, staged requests and outputs are gone from the service and the bucket
    p = run_cli(["cleanup", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, STORAGE_EMULATOR_HOST=gcs_url)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(gcs.list_blobs(bucket, prefix="batchify/news/")) == []
    assert vemu.thread.call(lambda: len(vemu.emulator.vjobs)) == 0


async def test_download_reads_every_jsonl_object_of_the_output_directory(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str
) -> None:
    """Vertex may write more than one output file (docs/VERTEX_NOTES.md A1): every *.jsonl under the directory
    counts, anything else (and a sibling directory sharing the name's prefix) does not. delete_file empties the
    directory, inside the staging area only."""
    b = gcs.bucket(bucket)

    def row(k: str) -> str:
        return json.dumps({"status": "", "processed_time": "t", "request": {"labels": {"batchify_key": k}}, "response": {"k": k}})

    out = "batchify/r/output/dn/prediction-model-1"
    b.blob(f"{out}/predictions.jsonl").upload_from_string(row("0") + "\n" + row("1") + "\n")
    b.blob(f"{out}/predictions_2.jsonl").upload_from_string(row("2") + "\n")
    b.blob(f"{out}/errors_stats.txt").upload_from_string("not results")
    b.blob(f"{out}0/predictions.jsonl").upload_from_string(row("9") + "\n")
    b.blob("elsewhere/prediction-model-1/predictions.jsonl").upload_from_string(row("8") + "\n")
    c = vclient(vemu, gcs_url, bucket)
    try:
        rows = [json.loads(x) for x in (await downloaded(c, f"gs://{bucket}/{out}")).splitlines()]
        assert sorted(r["key"] for r in rows) == ["0", "1", "2"]
        assert [r["response"] for r in sorted(rows, key=lambda r: r["key"])] == [{"k": "0"}, {"k": "1"}, {"k": "2"}]
        await c.delete_file(f"gs://{bucket}/{out}")
        with pytest.raises(batchify.RemoteError):
            await c.delete_file(f"gs://{bucket}/elsewhere/prediction-model-1")
        assert [x.name for x in gcs.list_blobs(bucket)] == [
            f"{out}0/predictions.jsonl",
            "elsewhere/prediction-model-1/predictions.jsonl",
        ]
    finally:
        await c.close()


def test_sigkill_and_resume_on_vertex_creates_nothing_twice(vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path) -> None:
    """Killed right after a create (the job exists, the sidecar does not know it) and again after a poll: `resume`
    takes the backend from the run's own options, finds the job by display name, and finishes the run."""
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a{i}", "text": f"article {i} about rates"}) + "\n" for i in range(120)))
    out = tmp_path / "out.jsonl"
    args = _vx_args(inp, bucket, vemu.url, "--batch-size", "40")
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli([*args, "--out", str(out)], tmp_path, BATCHIFY_CRASH_AT="after_create:2", **env)
    assert p.returncode == -9, p.stderr[-2000:]
    assert vemu.stats()["vertex_creates"] == 2
    resume = ["resume", "news", "--endpoint", vemu.url, "--state-dir", "st"]
    p = run_cli(resume, tmp_path, BATCHIFY_CRASH_AT="after_poll:2", **env)
    assert p.returncode == -9, p.stderr[-2000:]
    p = run_cli(resume, tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == [f"a{i}" for i in range(120)]
    assert all(r["status"] == "ok" for r in read_jsonl(out))
    stats = vemu.stats()
    assert stats["vertex_creates"] == 3 and set(stats["vertex_creates_by_display_name"].values()) == {1}, stats
    assert stats["creates"] == 0


async def test_a_key_no_label_can_carry_fails_the_upload_once(vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path) -> None:
    path = write_requests(tmp_path / "r" / "requests" / "b0001.jsonl", ["Ä" * 40])
    c = vclient(vemu, gcs_url, bucket)
    try:
        with pytest.raises(batchify.RemoteError, match="too long to ride in a Vertex label") as e:
            await c.upload(path, "dn-k")
        assert e.value.code == 400 and "after" not in str(e.value), "not retried"
    finally:
        await c.close()


# -- the backend is part of the run: a switch is said out loud, Flex is never planned on Vertex -----------------


def _vertex_opts(bucket: str, **kw: Any) -> batchify.RunOptions:
    base: dict[str, Any] = {
        "name": "news",
        "backend": "vertex",
        "project": PROJECT,
        "location": LOCATION,
        "bucket": f"gs://{bucket}",
    }
    return batchify.RunOptions(**{**base, **kw})


async def _dry(emu: Emu, inp: Path, state: Path, opts: batchify.RunOptions) -> batchify.Run:
    run, _ = await batchify.run_file(inp, options=opts, state_dir=state, endpoint=emu.url, api_key="k", dry_run=True)
    return run


def _news(tmp_path: Path, n: int = 40) -> Path:
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a{i}", "text": f"article {i} about rates " * 20}) + "\n" for i in range(n)))
    return inp


async def test_a_backend_switch_is_an_option_change(vemu: Emu, bucket: str, tmp_path: Path) -> None:
    inp, st = _news(tmp_path), tmp_path / "st"
    run = await _dry(vemu, inp, st, batchify.RunOptions(name="news"))
    assert batchify.plan_rows(run)[0] == ("endpoint", vemu.url)
    # a run made before the backend flags existed: no backend keys in its options; it reads as gemini
    store = batchify.RunStore(st, "news")
    d = json.loads(store.run_path.read_text())
    for k in ("backend", "project", "location", "bucket"):
        del d["options"][k]
    store.run_path.write_text(json.dumps(d))
    assert (await _dry(vemu, inp, st, batchify.RunOptions(name="news"))).run_options.backend == "gemini"
    with pytest.raises(batchify.UsageError, match=r"differs from it in: options \(--backend\)"):
        await _dry(vemu, inp, st, _vertex_opts(bucket))
    # a Vertex run: its project, location and bucket are kept and compared
    vx = _vertex_opts(bucket, name="vx")
    run = await _dry(vemu, inp, st, vx)
    assert (run.run_options.project, run.run_options.bucket) == (PROJECT, f"gs://{bucket}")
    await _dry(vemu, inp, st, dataclasses.replace(vx, bucket=f"gs://{bucket}/"))  # the same bucket
    for change, flag in ((dict(location="europe-west4"), "--location"), (dict(bucket="gs://other"), "--bucket")):
        with pytest.raises(batchify.UsageError, match=f"differs from it in: options \\({flag}\\)"):
            await _dry(vemu, inp, st, dataclasses.replace(vx, **change))
    with pytest.raises(batchify.UsageError, match=r"differs from it in: options \(--project\)"):
        await _dry(vemu, inp, st, dataclasses.replace(vx, project="another-proj"))
    with pytest.raises(batchify.UsageError, match=r"differs from it in: options \(--backend\)"):
        await _dry(vemu, inp, st, batchify.RunOptions(name="vx"))


async def test_plan_and_status_name_vertex_and_auto_mode_never_plans_flex(vemu: Emu, bucket: str, tmp_path: Path) -> None:
    inp, st = _news(tmp_path, 60), tmp_path / "st"
    small = {"batch_size": 10, "enqueued_limit": 3_000}  # several waves: auto mode on gemini would plan hybrid lanes
    gem = await _dry(vemu, inp, st, batchify.RunOptions(name="gem", **small))
    assert gem.plan["waves"] > 1 and gem.plan["lanes"] == "hybrid" and "flex" in gem.plan["modes"]
    run = await _dry(vemu, inp, st, _vertex_opts(bucket, **small))
    words = f"Vertex AI ({PROJECT}, {LOCATION}, gs://{bucket}) at {vemu.url}"
    assert dict(batchify.plan_rows(run))["endpoint"] == words
    assert batchify.run_status(st, "news")["runs"][0]["backend"] == words
    assert run.plan["waves"] > 1 and run.plan["lanes"] == "batch"
    assert set(run.plan["modes"]) == {"batch", "standard"} and run.plan["model_spec"]["flex"] is False
    engine = batchify.Engine(batchify.RunStore(st, "news"), None)
    assert engine.lanes == "batch" and engine._fallback_tier() == "none"
    engine.opts = dataclasses.replace(engine.opts, allow_standard=True)
    assert engine._fallback_tier() == "standard"
    engine.spec = dataclasses.replace(engine.spec, flex=True)  # planned before Vertex said it has no Flex
    assert engine._fallback_tier() == "standard"


async def test_flex_modes_on_vertex_exit_2_before_anything_is_sent(vemu: Emu, bucket: str, tmp_path: Path) -> None:
    inp = _news(tmp_path)
    for kw in ({"mode": "hybrid"}, {"fallback_tier": "flex"}):
        with pytest.raises(batchify.UsageError, match="batch prediction only"):
            await _dry(vemu, inp, tmp_path / "st", _vertex_opts(bucket, **kw))
    args = ["run", str(inp), "--backend", "vertex", "--project", PROJECT, "--location", LOCATION, "--bucket", f"gs://{bucket}"]
    p = run_cli([*args, "--mode", "flex", "--yes", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "--mode flex with --backend vertex" in p.stderr and "batch prediction only" in p.stderr
    assert vemu.stats()["vertex_creates"] == 0 and not (tmp_path / "st" / "news").exists()


# -- Vertex's own limits: job caps in the cutter, admission by jobs at once, never the enqueued-token table ------


async def test_vertex_job_caps_cut_the_batches_and_the_service_takes_them(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Vertex's per-job limits made small (the emulator enforces the same table), a vertex run is cut at
    them, whatever --batch-size says, and every job is taken; a gemini run of the same input is not cut."""
    monkeypatch.setitem(batchify.VERTEX_LIMITS, "requests_per_job", 7)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st = _news(tmp_path, 40), tmp_path / "st"
    gem = await _dry(vemu, inp, st, batchify.RunOptions(name="gem"))
    assert gem.plan["batches"] == 1
    one = gem.plan["batch_ranges"][0][3] // 40  # bytes of one request line
    run = await _dry(vemu, inp, st, _vertex_opts(bucket, name="n7"))
    assert [e - s for s, e, _t, _b in run.plan["batch_ranges"]] == [7, 7, 7, 7, 7, 5]
    # 5 lines fit the bytes, but not with the label each one gains on the way to Vertex: 4 a job
    monkeypatch.setitem(batchify.VERTEX_LIMITS, "input_bytes_per_job", 5 * one + 4 * batchify.VERTEX_LINE_OVERHEAD)
    opts = _vertex_opts(bucket, mode="batch", poll_interval=0.05, retry_scale=0.01, out=str(tmp_path / "out.jsonl"))
    run = await _dry(vemu, inp, st, opts)
    sizes = [(e - s, b) for s, e, _t, b in run.plan["batch_ranges"]]
    assert max(n for n, _ in sizes) == 4 and sum(n for n, _ in sizes) == 40, sizes  # the bytes cap binds first
    assert all(b + n * batchify.VERTEX_LINE_OVERHEAD <= batchify.VERTEX_LIMITS["input_bytes_per_job"] for n, b in sizes)
    _, summary = await batchify.run_file(inp, options=opts, state_dir=st, endpoint=vemu.url)  # submits the prepared run
    assert summary is not None and summary.ok == 40
    assert vemu.stats()["vertex_creates"] == len(sizes)


async def test_vertex_admission_is_by_jobs_not_the_enqueued_token_table(vemu: Emu, bucket: str, tmp_path: Path) -> None:
    inp, st = _news(tmp_path), tmp_path / "st"
    model = next(
        m
        for m, s in batchify.builtin_catalog().models.items()
        if not s.get("enqueued_tokens") and s.get("status") != "retired" and m not in batchify.VERTEX_BATCH_MODELS
    )
    cfg = batchify.JobConfig(model=model)
    with pytest.raises(batchify.UsageError, match="publishes no batch enqueued-token limit"):
        await batchify.run_file(inp, cfg, batchify.RunOptions(name="gem"), st, endpoint=vemu.url, api_key="k", dry_run=True)
    run, _ = await batchify.run_file(inp, cfg, _vertex_opts(bucket, max_active_jobs=3), st, endpoint=vemu.url, dry_run=True)
    assert run.plan["enqueued_limit"] == batchify.VERTEX_NO_TOKEN_LIMIT and run.plan["waves"] == 1
    assert run.plan["enqueued_limit_source"].startswith("none on Vertex AI")
    rows = dict(batchify.plan_rows(run))
    assert "enqueued limit" not in rows
    assert "at most 3 job(s) at once (--max-active-jobs" in rows["admission"] and "no predefined quota" in rows["admission"]
    assert "200,000 requests and 1,000,000,000 bytes a job" in rows["job caps"]
    assert any("not on the list of Gemini models that serve batch on Vertex AI" in w for w in run.plan["warnings"])
    listed = await _dry(vemu, inp, st, _vertex_opts(bucket, name="listed"))  # the default model is on Vertex's list
    assert not listed.plan["warnings"] and listed.plan["model_spec"]["batch"] is True
    assert listed.plan["enqueued_limit"] == batchify.VERTEX_NO_TOKEN_LIMIT, "not the Developer API's tier figure"


# -- gs:// input: read as a stream from the bucket, in object-name order ------------------------------------------


def test_cli_run_from_a_gs_prefix_every_id_once_in_order(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    rows = [{"id": f"n{i}", "text": f"article {i} on markets " * (1 + i % 7)} for i in range(300)]
    b = gcs.bucket(bucket)
    for k, (lo, hi) in enumerate(((0, 120), (120, 121), (121, 300))):  # object-name order is input order
        b.blob(f"corpus/news/part-{k:03d}.jsonl").upload_from_string("".join(json.dumps(r) + "\n" for r in rows[lo:hi]))
    b.blob("corpus/news/README.txt").upload_from_string("not input")
    src = f"gs://{bucket}/corpus/news/*.jsonl"
    args = ["run", src, "--backend", "vertex", "--project", PROJECT, "--location", LOCATION, "--bucket", f"gs://{bucket}"]
    args += ["--endpoint", vemu.url, "--state-dir", "st", "--yes", "--mode", "batch", "--batch-size", "100"]
    args += ["--poll-interval", "0.1"]
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "news.results.jsonl"  # named after the prefix, in the working directory
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows] and all(r["status"] == "ok" for r in got)
    run = json.loads((tmp_path / "st" / "news" / "run.json").read_text())
    assert run["input_path"] == src and run["records"] == 300
    assert not list((tmp_path / "st").rglob("part-*")), "the input is never copied to local disk"
    assert vemu.stats()["vertex_creates"] == 3
    # the same command again: the same run (nothing sent); after an object is rewritten, the input differs
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 0 and vemu.stats()["vertex_creates"] == 3, p.stderr[-2000:]
    same_size = json.dumps({"id": "n120", "text": rows[120]["text"].upper()}) + "\n"  # a change the size does not show
    b.blob("corpus/news/part-001.jsonl").upload_from_string(same_size)
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 2 and "input file (path or content)" in p.stderr, p.stderr[-2000:]
    p = run_cli(["resume", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 2 and "changed since run 'news' was prepared" in p.stderr, p.stderr[-2000:]


def test_a_gs_prefix_resumes_on_the_objects_prepare_listed_and_a_staging_area_under_it_is_refused(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """A part file added under a gs:// prefix input after prepare is not the run's input: resume reads the objects
    prepare listed (input.json; each still checked at its generation by the hash) and finishes the run, where it
    used to refuse the paid run as changed. --bucket under the input prefix (the run's own request objects would be
    listed as input) is refused before anything is sent."""
    rows = [{"id": f"n{i}", "text": f"article {i} on markets"} for i in range(30)]
    b, env = gcs.bucket(bucket), {"STORAGE_EMULATOR_HOST": gcs_url}
    b.blob("feed/part-000.jsonl").upload_from_string("".join(json.dumps(r) + "\n" for r in rows))
    args = _vx_args(f"gs://{bucket}/feed/", bucket, vemu.url, "--batch-size", "10", "--out", "feed.jsonl")
    args[args.index("--bucket") + 1] = f"gs://{bucket}/feed"
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 2 and "staging area" in p.stderr and "Fix: give --bucket a place outside" in p.stderr, p.stderr
    assert vemu.stats()["vertex_creates"] == 0 and [x.name for x in gcs.list_blobs(bucket)] == ["feed/part-000.jsonl"]
    args[args.index("--bucket") + 1] = f"gs://{bucket}"
    p = run_cli([*args, "--retry-scale", "0.02"], tmp_path, BATCHIFY_CRASH_AT="after_create:2", **env)
    assert p.returncode != 0 and vemu.stats()["vertex_creates"] >= 2, p.stderr[-2000:]
    b.blob("feed/part-001.jsonl").upload_from_string(json.dumps({"id": "later", "text": "tomorrow's article"}) + "\n")
    p = run_cli(["resume", "feed", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "feed.jsonl")] == [r["id"] for r in rows]
    assert vemu.stats()["vertex_creates"] == 3, "every batch created once"
    p = run_cli(args, tmp_path, **env)  # the same command again reads the run's input as resume does: not "changed"
    assert p.returncode == 0 and "input file" not in p.stderr and vemu.stats()["vertex_creates"] == 3, p.stderr[-2000:]
    b.blob("feed/part-000.jsonl").upload_from_string("".join(json.dumps(r) + "\n" for r in rows))  # a new generation
    p = run_cli(["resume", "feed", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 2 and "changed since run 'feed' was prepared" in p.stderr, p.stderr[-2000:]


def test_gs_input_needs_vertex_and_an_object(vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path) -> None:
    p = run_cli(["run", f"gs://{bucket}/x.jsonl", "--endpoint", vemu.url, "--yes"], tmp_path, STORAGE_EMULATOR_HOST=gcs_url)
    assert p.returncode == 2 and "needs --backend vertex" in p.stderr, p.stderr[-2000:]
    args = ["run", f"gs://{bucket}/none/*.jsonl", "--backend", "vertex", "--project", PROJECT, "--location", LOCATION]
    p = run_cli([*args, "--bucket", f"gs://{bucket}", "--endpoint", vemu.url, "--yes"], tmp_path, STORAGE_EMULATOR_HOST=gcs_url)
    assert p.returncode == 2 and "nothing matches" in p.stderr, p.stderr[-2000:]


def test_a_gs_input_in_a_missing_or_forbidden_bucket_is_an_input_error_naming_the_fix(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path
) -> None:
    """A prefix or glob in a bucket that does not exist: exit 2 naming the bucket and the fix, no traceback; a
    listing refused (403) names the role to grant; the network failing is a RemoteError, not a traceback."""
    from google.api_core import exceptions as gexc

    for k, src in enumerate(("gs://no-such-bucket-vgs/data/", "gs://no-such-bucket-vgs/data/*.jsonl")):
        p = run_cli(_vx_args(src, bucket, vemu.url, "--name", f"r{k}"), tmp_path, STORAGE_EMULATOR_HOST=gcs_url)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert "the bucket gs://no-such-bucket-vgs does not exist" in p.stderr and "Fix: check the bucket" in p.stderr

    class Refusing:
        def __init__(self, e: Exception) -> None:
            self.e = e

        def list_blobs(self, *args: Any, **kwargs: Any) -> Any:
            raise self.e

    for e, kind, said in (
        (gexc.Forbidden("caller does not have storage.objects.list access"), batchify.InputError, "roles/storage.objectViewer"),
        (ConnectionError("connection refused"), batchify.RemoteError, "ConnectionError"),
    ):
        inp = batchify.GsInput("gs://b/data/")
        inp._storage = Refusing(e)
        with pytest.raises(kind, match=said):
            inp.listing()


def test_gs_reader_streams_across_objects_and_seeks(
    gcs_url: str, gcs: storage.Client, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    rng = random.Random(3)
    lines = [json.dumps({"id": i, "text": "y" * rng.randint(0, 5000)}).encode() + b"\n" for i in range(2000)]
    for k, (lo, hi) in enumerate(((0, 700), (700, 700), (700, 701), (701, 2000))):  # an empty object too
        gcs.bucket(bucket).blob(f"in/p{k}.jsonl").upload_from_string(b"".join(lines[lo:hi]))
    g = batchify.input_location(f"gs://{bucket}/in/", batchify.RunOptions(backend="vertex"))
    assert g.stat().st_size == len(b"".join(lines))
    # each object but the last is followed by one byte: a space after one that ends its last line (or is empty)
    data = b" ".join(b"".join(lines[lo:hi]) for lo, hi in ((0, 700), (700, 700), (700, 701), (701, 2000)))
    with g.open("rb") as f:
        assert f.read() == data
        for off in (0, 1, len(b"".join(lines[:700])) - 3, len(b"".join(lines[:700])), len(data) - 10, len(data)):
            f.seek(off)
            assert f.read(40) == data[off : off + 40], off
    assert [r.obj["id"] for r in batchify.read_input(g)] == list(range(2000))
    assert len(list(batchify.calibration_sample(g, 64))) == 64


def test_gs_objects_are_read_as_files_of_their_own_no_final_newline_no_bom_merge(
    gcs_url: str, gcs: storage.Client, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several objects of one input: the last record of an object without a final line end does not run into the
    next object's first, and a BOM at an object's start does not break its first record (both did: the objects were
    read as one byte stream)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    rows = [json.dumps({"id": i, "text": f"article {i}"}) for i in range(9)]
    b = gcs.bucket(bucket)
    b.blob("in/p0.jsonl").upload_from_string("\n".join(rows[:3]))  # no final newline
    b.blob("in/p1.jsonl").upload_from_string("\ufeff" + "\r\n".join(rows[3:6]))  # a BOM, CRLF, no final newline
    b.blob("in/p2.jsonl").upload_from_string("".join(r + "\n" for r in rows[6:]))
    g = batchify.input_location(f"gs://{bucket}/in/", batchify.RunOptions(backend="vertex"))
    recs = list(batchify.read_input(g))
    assert [r.error for r in recs] == [None] * 9 and [r.obj["id"] for r in recs] == list(range(9))
    assert [r.number for r in recs] == list(range(1, 10)), "line numbers count the objects' own lines"
    with g.open("rb") as f:
        whole = f.read()
        end0 = len("\n".join(rows[:3]))
        f.seek(end0)  # the byte after the first object, reached by a seek
        assert f.read(4) == b"\n   " == whole[end0 : end0 + 4]
    assert len(list(batchify.calibration_sample(g, 5))) == 5


def test_gs_reader_fetches_whole_chunks_and_a_small_one_after_a_seek(
    gcs_url: str, gcs: storage.Client, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_GsConcat's ranged GETs: GS_READ_CHUNK at a time from the start (one object's at most), GS_SEEK_CHUNK after a
    seek elsewhere (calibration reads a line at 64 offsets), each served whole from the bytes it returned."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    monkeypatch.setattr(batchify, "GS_READ_CHUNK", 64 * 1024)
    monkeypatch.setattr(batchify, "GS_SEEK_CHUNK", 4 * 1024)
    data = b"".join(json.dumps({"id": i, "text": "z" * (i % 97)}).encode() + b"\n" for i in range(6000))
    gcs.bucket(bucket).blob("g/p0.jsonl").upload_from_string(data[:300_000])
    gcs.bucket(bucket).blob("g/p1.jsonl").upload_from_string(data[300_000:])
    gets: list[int] = []
    real = storage.Blob.download_as_bytes

    def counted(self: storage.Blob, *a: Any, **kw: Any) -> bytes:
        got: bytes = real(self, *a, **kw)
        gets.append(len(got))
        return got

    monkeypatch.setattr(storage.Blob, "download_as_bytes", counted)
    g = batchify.input_location(f"gs://{bucket}/g/", batchify.RunOptions(backend="vertex"))
    with g.open("rb") as f:
        assert f.read() == data[:300_000] + b"\n" + data[300_000:]  # a line end after p0 (cut mid-line), in its last GET
        assert gets == [65536] * 4 + [300_000 - 4 * 65536] + [65536] * ((len(data) - 300_000) // 65536) + [
            (len(data) - 300_000) % 65536
        ]
        gets.clear()
        f.seek(123_457)
        f.readline()
        assert f.readline() == data[123_457:].split(b"\n", 2)[1] + b"\n" and gets == [4096]


# -- a create the service refuses with 400 is final: FAILED with the service's words, never retried in a loop -----


@pytest.mark.parametrize("over", ["bytes", "requests"])
async def test_a_create_refused_with_400_fails_the_job_and_the_run_ends(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: str
) -> None:
    """Planned under Vertex's per-job limits, then the service's limits shrink (a quota changed between plan and
    submit): every create answers 400. Each attempt ends FAILED with the message (--max-attempts as on the
    Developer API), the fallback answers the ids, and the run ends well within its timeout."""
    inp, st = _news(tmp_path, 12), tmp_path / "st"
    opts = _vertex_opts(bucket, poll_interval=0.05, retry_scale=0.01, max_attempts=2, allow_standard=True)
    opts = dataclasses.replace(opts, out=str(tmp_path / "out.jsonl"))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    run = await _dry(vemu, inp, st, opts)
    assert run.plan["batches"] == 1
    monkeypatch.setitem(batchify.VERTEX_LIMITS, "input_bytes_per_job" if over == "bytes" else "requests_per_job", 5)
    _, summary = await asyncio.wait_for(batchify.run_file(inp, options=opts, state_dir=st, endpoint=vemu.url), 60)
    assert summary is not None and summary.ok == 12
    jobs = batchify.RunStore(st, "news").load_jobs()
    assert [(j.state, j.attempt) for j in jobs] == [(batchify.JobState.FAILED, 1), (batchify.JobState.FAILED, 2)]
    word = "larger than" if over == "bytes" else "at most"
    assert all(j.error and "400" in j.error and word in j.error for j in jobs), [j.error for j in jobs]
    assert vemu.stats()["vertex_creates"] == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(12)] and {r["source"] for r in rows} == {"standard"}


def test_only_a_missing_input_object_is_uploaded_again() -> None:
    def said(text: str, what: str = "create batch", code: int = 400) -> bool | None:
        return batchify.VertexClient._create_400(batchify.RemoteError(f"{what}: {code} {text}", code), what).input_gone

    assert said("The input file gs://b/x.jsonl does not exist or cannot be read (404).") is True
    assert said("The input file gs://b/x.jsonl is larger than 1 GB.") is False
    assert said("300000 requests: a batch prediction job takes at most 200,000.") is False
    assert said("The input file gs://b/x.jsonl is larger than 1 GB.", what="get batch") is None  # not a create


def test_the_cli_takes_project_and_location_from_the_environment_the_library_does_not(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)  # the library never reads it
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", LOCATION)
    inp, opts = _news(tmp_path), _vertex_opts(bucket, project=None, location=None)
    with pytest.raises(batchify.UsageError, match="needs --project, --location"):
        batchify.run_sync(_dry(vemu, inp, tmp_path / "st", opts))
    env = {"GOOGLE_CLOUD_PROJECT": "env-proj", "GOOGLE_CLOUD_LOCATION": "europe-west4", "STORAGE_EMULATOR_HOST": gcs_url}
    args = ["run", str(inp), "--backend", "vertex", "--bucket", f"gs://{bucket}", "--state-dir", "st", "--yes"]
    p = run_cli([*args, "--endpoint", vemu.url, "--dry-run"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    o = json.loads((tmp_path / "st" / "news" / "run.json").read_text())["options"]
    assert (o["project"], o["location"]) == ("env-proj", "europe-west4")
    p = run_cli([*args, "--project", "flag-proj", "--name", "n2", "--endpoint", vemu.url, "--dry-run"], tmp_path, **env)
    assert (
        p.returncode == 0 and json.loads((tmp_path / "st" / "n2" / "run.json").read_text())["options"]["project"] == "flag-proj"
    )
    # --endpoint local: the built-in emulator's jobs use the storage emulator the CLI found in STORAGE_EMULATOR_HOST
    p = run_cli([*args, "--name", "n3", "--endpoint", "local", "--mode", "batch", "--poll-interval", "0.1"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "news.n3.results.jsonl")) == 40


# -- --out gs://: the merged results streamed to the bucket, atomically, and read back from there ------------------


def _vx_args(inp: Any, bucket: str, url: str, *more: str) -> list[str]:
    args = ["run", str(inp), "--backend", "vertex", "--project", PROJECT, "--location", LOCATION, "--bucket", f"gs://{bucket}"]
    return [*args, "--endpoint", url, "--state-dir", "st", "--yes", "--mode", "batch", "--poll-interval", "0.1", *more]


def test_out_gs_streams_the_merged_results_to_the_bucket(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)  # the library's own reads (results) find the storage emulator
    inp = _news(tmp_path, 120)
    out = f"gs://{bucket}/results/news.jsonl"
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--batch-size", "40", "--out", out), tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    blob = gcs.bucket(bucket).get_blob("results/news.jsonl")
    rows = [json.loads(x) for x in blob.download_as_text().splitlines()]
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(120)] and all(r["status"] == "ok" for r in rows)
    assert [b.name for b in gcs.list_blobs(bucket, prefix="results/")] == ["results/news.jsonl"], "no temporary object left"
    assert not list(tmp_path.glob("*.results.jsonl")) and not (tmp_path / "gs:").exists(), "nothing written locally"
    run = json.loads((tmp_path / "st" / "news" / "run.json").read_text())
    assert run["out"] == out and run["summary"]["out"] == out
    listed = gcs.bucket(bucket).get_blob("results/news.jsonl")
    assert run["summary"]["out_stat"] == [listed.size, listed.generation]
    # `results` streams the object back; once something else rewrote it, the run's own results from its sidecars
    p = run_cli(["results", "news", "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0 and p.stdout == blob.download_as_text(), p.stderr[-2000:]
    assert [r.id for r in batchify.results("news", tmp_path / "st")] == [f"a{i}" for i in range(120)]
    gcs.bucket(bucket).blob("results/news.jsonl").upload_from_string(blob.download_as_text())  # same bytes, new generation
    p = run_cli(["results", "news", "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0 and "changed since run news wrote it" in p.stderr, p.stderr[-2000:]
    assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [f"a{i}" for i in range(120)]
    p = run_cli(["cleanup", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    kept = [b.name for b in gcs.list_blobs(bucket)]
    assert kept[-1] == "results/news.jsonl" and all(n.startswith("batchify/news/results/") for n in kept[:-1]), kept
    assert kept[:-1], "the run's results objects are kept: its results file is no longer its own"
    # results in Cloud Storage need the Vertex backend
    p = run_cli(["run", str(inp), "--endpoint", vemu.url, "--yes", "--name", "g", "--out", out], tmp_path, **env)
    assert p.returncode == 2 and "need --backend vertex" in p.stderr, p.stderr[-2000:]


def test_two_runs_given_one_out_gs_object_and_a_cleanup_after_it_was_replaced_keep_the_results(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run of the state dir given the first's --out gs:// is refused before anything is sent (one object
    keeps only the last run's rows), as a local --out is; once another state dir's run replaced the object,
    `cleanup` of the first keeps its results objects in the bucket, and `results` still gives every id back."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    out, env = f"gs://{bucket}/results/results.jsonl", {"STORAGE_EMULATOR_HOST": gcs_url}
    for name in ("one", "two"):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": f"{name}-{i}", "text": f"article {i} about rates"}) + "\n" for i in range(20))
        )
    p = run_cli(_vx_args(tmp_path / "one.jsonl", bucket, vemu.url, "--out", out), tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli(_vx_args(tmp_path / "two.jsonl", bucket, vemu.url, "--out", out), tmp_path, **env)
    assert p.returncode == 2 and "is run 'one'" in p.stderr and "results file" in p.stderr, p.stderr[-2000:]
    assert vemu.stats()["vertex_creates"] == 1, "nothing of the second run was sent"
    args = _vx_args(tmp_path / "two.jsonl", bucket, vemu.url, "--out", out)
    args[args.index("--state-dir") + 1] = "st2"  # another state dir: not known to this one, the object replaced
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_cli(["cleanup", "one", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0 and "kept run one's results objects" in p.stderr, p.stderr[-2000:]
    assert list(gcs.list_blobs(bucket, prefix="batchify/one/results/")), "the only copy of run one's results is kept"
    assert not list(gcs.list_blobs(bucket, prefix="batchify/one/requests/")), "the rest of the staging area is deleted"
    p = run_cli(["results", "one", "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [f"one-{i}" for i in range(20)]


def test_cleanup_deletes_its_own_results_objects_not_those_of_a_run_of_the_same_name(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """Two runs named news (two state dirs, one staging bucket) keep their results objects under one
    …/batchify/news/results/ folder, apart by their run ids: `cleanup` of one deletes its own only."""
    inp, env = _news(tmp_path, 30), {"STORAGE_EMULATOR_HOST": gcs_url}
    ids = {}
    for state in ("st", "st-b"):
        args = _vx_args(inp, bucket, vemu.url, "--batch-size", "10", "--out", str(tmp_path / f"{state}.jsonl"))
        args[args.index("--state-dir") + 1] = state
        p = run_cli(args, tmp_path, **env)
        assert p.returncode == 0, p.stderr[-2000:]
        ids[state] = json.loads((tmp_path / state / "news" / "run.json").read_text())["run_id"]

    def results_of(state: str) -> list[str]:
        return [b.name for b in gcs.list_blobs(bucket, prefix="batchify/news/results/") if f"-{ids[state]}-" in b.name]

    assert len(results_of("st")) == 3 and len(results_of("st-b")) == 3
    p = run_cli(["cleanup", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert results_of("st") == [] and len(results_of("st-b")) == 3, "the other run's results objects are kept"
    p = run_cli(["results", "news", "--state-dir", "st-b"], tmp_path, **env)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 30, p.stderr[-2000:]


def test_out_gs_in_a_missing_bucket_is_refused_before_anything_is_sent_and_a_merge_refused_later_names_the_fix(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--out gs:// in a bucket that does not exist: exit 2 before anything is sent (the bucket is tried with an
    empty object written and deleted), not a traceback at the merge after every job is paid. A bucket gone after
    prepare: the merge's refusal is exit 3 naming the fix; `results` prints the run's results from its sidecars;
    `resume --out FILE` writes them elsewhere."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, env = _news(tmp_path, 20), {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--out", "gs://no-such-bucket-vgs/results.jsonl"), tmp_path, **env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "the bucket gs://no-such-bucket-vgs does not exist" in p.stderr and "Fix:" in p.stderr, p.stderr[-2000:]
    assert vemu.stats()["vertex_creates"] == 0
    outb = f"out-{uuid.uuid4().hex[:10]}"
    gcs.create_bucket(outb)
    out = f"gs://{outb}/results.jsonl"
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--out", out), tmp_path, BATCHIFY_CRASH_AT="merge:1", **env)
    assert p.returncode != 0 and vemu.stats()["vertex_creates"] == 1, p.stderr[-2000:]
    assert [b.name for b in gcs.list_blobs(outb) if "probe" in b.name] == [], "the probe object is deleted"
    gcs.bucket(outb).delete(force=True)
    p = run_cli(["resume", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"could not be written to {out}" in p.stderr and "batchify resume news --out FILE" in p.stderr, p.stderr[-2000:]
    p = run_cli(["results", "news", "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0 and "does not exist" in p.stderr, p.stderr[-2000:]
    assert [json.loads(x)["id"] for x in p.stdout.splitlines()] == [f"a{i}" for i in range(20)]
    p = run_cli(["resume", "news", "--endpoint", vemu.url, "--state-dir", "st", "--out", "here.jsonl"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["id"] for r in read_jsonl(tmp_path / "here.jsonl")] == [f"a{i}" for i in range(20)]
    assert vemu.stats()["vertex_creates"] == 1, "nothing paid twice"


def test_out_gs_naming_the_gs_input_or_an_object_it_would_take_is_refused_before_anything_is_sent(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """--out gs:// that is the input object (the merge would overwrite it), or an object under the input prefix or
    matching its glob (a later listing would read the results as input): exit 2 naming the fix, nothing created."""
    original = "".join(json.dumps({"id": f"n{i}", "text": f"article {i} on markets"}) + "\n" for i in range(10))
    gcs.bucket(bucket).blob("data/news.jsonl").upload_from_string(original)
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    for k, (src, out) in enumerate(
        (
            (f"gs://{bucket}/data/news.jsonl", f"gs://{bucket}/data/news.jsonl"),
            (f"gs://{bucket}/data/", f"gs://{bucket}/data/out/results.jsonl"),
            (f"gs://{bucket}/data/*.jsonl", f"gs://{bucket}/data/results.jsonl"),
        )
    ):
        p = run_cli(_vx_args(src, bucket, vemu.url, "--out", out, "--name", f"r{k}"), tmp_path, **env)
        said = f"--out {out} is" in p.stderr and "Fix: give --out an object outside" in p.stderr
        assert p.returncode == 2 and said, p.stderr[-2000:]
    assert vemu.stats()["vertex_creates"] == 0
    assert gcs.bucket(bucket).blob("data/news.jsonl").download_as_text() == original, "the input is untouched"
    assert [b.name for b in gcs.list_blobs(bucket)] == ["data/news.jsonl"], "nothing staged"


# -- 2,000 articles end to end (issue 16's "Must show"): local file and gs:// prefix, results in the bucket and locally,
# -- cancel, cleanup of the staging area ------------------------------------------------------------------------------


def _articles(n: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "examples"))
    import make_articles

    rng = random.Random(2000)
    return [make_articles.article(i, rng, 60) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["local", "gs"])
def test_2000_articles_end_to_end_then_cleanup_empties_the_staging_area(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, source: str
) -> None:
    """From a local file to --out gs://, and from a gs:// prefix (three objects) to a local file: every id once, in
    input order, each with its own answer; `cleanup` then leaves nothing of the run under the staging prefix (the
    issue's must-show: 2,000 articles, four jobs of 500)."""
    rows = _articles(2000)
    lines = [json.dumps(r) + "\n" for r in rows]
    if source == "local":
        inp: Any = tmp_path / "news.jsonl"
        inp.write_text("".join(lines))
        out = f"gs://{bucket}/results/news.jsonl"
    else:
        for k, (lo, hi) in enumerate(((0, 700), (700, 1500), (1500, 2000))):
            gcs.bucket(bucket).blob(f"corpus/news/part-{k}.jsonl").upload_from_string("".join(lines[lo:hi]))
        inp, out = f"gs://{bucket}/corpus/news/", str(tmp_path / "news.results.jsonl")
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--batch-size", "500", "--out", out), tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    if source == "local":
        got = [json.loads(x) for x in gcs.bucket(bucket).blob("results/news.jsonl").download_as_text().splitlines()]
    else:
        got = read_jsonl(Path(out))
    assert [r["id"] for r in got] == [r["id"] for r in rows], "every id once, in input order"
    assert all(r["status"] == "ok" for r in got)
    assert len({json.dumps(r["result"], sort_keys=True) for r in got}) > 100, "each id has its own answer"
    stats = vemu.stats()
    assert stats["vertex_creates"] == 4 and set(stats["vertex_creates_by_display_name"].values()) == {1}
    assert len(list(gcs.list_blobs(bucket, prefix="batchify/news/"))) >= 8, "4 request objects and 4 outputs staged"
    p = run_cli(["cleanup", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(gcs.list_blobs(bucket, prefix="batchify/")) == [], "the staging area is empty"
    assert vemu.thread.call(lambda: len(vemu.emulator.vjobs)) == 0
    kept = "results/news.jsonl" if source == "local" else "corpus/news/part-0.jsonl"
    assert gcs.bucket(bucket).get_blob(kept) is not None, "cleanup deletes only what batchify staged"


def test_cancel_on_vertex_cancels_the_jobs_at_the_service(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    vemu.configure(job_seconds=60)
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _articles(400)))  # four jobs of 100
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    out = tmp_path / "o.jsonl"
    p = spawn_cli(_vx_args(inp, bucket, vemu.url, "--batch-size", "100", "--out", str(out)), tmp_path, **env)
    try:
        wait_for(lambda: vemu.stats()["vertex_creates"] == 4 and a_create_recorded(tmp_path / "st" / "news"))
        wait_for(lambda: sum('"remote_job": "' in f.read_text() for f in (tmp_path / "st/news/jobs").glob("*.json")) == 4)
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    c = run_cli(["cancel", "news", "--state-dir", "st"], tmp_path, **env)
    assert c.returncode == 0 and "cancelled 4 job(s)" in c.stdout, c.stderr[-2000:]
    states = vemu.thread.call(lambda: sorted(j["state"] for j in vemu.emulator.vjobs.values()))
    assert states == ["CANCELLED"] * 4
    st = json.loads(run_cli(["status", "news", "--json", "--state-dir", "st"], tmp_path).stdout)["runs"][0]
    assert st["status"] == "cancelled" and st["job_states"] == {"CANCELLED": 4}
    assert vemu.stats()["vertex_creates"] == 4


# -- request files streamed to the bucket by prepare (issue 16 C1): nothing of them on local disk -------------------


def _staged(gcs: storage.Client, bucket: str, run: str = "news") -> dict[str, list[dict[str, Any]]]:
    """The run's request objects: name -> its lines."""
    blobs = gcs.list_blobs(bucket, prefix=f"batchify/{run}/requests/")
    return {b.name: [json.loads(x) for x in b.download_as_text().splitlines()] for b in blobs}


def _no_local_requests(run_dir: Path) -> None:
    assert not list(run_dir.glob("requests/*")), "no request file in the run folder"


async def test_prepare_streams_the_request_files_to_the_bucket_in_vertex_form(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare writes each request file as an object (Vertex form: the key in the label) and nothing locally but
    requests.json, which names them; a dry run touches no bucket. Submitted, each object is its job's input (no
    copy), a job sidecar lost meanwhile is rebuilt from its object, and cleanup deletes the objects."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st = _news(tmp_path, 40), tmp_path / "st"
    opts = _vertex_opts(bucket, batch_size=15, mode="batch", poll_interval=0.05, out=str(tmp_path / "out.jsonl"))
    run = await batchify.prepare(inp, options=opts, state_dir=st, endpoint=vemu.url)
    prefix = f"batchify/news/requests/{run.run_id}-"
    marker = json.loads((st / "news" / "requests.json").read_text())
    assert marker == {
        "kind": "requests",
        "schema_version": batchify.SCHEMA_VERSION,
        "bucket": bucket,
        "prefix": prefix,
        "project": PROJECT,
        "location": LOCATION,
    }
    _no_local_requests(st / "news")
    staged = _staged(gcs, bucket)
    assert list(staged) == [f"{prefix}b{i:04d}.jsonl" for i in (1, 2, 3)]
    lines = [x for rows in staged.values() for x in rows]
    assert all(set(x) == {"request"} for x in lines), "Vertex form: no top-level key"
    assert [x["request"]["labels"] for x in lines] == [{"batchify_key": str(n)} for n in range(40)]
    await _dry(vemu, inp, st, batchify.RunOptions(name="gem", batch_size=15))  # the same requests, locally
    gem_lines = [json.loads(x) for i in (1, 2, 3) for x in (st / "gem" / f"requests/b{i:04d}.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x["request"].items() if k != "labels"} for x in lines] == [x["request"] for x in gem_lines]
    assert [batchify.request_entry(json.dumps(x).encode()) for x in lines] == [(x["key"], x["request"]) for x in gem_lines]
    await _dry(vemu, inp, st, _vertex_opts(bucket, name="dry", batch_size=15))  # a dry run: local files, no object
    assert len(list((st / "dry" / "requests").glob("*.jsonl"))) == 3 and not _staged(gcs, bucket, "dry")
    (st / "news" / "jobs" / "b0002.json").unlink()  # lost: repair counts its requests in the object
    summary = await batchify.submit("news", st, endpoint=vemu.url)
    assert summary.ok == 40 and [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"a{i}" for i in range(40)]
    repairs = json.loads((st / "news" / "run.json").read_text())["notes"]["repairs"]
    assert any("b0002: sidecar missing and no job at the service: its 15 request(s)" in r for r in repairs), repairs
    jobs = batchify.RunStore(st, "news").load_jobs()
    assert [j.remote_file for j in jobs] == [f"gs://{bucket}/{prefix}b{i:04d}.jsonl" for i in (1, 2, 3)], "no copy"
    _no_local_requests(st / "news")
    counts = await batchify.cleanup("news", st, endpoint=vemu.url)
    assert counts["jobs"] == 3 and counts["files"] == 6, counts  # 3 request objects, once each, and 3 outputs
    assert list(gcs.list_blobs(bucket, prefix="batchify/news/")) == []


def test_sigkill_while_prepare_streams_then_the_same_command_finishes(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """Killed as prepare closes its 2nd request object: no run yet, two objects named by requests.json. The same
    command again deletes them, prepares anew and finishes: every id once, one job per batch."""
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a{i}", "text": f"article {i} about rates"}) + "\n" for i in range(120)))
    out = tmp_path / "out.jsonl"
    args = [*_vx_args(inp, bucket, vemu.url, "--batch-size", "40"), "--out", str(out)]
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(args, tmp_path, BATCHIFY_CRASH_AT="prepare:2", **env)
    assert p.returncode == -9, p.stderr[-2000:]
    run_dir = tmp_path / "st" / "news"
    assert not (run_dir / "run.json").exists()
    torn = list(_staged(gcs, bucket))
    prefix = json.loads((run_dir / "requests.json").read_text())["prefix"]
    assert torn == [f"{prefix}b0001.jsonl", f"{prefix}b0002.jsonl"]
    _no_local_requests(run_dir)
    p = run_cli(args, tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(120)] and all(r["status"] == "ok" for r in rows)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert list(_staged(gcs, bucket)) == [f"batchify/news/requests/{run_id}-b{i:04d}.jsonl" for i in (1, 2, 3)]
    stats = vemu.stats()
    assert stats["vertex_creates"] == 3 and set(stats["vertex_creates_by_display_name"].values()) == {1}, stats
    _no_local_requests(run_dir)


def test_a_prepare_killed_while_staging_says_so_and_cleanup_deletes_its_objects(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """Killed as prepare closes its 2nd request object: `resume` says the objects are staged (not "nothing was
    uploaded") and how they go; `cleanup NAME` deletes them and the run folder (only an unfinished prepare in it)."""
    inp = _news(tmp_path, 40)
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--batch-size", "10"), tmp_path, BATCHIFY_CRASH_AT="prepare:2", **env)
    assert p.returncode == -9, p.stderr[-2000:]
    prefix = json.loads((tmp_path / "st" / "news" / "requests.json").read_text())["prefix"]
    assert list(_staged(gcs, bucket)) == [f"{prefix}b0001.jsonl", f"{prefix}b0002.jsonl"]
    p = run_cli(["resume", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    said = " ".join(p.stderr.split())
    assert p.returncode == 2 and "nothing was uploaded" not in said, said
    assert f"gs://{bucket}/{prefix}*" in said and "`batchify cleanup news`" in said, said
    p = run_cli(["cleanup", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0 and "2 remote file(s)" in p.stderr, p.stderr[-2000:]
    assert list(_staged(gcs, bucket)) == [] and not (tmp_path / "st" / "news").exists()


async def test_a_staged_request_object_gone_before_its_job_is_written_again_from_the_input(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request objects prepare staged are deleted before their jobs are created (a lifecycle rule, a `gsutil rm`):
    with the input moved away meanwhile, the run stops naming the object and the fix, no attempt spent; the input
    back, each is written again from it (the same bytes) before its job is created, and every id is answered
    by one job per batch."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st = _news(tmp_path, 30), tmp_path / "st"
    opts = _vertex_opts(bucket, batch_size=10, mode="batch", poll_interval=0.05, retry_scale=0.01)
    opts = dataclasses.replace(opts, out=str(tmp_path / "out.jsonl"))
    run = await batchify.prepare(inp, options=opts, state_dir=st, endpoint=vemu.url)
    prefix = f"batchify/news/requests/{run.run_id}-"
    staged = {n: gcs.bucket(bucket).blob(n).download_as_bytes() for n in (f"{prefix}b{i:04d}.jsonl" for i in (1, 2, 3))}
    for gone in ("b0002", "b0003"):
        gcs.bucket(bucket).blob(f"{prefix}{gone}.jsonl").delete()
    inp.rename(tmp_path / "away.jsonl")
    with pytest.raises(batchify.StateError, match=rf"gs://{bucket}/{prefix}b000[23].jsonl: .*gone.*Fix: restore"):
        await asyncio.wait_for(batchify.submit("news", st, endpoint=vemu.url), 60)
    jobs = batchify.RunStore(st, "news").load_jobs()
    assert all(j.attempt == 1 and j.state != batchify.JobState.FAILED for j in jobs), [(j.name, j.state) for j in jobs]
    (tmp_path / "away.jsonl").rename(inp)
    summary = await asyncio.wait_for(batchify.submit("news", st, endpoint=vemu.url), 60)
    assert summary.ok == 30 and [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"a{i}" for i in range(30)]
    assert {n: gcs.bucket(bucket).blob(n).download_as_bytes() for n in staged} == staged, "written again, the same"
    jobs = batchify.RunStore(st, "news").load_jobs()
    assert [(j.name, j.attempt) for j in jobs] == [("b0001", 1), ("b0002", 1), ("b0003", 1)]
    assert vemu.stats()["vertex_creates"] == 3
    repairs = json.loads((st / "news" / "run.json").read_text())["notes"]["repairs"]
    restaged = sorted(r.split(" ", 1)[1].split(": ")[0] for r in repairs if "gone from the bucket" in r)
    assert restaged == [f"gs://{bucket}/{prefix}b000{i}.jsonl" for i in (2, 3)], repairs
    _no_local_requests(st / "news")


async def test_a_request_object_the_run_cut_itself_gone_fails_its_job_once(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A split part's request object (cut during the run, not from the input alone) gone from the bucket: its job
    fails once, naming the object and why, and is not tried again (no attempt spent reading it again)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st = _news(tmp_path, 20), tmp_path / "st"
    await batchify.prepare(inp, options=_vertex_opts(bucket, batch_size=10, mode="batch"), state_dir=st, endpoint=vemu.url)
    store = batchify.RunStore(st, "news")
    client = vclient(vemu, gcs_url, bucket)
    try:
        engine = batchify.Engine(store, client)
        first = engine.jobs["b0001"]
        part = dataclasses.replace(first, name="b0001.1", request_file="requests/b0001.1.jsonl", part=".1")
        store.save_job(part)
        engine.jobs[part.name] = part
        assert await engine._upload(part)
    finally:
        await client.close()
    failed = store.load_jobs()[1]
    assert failed.name == "b0001.1" and failed.state == batchify.JobState.FAILED and failed.no_retry, failed
    assert "b0001.1.jsonl: the request object is gone from the bucket" in (failed.error or ""), failed.error
    assert [j.name for j in batchify.jobs_to_retry(store.load_jobs(), 3, False)] == []


async def test_split_and_the_line_retry_write_their_request_objects_to_the_bucket(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create refused (429) again and again with nothing enqueued: the job is split, its parts cut from its request
    object into objects of their own. Per-line errors then get one more try in a batch whose object is in the bucket."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    vemu.configure(create_429=batchify.SPLIT_AFTER_REFUSALS, line_error_rate=0.3, seed=5)
    inp, st = _news(tmp_path, 30), tmp_path / "st"
    opts = _vertex_opts(bucket, mode="batch", poll_interval=0.05, retry_scale=0.01, out=str(tmp_path / "out.jsonl"))
    run, _summary = await asyncio.wait_for(batchify.run_file(inp, options=opts, state_dir=st, endpoint=vemu.url), 90)
    jobs = {j.name: j for j in batchify.RunStore(st, "news").load_jobs()}
    parts = sorted(n for n in jobs if n.startswith("b0001."))
    assert jobs["b0001"].state == batchify.JobState.SPLIT and len(parts) >= 2, jobs
    retry = jobs["x0002"]
    assert retry.request_count == sum(jobs[n].failed for n in parts) > 0
    staged = _staged(gcs, bucket)
    prefix = f"batchify/news/requests/{run.run_id}-"
    names = ["b0001", *parts, "retry-0002"]
    assert sorted(staged) == sorted(f"{prefix}{n}.jsonl" for n in names)
    keys = [[x["request"]["labels"]["batchify_key"] for x in staged[f"{prefix}{n}.jsonl"]] for n in parts]
    assert [k for ks in keys for k in ks] == [str(n) for n in range(30)], "the parts hold the job's requests, in order"
    assert len(staged[f"{prefix}retry-0002.jsonl"]) == retry.request_count
    assert all(set(x) == {"request"} for rows in staged.values() for x in rows)
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(30)]
    _no_local_requests(st / "news")


async def test_the_real_time_fallback_reads_the_requests_back_from_the_bucket(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every create refused with 400 (the limits shrank after the plan): the fallback sends each request, read back
    from its object (the key label taken out again), through generateContent."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st = _news(tmp_path, 12), tmp_path / "st"
    opts = _vertex_opts(bucket, poll_interval=0.05, retry_scale=0.01, max_attempts=2, allow_standard=True)
    opts = dataclasses.replace(opts, out=str(tmp_path / "out.jsonl"))

    def shrink(run: batchify.Run) -> bool:
        monkeypatch.setitem(batchify.VERTEX_LIMITS, "requests_per_job", 5)
        return True

    _, summary = await asyncio.wait_for(batchify.run_file(inp, options=opts, state_dir=st, endpoint=vemu.url, confirm=shrink), 60)
    assert summary is not None and summary.ok == 12
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(12)] and {r["source"] for r in rows} == {"standard"}
    assert vemu.stats()["vertex_creates"] == 0 and vemu.stats()["generate_calls"] == 12
    jobs = batchify.RunStore(st, "news").load_jobs()
    assert [j.attempt for j in jobs] == [1, 2] and len({j.remote_file for j in jobs}) == 1, "the retry reuses the object"
    assert (jobs[0].remote_file or "").startswith(f"gs://{bucket}/batchify/news/requests/")
    _no_local_requests(st / "news")


# -- results streamed (docs/VERTEX_NOTES.md C2): a job's shuffled output sorted by ordinal in bounded runs in the
# -- bucket, merged into one results object per job; nothing of it on local disk -------------------------------------


class MemorySink:
    """batchify.ResultsSink in memory: every put recorded (name, bytes) to check the runs' sizes."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts: list[tuple[str, int]] = []

    def put(self, name: str, lines: Any) -> None:
        data = b"".join(lines)
        self.objects[name] = data
        self.puts.append((name, len(data)))

    def lines(self, name: str, run: bool = False) -> Iterator[bytes]:
        assert run == (".run-" in name)  # the K-way merge reads its runs with the small reads
        yield from self.objects[name].splitlines(keepends=True)

    def exists(self, name: str) -> bool:
        return name in self.objects

    def drop_runs(self, name: str) -> None:
        for k in [k for k in self.objects if k.startswith(f"{name}.run-")]:
            del self.objects[k]


def _line(n: int, ok: bool, tag: int) -> bytes:
    r = batchify.result_record(n, {"t": tag} if ok else None, None if ok else f"bad {tag}", "batch")
    return json.dumps(r, separators=(",", ":")).encode() + b"\n"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_shuffle_of_a_jobs_lines_sorts_back_to_request_order_in_bounded_runs(data: Any) -> None:
    start = data.draw(st.integers(0, 10**6))
    keys = range(start, start + data.draw(st.integers(0, 80)))
    answered = [n for n in keys if data.draw(st.integers(0, 6))]  # a line missing from the output now and then
    extra = data.draw(st.lists(st.integers(start - 5, start + 90), max_size=6))  # duplicates and strangers
    lines = [(n, _line(n, data.draw(st.booleans()), i)) for i, n in enumerate(answered + extra)]
    shuffled = data.draw(st.permutations(lines))
    run_bytes = data.draw(st.integers(40, 3000))
    sink = MemorySink()
    sorter = batchify.ExternalSorter(sink, "b0001", run_bytes)
    for n, line in shuffled:
        sorter.add(n, line)
    ok, failed = sorter.finish(keys, lambda n: _line(n, False, -1))
    out = sink.objects["b0001"].splitlines(keepends=True)
    assert [batchify.line_ordinal(x) for x in out] == list(keys), "every key once, ascending"
    chosen: dict[int, bytes] = {}  # of an ordinal's lines in the order added, the first ok one, else the first
    for n, line in shuffled:
        if n not in chosen or (not batchify.line_is_ok(chosen[n]) and batchify.line_is_ok(line)):
            chosen[n] = line
    assert out == [chosen.get(n, _line(n, False, -1)) for n in keys]
    assert (ok, failed) == (sum(json.loads(x)["status"] == "ok" for x in out), sum(json.loads(x)["status"] != "ok" for x in out))
    biggest = max((len(x) for _n, x in lines), default=0)
    runs = [size for name, size in sink.puts if ".run-" in name]
    assert all(size <= max(run_bytes, biggest) for size in runs), (runs, run_bytes)
    assert sum(runs) in (0, sum(len(x) for _n, x in lines)), "a run per spill, together the whole output"
    assert list(sink.objects) == ["b0001"], "the runs are gone once the result is written"


def test_a_run_that_cannot_be_deleted_costs_nothing_once_the_result_is_whole() -> None:
    """The result object is written: a failure to delete the sorted runs is not a failed download round (that
    would download and sort the paid answers again, and after a few rounds send them again); cleanup's
    results/ folder takes the runs."""

    class StickyRuns(MemorySink):
        def drop_runs(self, name: str) -> None:
            raise batchify.RemoteError("delete gs://b/results/b0001.run-0001.jsonl: 503 Service Unavailable", code=503)

    sink = StickyRuns()
    sorter = batchify.ExternalSorter(sink, "b0001", 60)
    for n in (3, 1, 2, 0):
        sorter.add(n, _line(n, True, n))
    assert sorter.finish(range(4), lambda n: _line(n, False, -1)) == (4, 0)
    assert [batchify.line_ordinal(x) for x in sink.objects["b0001"].splitlines()] == [0, 1, 2, 3]


def test_every_cloud_storage_error_of_a_results_call_is_a_remote_error() -> None:
    """Not only the API's: resumable-media's InvalidResponse of an upload chunk derives from Exception alone, and
    an expired credential is google-auth's; either would otherwise stop the engine in the middle of retrieval."""
    from google.auth import exceptions as auth_exc
    from google.resumable_media import common

    results = batchify.GsResults("gs://b/batchify/news/results")
    response = type("Response", (), {"status_code": 502})()
    with pytest.raises(batchify.RemoteError) as got, results._remote("write b0001"):
        raise common.InvalidResponse(response, "Bad Gateway")
    assert got.value.code == 502 and "write b0001" in str(got.value)
    with pytest.raises(batchify.AuthError, match="application-default login"), results._remote("read b0001"):
        raise auth_exc.RefreshError("token expired")
    with pytest.raises(batchify.RemoteError, match="no such object"), results._remote("read b0001"):
        raise batchify.RemoteError("read b0001: no such object", code=404)


def test_join_keys_table() -> None:
    """One line per key; of several lines for one key the first ok one (an output answering a key twice, ok then
    an error, used to keep the error: the paid answer was thrown away and the request sent again)."""

    def line(n: int, x: str) -> bytes:
        return f'{{"id":{n},"status":"{"error" if x.startswith("e") else "ok"}","v":"{x}"}}'.encode()

    def join(pairs: list[tuple[int, str]], keys: list[int]) -> list[str]:
        got = batchify.join_keys(iter([(n, line(n, x)) for n, x in pairs]), keys, lambda n: f"missing {n}".encode())
        return [x.decode().rsplit('"v":"', 1)[-1].rstrip('"}') for x in got]

    assert join([], [1, 2]) == ["missing 1", "missing 2"]
    assert join([(1, "a"), (2, "b")], []) == []
    assert join([(0, "z"), (1, "a"), (1, "a2"), (3, "c"), (9, "x")], [1, 2, 3]) == ["a", "missing 2", "c"]
    assert join([(1, "a"), (1, "e1")], [1]) == ["a"]  # ok, then an error: the ok answer stays
    assert join([(1, "e1"), (1, "a")], [1]) == ["a"]  # an error, then ok: the ok one
    assert join([(1, "e1"), (1, "e2")], [1]) == ["e1"]


def _results_objects(gcs: storage.Client, bucket: str) -> list[str]:
    return sorted(b.name for b in gcs.list_blobs(bucket, prefix="batchify/news/results/"))


async def test_vertex_results_are_sorted_in_the_bucket_in_bounded_runs_never_on_local_disk(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shuffled output (the emulator shuffles as Vertex may), runs of at most 8 KB: every id once, in input order,
    each with its own answer; the primary results are one object per job in the bucket, no file in results/."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    monkeypatch.setattr(batchify, "RESULT_RUN_BYTES", 8192)
    puts: list[tuple[str, int]] = []
    real_put = batchify.GsResults.put

    def put(self: batchify.GsResults, name: str, lines: Any) -> None:
        data = list(lines)
        puts.append((name, sum(len(x) for x in data)))
        real_put(self, name, data)

    monkeypatch.setattr(batchify.GsResults, "put", put)
    active, most = [0], [0]  # jobs being sorted at once (each holds a run in memory): one at a time
    real_init, real_finish = batchify.ResultsRecorder.__init__, batchify.ResultsRecorder.finish

    def init(self: batchify.ResultsRecorder, *a: Any) -> None:
        active[0] += 1
        most[0] = max(most[0], active[0])
        real_init(self, *a)

    def finish(self: batchify.ResultsRecorder, *a: Any) -> Any:
        # hold the first sort until every job has ended at the service (the others' outputs are ready to sort
        # meanwhile) or a second sort has started (the gate is broken): a condition, not a timed wait
        ended = ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
        wait_for(lambda: active[0] > 1 or [j["state"] in ended for j in list(vemu.emulator.vjobs.values())] == [True] * 3)
        try:
            return real_finish(self, *a)
        finally:
            active[0] -= 1

    monkeypatch.setattr(batchify.ResultsRecorder, "__init__", init)
    monkeypatch.setattr(batchify.ResultsRecorder, "finish", finish)
    vemu.configure(job_seconds=0.5, pending_fraction=0.0)
    inp, st_dir = _news(tmp_path, 300), tmp_path / "st"
    opts = dataclasses.replace(
        _vertex_opts(bucket, batch_size=100, poll_interval=0.05, mode="batch"), out=str(tmp_path / "o.jsonl")
    )
    _, summary = await batchify.run_file(inp, options=opts, state_dir=st_dir, endpoint=vemu.url, api_key="k")
    assert summary is not None and summary.ok == 300
    rows = read_jsonl(tmp_path / "o.jsonl")
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(300)]
    assert all(r["source"] == "batch" and r["usage"]["promptTokenCount"] > 0 for r in rows)
    assert not list((st_dir / "news").glob("results/*.jsonl")), "no local results sidecar of a primary job"
    jobs = batchify.RunStore(st_dir, "news").load_jobs()
    assert _results_objects(gcs, bucket) == sorted(f"batchify/news/results/{j.display_name}.jsonl" for j in jobs)
    assert [(j.ok, j.failed) for j in jobs] == [(100, 0)] * 3
    runs = [size for name, size in puts if ".run-" in name]
    assert len(runs) >= 3 * 2 and max(runs) <= 8192, runs
    assert most[0] == 1, "one job's output sorted at a time"
    for j in jobs:  # each results object is in request order, one line per request
        text = gcs.bucket(bucket).blob(f"batchify/news/results/{j.display_name}.jsonl").download_as_text()
        assert [json.loads(x)["n"] for x in text.splitlines()] == list(range(j.start or 0, j.end or 0))
    # the merge reads them back from the bucket (no network but Cloud Storage): the same file again
    before = (tmp_path / "o.jsonl").read_bytes()
    batchify.merge_run(st_dir, "news")
    assert (tmp_path / "o.jsonl").read_bytes() == before


class _Crash(Exception):
    pass


async def test_a_crash_between_download_and_the_results_object_loses_nothing(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after a job's output is read and its sorted runs are in the bucket, before the results object is
    written: the job is still SUCCEEDED (its output untouched); resume retrieves it again from the same output,
    replaces the runs, and creates nothing twice."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    monkeypatch.setattr(batchify, "RESULT_RUN_BYTES", 4096)
    monkeypatch.setattr(batchify, "DOWNLOAD_CHUNK_BYTES", 2048)  # several chunks a job: runs spilled before the crash
    inp, st_dir = _news(tmp_path, 120), tmp_path / "st"
    opts = dataclasses.replace(
        _vertex_opts(bucket, batch_size=40, poll_interval=0.05, mode="batch"), out=str(tmp_path / "o.jsonl")
    )

    def crash(point: batchify.Hook) -> None:
        if point == batchify.Hook.AFTER_DOWNLOAD:
            raise _Crash(point)

    with pytest.raises(_Crash):
        await batchify.run_file(inp, options=opts, state_dir=st_dir, endpoint=vemu.url, api_key="k", hook=crash)
    left = [n for n in (b.name for b in gcs.list_blobs(bucket, prefix="batchify/news/results/")) if ".run-" in n]
    assert left and not [n for n in _results_objects(gcs, bucket) if ".run-" not in n], "runs written, no result yet"
    jobs = batchify.RunStore(st_dir, "news").load_jobs()
    assert batchify.JobState.RESULTS_DOWNLOADED not in {j.state for j in jobs}
    creates = vemu.stats()["vertex_creates"]
    summary = await batchify.resume_run("news", st_dir, endpoint=vemu.url, api_key="k")
    assert summary.ok == 120
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == [f"a{i}" for i in range(120)]
    stats = vemu.stats()
    assert stats["vertex_creates"] == creates == 3 and set(stats["vertex_creates_by_display_name"].values()) == {1}
    assert len(_results_objects(gcs, bucket)) == 3, "one results object per job, the runs removed"
    assert not list((st_dir / "news").glob("results/*.jsonl"))


async def test_a_crash_after_the_results_object_before_the_state_is_recorded_retrieves_again(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other window: the results object is whole, RESULTS_DOWNLOADED not yet recorded. Resume retrieves the job
    again from its output (still there: nothing is deleted before cleanup) and writes the same object again."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    monkeypatch.setattr(batchify, "RESULT_RUN_BYTES", 4096)
    real_finish = batchify.ExternalSorter.finish
    crashed: list[str] = []
    dead = [True]  # until the resume: a dead process records nothing more (the engine lets retrievals end)

    def finish(self: batchify.ExternalSorter, *a: Any) -> Any:
        got = real_finish(self, *a)
        if dead[0]:
            crashed.append(self.name)
            raise _Crash("after the results object")
        return got

    monkeypatch.setattr(batchify.ExternalSorter, "finish", finish)
    inp, st_dir = _news(tmp_path, 120), tmp_path / "st"
    opts = dataclasses.replace(
        _vertex_opts(bucket, batch_size=40, poll_interval=0.05, mode="batch"), out=str(tmp_path / "o.jsonl")
    )
    with pytest.raises(_Crash):
        await batchify.run_file(inp, options=opts, state_dir=st_dir, endpoint=vemu.url, api_key="k")
    assert f"batchify/news/results/{crashed[0]}.jsonl" in _results_objects(gcs, bucket)
    first = gcs.bucket(bucket).blob(f"batchify/news/results/{crashed[0]}.jsonl").download_as_bytes()
    jobs = {j.display_name: j for j in batchify.RunStore(st_dir, "news").load_jobs()}
    assert all(jobs[name].state == batchify.JobState.SUCCEEDED for name in crashed)
    dead[0] = False
    summary = await batchify.resume_run("news", st_dir, endpoint=vemu.url, api_key="k")
    assert summary.ok == 120
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == [f"a{i}" for i in range(120)]
    stats = vemu.stats()
    assert stats["vertex_creates"] == 3 and set(stats["vertex_creates_by_display_name"].values()) == {1}
    assert len(_results_objects(gcs, bucket)) == 3
    assert gcs.bucket(bucket).blob(f"batchify/news/results/{crashed[0]}.jsonl").download_as_bytes() == first


def test_sigkill_after_download_on_vertex_then_resume_loses_nothing(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    """SIGKILL after a job's output is streamed, before its results object exists (BATCHIFY_CRASH_AT): resume
    retrieves it again; every id once, in order; nothing created twice; the results objects in the bucket."""
    inp = _news(tmp_path, 120)
    out = tmp_path / "out.jsonl"
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    p = run_cli(
        [*_vx_args(inp, bucket, vemu.url, "--batch-size", "40"), "--out", str(out)],
        tmp_path,
        BATCHIFY_CRASH_AT="after_download:2",
        **env,
    )
    assert p.returncode == -9, p.stderr[-2000:]
    states = [json.loads(f.read_text())["state"] for f in sorted((tmp_path / "st/news/jobs").glob("*.json"))]
    assert states.count("RESULTS_DOWNLOADED") <= 1, states
    p = run_cli(["resume", "news", "--endpoint", vemu.url, "--state-dir", "st"], tmp_path, **env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(120)] and all(r["status"] == "ok" for r in rows)
    stats = vemu.stats()
    assert stats["vertex_creates"] == 3 and set(stats["vertex_creates_by_display_name"].values()) == {1}, stats
    assert len(_results_objects(gcs, bucket)) == 3
    assert not list((tmp_path / "st/news").glob("results/*.jsonl"))


def test_a_primary_jobs_keys_are_its_range_less_its_fetch_failures_without_reading_its_requests(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"d{i}", "text": f"article {i}"}) + "\n" for i in range(30)))
    opts = batchify.RunOptions(calibrate=False, batch_size=10, out=str(tmp_path / "out.jsonl"))
    store = batchify.RunStore(tmp_path / "st", "m")
    asyncio.run(batchify.prepare_run(store, inp, batchify.JobConfig(), opts))
    failed = [batchify.result_record(n, None, "404 (fetch)", "fetch") for n in (3, 12, 19)]
    store.fetch_errors_path.write_text("".join(json.dumps(r) + "\n" for r in failed))
    for p in (store.dir / "requests").glob("*.jsonl"):
        p.unlink()  # never read for a primary job
    engine = batchify.Engine(store, None)
    jobs = sorted(store.load_jobs(), key=lambda j: j.index)
    assert [list(engine._job_keys(j)) for j in jobs] == [
        [n for n in range(10) if n != 3],
        [n for n in range(10, 20) if n not in (12, 19)],
        list(range(20, 30)),
    ]
    assert engine._job_keys(jobs[2]) == range(20, 30), "no list when nothing in the range failed"


async def test_a_results_object_gone_with_its_output_marks_its_ids_with_the_reason(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's results object and its output both gone from the bucket: its ids get an error line saying why (kept in
    results/, which is read first), so `results` is whole again; before, the repair only logged 'its ids go again'
    and nothing did, and a strict read of the results stopped on the gone object for good."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    inp, st_dir = _news(tmp_path, 40), tmp_path / "st"
    opts = dataclasses.replace(
        _vertex_opts(bucket, batch_size=20, poll_interval=0.05, mode="batch", retry_scale=0.02), out=str(tmp_path / "o.jsonl")
    )
    await batchify.run_file(inp, options=opts, state_dir=st_dir, endpoint=vemu.url, api_key="k")
    gone = _results_objects(gcs, bucket)[0]
    display = gone.rsplit("/", 1)[1].removesuffix(".jsonl")
    for blob in [gcs.bucket(bucket).blob(gone), *gcs.list_blobs(bucket, prefix=f"batchify/news/output/{display}")]:
        blob.delete()
    await batchify.resume_run("news", st_dir, endpoint=vemu.url, api_key="k")
    rows = list(batchify.iter_sidecar_results(st_dir, "news", strict=True))
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(40)]
    lost = [r for r in rows if r["status"] != "ok"]
    assert len(lost) == 20 and all(r["error"].startswith("result lost: results file gone") for r in lost)


# -- a job that ends FAILED, EXPIRED or CANCELLED after exporting part of its rows (docs/VERTEX_NOTES.md A5) ---------


def _sent_keys(gcs: storage.Client, uris: list[str]) -> set[str]:
    """The batchify keys of every request a Vertex job was given (its input objects)."""
    keys: set[str] = set()
    for uri in uris:
        b, name = batchify.split_gs_uri(uri)
        text = gcs.bucket(b).blob(name).download_as_text()
        keys |= {json.loads(x)["request"]["labels"]["batchify_key"] for x in text.splitlines() if x.strip()}
    return keys


@pytest.mark.parametrize("end", ["fail_jobs", "expire_jobs"])
async def test_a_job_ending_with_part_of_its_rows_exported_is_retrieved_not_sent_again(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path, end: str
) -> None:
    vemu.configure(**{end: 1}, vertex_exported_share=0.5, expire_seconds=0.3)
    c = vclient(vemu, gcs_url, bucket)  # the client over the unmodified SDK: the job's output found and named
    try:
        f = await c.upload(write_requests(tmp_path / "r" / "requests" / "b0001.jsonl", [str(i) for i in range(10)]), "dn-p")
        done = await until_final(c, (await c.create_batch("gemini-2.5-flash", f.name, "dn-p")).name)
        assert done.state == (batchify.JobState.FAILED if end == "fail_jobs" else batchify.JobState.EXPIRED)
        assert done.output_file and done.output_file.startswith(f"gs://{bucket}/batchify/r/output/dn-p/prediction-model-")
        assert done.stats.get("successfulRequestCount") == 5
        assert len((await downloaded(c, done.output_file)).splitlines()) == 5
    finally:
        await c.close()
    vemu.configure(**{end: 2}, vertex_exported_share=0.5)  # the 2nd job created (the run's first) ends so, half exported
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _articles(20)))
    out = tmp_path / "o.jsonl"
    p = run_cli(
        _vx_args(inp, bucket, vemu.url, "--batch-size", "20", "--retry-scale", "0.02", "--out", str(out)),
        tmp_path,
        STORAGE_EMULATOR_HOST=gcs_url,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "with rows exported to" in " ".join(p.stderr.split()), p.stderr[-3000:]
    rows = read_jsonl(out)
    assert [r["status"] for r in rows] == ["ok"] * 20
    jobs = sorted(vemu.thread.call(lambda: [dict(j) for j in vemu.emulator.vjobs.values()]), key=lambda j: j["create_time"])
    first, *later = [j for j in jobs if "news" in (j["display_name"] or "")]
    answered = {
        json.loads(x)["request"]["labels"]["batchify_key"]
        for b in gcs.list_blobs(bucket, prefix=batchify.split_gs_uri(first["output_dir"])[1] + "/")
        for x in b.download_as_text().splitlines()
    }
    assert len(answered) == 10
    resent = set().union(*(_sent_keys(gcs, j["uris"]) for j in later))
    assert len(resent) == 10 and not answered & resent, "only the requests the ended job left unanswered go again"
    b1 = json.loads((tmp_path / "st" / "news" / "jobs" / "b0001.json").read_text())
    assert b1["state"] == "RESULTS_DOWNLOADED" and b1["ok"] == 10 and b1["usage"].get("promptTokenCount", 0) > 0, b1
    assert b1["error"].startswith("ended FAILED" if end == "fail_jobs" else "ended EXPIRED")


def test_cancel_on_vertex_keeps_the_rows_exported_before_it_and_counts_their_cost(
    vemu: Emu, gcs_url: str, gcs: storage.Client, bucket: str, tmp_path: Path
) -> None:
    vemu.configure(job_seconds=60, pending_fraction=0.01, vertex_exported_share=0.5)  # half done when the cancel comes
    inp = tmp_path / "news.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _articles(20)))
    env = {"STORAGE_EMULATOR_HOST": gcs_url}
    out = tmp_path / "o.jsonl"
    p = spawn_cli(_vx_args(inp, bucket, vemu.url, "--batch-size", "20", "--out", str(out)), tmp_path, **env)
    try:
        wait_for(lambda: any('"remote_job": "' in f.read_text() for f in (tmp_path / "st/news/jobs").glob("*.json")))
        wait_for(lambda: vemu.thread.call(lambda: [j["state"] for j in vemu.emulator.vjobs.values()]) == ["RUNNING"])
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    c = run_cli(["cancel", "news", "--state-dir", "st"], tmp_path, **env)
    assert c.returncode == 0 and "cancelled 1 job(s)" in c.stdout, (c.stdout, c.stderr[-2000:])
    assert vemu.thread.call(lambda: [j["state"] for j in vemu.emulator.vjobs.values()]) == ["CANCELLED"]
    b1 = json.loads((tmp_path / "st" / "news" / "jobs" / "b0001.json").read_text())
    assert b1["state"] == "RESULTS_DOWNLOADED" and b1["ok"] == 10 and b1["cancelled_by_user"], b1
    st = json.loads(run_cli(["status", "news", "--json", "--state-dir", "st"], tmp_path).stdout)["runs"][0]
    assert st["status"] == "cancelled" and st["batch_cost_usd"] > 0, st
    res = run_cli(["results", "news", "--state-dir", "st"], tmp_path, **env)
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert len(rows) == 20 and sum(r["status"] == "ok" for r in rows) == 10, res.stderr[-2000:]
    assert {r["error"].split(":")[0] for r in rows if r["status"] != "ok"} == {
        "not answered before its batch job ended CANCELLED"
    }
    assert vemu.stats()["vertex_creates"] == 1, "nothing sent again"


def test_a_succeeded_job_naming_no_output_directory_is_read_from_its_prefix(
    vemu: Emu, gcs_url: str, bucket: str, tmp_path: Path
) -> None:
    vemu.configure(vertex_output_info=False)  # the resource names no outputInfo.gcsOutputDirectory
    inp = _news(tmp_path, 10)
    out = tmp_path / "o.jsonl"
    p = run_cli(_vx_args(inp, bucket, vemu.url, "--out", str(out)), tmp_path, timeout=60, STORAGE_EMULATOR_HOST=gcs_url)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["status"] for r in read_jsonl(out)] == ["ok"] * 10
    assert vemu.stats()["vertex_creates"] == 1


def test_every_kind_of_storage_error_becomes_a_batchify_error_never_a_traceback():
    """The storage library ends a call made with the network down in api_core's RetryError (a GoogleAPIError, neither
    a GoogleAPICallError nor an OSError), after its 120 s deadline: the --out gs:// merge and a gs:// input listing let
    it out as a traceback after every job was paid (the review's reproducer, /tmp/rev12/repro/01). One mapping now
    (gs_errors, gs_error) serves the listing, the merge's writer and the results objects."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    down = gexc.RetryError("Timeout of 120.0s exceeded", cause=ConnectionError("refused"))
    assert isinstance(down, batchify.gs_errors())  # what GsOutput.atomic_writer catches (and maps to OutWriteError)
    with pytest.raises(batchify.RemoteError) as e:
        with batchify.gs_look_errors("gs://b/in/", "list"):
            raise down
    assert e.value.code == 0 and e.value.transient and "RetryError" in str(e.value)
    assert batchify.gs_error(gexc.ServiceUnavailable("busy"), "read").code == 503
    assert isinstance(batchify.gs_error(auth_exc.RefreshError("expired"), "read"), batchify.AuthError)
