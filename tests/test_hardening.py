"""Issue 12's defects, one test each: names that escape, races, permanent errors, bad numbers and paths,
broken sidecars, private URLs, the REST API's limits, attempts that mean what they say."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import stat
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import input_ids, read_jsonl, run_against, run_cli, serving, zygote

import batchify

FAST = ["--poll-interval", "0.2", "--yes"]


# -- 3. one name rule for CLI, library and REST ------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", ".hidden", "x" * 65, ""])
def test_run_names_that_would_escape_the_state_dir_exit_2(emu, articles, tmp_path, name):
    p = run_against(emu, articles, tmp_path, "--name", name, *FAST)
    assert p.returncode == 2, p.stderr
    assert "letters, digits" in p.stderr or "--name" in p.stderr
    assert emu.stats()["uploads"] == 0
    assert not (tmp_path / "x").exists() and not Path("/abs/path").exists()
    assert not any(tmp_path.glob("st/*/run.json"))


def test_library_applies_the_same_name_rule(tmp_path, articles):
    with pytest.raises(batchify.UsageError, match="not allowed"):
        batchify.prepare_sync(articles, name="../escape", state_dir=tmp_path / "st")
    with pytest.raises(batchify.UsageError, match="not allowed"):
        batchify.RunStore(tmp_path / "st", "a/b")
    assert batchify.default_run_name("my file (2).jsonl") == "my-file-2"


@pytest.mark.parametrize("name", ["news\n", "inputs", "Inputs"])
def test_a_name_with_a_trailing_newline_or_the_inputs_folders_is_refused(tmp_path, articles, name):
    """ "news\n" passed re.match(r"^...$") ("$" matches before a final newline); "inputs" is the folder of every
    in-memory run's records and default results files, which that run's `cleanup --local` deleted."""
    with pytest.raises(batchify.UsageError, match=r"not allowed|reserved") as e:
        batchify.prepare_sync([{"id": 1, "text": "x"}], name=name, state_dir=tmp_path / "st")
    assert "Fix: pass --name" in str(e.value)
    with pytest.raises(batchify.UsageError):
        batchify.run_file_sync(articles, state_dir=tmp_path / "st", options=batchify.RunOptions(name=name), endpoint="local")
    with pytest.raises(batchify.UsageError):
        batchify.RunStore(tmp_path / "st", name)
    assert not (tmp_path / "st" / "inputs").exists() or not list((tmp_path / "st" / "inputs").iterdir())
    assert batchify.default_run_name(tmp_path / "inputs.jsonl") == "inputs-run"  # a file named so still runs


# -- 1. the same name, twice at once ------------------------------------------------------------------
def test_library_prepare_never_overwrites_an_existing_runs_input(tmp_path):
    st = tmp_path / "st"
    first = [{"id": i, "text": f"first {i}"} for i in range(3)]
    batchify.prepare_sync(first, name="same", state_dir=st)
    before = (st / "inputs" / "same.jsonl").read_bytes()
    with pytest.raises(batchify.UsageError, match="already exists"):
        batchify.prepare_sync([{"id": 9, "text": "second"}], name="same", state_dir=st)
    assert (st / "inputs" / "same.jsonl").read_bytes() == before


def _post(url: str, body: dict, token: str = "s3cret-token") -> tuple[int, dict]:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def api_server(emu, tmp_path):
    """Start REST servers on free loopback ports (make_api keywords per call); yields the starter."""
    with contextlib.ExitStack() as stack:

        def serve(**kw):
            app = batchify.make_api(tmp_path / "st", "s3cret-token", endpoint=emu.url, api_key="k", **kw)
            return stack.enter_context(serving(app))

        yield serve


def test_rest_same_name_race_one_wins_the_others_409(api_server, tmp_path):
    base = api_server(options=batchify.RunOptions(poll_interval=0.2))
    bodies = [
        {"contents": [{"id": f"r{k}-{i}", "text": f"request {k} doc {i}"} for i in range(200)], "batch_name": "race"}
        for k in range(4)
    ]
    results: list[tuple[int, dict]] = [(0, {})] * 4

    def go(k: int) -> None:
        results[k] = _post(f"{base}/batch/submit-contents", bodies[k])

    threads = [threading.Thread(target=go, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(c for c, _ in results)
    assert codes == [200, 409, 409, 409], results
    winner = next(k for k, (c, _) in enumerate(results) if c == 200)
    stored = [r["id"] for r in read_jsonl(tmp_path / "st" / "inputs" / "race.jsonl")]
    assert stored == [r["id"] for r in bodies[winner]["contents"]]


# -- 6. the REST API's limits -------------------------------------------------------------------------------
def test_rest_docs_off_by_default_and_body_limit(api_server, tmp_path):
    base = api_server(max_body=20_000)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/docs", timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/openapi.json", timeout=10)
    assert e.value.code == 404
    big = {"contents": [{"id": i, "text": "x" * 100} for i in range(500)], "batch_name": "big"}
    code, body = _post(f"{base}/batch/submit-contents", big)
    assert code == 413 and "bytes" in body["detail"]
    assert not (tmp_path / "st" / "big").exists()


def test_rest_chunked_body_over_the_limit_answers_413(api_server, tmp_path):
    """A body with no Content-Length (chunked, as streaming clients and proxies send) is counted as it is read; over
    the limit it answers 413 as a declared one does (FastAPI caught the middleware's signal and answered 400)."""
    base = api_server(max_body=20_000)

    def chunks():
        yield b'{"contents": ['
        for i in range(50):
            yield b'{"id": %d, "text": "%s"},' % (i, b"x" * 1000)
        yield b'{"id": -1, "text": "x"}], "batch_name": "chunked"}'

    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    headers = {"Authorization": "Bearer s3cret-token", "Content-Type": "application/json"}
    conn.request("POST", "/batch/submit-contents", body=chunks(), headers=headers, encode_chunked=True)
    answer = conn.getresponse()
    body = json.loads(answer.read())
    conn.close()
    assert answer.status == 413 and "bytes" in body["detail"], body
    assert not (tmp_path / "st" / "chunked").exists()


def test_rest_422_echoes_no_body_no_path_keeps_nothing(api_server, tmp_path):
    base = api_server()
    code, body = _post(f"{base}/batch/submit-contents", {"contents": "y" * 5000, "batch_name": "bad"})
    assert code == 422 and len(json.dumps(body)) < 2000 and "yyyy" not in json.dumps(body)
    code, body = _post(f"{base}/batch/submit-contents", {"contents": [{"id": 1}, {"id": 2, "text": "ok"}], "batch_name": "rej"})
    assert code == 422
    text = json.dumps(body)
    assert "no 'text' field" in text and str(tmp_path) not in text and "--skip-invalid" not in text
    assert not (tmp_path / "st" / "inputs" / "rej.jsonl").exists()  # a refused payload is not kept
    code, _ = _post(f"{base}/batch/submit-contents", {"contents": [{"id": 2, "text": "ok"}], "batch_name": "rej"})
    assert code == 200  # and the name is free again


def _get(url: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-token"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_rest_a_damaged_run_is_listed_broken_and_its_routes_say_why(api_server, tmp_path):
    """One run's unreadable run.json made /batch/jobs answer 500 for every run (KeyError on its entry), and that
    run's status, results and cancel a bare 500 (StateError unmapped): now it is listed as broken with its error,
    and its routes answer 409 with the message (no server path)."""
    base = api_server()
    st = tmp_path / "st"
    for name in ("good", "bad"):
        batchify.prepare_sync([{"id": 1, "text": "one"}, {"id": 2, "text": "two"}], name=name, state_dir=st)
    (st / "bad" / "run.json").write_text("{not json")
    code, body = _get(f"{base}/batch/jobs")
    assert code == 200, body
    runs = {r["name"]: r for r in body["runs"]}
    assert runs["good"]["status"] == "prepared" and runs["good"]["records"] == 2
    assert runs["bad"]["status"] == "broken" and "run.json" in runs["bad"]["error"]
    for code, body in (
        _get(f"{base}/batch/status/bad"),
        _get(f"{base}/batch/results/bad"),
        _post(f"{base}/batch/cancel/bad", {}),
    ):
        assert code == 409 and "bad/run.json" in body["detail"], (code, body)
        assert str(tmp_path) not in json.dumps(body)
    assert str(tmp_path) not in json.dumps(runs["bad"])


def test_rest_cancel_says_finished_and_409_for_a_run_another_process_holds(api_server, emu, tmp_path):
    """Cancelling a finished run answered "status": "cancelled" although it stays done; a run held by another
    process (a CLI `resume`) answered a bare 500 (LockedError unmapped)."""
    base = api_server()
    st = tmp_path / "st"
    opts = batchify.RunOptions(poll_interval=0.1)
    records = [{"id": 1, "text": "one"}]
    batchify.prepare_sync(records, name="done1", state_dir=st, endpoint=emu.url, api_key="k", options=opts)
    batchify.submit_sync("done1", st, endpoint=emu.url, api_key="k")
    code, body = _post(f"{base}/batch/cancel/done1", {})
    assert code == 200 and body["status"] == "done" and "finished" in body["message"], body
    assert batchify.RunStore(st, "done1").load_run().status == "done"
    batchify.prepare_sync(records, name="busy", state_dir=st, endpoint=emu.url, api_key="k", options=opts)
    with batchify.RunLock(st / ".locks" / "busy") as lock:
        lock.acquire("resume")
        code, body = _post(f"{base}/batch/cancel/busy", {})
    assert code == 409 and "in use" in body["detail"], body
    assert emu.stats()["cancels"] == 0


def test_rest_an_unavailable_api_answers_503_and_frees_the_name(api_server, emu, tmp_path):
    """A 503 from the Gemini API while a submission was prepared gave a bare 500, and its batch_name stayed
    claimed until restart (every retry 409, status 404). Now 503 with the message, and the name is free."""
    base = api_server(options=batchify.RunOptions(poll_interval=0.2, retry_scale=0))
    emu.configure(unavailable_rate=1.0)
    body = {"contents": [{"id": 1, "text": "one"}], "batch_name": "n503"}
    code, answer = _post(f"{base}/batch/submit-contents", body)
    assert code == 503 and "503" in answer["detail"] and str(tmp_path) not in answer["detail"], answer
    assert _get(f"{base}/batch/status/n503")[0] == 404
    emu.configure(unavailable_rate=0.0)
    code, answer = _post(f"{base}/batch/submit-contents", body)
    assert code == 200, answer


# -- 7. URL fetching never reaches the machine's own network ----------------------------------------
@pytest.mark.parametrize(
    "ip, public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.5", False),
        ("172.16.9.9", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_public_address(ip, public):
    assert batchify.public_address(ip) is public


def test_urls_to_loopback_are_refused_without_the_flag(emu, tmp_path):
    import http.server

    hits = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/secret")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        inp = tmp_path / "u.jsonl"
        inp.write_text(
            json.dumps({"id": 1, "url": f"http://127.0.0.1:{srv.server_address[1]}/x"})
            + "\n"
            + json.dumps({"id": 2, "url": f"http://localhost:{srv.server_address[1]}/y"})
            + "\n"
        )
        out = tmp_path / "o.jsonl"
        p = run_against(emu, inp, tmp_path, *FAST, out=out)
        assert p.returncode == 1
        rows = read_jsonl(out)
        assert all(r["status"] == "error" and "refused" in r["error"] for r in rows), rows
        assert hits == []  # nothing was requested from the local server
    finally:
        srv.shutdown()


# -- 8, 9. awkward paths ------------------------------------------------------------------------------
def test_interrupted_prepare_tells_how_to_go_on(tmp_path):
    (tmp_path / "st" / "articles" / "requests").mkdir(parents=True)
    p = run_cli(["resume", "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 2 and "batchify run" in p.stderr and "again" in p.stderr


def test_bad_endpoint_is_a_usage_error(articles, tmp_path):
    p = run_cli(["run", str(articles), "--endpoint", "notaurl", "--yes"], tmp_path)
    assert p.returncode == 2 and "notaurl" in p.stderr and "Traceback" not in p.stderr


def test_a_fifo_input_is_refused_not_waited_on(tmp_path, emu):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    p = run_against(emu, fifo, tmp_path, *FAST)
    assert p.returncode == 2 and "not a regular file" in p.stderr and "Traceback" not in p.stderr


# -- 10, 11. numbers and messages ----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_max_cost_must_be_a_positive_number(emu, articles, tmp_path, value):
    p = run_against(emu, articles, tmp_path, "--max-cost", value, *FAST)
    assert p.returncode == 2 and "--max-cost" in p.stderr
    assert emu.stats()["uploads"] == 0


@pytest.mark.parametrize(
    "flag, value, blamed",
    [("--temperature", "5", "--temperature"), ("--model", "", "--model"), ("--max-output-tokens", "-1", "--max-output-tokens")],
)
def test_bad_flag_values_blame_the_flag(emu, articles, tmp_path, flag, value, blamed):
    p = run_against(emu, articles, tmp_path, flag, value, *FAST)
    assert p.returncode == 2 and blamed in p.stderr and "built-in default" not in p.stderr, p.stderr


def test_temperature_true_in_toml_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("temperature = true\n")
    with pytest.raises(batchify.ConfigError, match=r"c\.toml.*temperature"):
        batchify.load_config(f)


def test_inputs_that_are_not_jsonl_say_what_they_are(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text('{"id": 123456789012345678901234567890, "text": "x"}\n')
    with pytest.raises(batchify.InputError) as e:
        batchify.validate_file(big)
    assert any("64 bits" in p and "string" in p for p in e.value.problems), e.value.problems
    u16 = tmp_path / "u16.jsonl"
    u16.write_bytes('{"id": 1, "text": "x"}\n'.encode("utf-16"))
    with pytest.raises(batchify.InputError, match="UTF-16"):
        batchify.validate_file(u16)
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "id": 1,\n  "text": "x"\n}\n')
    with pytest.raises(batchify.InputError, match="pretty-printed"):
        batchify.validate_file(pretty)


# -- 12. one broken sidecar does not hide the other runs ------------------------------------------------
def test_a_corrupt_run_json_is_marked_and_the_others_listed(emu, articles, tmp_path):
    assert run_against(emu, articles, tmp_path, "--name", "good", *FAST).returncode == 0
    assert run_against(emu, articles, tmp_path, "--name", "bad", "--dry-run").returncode == 0
    (tmp_path / "st" / "bad" / "run.json").write_text('{"schema_version": 1}')
    s = run_cli(["status", "--state-dir", "st"], tmp_path, COLUMNS="200")
    assert s.returncode == 0, s.stderr
    assert "good" in s.stdout + s.stderr and "broken" in s.stdout + s.stderr
    assert "bad/run.json" in s.stdout + s.stderr and "Fix:" in s.stdout + s.stderr
    js = json.loads(run_cli(["status", "--json", "--state-dir", "st"], tmp_path).stdout)
    assert {r["name"]: r["status"] for r in js["runs"]} == {"good": "done", "bad": "broken"}
    lst = run_cli(["list", "--state-dir", "st"], tmp_path)
    assert lst.returncode == 0 and "good" in lst.stdout and "broken" in lst.stdout
    one = run_cli(["status", "bad", "--state-dir", "st"], tmp_path)
    assert one.returncode == 3 and "bad/run.json" in one.stderr and "Fix:" in one.stderr


def test_a_newer_schema_asks_for_an_upgrade(tmp_path):
    d = {"schema_version": 99, "kind": "run"}
    with pytest.raises(batchify.StateError, match="upgrade batchify"):
        batchify.validate_run_dict(d)


# -- 13. the same command twice ------------------------------------------------------------------------------
def test_running_the_same_command_again(emu, articles, tmp_path):
    first = run_against(emu, articles, tmp_path, *FAST, "--dry-run")
    assert first.returncode == 0
    again = run_against(emu, articles, tmp_path, *FAST, "--dry-run")
    assert again.returncode == 0, again.stderr
    go = run_against(emu, articles, tmp_path, *FAST)  # the prepared run is submitted, not refused
    assert go.returncode == 0, go.stderr
    assert emu.stats()["creates"] == 1
    done = run_against(emu, articles, tmp_path, *FAST)  # finished: says where the results are, sends nothing
    assert done.returncode == 0 and emu.stats()["creates"] == 1
    diff = run_against(emu, articles, tmp_path, *FAST, "--thinking", "high")
    assert diff.returncode == 2 and "thinking" in diff.stderr and "--name" in diff.stderr


def test_a_run_held_by_another_process_exits_4(emu, articles, tmp_path):
    assert run_against(emu, articles, tmp_path, *FAST, "--dry-run").returncode == 0
    lock = batchify.RunLock(tmp_path / "st" / ".locks" / "articles")
    lock.acquire("test holder")
    try:
        p = run_against(emu, articles, tmp_path, *FAST)
        assert p.returncode == 4 and "test holder" in p.stderr
    finally:
        lock.release()


# -- 14. durability and privacy -----------------------------------------------------------------------------
def test_run_folders_are_private(emu, articles, tmp_path):
    assert run_against(emu, articles, tmp_path, *FAST).returncode == 0
    for d in ("st/articles", "st/articles/jobs", "st/articles/requests", "st/articles/results"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d


# -- 5. a disk that refuses writes ------------------------------------------------------------------------
def test_disk_full_is_one_line_and_its_own_exit_code(articles, tmp_path, monkeypatch, capsys):
    real = batchify.atomic_write

    def full(path, data, *args):
        if path.name == "run.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, *args)

    monkeypatch.setattr(batchify, "atomic_write", full)
    monkeypatch.chdir(tmp_path)
    code = batchify.main(["run", str(articles), "--endpoint", "local", "--yes", "--state-dir", "st", "--dry-run"])
    err = capsys.readouterr().err
    assert code == batchify.DISK_EXIT == 6
    assert "disk is full" in err and "run.json" in err and "Traceback" not in err


# -- 15. --max-attempts means what it says -------------------------------------------------------------------------
# -- 4. a lost or damaged sidecar never buys the work again ------------------------------------------------
def _jobs_dir(tmp_path: Path) -> Path:
    return tmp_path / "st" / "articles" / "jobs"


def assert_billed_once(emu, n: int) -> None:
    billed = emu.stats()["billed"]
    assert len(billed) == n and set(billed.values()) == {1}, {k: v for k, v in billed.items() if v != 1}


@pytest.mark.slow
def test_crash_drill_with_lost_sidecars_bills_every_key_once(emu, articles, tmp_path):
    """Kills at several steps, a sidecar deleted or truncated after each, resume after each: each input billed once."""
    out = tmp_path / "o.jsonl"
    emu.configure(job_seconds=1.0)
    args = [*FAST, "--batch-size", "10", "--enqueued-limit", "12000", "--mode", "batch"]
    p = run_against(emu, articles, tmp_path, *args, out=out, BATCHIFY_CRASH_AT="after_create:2")
    assert p.returncode != 0
    for n, (point, damage) in enumerate([("after_poll:3", "delete"), ("after_download", "truncate"), ("after_create", "delete")]):
        sides = sorted(_jobs_dir(tmp_path).glob("*.json"))
        victim = sides[n % len(sides)]
        if damage == "delete":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[:25])
        r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path, BATCHIFY_CRASH_AT=point)
        assert r.returncode in (0, -9), r.stderr
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert [x["id"] for x in rows] == input_ids(articles) and all(x["status"] == "ok" for x in rows)
    assert all(v == 1 for v in emu.stats()["creates_by_display_name"].values())
    assert_billed_once(emu, 60)


def test_an_older_sidecar_goes_through_the_migration_hook(monkeypatch):
    """A sidecar written by an older batchify is rewritten by MIGRATIONS step by step, then read as usual;
    one with no migration path is refused by name."""
    j = batchify.Job("b0001", 1, "dn", "requests/b0001.jsonl", 3, 30, 100)
    d = j.to_dict()
    d["schema_version"] = 0
    d["lane_owner"] = d.pop("lane")  # how "version 0" spelled it

    def v0_to_v1(old: dict) -> None:
        old["lane"] = old.pop("lane_owner")

    with pytest.raises(batchify.StateError, match="schema_version 0"):
        batchify.Job.from_dict(dict(d))
    monkeypatch.setitem(batchify.MIGRATIONS, ("job", 0), v0_to_v1)
    assert batchify.Job.from_dict(dict(d)) == j


def test_a_version_1_run_json_keeps_its_notes(tmp_path):
    """schema 2 renamed run.json's "realtime" (flags about batch creates) to "notes": a run written by
    batchify 1.x keeps what it learned (a refused create must not be forgotten on resume)."""
    store = batchify.RunStore(tmp_path, "old")
    run = batchify.Run(
        "old", "rid", "in.jsonl", "0" * 64, "jsonl", {}, {}, None, 1, 0, 4.0, False, {"batches": 1}, "o.jsonl", "now"
    )
    d = run.to_dict()
    d["schema_version"] = 1
    d["realtime"] = d.pop("notes") | {"create_refused": "429 x4", "line_retry_done": True}
    store.dir.mkdir(parents=True)
    (store.dir / "run.json").write_bytes(json.dumps(d).encode())
    back = store.load_run()
    assert back.notes == {"create_refused": "429 x4", "line_retry_done": True}
    store.save_run(back)
    on_disk = json.loads((store.dir / "run.json").read_bytes())
    assert on_disk["schema_version"] == batchify.SCHEMA_VERSION and "realtime" not in on_disk


# -- a resume never moves live jobs to another service ----------------------------------------------------
def _interrupted_after_a_create(emu, articles, tmp_path, *endpoint: str, **env: str) -> None:
    """A batch run (its endpoint given by the flag or the environment) stopped with Ctrl-C once a job is created;
    its sidecars say RUNNING whether or not the job has ended by the next command (jobs of 1.5 s)."""
    import signal

    from conftest import a_create_recorded, spawn_cli, wait_for

    emu.configure(job_seconds=1.5)
    args = ["run", str(articles), *endpoint, "--state-dir", "st", "--mode", "batch", "--out", "o.jsonl", *FAST]
    p = spawn_cli(args, tmp_path, **env)
    wait_for(lambda: a_create_recorded(tmp_path / "st" / "articles"))
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)


def _resume_at_home_creates_nothing_more(emu, articles, tmp_path) -> None:
    """`resume` at the run's own service (no --endpoint, no variable) finishes it with the one job it had."""
    done = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == input_ids(articles)
    assert emu.stats()["creates"] == 1


def test_resume_at_another_endpoint_with_jobs_live_is_refused(emu, articles, tmp_path):
    """Jobs created at one service are unknown to another: resuming there would create (and pay for) them again."""
    _interrupted_after_a_create(emu, articles, tmp_path, "--endpoint", emu.url)
    with batchify.EmulatorThread(batchify.EmulatorConfig(job_seconds=0.2)) as other:
        moved = run_cli(["resume", "articles", "--state-dir", "st", "--endpoint", other.url], tmp_path)
        assert moved.returncode == 2, moved.stderr
        assert "pay for their requests twice" in moved.stderr and "b0001" in moved.stderr
        sidecar = tmp_path / "st" / "articles" / "jobs" / "b0001.json"
        sidecar.write_bytes(sidecar.read_bytes()[:40])  # damaged: it may be a live job's
        damaged = run_cli(["resume", "articles", "--state-dir", "st", "--endpoint", other.url + "/"], tmp_path)
        assert damaged.returncode == 2 and "damaged job sidecar" in damaged.stderr, damaged.stderr
        assert other.emulator.stats["creates"] == 0
    _resume_at_home_creates_nothing_more(emu, articles, tmp_path)


def test_an_endpoint_from_google_gemini_base_url_is_recorded_and_held_to(emu, articles, tmp_path):
    """GOOGLE_GEMINI_BASE_URL counts as --endpoint: the run records it, so a resume with the variable pointing at
    another service is refused (it used to record nothing, and the resume created every job again there: paid
    twice), and a resume with the variable unset goes back to the run's own service."""
    _interrupted_after_a_create(emu, articles, tmp_path, GOOGLE_GEMINI_BASE_URL=emu.url)
    assert batchify.RunStore(tmp_path / "st", "articles").load_run().endpoint == emu.url
    with batchify.EmulatorThread(batchify.EmulatorConfig(job_seconds=0.2)) as other:
        moved = run_cli(["resume", "articles", "--state-dir", "st"], tmp_path, GOOGLE_GEMINI_BASE_URL=other.url)
        assert moved.returncode == 2 and "GOOGLE_GEMINI_BASE_URL" in moved.stderr, moved.stderr
        assert other.emulator.stats["creates"] == 0
    _resume_at_home_creates_nothing_more(emu, articles, tmp_path)


def test_endpoint_switch_problem_only_for_jobs_alive_elsewhere():
    job = batchify.Job("b0001", 1, "dn", "requests/b0001.jsonl", 3, 30, 100)
    running = [batchify.dataclasses.replace(job, state=batchify.JobState.RUNNING, remote_job="batches/1")]
    done = [batchify.dataclasses.replace(job, state=batchify.JobState.RESULTS_DOWNLOADED, remote_job="batches/1")]
    assert batchify.endpoint_switch_problem("r", "http://a", "http://b", running) is not None
    assert batchify.endpoint_switch_problem("r", None, "http://b", running) is not None  # from Google's own
    assert batchify.endpoint_switch_problem("r", "http://a", None, running) is None  # not given: the run's own
    assert batchify.endpoint_switch_problem("r", "http://a", "http://a", running) is None
    assert batchify.endpoint_switch_problem("r", "http://a:1", "HTTP://A:1/", running) is None  # the same service
    assert batchify.endpoint_switch_problem("r", None, "https://generativelanguage.googleapis.com/", running) is None
    assert batchify.endpoint_switch_problem("r", "http://a", "http://b", None) is not None  # a damaged sidecar
    assert batchify.endpoint_switch_problem("r", "local", "http://b", running) is None  # died with its process
    assert batchify.endpoint_switch_problem("r", "http://a", "http://b", done) is None
    assert batchify.endpoint_switch_problem("r", "http://a", "http://b", [job]) is None  # never created


# -- damaged sidecars prepare wrote: request files and ids.jsonl are checked against the plan before use -------
def _truncate_mid_line(path: Path, share: float = 0.5) -> None:
    data = path.read_bytes()
    cut = int(len(data) * share)
    assert data[cut - 1 : cut] != b"\n"
    path.write_bytes(data[:cut])


def test_a_truncated_request_file_is_rebuilt_from_the_input_before_its_upload(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    p = run_against(
        emu, articles, tmp_path, *FAST, "--mode", "batch", "--batch-size", "10", out=out, BATCHIFY_CRASH_AT="before_upload"
    )
    assert p.returncode != 0
    run_dir = tmp_path / "st" / "articles"
    whole = (run_dir / "requests" / "b0004.jsonl").read_bytes()
    _truncate_mid_line(run_dir / "requests" / "b0004.jsonl")
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "requests/b0004.jsonl" in p.stderr and "rebuilt" in p.stderr
    assert (run_dir / "requests" / "b0004.jsonl").read_bytes() == whole
    assert all(r["status"] == "ok" for r in read_jsonl(out)) and [r["id"] for r in read_jsonl(out)] == input_ids(articles)
    billed = emu.stats()["billed"]
    assert len(billed) == 60 and set(billed.values()) == {1}


def test_request_files_all_gone_are_rebuilt_byte_for_byte(emu, articles, tmp_path):
    """No whole request is left to read the generation config from (one batch, its folder gone): the plan keeps the
    config as sent, in its order (run.json sorts the schema's keys, and Gemini reads a schema's properties in order)."""
    import shutil

    assert run_against(emu, articles, tmp_path, "--dry-run", "--mode", "batch").returncode == 0
    requests = tmp_path / "st" / "articles" / "requests"
    whole = (requests / "b0001.jsonl").read_bytes()
    shutil.rmtree(requests)
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.1"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert (requests / "b0001.jsonl").read_bytes() == whole


def test_a_truncated_request_file_with_its_input_gone_stops_naming_it(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    p = run_against(
        emu, articles, tmp_path, *FAST, "--mode", "batch", "--batch-size", "10", out=out, BATCHIFY_CRASH_AT="before_upload"
    )
    assert p.returncode != 0
    _truncate_mid_line(tmp_path / "st" / "articles" / "requests" / "b0004.jsonl")
    articles.unlink()
    uploads = emu.stats()["uploads"]
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "b0004.jsonl" in p.stderr and "Fix:" in p.stderr
    assert emu.stats()["uploads"] == uploads, "nothing is uploaded while a request file is damaged"
    assert json.loads((tmp_path / "st" / "articles" / "run.json").read_text())["status"] == "interrupted"


def test_a_truncated_ids_file_is_rebuilt_or_named(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run_against(emu, articles, tmp_path, *FAST, "--batch-size", "20", out=out).returncode == 0
    ids = tmp_path / "st" / "articles" / "ids.jsonl"
    whole = ids.read_bytes()
    ids.write_bytes(b"".join(whole.splitlines(keepends=True)[:45]))
    out.unlink()
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "ids.jsonl" in p.stderr and "rebuilt" in p.stderr and ids.read_bytes() == whole
    assert [r["id"] for r in read_jsonl(out)] == input_ids(articles) and all(r["status"] == "ok" for r in read_jsonl(out))
    ids.write_bytes(whole[: len(whole) // 2])
    articles.unlink()
    out.unlink()
    p = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "ids.jsonl" in p.stderr and "Fix:" in p.stderr


def test_a_cut_results_file_is_downloaded_again(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run_against(emu, articles, tmp_path, *FAST, "--batch-size", "15", out=out).returncode == 0
    res = tmp_path / "st" / "articles" / "results" / "b0002.jsonl"
    whole = res.read_bytes()
    _truncate_mid_line(res)
    out.unlink()
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "repair: b0002: results file cut short: downloaded" in p.stderr
    assert res.read_bytes() == whole
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == input_ids(articles) and all(r["status"] == "ok" and r["source"] == "batch" for r in rows)
    assert emu.stats()["generate_calls"] == 0
    assert_billed_once(emu, 60)


def test_results_of_a_run_whose_results_files_are_gone_says_so(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run_against(emu, articles, tmp_path, *FAST, "--batch-size", "15", out=out).returncode == 0
    results = tmp_path / "st" / "articles" / "results"
    (results / "b0001.jsonl").unlink()
    _truncate_mid_line(results / "b0003.jsonl")
    out.unlink()
    p = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 3 and not p.stdout and not out.exists()
    assert "b0001.jsonl" in p.stderr and "b0003.jsonl" in p.stderr and "batchify resume articles" in p.stderr


def test_a_cut_results_file_whose_output_is_gone_marks_its_ids(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    assert run_against(emu, articles, tmp_path, *FAST, "--batch-size", "15", "--no-fallback", out=out).returncode == 0
    assert run_cli(["cleanup", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path).returncode == 0
    _truncate_mid_line(tmp_path / "st" / "articles" / "results" / "b0002.jsonl")
    out.unlink()
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 1, p.stderr
    assert "b0002: results file cut short and the output is not downloadable" in p.stderr
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == input_ids(articles)
    bad = [r for r in rows if r["status"] != "ok"]
    assert bad and all(r["error"].startswith("result lost: results file cut short") for r in bad)
    assert all(r["status"] == "ok" for r in rows[:15] + rows[30:])


@pytest.mark.parametrize("damaged", ["ids.jsonl", "requests/b0002.jsonl"])
async def test_a_rebuild_writes_only_the_damaged_file(emu, articles, tmp_path, monkeypatch, damaged):
    """Prepare's pass runs again for a damaged file, and writes that file only: no other request bytes anywhere (on
    Vertex the requests are in the bucket; a big run's would fill the disk)."""
    opts = batchify.RunOptions(batch_size=20, mode="batch")
    run = await batchify.prepare(articles, name="a", state_dir=tmp_path, options=opts, endpoint=emu.url, api_key="k")
    store = batchify.RunStore(tmp_path, "a")
    path = store.dir / damaged
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    written: list[str] = []
    real_open = batchify.LocalRequests.open

    def spy(self, rel, atomic=False):
        written.append(rel)
        return real_open(self, rel, atomic)

    monkeypatch.setattr(batchify.LocalRequests, "open", spy)
    batchify.rebuild_prepared_files(store, run, batchify.run_model_spec(run), [path])
    assert path.read_bytes() == whole
    assert written == ([damaged] if damaged.startswith("requests/") else [])


@pytest.mark.parametrize("flag", ["--batch-size", "--enqueued-limit", "--concurrency"])
def test_a_whole_number_flag_beyond_64_bits_is_a_usage_error(articles, tmp_path, flag):
    """It used to pass click, then fail writing the sidecar (TypeError: Integer exceeds 64-bit range) with a half-made
    run folder."""
    p = run_cli(["run", str(articles), "--endpoint", "local", "--state-dir", "st", "--yes", flag, str(10**20)], tmp_path)
    assert p.returncode == 2 and flag in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "st" / "articles").exists()


def _exit_with_a_reader_that_closes_early(args: list[str], cwd: Path) -> int:
    """`batchify ARGS | head -c 1`: the exit code of a CLI run whose stdout is closed after its first byte."""
    from conftest import cli_env

    p = zygote().spawn(args, cwd, cli_env())
    assert os.read(p.stdout.fileno(), 1)
    p.stdout.close()
    p.stdout = None
    p.communicate(timeout=120)  # stderr, to its end
    return p.returncode


def test_a_reader_that_closes_early_does_not_turn_success_into_exit_1(emu, articles, tmp_path):
    """`batchify run ... | head -1`: click answers EPIPE with exit 1, which the README reserves for ids in error;
    the exit code is now the run's own (0 here), and `models | head -1` exits 0."""
    args = ["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", "--yes", "--poll-interval", "0.2"]
    assert _exit_with_a_reader_that_closes_early(args, tmp_path) == 0
    assert _exit_with_a_reader_that_closes_early(["models"], tmp_path) == 0
    assert [r["status"] for r in read_jsonl(tmp_path / "articles.results.jsonl")] == ["ok"] * 60


def test_small_habits_get_plain_answers(emu, articles, tmp_path):
    """Input from stdin (`run -`), a config saved with a BOM, `resume` in a folder with no runs (a typo in
    --state-dir said "every run there is finished" and exit 0), a --state-dir the system refuses (exit 3, no fix)."""
    p = run_cli(["run", "-", "--endpoint", emu.url, "--state-dir", "st", "--yes"], tmp_path)
    assert p.returncode == 2 and "stdin" in p.stderr and "save it to a file first" in p.stderr, p.stderr
    (tmp_path / "job.toml").write_bytes(b"\xef\xbb\xbfmodel = 'gemini-3-flash-preview'\n")
    p = run_cli(["run", str(articles), "--config", "job.toml", "--endpoint", emu.url, "--state-dir", "st", "--dry-run"], tmp_path)
    assert p.returncode == 0, p.stderr
    p = run_cli(["resume", "--state-dir", "no-such-folder"], tmp_path)
    assert p.returncode == 2 and "no runs in no-such-folder" in p.stderr, p.stderr
    p = run_cli(["run", str(articles), "--endpoint", emu.url, "--state-dir", "/sys/batchify-st", "--yes"], tmp_path)
    assert p.returncode == batchify.DISK_EXIT and "--state-dir" in p.stderr and "Fix:" in p.stderr, p.stderr


def test_stop_now_is_bounded_even_if_unwinding_hangs():
    """A second Ctrl-C raises KeyboardInterrupt wherever the main thread is; if the cleanup after it hangs (seen
    once in CI: 60 s and counting), the watchdog ends the process with the interrupt's code."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, time; sys.path.insert(0, sys.argv[1]); import batchify; batchify._exit_after(0.2, 130); time.sleep(60)"
    p = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 130 and "exiting now (130)" in p.stderr, p.stderr
