"""`run`, `status`, `resume` end to end: the CLI in a subprocess against a real emulator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import (
    ROOT,
    a_create_recorded,
    assert_complete,
    assert_no_duplicate_creates,
    cli_env,
    read_jsonl,
    run_against,
    run_cli,
    spawn_cli,
    wait_for,
)

import batchify

FAST = ["--poll-interval", "0.2", "--yes", "--mode", "batch"]  # batch mechanics (auto turns hybrid with waves)


def test_run_forces_three_waves_and_respects_the_limit(emu, articles, tmp_path):
    emu.configure(enqueued_limit=9000)
    out = tmp_path / "out.jsonl"
    p = run_against(emu, articles, tmp_path, "--enqueued-limit", "9000", "--batch-size", "8", *FAST, out=out)
    assert p.returncode == 0, p.stderr
    assert_complete(out, articles)
    st = json.loads(run_cli(["status", "articles", "--json", "--state-dir", "st"], tmp_path).stdout)
    run = st["runs"][0]
    assert run["status"] == "done" and run["plan"]["waves"] >= 3
    assert run["job_states"] == {"RESULTS_DOWNLOADED": run["jobs"]}
    stats = emu.stats()
    assert stats["peak_enqueued_tokens"] <= 9000
    assert stats["creates"] == run["jobs"] == run["plan"]["batches"]
    assert_no_duplicate_creates(stats)
    assert "60 ok, 0 error(s)" in p.stdout and "cost $" in p.stdout  # the summary is a report: stdout
    # results re-emits the merged file on stdout; list names the run
    assert run_cli(["results", "articles", "--state-dir", "st"], tmp_path).stdout == out.read_text()
    assert run_cli(["list", "--state-dir", "st"], tmp_path).stdout.startswith("articles\tdone\t60")
    # the human status shows the run and its jobs
    human = run_cli(["status", "articles", "--state-dir", "st"], tmp_path)
    assert human.returncode == 0 and "b0001" in human.stdout and "results_downloaded" in human.stdout  # a report: stdout


def test_dry_run_uploads_nothing(emu, articles, tmp_path):
    p = run_against(emu, articles, tmp_path, "--dry-run", "--json", "--batch-size", "25", "--barrier")
    assert p.returncode == 0, p.stderr
    # --barrier reaches the run's options (what it does: tests/test_engine_fake.py, rolling vs barrier admission)
    assert json.loads((tmp_path / "st" / "articles" / "run.json").read_text())["options"]["barrier"] is True
    plan = json.loads(p.stdout)
    assert plan["records"] == 60 and plan["plan"]["batches"] == 3 and plan["plan"]["estimated_cost_usd"] > 0
    files = sorted((tmp_path / "st" / "articles" / "requests").glob("*.jsonl"))
    assert len(files) == 3
    line = json.loads(files[0].read_text().splitlines()[0])
    assert set(line) == {"key", "request"} and line["request"]["generationConfig"]["responseMimeType"] == "application/json"
    s = emu.stats()
    assert s["uploads"] == 0 and s["creates"] == 0 and s["count_tokens_calls"] > 0  # calibrated, nothing sent


@pytest.mark.slow
def test_quick_start_local_endpoint(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "batchify.py"),
            "run",
            str(ROOT / "examples/articles.jsonl"),
            "--waves",
            "auto",
            "--endpoint",
            "local",
            "--yes",
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        cwd=tmp_path,
        env=cli_env(GEMINI_API_KEY=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr  # within the 120 s timeout: the bound, not a speed test
    assert "emulator" in p.stderr
    assert_complete(tmp_path / "o.jsonl", ROOT / "examples/articles.jsonl")


def test_config_file_and_flags(emu, articles, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        'model = "gemini-2.5-flash-lite"\nprompt_template = "Summarise: {text}"\nschema = \'{"type": "object", '
        '"properties": {"summary": {"type": "string"}}, "required": ["summary"]}\'\n'
    )
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, "--config", str(cfg), "--temperature", "0.5", *FAST, out=out)
    assert p.returncode == 0, p.stderr
    rows = read_jsonl(out)
    assert all(r["status"] == "ok" and set(r["result"]) == {"summary"} for r in rows)
    req = json.loads((tmp_path / "st/articles/requests/b0001.jsonl").read_text().splitlines()[0])["request"]
    assert req["contents"][0]["parts"][0]["text"].startswith("Summarise: ")
    assert req["generationConfig"]["temperature"] == 0.5
    # 2.5 Flash-Lite thinks only when asked: the lowest it allows (off) is sent explicitly
    assert req["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    run = json.loads((tmp_path / "st/articles/run.json").read_text())
    assert run["config"]["model"] == "gemini-2.5-flash-lite"
    assert "test-key-123" not in json.dumps(run)


def test_json_array_input_and_integer_ids(emu, tmp_path):
    inp = tmp_path / "docs.json"
    inp.write_text(
        json.dumps(
            [{"id": i, "text": f"Document number {i} about markets."} for i in range(1, 8)]
            + [{"id": "8", "text": "String id eight."}]
        )
    )
    out = tmp_path / "o.jsonl"
    p = run_against(emu, inp, tmp_path, *FAST, out=out)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(out)] == [1, 2, 3, 4, 5, 6, 7, "8"]


async def test_library_api(emu, articles, tmp_path):
    opts = batchify.RunOptions(poll_interval=0.2, batch_size=20)
    run, summary = await batchify.run_file(articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k")
    assert summary is not None and summary.ok == 60 and summary.errors == 0 and summary.cost_batch_usd > 0
    assert run.plan["batches"] == 3
    # Calibrated with countTokens (8 calls, documents from across the file); the emulator's tokenizer is
    # an exact chars/token here, so the calibration shows no spread and the margin is the floor.
    assert run.calibrated and run.plan["margin"] == batchify.MARGIN_FLOOR
    assert emu.stats()["count_tokens_calls"] == batchify.CALIBRATION_CALLS
    assert abs(run.chars_per_token - batchify.EmulatorConfig().chars_per_token) < 0.05
    st = batchify.run_status(tmp_path / "st", "articles")
    assert st["runs"][0]["status"] == "done" and len(st["runs"][0]["job_list"]) == 3
    # the results sidecars are written in the layout merge splices as bytes (not re-encoded)
    lines = [ln for p in sorted((tmp_path / "st" / "articles" / "results").glob("*.jsonl")) for ln in p.open("rb")]
    assert len(lines) == 60 and all(tuple(json.loads(ln)) == batchify.RESULT_KEYS for ln in lines)
    with pytest.raises(batchify.UsageError):  # the same name again: resume, not a second run
        await batchify.run_file(articles, options=batchify.RunOptions(), state_dir=tmp_path / "st", endpoint=emu.url, api_key="k")


async def test_margin_follows_the_spread_the_calibration_measured(emu, articles, tmp_path):
    """Real tokenizers vary from text to text: the calibration sees it and keeps a wider margin."""
    emu.configure(token_spread=0.3, enqueued_limit=9000, job_seconds=0.3, job_seconds_max=0.8)
    opts = batchify.RunOptions(poll_interval=0.2, batch_size=4, enqueued_limit=9000)
    run, summary = await batchify.run_file(articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k")
    assert summary is not None and summary.ok == 60
    assert run.calibrated and batchify.CALIBRATED_MARGIN < run.plan["margin"] <= batchify.DEFAULT_MARGIN
    assert run.plan["effective_limit"] == int(9000 * (1 - run.plan["margin"]))
    assert emu.stats()["peak_enqueued_tokens"] <= 9000


@pytest.mark.slow
def test_ctrl_c_during_polling_then_resume(emu, articles, tmp_path):
    emu.configure(job_seconds=1.5, enqueued_limit=12000)
    out = tmp_path / "o.jsonl"
    proc = spawn_cli(
        [
            "run",
            str(articles),
            "--endpoint",
            emu.url,
            "--enqueued-limit",
            "12000",
            "--batch-size",
            "10",
            "--out",
            str(out),
            "--state-dir",
            "st",
            *FAST,
        ],
        tmp_path,
    )
    wait_for(lambda: emu.stats()["creates"] >= 2)
    wait_for(lambda: emu.stats()["gets"] >= 1)  # now it is polling
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "resume" in err
    created_before = emu.stats()["creates"]
    assert created_before < 6  # it really was interrupted part-way
    emu.configure(job_seconds=0.5)
    p = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert_complete(out, articles)
    stats = emu.stats()
    assert_no_duplicate_creates(stats)
    assert stats["creates"] == json.loads(run_cli(["status", "--json", "--state-dir", "st"], tmp_path).stdout)["runs"][0]["jobs"]


def test_resume_refuses_changed_input(emu, articles, tmp_path):
    p = run_against(emu, articles, tmp_path, *FAST, out=str(tmp_path / "o.jsonl"), BATCHIFY_CRASH_AT="after_intent")
    assert p.returncode == -signal.SIGKILL
    with open(articles, "a") as f:
        f.write(json.dumps({"id": "new", "text": "changed"}) + "\n")
    p = run_cli(["resume", "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 2 and "changed since" in p.stderr


def test_cancel_keeps_jobs_cancelled(emu, articles, tmp_path):
    emu.configure(job_seconds=30)
    p = spawn_cli(
        ["run", str(articles), "--endpoint", emu.url, "--out", str(tmp_path / "o.jsonl"), "--state-dir", "st", *FAST], tmp_path
    )
    wait_for(lambda: a_create_recorded(tmp_path / "st" / "articles"))
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=30)
    c = run_cli(["cancel", "articles", "--state-dir", "st"], tmp_path)
    assert c.returncode == 0, c.stderr
    assert emu.stats()["cancels"] == 1
    st = json.loads(run_cli(["status", "articles", "--json", "--state-dir", "st"], tmp_path).stdout)["runs"][0]
    assert st["status"] == "cancelled" and st["job_states"] == {"CANCELLED": 1}
    r = run_cli(["resume", "articles", "--state-dir", "st"], tmp_path)
    assert r.returncode == 1  # the ids stay in error: the user cancelled them
    assert emu.stats()["creates"] == 1
    assert all(x["status"] == "error" and "CANCELLED" in x["error"] for x in read_jsonl(tmp_path / "o.jsonl"))


def test_sdk_base_url_env_and_state_dir_env(emu, articles, tmp_path):
    """No --endpoint: the SDK's own GOOGLE_GEMINI_BASE_URL is honoured; BATCHIFY_STATE_DIR is the default state dir."""
    out = tmp_path / "o.jsonl"
    env = {"GOOGLE_GEMINI_BASE_URL": emu.url, "BATCHIFY_STATE_DIR": str(tmp_path / "envstate")}
    p = run_cli(["run", str(articles), "--out", str(out), *FAST], tmp_path, **env)
    assert p.returncode == 0, p.stderr
    assert_complete(out, articles)
    assert (tmp_path / "envstate" / "articles" / "run.json").exists()
    assert emu.stats()["creates"] == 1
    s = run_cli(["status", "--json"], tmp_path, **env)
    assert json.loads(s.stdout)["runs"][0]["status"] == "done"
