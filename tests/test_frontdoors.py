"""The other front doors: library API (async and sync), REST API over real HTTP, URL input, analytics, cleanup."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT, input_ids, read_jsonl, run_against, run_cli, serving

import batchify

sys.path.insert(0, str(ROOT / "examples"))
import make_articles

# -- a local web site for URL input -----------------------------------------------------------


class Site:
    def __init__(self):
        import random

        rng = random.Random(5)
        self.pages = {}
        for i in range(6):
            a = make_articles.article(i, rng, 220)
            paras = "".join(f"<p>{p}</p>" for p in a["text"].split("\n\n"))
            self.pages[f"/news/{i}"] = (
                f"<html><head><title>{a['title']}</title></head><body><nav>Home | World</nav>"
                f"<article><h1>{a['title']}</h1>{paras}</article><footer>(c) News</footer>"
                "</body></html>"
            )
        self.hits: dict[str, int] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                if self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.end_headers()
                    return
                body = site.pages.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def url_records(site):
    ok = [{"id": f"p{i}", "url": f"{site.url}/news/{i}"} for i in range(6)]
    bad = [
        {"id": "missing", "url": f"{site.url}/nope"},
        {"id": "loop", "url": f"{site.url}/loop"},
        {"id": "ftp", "url": "ftp://127.0.0.1/file"},
    ]
    return ok[:3] + bad + ok[3:]


def test_url_input_fetches_extracts_and_caches(emu, site, tmp_path):
    inp = tmp_path / "urls.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in url_records(site)))
    out = tmp_path / "o.jsonl"
    p = run_against(
        emu, inp, tmp_path, "--yes", "--poll-interval", "0.2", "--allow-private-urls", out=out, BATCHIFY_CRASH_AT="after_create"
    )
    assert p.returncode == -9  # crash after the fetch and the create; resume must not fetch again
    hits = dict(site.hits)
    assert hits["/news/0"] == 1 and hits["/nope"] == 1
    p = run_cli(["resume", "urls", "--state-dir", "st"], tmp_path)
    assert p.returncode == 1, p.stderr  # three ids end in error
    assert site.hits == hits
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == input_ids(inp)
    by_id = {r["id"]: r for r in rows}
    for i in range(6):
        assert by_id[f"p{i}"]["status"] == "ok"
    assert "HTTP 404" in by_id["missing"]["error"] and "redirects" in by_id["loop"]["error"]
    assert "only http and https" in by_id["ftp"]["error"]
    assert {by_id[k]["source"] for k in ("missing", "loop", "ftp")} == {"fetch"}
    # the request carries the extracted article text, not the page chrome
    req = json.loads((tmp_path / "st/urls/requests/b0001.jsonl").read_text().splitlines()[0])["request"]
    text = req["contents"][0]["parts"][0]["text"]
    assert "Home | World" not in text and len(text) > 500


def test_url_input_fills_title_from_the_page_and_logs_what_is_sent(emu, site, tmp_path):
    """{title} in the prompt comes from the page's <title> when the record has none; the log counts the
    requests actually sent, and failed fetches are not reported as work for the real-time fallback."""
    inp = tmp_path / "urls.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in url_records(site)))
    p = run_against(
        emu,
        inp,
        tmp_path,
        "--yes",
        "--poll-interval",
        "0.2",
        "--allow-private-urls",
        "--prompt-template",
        "TITLE: {title}\n\n{text}",
    )
    assert p.returncode == 1, p.stderr  # the three pages that could not be fetched end in error
    req = json.loads((tmp_path / "st/urls/requests/b0001.jsonl").read_text().splitlines()[0])["request"]
    first = req["contents"][0]["parts"][0]["text"]
    assert first.startswith("TITLE: ") and "<title>" not in site.pages["/news/0"].split("<title>")[1][:0]
    assert first.splitlines()[0] == "TITLE: " + site.pages["/news/0"].split("<title>")[1].split("</title>")[0]
    assert "(6 requests" in p.stderr  # six pages fetched, six requests in the job
    assert "fallback" not in p.stderr, p.stderr


def test_all_urls_failing_still_gives_one_line_each(emu, site, tmp_path):
    inp = tmp_path / "dead.jsonl"
    inp.write_text(json.dumps({"id": 1, "url": f"{site.url}/gone"}) + "\n")
    out = tmp_path / "o.jsonl"
    p = run_against(emu, inp, tmp_path, "--yes", "--allow-private-urls", out=out)
    assert p.returncode == 1
    assert [(r["id"], r["status"]) for r in read_jsonl(out)] == [(1, "error")]
    assert emu.stats()["uploads"] == 0


async def test_library_records_prepare_submit_results(emu, tmp_path):
    records = [{"id": i, "title": f"Story {i}", "text": f"Shares of Quillmark Systems rose {i}% today."} for i in range(12)]
    run = await batchify.prepare(
        records,
        name="lib",
        state_dir=tmp_path,
        endpoint=emu.url,
        api_key="k",
        options=batchify.RunOptions(batch_size=5, poll_interval=0.2),
    )
    assert run.records == 12 and run.plan["batches"] == 3 and emu.stats()["uploads"] == 0
    summary = await batchify.submit("lib", state_dir=tmp_path, endpoint=emu.url, api_key="k")
    assert summary.ok == 12
    res = batchify.results("lib", state_dir=tmp_path)
    assert [r.id for r in res] == list(range(12)) and all(isinstance(r, batchify.Result) and r.ok for r in res)
    assert res[0].to_dict()["result"]["is_financial"] in ("Yes", "No")
    a = batchify.analytics(tmp_path, "lib")
    assert sum(a["fields"]["is_financial"].values()) == 12 and a["cost_usd"]["batch"] > 0


async def test_sync_wrappers_work_inside_a_running_loop(emu, articles, tmp_path):
    # A notebook cell runs inside an event loop: the sync API must still work there.
    assert asyncio.get_running_loop()
    _run, summary = batchify.run_file_sync(
        articles, options=batchify.RunOptions(poll_interval=0.2), state_dir=tmp_path, endpoint=emu.url, api_key="k"
    )
    assert summary.ok == 60
    assert batchify.run_status(tmp_path, "articles")["runs"][0]["status"] == "done"
    with pytest.raises(batchify.UsageError):
        batchify.cancel_sync("nope", state_dir=tmp_path, endpoint=emu.url, api_key="k")


@pytest.mark.slow
def test_notebook_example_runs(tmp_path):
    import subprocess

    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "notebook_usage.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "60 ok" in p.stdout


def test_results_summary_json_and_cleanup(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, "--yes", "--poll-interval", "0.2", "--batch-size", "30", out=out)
    assert p.returncode == 0
    assert "is_financial" in p.stdout and "category" in p.stdout  # the analytics table at the end (a report: stdout)
    a = json.loads(run_cli(["results", "articles", "--summary", "--json", "--state-dir", "st"], tmp_path).stdout)
    assert a["ok"] == 60 and sum(a["fields"]["category"].values()) == 60
    assert set(a["fields"]) == {"is_financial", "category", "sentiment"}  # enums only: free text is not counted
    c = run_cli(["cleanup", "articles", "--state-dir", "st", "--local"], tmp_path)
    assert c.returncode == 0, c.stderr
    s = emu.stats()
    assert s["deletes"] == 2 + 4  # two jobs, two uploads and two outputs
    assert not (tmp_path / "st" / "articles").exists()


def test_cleanup_refuses_before_results_are_merged(emu, articles, tmp_path):
    p = run_against(emu, articles, tmp_path, "--yes", BATCHIFY_CRASH_AT="after_create")
    assert p.returncode == -9
    c = run_cli(["cleanup", "articles", "--state-dir", "st"], tmp_path)
    assert c.returncode == 2 and "not finished" in c.stderr and "resume" in c.stderr
    assert emu.stats()["deletes"] == 0


# -- REST API over real HTTP --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(emu, tmp_path):
    app = batchify.make_api(
        tmp_path / "st",
        "s3cret-token",
        endpoint=emu.url,
        api_key="k",
        options=batchify.RunOptions(poll_interval=0.2, allow_private_urls=True),  # the test site is on loopback
        docs=True,
    )
    with serving(app) as url:
        yield url


def call(url, method="GET", body=None, token="s3cret-token"):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_status(api, name, want="done", timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        code, st = call(f"{api}/batch/status/{name}")
        assert code == 200, st
        if st["status"] == want and not st.get("working"):
            return st
        time.sleep(0.2)
    raise AssertionError(f"status stayed {st}")


def test_rest_api_submit_contents_status_results(api, articles):
    records = [json.loads(x) for x in articles.read_text().splitlines()[:20]]
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": records, "batch_name": "news1"})
    assert code == 200 and set(body) == {"job_id", "batch_name", "status", "message"}
    assert body["job_id"] == "news1" and body["status"] == "submitted"
    st = wait_status(api, "news1")
    assert st["records"] == 20
    code, res = call(f"{api}/batch/results/news1")
    assert code == 200 and [r["id"] for r in res["results"]] == [r["id"] for r in records]
    assert all(r["status"] == "ok" for r in res["results"])
    code, summ = call(f"{api}/batch/results/news1?summary=true")
    assert code == 200 and summ["ok"] == 20
    code, jobs = call(f"{api}/batch/jobs")
    assert code == 200 and [r["name"] for r in jobs["runs"]] == ["news1"]


def test_rest_api_requires_token_and_validates(api):
    assert call(f"{api}/batch/jobs", token=None)[0] == 401
    assert call(f"{api}/batch/jobs", token="wrong")[0] == 401
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": []})
    assert code == 422
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": [{"id": 1, "text": "x"}], "batch_name": "../etc"})
    assert code == 422
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": [{"id": 1, "text": "x"}], "batch_name": "inputs"})
    assert code == 422 and "reserved" in body["detail"] and "batch_name" in body["detail"], body  # the library's rule
    assert call(f"{api}/batch/status/inputs")[0] == 404
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": [{"id": 1}, {"id": 1, "text": "x"}]})
    assert code == 422 and "no 'text' field" in json.dumps(body)
    code, body = call(f"{api}/batch/submit", "POST", {"urls": ["file:///etc/passwd"]})
    assert code == 422
    assert call(f"{api}/batch/status/nope")[0] == 404
    with urllib.request.urlopen(f"{api}/openapi.json") as r:
        spec = json.loads(r.read())
    paths = spec["paths"]
    assert {"SubmitUrls", "SubmitContents", "Submitted"} <= set(spec["components"]["schemas"])  # typed bodies
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"  # docs can send the token
    assert all(op.get("security") == [{"HTTPBearer": []}] for route in spec["paths"].values() for op in route.values())
    assert {
        "/batch/submit",
        "/batch/submit-contents",
        "/batch/status/{run}",
        "/batch/results/{run}",
        "/batch/jobs",
        "/batch/cancel/{run}",
    } <= set(paths)


def test_rest_api_urls_and_cancel(api, emu, site):
    code, body = call(f"{api}/batch/submit", "POST", {"urls": [f"{site.url}/news/{i}" for i in range(4)], "batch_name": "web"})
    assert code == 200
    st = wait_status(api, "web")
    assert st["records"] == 4
    code, res = call(f"{api}/batch/results/web")
    assert [r["status"] for r in res["results"]] == ["ok"] * 4
    emu.configure(job_seconds=30)
    code, body = call(f"{api}/batch/submit-contents", "POST", {"contents": [{"id": 1, "text": "slow"}], "batch_name": "slow"})
    assert code == 200
    for _ in range(100):
        if emu.stats()["creates"] >= 2:
            break
        time.sleep(0.05)
    # an unfinished run's results: 409 with its progress, or only the rows answered so far
    code, body = call(f"{api}/batch/results/slow")
    assert code == 409 and "not finished" in body["detail"] and body["records"] == 1, body
    code, body = call(f"{api}/batch/results/slow?partial=true")
    assert code == 200 and body["partial"] is True and body["results"] == [], body
    code, body = call(f"{api}/batch/cancel/slow", "POST")
    assert code == 200 and body["cancelled"] == ["b0001"]
    assert emu.stats()["cancels"] == 1


async def test_rest_api_shutdown_keeps_the_flex_answers_already_paid_for(emu, articles, tmp_path):
    """The server going down drains its runs as Ctrl-C drains the CLI: nothing new is sent, the Flex requests
    already sent are waited for and saved, the run is left "interrupted", and resuming it pays for no id twice
    (shutdown used to cancel the runs, throwing away answers the service had billed)."""
    emu.configure(flex_latency_min=0.5, flex_latency_max=0.8)
    api = batchify.RestApi(tmp_path / "st", emu.url, "k", None, batchify.RunOptions(mode="flex", poll_interval=0.2))
    records = [json.loads(x) for x in articles.read_text().splitlines()]
    await api.submit_contents(records, "drain")
    while emu.stats()["flex_in_flight"] < 1:
        await asyncio.sleep(0.05)
    await api.shutdown()
    assert emu.stats()["flex_in_flight"] == 0  # every request sent was answered before shutdown returned
    kept = read_jsonl(tmp_path / "st" / "drain" / "realtime.jsonl")
    billed = emu.stats()["billed"]
    assert len(kept) == sum(billed.values()) > 0, "an answer paid for was thrown away"
    assert batchify.RunStore(tmp_path / "st", "drain").load_run().status == "interrupted"
    emu.configure(flex_latency_min=0.0, flex_latency_max=0.0)
    summary = await batchify.resume_run("drain", tmp_path / "st", emu.url, "k")
    assert summary.ok == len(records)
    billed = emu.stats()["billed"]
    assert len(billed) == len(records) and set(billed.values()) == {1}


async def test_rest_cancel_keeps_the_flex_answers_already_paid_for(emu, articles, tmp_path):
    """POST /batch/cancel stops the run as shutdown does: the Flex requests already sent are answered and saved
    before the run is cancelled (it cancelled the run's task outright: answers billed and thrown away)."""
    emu.configure(flex_hold=True)  # answers wait until released: requests provably in flight at the cancel
    api = batchify.RestApi(tmp_path / "st", emu.url, "k", None, batchify.RunOptions(mode="flex", poll_interval=0.2))
    records = [json.loads(x) for x in articles.read_text().splitlines()]
    await api.submit_contents(records, "c1")
    while emu.stats()["flex_in_flight"] < 1:
        await asyncio.sleep(0.05)
    cancelling = asyncio.ensure_future(api.cancel("c1"))
    while not api.stops["c1"].requested and not cancelling.done():
        await asyncio.sleep(0)
    emu.configure(flex_hold=False)
    answer = await cancelling
    while emu.stats()["flex_in_flight"]:  # (the old code: the requests abandoned are answered, and billed, now)
        await asyncio.sleep(0.05)
    kept = read_jsonl(tmp_path / "st" / "c1" / "realtime.jsonl")
    billed = emu.stats()["billed"]
    assert len(kept) == sum(billed.values()) > 0, "an answer paid for was thrown away"
    assert answer["status"] == "cancelled" and batchify.RunStore(tmp_path / "st", "c1").load_run().status == "cancelled"
    await api.shutdown()


def test_rest_url_input_errors_say_no_server_path_and_free_the_name(api, site, tmp_path):
    """/batch/submit with an invalid list (a duplicate URL) failed with the state dir's path and a CLI flag in its
    status, and the name stayed claimed (the corrected retry: 409). Now the problems as submit-contents gives
    them, and the name is free again."""
    url = f"{site.url}/news/1"
    code, body = call(f"{api}/batch/submit", "POST", {"urls": [url, url], "batch_name": "dup"})
    assert code == 200
    for _ in range(600):
        code, st = call(f"{api}/batch/status/dup")
        if st["status"] == "failed":
            break
        time.sleep(0.05)
    assert st["status"] == "failed" and "duplicate" in json.dumps(st["problems"]), st
    assert str(tmp_path) not in json.dumps(st) and "--skip-invalid" not in json.dumps(st)
    code, body = call(f"{api}/batch/submit", "POST", {"urls": [url], "batch_name": "dup"})
    assert code == 200, body
    assert wait_status(api, "dup")["records"] == 1


def test_every_run_option_is_a_flag_and_a_new_one_needs_one_line():
    """RunOptions is the option table: each field with a flag shows up in `run --help` with its help text,
    and the `run` command builds RunOptions from them without a second listing."""
    from click.testing import CliRunner

    helptext = CliRunner().invoke(batchify.cli, ["run", "--help"], terminal_width=200).output
    for name in batchify.RUN_FLAGS:
        decls = batchify.RunOptions.__dataclass_fields__[name].metadata["flag"][0]
        shown = decls[0].split("/")[0] if decls else f"--{name.replace('_', '-')}"
        hidden = batchify.RunOptions.__dataclass_fields__[name].metadata["flag"][2].get("hidden")
        assert (shown in helptext) != bool(hidden), name
    assert {"batch_size", "mode", "max_cost", "poll_interval"} <= set(batchify.RUN_FLAGS)


def test_run_file_leaves_the_callers_options_alone_and_keeps_an_explicit_poll_interval(tmp_path, articles):
    opts = batchify.RunOptions(poll_interval=30.0, calibrate=False)
    before = dataclasses.asdict(opts)
    run, _ = asyncio.run(batchify.run_file(articles, options=opts, state_dir=tmp_path, endpoint="local", dry_run=True))
    assert dataclasses.asdict(opts) == before
    assert run.options["poll_interval"] == 30.0  # told 30 s against the local emulator: 30 s, not 1
    run2, _ = asyncio.run(
        batchify.run_file(
            articles, options=batchify.RunOptions(name="b", calibrate=False), state_dir=tmp_path, endpoint="local", dry_run=True
        )
    )
    assert run2.options["poll_interval"] == 1.0  # not given: 1 s for the local emulator


def test_sync_functions_carry_the_async_signatures_and_docstrings():
    import inspect

    for sync, coro in (
        (batchify.run_file_sync, batchify.run_file),
        (batchify.prepare_sync, batchify.prepare),
        (batchify.submit_sync, batchify.submit),
        (batchify.resume_sync, batchify.resume_run),
        (batchify.cancel_sync, batchify.cancel),
        (batchify.cleanup_sync, batchify.cleanup),
    ):
        assert inspect.signature(sync) == inspect.signature(coro), sync.__name__
        assert coro.__doc__ and coro.__doc__ in (sync.__doc__ or ""), sync.__name__
        assert sync.__name__.endswith("_sync")


def test_a_notebook_shows_progress_by_default_and_can_turn_it_off(emu, articles, tmp_path, monkeypatch, capsys):
    """In a Jupyter kernel a run takes hours: with no reporter given the library shows rich progress there."""
    monkeypatch.setattr(batchify, "in_notebook", lambda: True)
    opts = batchify.RunOptions(poll_interval=0.2, calibrate=False)
    batchify.run_file_sync(articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k")
    assert "created batches/" in capsys.readouterr().err
    opts = batchify.RunOptions(poll_interval=0.2, calibrate=False, name="quiet")
    batchify.run_file_sync(
        articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k", reporter=batchify.NullReporter()
    )
    assert "created batches/" not in capsys.readouterr().err


def test_import_batchify_works_without_fcntl(tmp_path):
    """On a system without fcntl (Windows), `import batchify` works; only running a batch needs the POSIX lock,
    and says so."""
    import subprocess

    code = (
        "import sys; sys.modules['fcntl'] = None; sys.path.insert(0, sys.argv[1]); import batchify\n"
        "try:\n    batchify.RunLock(__import__('pathlib').Path(sys.argv[2])).acquire('x')\n"
        "except batchify.UsageError as e:\n    print('refused:', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "refused: running a batch needs a POSIX system" in p.stdout


def test_the_cli_lifts_the_open_file_limit_for_flex_sockets():
    """Flex keeps thousands of requests in flight, a socket each: main() lifts the soft limit to the hard one
    (at most 65,536), and the in-flight ceiling follows it."""
    import subprocess

    code = (
        "import resource, sys; sys.path.insert(0, sys.argv[1]); import batchify\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))\n"
        "low = batchify.in_flight_ceiling()\n"
        "batchify.main(['--version'])\n"
        "print(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, batchify.in_flight_ceiling())\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    low, soft, hard, high = (int(x) for x in p.stdout.split()[-4:])
    assert low == 256  # 512 less the reserve
    expected = 65_536 if hard == -1 else min(hard, 65_536)  # RLIM_INFINITY is -1 on Linux
    assert soft == max(512, expected) and high == max(64, min(20_000, soft - 256))


@pytest.mark.parametrize(
    ("records", "error", "words"),
    [
        ({"id": 1, "text": "one dict, not a list"}, batchify.UsageError, "not one dict"),
        ([{"id": 1, "text": "x", "score": __import__("decimal").Decimal("1.5")}], batchify.InputError, "record 1"),
        ([{"id": 2**70, "text": "x"}], batchify.InputError, "big integers as strings"),
    ],
)
async def test_records_that_are_not_plain_json_are_refused_and_nothing_is_kept(tmp_path, records, error, words):
    """One dict used to become two URL records ({"id": "id", ...}); a Decimal or an id over 64 bits raised a raw
    TypeError and left the half-written input behind (a refused payload is not kept on disk)."""
    with pytest.raises(error, match=words):
        await batchify.prepare(records, name="odd", state_dir=tmp_path)
    assert not any((tmp_path / "inputs").glob("*"))
    assert not batchify.RunStore(tmp_path, "odd").exists()


async def test_rest_resume_goes_on_with_a_run_a_restart_left_interrupted(emu, articles, tmp_path):
    """A server stopped with SIGTERM leaves its runs interrupted (gracefully); nothing in the REST API resumed them:
    the restarted server did not, there was no route, a re-POST answered 409 (adversary finding 03). POST
    /batch/resume/{run} goes on with it, each job created once."""
    emu.configure(job_seconds=1.0)
    # retry delays (and an interrupted create's settle window) at a hundredth: shut down between a create's intent
    # and its answer, the resume waits that window out before creating again
    opts = batchify.RunOptions(mode="batch", poll_interval=0.2, batch_size=20, retry_scale=0.01)
    api = batchify.RestApi(tmp_path / "st", emu.url, "k", None, opts)
    records = [json.loads(x) for x in articles.read_text().splitlines()]
    await api.submit_contents(records, "r1")
    while emu.stats()["creates"] < 1:
        await asyncio.sleep(0.05)
    await api.shutdown()  # as SIGTERM does
    assert batchify.RunStore(tmp_path / "st", "r1").load_run().status == "interrupted"
    again = batchify.RestApi(tmp_path / "st", emu.url, "k", None, opts)  # the restarted server
    assert (await again.resume("r1"))["status"] == "submitted"
    with pytest.raises(batchify.RestError, match="running on this server"):
        await again.resume("r1")
    await again.tasks["r1"]
    assert (await again.status("r1"))["status"] == "done"
    assert (await again.resume("r1"))["status"] == "done"
    dup = {k: v for k, v in emu.stats()["creates_by_display_name"].items() if v > 1}
    assert not dup, f"created twice: {dup}"
    await again.shutdown()


def test_an_open_file_or_a_path_given_as_records_is_refused_with_the_fix(tmp_path, articles):
    """prepare(open("a.jsonl")) took each JSONL line as a URL: a run whose ids were whole JSON lines."""
    with open(articles) as f, pytest.raises(batchify.UsageError, match="not an open file") as e:
        batchify.prepare_sync(f, name="fo", state_dir=tmp_path / "st")
    assert "pass a file's path as the input" in str(e.value) and "list of dicts" in str(e.value)
    assert not (tmp_path / "st" / "fo").exists() and not (tmp_path / "st" / "inputs" / "fo.jsonl").exists()
    for given in ("https://example.com/a", articles, open(articles)):  # one URL, a path, a file: no list of records
        with pytest.raises(batchify.UsageError, match="records must be a list"):
            batchify.write_records(given, tmp_path / "w.jsonl")
    assert not (tmp_path / "w.jsonl").exists()


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("state_dir is a file", "not a folder"),
        ("state_dir under a file", "cannot be used"),
        ("run_file(records)", "prepare(records, name=...)"),
        ("run_file options dict", "options=batchify.RunOptions(batch_size=2)"),
        ("prepare options dict", "options=batchify.RunOptions(batch_size=2)"),
        ("prepare config dict", "config=batchify.JobConfig(model="),
        ("api_key bytes", "api_key must be a str"),
    ],
)
async def test_library_misuse_is_a_usage_error_naming_the_argument_and_the_fix(tmp_path, articles, case, words):
    """Each raised a raw NotADirectoryError, FileNotFoundError, TypeError or AttributeError from deep inside."""
    recs = [json.loads(x) for x in articles.read_text().splitlines()[:3]]
    calls = {
        "state_dir is a file": lambda: batchify.run_file(articles, state_dir=articles, endpoint="local"),
        "state_dir under a file": lambda: batchify.prepare(recs, "x", state_dir=articles / "st"),
        "run_file(records)": lambda: batchify.run_file(recs, state_dir=tmp_path / "st", endpoint="local"),
        "run_file options dict": lambda: batchify.run_file(articles, options={"batch_size": 2}, state_dir=tmp_path / "st"),
        "prepare options dict": lambda: batchify.prepare(recs, "x", options={"batch_size": 2}, state_dir=tmp_path / "st"),
        "prepare config dict": lambda: batchify.prepare(recs, "x", config={"model": "m"}, state_dir=tmp_path / "st"),
        "api_key bytes": lambda: batchify.run_file(
            articles, state_dir=tmp_path / "st", endpoint="http://127.0.0.1:9", api_key=b"k"
        ),
    }
    with pytest.raises(batchify.UsageError) as e:
        await calls[case]()
    assert words in str(e.value), str(e.value)


async def test_no_api_key_tells_a_library_caller_to_pass_api_key_and_the_cli_to_set_the_variable(tmp_path, articles):
    """The library reads no environment, yet its message said to set GEMINI_API_KEY."""
    with pytest.raises(batchify.UsageError, match=r"pass api_key=") as e:
        await batchify.run_file(articles, state_dir=tmp_path / "st", endpoint="http://127.0.0.1:9")
    assert "set GEMINI_API_KEY" not in str(e.value)
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL")}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "batchify.py"),
            "run",
            str(articles),
            "--state-dir",
            "st",
            "--yes",
            "--endpoint",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 2 and "set GEMINI_API_KEY" in p.stdout + p.stderr, p.stdout + p.stderr


def test_an_interrupt_in_a_notebook_stops_the_sync_run_gracefully(emu, articles, tmp_path):
    """A notebook cell calls run_file_sync (the kernel's loop runs: the run goes on a thread of its own) and the user
    interrupts the kernel: KeyboardInterrupt came back at once while the run went on in that thread, holding its
    lock, still paying (adversary finding 10; an interrupted Thread.join also marks a live thread stopped). The run
    now stops as a first Ctrl-C stops the CLI's: the Flex answers in flight are saved, then KeyboardInterrupt."""
    import signal
    import threading

    emu.configure(flex_hold=True)
    stop = batchify.GracefulStop()

    def user() -> None:  # presses "interrupt kernel" once requests are in flight; the answers come after the stop
        while emu.stats()["flex_in_flight"] < 1:
            time.sleep(0.02)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        deadline = time.monotonic() + 10  # (a run that never asks its stop fails below, not by hanging here)
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.02)
        emu.configure(flex_hold=False)

    async def cell() -> None:
        presser = threading.Thread(target=user)
        presser.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                batchify.run_file_sync(
                    articles, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k", options=opts, stop=stop
                )
        finally:
            emu.configure(flex_hold=False)
            presser.join()

    opts = batchify.RunOptions(mode="flex", name="nb", retry_scale=0.01)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        asyncio.new_event_loop().run_until_complete(cell())
    finally:
        signal.signal(signal.SIGINT, before)
    assert not [t for t in threading.enumerate() if t.name == "batchify-sync"], "the run goes on behind the caller"
    saved = read_jsonl(tmp_path / "st" / "nb" / "realtime.jsonl")
    assert len(saved) == sum(emu.stats()["billed"].values()) > 0, "an answer paid for was not saved"
    assert batchify.RunStore(tmp_path / "st", "nb").load_run().status == "interrupted"


def test_a_run_an_older_batchify_named_outside_the_rule_is_shown_by_its_rest_routes(api, tmp_path):
    """GET /batch/jobs lists every run, a legacy-named one too (legacy_run); its own routes answered 404."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"document {i}"}) + "\n" for i in range(5)))
    store = batchify.RunStore(tmp_path / "st", "made")
    asyncio.run(batchify.prepare_run(store, inp, batchify.JobConfig(), batchify.RunOptions(calibrate=False)))
    (tmp_path / "st" / "made").rename(tmp_path / "st" / "my data (v2)")
    status, body = call(f"{api}/batch/status/{urllib.parse.quote('my data (v2)')}")
    assert status == 200, body
    assert call(f"{api}/batch/status/{urllib.parse.quote('../etc')}")[0] == 404
