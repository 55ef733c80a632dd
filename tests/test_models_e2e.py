"""Today's models and failures, through the real SDK against the emulator: the right thinking field on the
wire, no upload for an unknown or retired model, and every fault knob ending in a terminal state with every
id answered once and nothing created twice."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from conftest import ROOT, input_ids, read_jsonl, run_against, run_cli, run_until_the_job_ended_remotely, spawn_batch_run

import batchify

FAST = ["--poll-interval", "0.2", "--yes"]


def run(emu, articles, tmp_path, *extra, **env):
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, *FAST, *extra, out=out, **env)
    return p, out


def assert_every_id_once(out: Path, articles: Path) -> list[dict]:
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == input_ids(articles)
    return rows


def assert_created_once(stats: dict) -> None:
    dup = {k: v for k, v in stats["creates_by_display_name"].items() if v > 1}
    assert not dup, f"created twice: {dup}"


def test_gemini3_run_sends_thinking_level(emu, articles, tmp_path):
    p, out = run(emu, articles, tmp_path, "--mode", "batch")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    seen = emu.stats()["thinking_seen"]
    assert seen == {f"{batchify.DEFAULT_MODEL} thinkingLevel=MINIMAL": 60}, seen
    run_json = json.loads((tmp_path / "st" / "articles" / "run.json").read_text())
    assert run_json["plan"]["generation_config"]["temperature"] == 1.0
    assert run_json["plan"]["model_spec"]["name"] == batchify.DEFAULT_MODEL


@pytest.mark.parametrize("mode", ["batch", "realtime"])
def test_25_pro_run_sends_its_lowest_budget(emu, articles, tmp_path, mode):
    # --rpm: the catalog's 150 RPM for 2.5 Pro would make this test wait ~25 s for pacing it does not check
    p, out = run(emu, articles, tmp_path, "--model", "gemini-2.5-pro", "--mode", mode, "--rpm", "6000")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    assert emu.stats()["thinking_seen"] == {"gemini-2.5-pro thinkingBudget=128": 60}
    assert "deprecated" in p.stderr  # the plan warns


def test_the_emulator_refuses_what_the_real_service_refuses(emu):
    """Budget 0 on 2.5 Pro, a level on a 2.5 model, a budget on Gemini 3.5+, both fields at once: 400s."""
    from google import genai
    from google.genai import errors, types

    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.url, api_version="v1beta"))
    cases = [
        ("gemini-2.5-pro", types.ThinkingConfig(thinking_budget=0), "only works in thinking mode"),
        ("gemini-2.5-flash", types.ThinkingConfig(thinking_level="LOW"), "not supported"),
        ("gemini-3.5-flash", types.ThinkingConfig(thinking_budget=512), "thinking_level"),
        ("gemini-3.8-flash", types.ThinkingConfig(thinking_level="MINIMAL"), "not supported"),
        ("gemini-4-argon", types.ThinkingConfig(thinking_level="XHIGH"), "not supported"),
        ("gemini-4-neon", types.ThinkingConfig(thinking_level="MINIMAL"), "not supported"),
        ("gemini-3.1-flash-lite", types.ThinkingConfig(thinking_budget=512), "thinking_level"),
        ("gemini-3-flash-preview", types.ThinkingConfig(thinking_level="LOW", thinking_budget=5), "only set one"),
    ]
    for model, tc, words in cases:
        with pytest.raises(errors.ClientError) as e:
            client.models.generate_content(model=model, contents="hi", config=types.GenerateContentConfig(thinking_config=tc))
        assert e.value.code == 400 and words in (e.value.message or ""), (model, e.value.message)
    ok = client.models.generate_content(
        model="gemini-3-flash-preview",
        contents="hi",
        config=types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_level="HIGH")),
    )
    assert ok.usage_metadata.thoughts_token_count and ok.text
    m = client.models.get(model="gemini-3.1-pro-preview")
    assert (m.input_token_limit, m.output_token_limit) == (1_048_576, 65_536)
    m = client.models.get(model="gemini-4-argon")  # one non-streaming request's most, not the 1M shared budget
    assert (m.input_token_limit, m.output_token_limit) == (1_048_576, 32_768)
    with pytest.raises(errors.ClientError) as e:
        client.models.get(model="gemini-2.0-flash")
    assert e.value.code == 404


def _sdk_client(emu):
    from google import genai
    from google.genai import types

    return genai.Client(api_key="k", http_options=types.HttpOptions(base_url=emu.url, api_version="v1beta"))


def test_gemini_4_hydrogen_takes_thinking_xhigh_through_the_sdk_and_a_batch_run(emu, articles, tmp_path):
    """XHIGH, new with Hydrogen and Neon (Google's Vertex guides): the SDK's request is answered, with xhigh's
    thinking; a batch run with --thinking xhigh sends it on every line and every line is answered."""
    from google.genai import types

    client = _sdk_client(emu)  # kept: a client no longer referenced closes its connection pool
    ok = client.models.generate_content(
        model="gemini-4-hydrogen",
        contents="hi",
        config=types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_level=types.ThinkingLevel.XHIGH)),
    )
    assert ok.text and ok.usage_metadata.thoughts_token_count == batchify.EMULATED_THOUGHTS["xhigh"]
    args = ("--model", "gemini-4-hydrogen", "--thinking", "xhigh", "--enqueued-limit", "3000000", "--mode", "batch")
    p, out = run(emu, articles, tmp_path, *args)
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    seen = emu.stats()["thinking_seen"]
    assert seen == {"gemini-4-hydrogen thinkingLevel=XHIGH": 61}, seen  # the SDK's request and the run's 60


def test_gemini_4_carbon_refuses_thinking_xhigh_as_the_service_does(emu, articles, tmp_path):
    """Carbon's levels top out at HIGH: the emulator answers XHIGH with the service's 400, and batchify refuses
    --thinking xhigh for it before anything is uploaded (exit 2 naming the levels it takes)."""
    from google.genai import errors, types

    client = _sdk_client(emu)
    with pytest.raises(errors.ClientError) as e:
        client.models.generate_content(
            model="gemini-4-carbon",
            contents="hi",
            config=types.GenerateContentConfig(thinking_config=types.ThinkingConfig(thinking_level="XHIGH")),
        )
    assert e.value.code == 400 and "XHIGH is not supported" in (e.value.message or ""), e.value.message
    p, _ = run(emu, articles, tmp_path, "--model", "gemini-4-carbon", "--thinking", "xhigh", "--enqueued-limit", "3000000")
    assert p.returncode == 2 and "low, medium, high" in p.stderr, p.stderr
    assert emu.stats()["uploads"] == 0


def test_thinking_past_max_output_tokens_is_max_tokens_and_an_error(emu, articles, tmp_path):
    p, out = run(
        emu, articles, tmp_path, "--thinking", "high", "--max-output-tokens", "500", "--mode", "batch", "--max-attempts", "1"
    )
    assert p.returncode == 1
    rows = assert_every_id_once(out, articles)
    assert rows and all(r["status"] == "error" and "MAX_TOKENS" in r["error"] for r in rows)


def test_schema_less_truncated_answers_can_be_accepted(emu, articles, tmp_path):
    cfg = tmp_path / "plain.toml"
    cfg.write_text('prompt_template = "{text}"\nsystem_instruction = "Summarize."\nschema = "null"\nmax_output_tokens = 5\n')
    p, out = run(emu, articles, tmp_path, "--config", str(cfg), "--mode", "batch", "--max-attempts", "1")
    assert p.returncode == 1 and all("truncated" in r["error"] for r in read_jsonl(out))
    (tmp_path / "st").rename(tmp_path / "st-1")
    p, out = run(emu, articles, tmp_path, "--config", str(cfg), "--mode", "batch", "--accept-truncated")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" and r["result"] for r in read_jsonl(out))


@pytest.mark.parametrize(
    "model, words",
    [
        ("gemini-9-ultra", '[models."gemini-9-ultra"]'),
        ("gemini-2.0-flash", "shut down on 2026-06-01"),
        ("gemini-3-pro-preview", "--model gemini-3.1-pro-preview"),
    ],
)
def test_unknown_and_retired_models_exit_2_before_anything_is_sent(emu, articles, tmp_path, model, words):
    p, _ = run(emu, articles, tmp_path, "--model", model)
    assert p.returncode == 2 and words in p.stderr, p.stderr
    s = emu.stats()
    assert s["uploads"] == 0 and s["count_tokens_calls"] == 0 and s["creates"] == 0 and s["generate_calls"] == 0


def test_a_model_the_service_no_longer_serves_exits_2(emu, articles, tmp_path):
    """The catalog still lists it, the service answers models.get with 404: exit 2 naming the replacement."""
    emu.configure(models={"gemini-3.5-flash": {"status": "retired", "shutdown": "2026-11-30"}})
    p, _ = run(emu, articles, tmp_path, "--model", "gemini-3.5-flash", "--enqueued-limit", "3000000")
    assert p.returncode == 2 and "does not serve" in p.stderr, p.stderr
    assert emu.stats()["uploads"] == 0 and emu.stats()["models_get"] == 1


def test_unpublished_limit_asks_for_the_figure_and_a_models_file_gives_it(emu, articles, tmp_path):
    p, _ = run(emu, articles, tmp_path, "--model", "gemini-3.8-flash")
    assert p.returncode == 2 and "--enqueued-limit" in p.stderr and "not published" in p.stderr
    assert emu.stats()["uploads"] == 0
    f = tmp_path / "models.toml"
    f.write_text('[models."gemini-3.8-flash"]\nenqueued_tokens = { tier1 = 2000000 }\n')
    p, _out = run(emu, articles, tmp_path, "--model", "gemini-3.8-flash", "--mode", "batch", BATCHIFY_MODELS=str(f))
    assert p.returncode == 0, p.stderr
    assert emu.stats()["thinking_seen"] == {"gemini-3.8-flash thinkingLevel=LOW": 60}


def test_a_custom_model_from_a_models_file_runs_on_the_local_emulator(tmp_path, articles):
    f = tmp_path / "models.toml"
    f.write_text('[models."acme-tuned-1"]\ninput_price = 1.0\noutput_price = 4.0\nenqueued_tokens = { tier1 = 5000000 }\n')
    p = run_cli(
        [
            "run",
            str(articles),
            "--endpoint",
            "local",
            "--state-dir",
            "st",
            "--yes",
            "--model",
            "acme-tuned-1",
            "--models",
            str(f),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--json",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["ok"] == 60 and s["cost_batch_usd"] > 0


def test_repeated_system_instruction_is_billed_at_the_cache_price(emu, articles, tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text('system_instruction = """' + "Classify carefully. " * 300 + '"""\n')
    p, _out = run(emu, articles, tmp_path, "--config", str(cfg), "--mode", "batch", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    cached = summary["usage"]["cachedContentTokenCount"]
    assert cached > 0 and cached < summary["usage"]["promptTokenCount"]
    spec = batchify.builtin_catalog().spec(batchify.DEFAULT_MODEL, "2026-12-01")
    assert summary["cost_batch_usd"] == pytest.approx(batchify.cost_usd(spec, summary["usage"], "batch"), rel=1e-4)
    assert summary["cost_batch_usd"] < batchify.cost_usd(spec, {**summary["usage"], "cachedContentTokenCount": 0}, "batch")


# -- faults users report: each ends in a terminal state, every id answered once, nothing created twice ----
def test_upload_refused_with_unsupported_mime_a_few_times_is_retried(emu, articles, tmp_path):
    emu.configure(upload_400_mime=2, upload_no_file=2)
    p, out = run(emu, articles, tmp_path, "--batch-size", "20", "--mode", "batch")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["faults_upload_400_mime"] == 2 and s["faults_upload_no_file"] == 2 and s["creates"] == 3
    assert_created_once(s)
    jobs = [json.loads(f.read_text()) for f in (tmp_path / "st" / "articles" / "jobs").glob("*.json")]
    assert sorted(j["state"] for j in jobs) == ["RESULTS_DOWNLOADED"] * 3  # retried in the call, no job lost to it


def test_upload_always_refused_without_fallback_reports_the_reason(emu, articles, tmp_path):
    emu.configure(upload_400_mime=10_000)
    p, out = run(emu, articles, tmp_path, "--batch-size", "30", "--max-attempts", "1", "--mode", "batch")
    assert p.returncode == 1
    rows = assert_every_id_once(out, articles)
    assert all(r["status"] == "error" and "Unsupported MIME type" in r["error"] for r in rows)


def test_an_output_refused_for_a_while_is_waited_for_never_paid_twice(emu, articles, tmp_path):
    """SUCCEEDED before its output can be read (users report it; the adversarial pass made it 40 s): the
    download is tried again, backing off, for up to OUTPUT_PATIENCE_S; the job is never failed and created
    again (it used to be after 3 rounds: every request paid twice or more)."""
    attempts = batchify.DOWNLOAD_POLICY.attempts * 4  # four whole rounds refused
    emu.configure(download_404=attempts)
    p, out = run(emu, articles, tmp_path, "--mode", "batch", "--poll-interval", "0.1")  # rounds 0.1 s apart, doubling
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" and r["source"] == "batch" for r in assert_every_id_once(out, articles))
    assert "output not downloadable yet" in p.stderr and "paid for" in p.stderr
    s = emu.stats()
    assert s["faults_download_404"] == attempts and s["creates"] == 1
    assert_created_once(s)


def test_download_403_a_few_times_is_retried(emu, articles, tmp_path):
    emu.configure(download_403=2)
    p, _out = run(emu, articles, tmp_path, "--mode", "batch")
    assert p.returncode == 0, p.stderr
    assert emu.stats()["creates"] == 1 and emu.stats()["faults_download_403"] == 2


def test_create_429_with_nothing_enqueued_without_fallback_exits_3_with_the_reason(emu, articles, tmp_path):
    emu.configure(create_429=10**9)
    p, out = run(emu, articles, tmp_path, "--create-timeout", "1", "--no-fallback")
    assert p.returncode == 3 and "refused with 429" in p.stderr and "nothing of this run was enqueued" in p.stderr
    assert emu.stats()["generate_calls"] == 0
    rows = assert_every_id_once(out, articles)
    assert all(r["status"] == "error" for r in rows)
    st = json.loads(run_cli(["status", "articles", "--state-dir", "st", "--json"], tmp_path).stdout)["runs"][0]
    assert st["status"] == "interrupted"  # not done: resume tries the refused creates again


@pytest.mark.parametrize("refusals", [2])  # within one call's retries (past them: tests/test_engine_faults_fake.py)
def test_429_on_list_during_reconcile_is_retried(emu, articles, tmp_path, refusals):
    p, _ = run(emu, articles, tmp_path, "--mode", "batch", BATCHIFY_CRASH_AT="after_intent")
    assert p.returncode != 0
    emu.configure(list_429=refusals)
    r = run_cli(
        ["resume", "articles", "--state-dir", "st", "--endpoint", emu.url, "--poll-interval", "0.2"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    s = emu.stats()
    assert s["faults_list_429"] == refusals
    assert_created_once(s)


def test_a_key_refused_mid_run_stops_polling_at_once(emu, articles, tmp_path):
    emu.configure(job_seconds=5.0)
    p = spawn_batch_run(emu, articles, tmp_path, tmp_path / "o.jsonl", poll="0.2")
    deadline = time.monotonic() + 60
    while emu.stats()["creates"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    emu.configure(reject_key="test-key-123")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 3 and "GEMINI_API_KEY" in err, err


@pytest.mark.slow
def test_cancel_then_resume_downloads_a_job_that_had_finished(emu, articles, tmp_path):
    """The finished job's output is not readable during the cancel: resume downloads it, nothing is lost."""
    run_until_the_job_ended_remotely(emu, articles, tmp_path, tmp_path / "o.jsonl")
    emu.configure(download_404=batchify.DOWNLOAD_POLICY.attempts)
    assert run_cli(["cancel", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path).returncode == 0
    assert json.loads((tmp_path / "st/articles/jobs/b0001.json").read_text())["state"] == "SUCCEEDED"
    run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    job = json.loads((tmp_path / "st/articles/jobs/b0001.json").read_text())
    assert job["state"] == "RESULTS_DOWNLOADED"
    assert all(x["status"] == "ok" for x in assert_every_id_once(tmp_path / "o.jsonl", articles))
    assert emu.stats()["creates"] == 1


def test_resume_on_a_model_no_longer_served_exits_2(emu, articles, tmp_path):
    p, _ = run(emu, articles, tmp_path, "--dry-run")
    assert p.returncode == 0
    emu.configure(models={batchify.DEFAULT_MODEL: {"status": "retired", "shutdown": "2026-11-30"}})
    r = run_cli(["resume", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
    assert r.returncode == 2 and "does not serve" in r.stderr, r.stderr
    assert emu.stats()["uploads"] == 0


def test_a_refused_api_key_stops_at_once_naming_the_variable(emu, articles, tmp_path):
    emu.configure(reject_key="test-key-123")
    p, _ = run(emu, articles, tmp_path)
    assert p.returncode == 3, p.stderr
    assert "refused the API key in GEMINI_API_KEY" in p.stderr and "test-key-123" not in p.stderr + p.stdout
    assert "the API key in the API key" not in p.stderr and "key in GEMINI_API_KEY (or .env)" not in p.stderr
    assert emu.stats()["uploads"] == 0  # and it stopped at once: no retry loop (run_cli's timeout bounds it)
    (tmp_path / ".env").write_text("GOOGLE_API_KEY=test-key-123\n")  # a stale .env: it wins, and is named as such
    p, _ = run(emu, articles, tmp_path)
    assert p.returncode == 3 and "GOOGLE_API_KEY (set in .env)" in p.stderr, p.stderr


def test_cancel_reads_back_and_keeps_a_finished_jobs_results(emu, articles, tmp_path):
    """The job finished before the cancel reached it: cancel downloads its results instead of dropping them."""
    run_until_the_job_ended_remotely(emu, articles, tmp_path, tmp_path / "o.jsonl")
    c = run_cli(["cancel", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
    assert c.returncode == 0, c.stderr
    job = json.loads((tmp_path / "st" / "articles" / "jobs" / "b0001.json").read_text())
    assert job["state"] == "RESULTS_DOWNLOADED" and job["ok"] == 60
    assert emu.stats()["cancels"] == 1


def test_models_command_lists_the_catalog(tmp_path):
    p = run_cli(["models", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    rows = {r["model"]: r for r in data["models"]}
    assert data["default"] == batchify.DEFAULT_MODEL and rows[batchify.DEFAULT_MODEL]["default"]
    assert rows["gemini-2.0-flash"]["status"] == "retired" and rows["gemini-2.5-pro"]["status"] == "deprecated"
    assert "ai.google.dev" in rows["gemini-3-flash-preview"]["sources"]["prices"]
    assert "xhigh" in rows["gemini-4-hydrogen"]["thinking_allowed"] and "xhigh" not in rows["gemini-4-carbon"]["thinking_allowed"]
    assert rows["gemini-3.1-flash-lite"]["thinking_default_sent"] == "minimal"
    t = run_cli(["models"], tmp_path, COLUMNS="100")
    assert t.returncode == 0 and "gemini-3-flash-preview" in t.stdout and "retired" in t.stdout
    m = run_cli(["models", "--markdown"], tmp_path)
    assert m.stdout in (ROOT / "README.md").read_text()


# -- Flex: the batch price through generateContent ----------------------------------------------------------
def test_flex_mode_sends_every_request_through_flex(emu, articles, tmp_path):
    emu.configure(flex_latency_min=0.2, flex_latency_max=0.6)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--json")
    assert p.returncode == 0, p.stderr
    rows = assert_every_id_once(out, articles)
    assert all(r["status"] == "ok" and r["source"] == "flex" for r in rows)
    s = emu.stats()
    assert s["flex_calls"] == 60 and s["standard_calls"] == 0 and s["creates"] == 0 and s["uploads"] == 0
    summary = json.loads(p.stdout)
    spec = batchify.builtin_catalog().spec(batchify.DEFAULT_MODEL, "2026-12-01")
    assert summary["cost_flex_usd"] == pytest.approx(batchify.cost_usd(spec, summary["usage"], "flex"), rel=1e-4)
    assert summary["cost_flex_usd"] == pytest.approx(batchify.cost_usd(spec, summary["usage"], "standard") / 2, rel=1e-4)
    flex = f"${summary['cost_flex_usd']:.4f}"
    fields = {f.name for f in dataclasses.fields(batchify.Summary)}
    said = batchify.summary_cost(batchify.Summary(**{k: v for k, v in summary.items() if k in fields}))
    assert said == f"{flex} (flex {flex})"  # the closing report counts Flex
    st = run_cli(["status", "--state-dir", "st"], tmp_path)
    assert flex in st.stdout, st.stdout  # and status's cost column: Flex is paid for too


def test_flex_shed_storm_every_id_answered_and_the_rate_backed_off(emu, articles, tmp_path):
    emu.configure(flex_shed_rate=0.5, seed=4)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--max-attempts", "5", "--rpm", "60000")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["flex_shed"] > 0 and s["flex_calls"] == 60 + s["flex_shed"]
    assert_billed = s["billed"]
    assert len(assert_billed) == 60 and set(assert_billed.values()) == {1}


@pytest.mark.parametrize("code", [504, 500])
def test_flex_shed_as_504_or_500_gets_the_shed_budget_not_three_tries(emu, articles, tmp_path, code):
    """An overloaded Flex pool answering 504/500 instead of 503 (the adversarial pass): with the default
    attempts, ids used to end in error after three quick tries; they are now retried like a 503 shed."""
    emu.configure(flex_shed_rate=0.5, flex_shed_code=code, seed=4)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--rpm", "60000")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    assert emu.stats()["flex_shed"] > 0


def test_flex_on_a_model_without_flex_exits_2_naming_those_with_it(emu, articles, tmp_path):
    f = tmp_path / "m.toml"
    f.write_text(
        '[models."acme-1"]\ninput_price = 1.0\noutput_price = 2.0\nflex = false\nenqueued_tokens = { tier1 = 3000000 }\n'
    )
    p, _ = run(emu, articles, tmp_path, "--mode", "flex", "--model", "acme-1", "--models", str(f))
    assert p.returncode == 2 and "no Flex" in p.stderr and "gemini-3-flash-preview" in p.stderr
    assert emu.stats()["generate_calls"] == 0


# -- hybrid: batch from the head, Flex lanes from the tail ------------------------------------------------
@pytest.mark.slow
def test_hybrid_killed_and_resumed_never_hands_a_flex_batch_to_batch(emu, articles, tmp_path):
    emu.configure(job_seconds=1.5, flex_latency_min=0.2, flex_latency_max=0.4)
    out = tmp_path / "o.jsonl"
    args = [*FAST, "--mode", "hybrid", "--batch-size", "10", "--enqueued-limit", "9000", "--flex-lanes", "1"]
    p = run_against(emu, articles, tmp_path, *args, out=out, BATCHIFY_CRASH_AT="after_realtime:5")
    assert p.returncode == -9
    claimed = {
        json.loads(f.read_text())["display_name"]
        for f in (tmp_path / "st/articles/jobs").glob("*.json")
        if json.loads(f.read_text())["lane"] == "flex"
    }
    assert claimed
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(x["status"] == "ok" for x in assert_every_id_once(out, articles))
    s = emu.stats()
    assert not claimed & set(s["creates_by_display_name"])  # a batch Flex had started never went to batch
    assert_created_once(s)
    assert len(s["billed"]) == 60 and sum(s["billed"].values()) - 60 <= 64  # at most the requests in flight at the kill


def test_the_standard_tier_2x_is_used_only_when_allowed(emu, articles, tmp_path):
    """A model without Flex: what batch could not do is not sent at 2x unless asked (--allow-standard, here
    given to resume); then it is, and every id ends ok."""
    f = tmp_path / "m.toml"
    f.write_text(
        '[models."acme-1"]\ninput_price = 1.0\noutput_price = 2.0\nflex = false\nenqueued_tokens = { tier1 = 3000000 }\n'
    )
    emu.configure(models=batchify.read_models_file(f), fail_jobs=10)
    p, out = run(emu, articles, tmp_path, "--model", "acme-1", "--models", str(f), "--max-attempts", "1")
    assert p.returncode == 1, p.stderr
    assert "--allow-standard" in p.stderr and emu.stats()["standard_calls"] == 0
    assert all(r["status"] == "error" for r in read_jsonl(out))
    r = run_cli(["resume", "articles", "--state-dir", "st", "--allow-standard", "--poll-interval", "0.2"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = assert_every_id_once(out, articles)
    assert all(x["status"] == "ok" and x["source"] == "standard" for x in rows)
    assert emu.stats()["standard_calls"] == 60


def test_auto_is_hybrid_when_the_limit_makes_waves_and_batch_when_it_does_not(emu, articles, tmp_path):
    emu.configure(enqueued_limit=9000, job_seconds=1.0)
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, *FAST, "--enqueued-limit", "9000", "--batch-size", "6", out=out)
    assert p.returncode == 0, p.stderr
    run = json.loads((tmp_path / "st/articles/run.json").read_text())
    assert run["options"]["mode"] == "auto" and run["plan"]["lanes"] == "hybrid" and run["plan"]["waves"] > 1
    rows = assert_every_id_once(out, articles)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["source"] for r in rows} <= {"batch", "flex"} and "flex" in {r["source"] for r in rows}
    s = emu.stats()
    assert len(s["billed"]) == 60 and set(s["billed"].values()) == {1}, "every request answered (and billed) once"
    one = run_against(emu, articles, tmp_path, *FAST, "--name", "one", "--dry-run", "--json")
    assert json.loads(one.stdout)["plan"]["lanes"] == "batch"  # one wave: batch alone


@pytest.mark.parametrize("foreign", ["BATCH_STATE_SOMETHING_NEW", ""])
def test_a_lost_create_is_found_though_the_list_holds_a_job_in_a_state_batchify_does_not_know(emu, articles, tmp_path, foreign):
    """The create's answer is lost (503, the job made); reconciling lists the jobs, and someone else's job there is in
    a state batchify does not know (or has none). That used to fail every list: the run hung, the job SUBMITTING."""
    emu.configure(create_lost=1, list_foreign_state=foreign)
    p, out = run(emu, articles, tmp_path, "--mode", "batch")
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" for r in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["faults_create_lost"] == 1 and s["creates"] == 1
    assert_created_once(s)


# -- the account refused mid-run (billing, permissions, location): stop, keep every job, resume pays nothing twice ----
def test_polls_refused_403_stop_the_run_with_the_job_kept_never_created_again(emu, articles, tmp_path):
    """A billing or permission change answers the job's gets 403 for a while. It used to count the job FAILED after 3
    refused polls and create it again (then again, then Flex): four payments for one batch, exit 0 and no word. The
    run now stops (exit 3) with the job as it was and the fix; resume, once mended, collects the one job."""
    emu.configure(job_seconds=1.0, get_403=batchify.POLL_REFUSALS)
    p, out = run(emu, articles, tmp_path, "--mode", "batch")
    assert p.returncode == 3, p.stderr
    assert "refused to show its state" in p.stderr and "not counted as failed" in p.stderr and "resume articles" in p.stderr
    jobs = batchify.RunStore(tmp_path / "st", "articles").load_jobs()
    assert [j.state for j in jobs] != [] and all(j.state in batchify.REMOTE_LIVE for j in jobs), jobs
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(x["status"] == "ok" and x["source"] == "batch" for x in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["creates"] == 1 and s["generate_calls"] == 0
    assert_created_once(s)


def test_a_location_refusal_on_flex_stops_the_run_recording_no_id_as_failed(emu, articles, tmp_path):
    """400 FAILED_PRECONDITION "User location is not supported" (a VPN's exit changed country): an answer about the
    account, not the request. It used to be recorded as each id's final error (resume then sent nothing: 60 errors
    for good); the run now stops (exit 3), nothing recorded, and resume finishes every id, each billed once."""
    emu.configure(generate_400_location=1)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--flex-lanes", "1")
    assert p.returncode == 3, p.stderr
    assert "User location is not supported" in p.stderr and "resume articles" in p.stderr
    rt = tmp_path / "st" / "articles" / "realtime.jsonl"
    assert not rt.exists() or all(r.get("status") == "ok" for r in read_jsonl(rt))
    r = run_cli(["resume", "articles", "--state-dir", "st"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(x["status"] == "ok" and x["source"] == "flex" for x in assert_every_id_once(out, articles))
    billed = emu.stats()["billed"]
    assert len(billed) == 60 and set(billed.values()) == {1}


def test_a_flex_answer_cut_short_on_the_way_is_asked_again_and_the_run_finishes(emu, articles, tmp_path):
    """A 200 whose body is not a JSON object (cut short by a proxy, an HTML page from a captive portal): it used to
    raise orjson's JSONDecodeError out of the run, a traceback, every other request in flight abandoned (paid, then
    paid again by the resume). It is now a transient error of that one request: asked again, the run finishes. Only
    that request is paid twice (its first answer was billed and lost on the way back: nothing can recover it)."""
    emu.configure(generate_cut_short=1)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--retry-scale", "0.01")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert all(x["status"] == "ok" and x["source"] == "flex" for x in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["faults_generate_cut_short"] == 1
    assert len(s["billed"]) == 60 and sorted(s["billed"].values()) == [1] * 59 + [2]


def test_an_answer_stopped_with_continuation_is_continued_with_its_token(emu, articles, tmp_path):
    """google-genai 3.x: an answer that reached the per-request output limit stops with finishReason CONTINUATION and
    a continuationToken; the SDK's generate_content sends the request again with the token and merges the hops.
    batchify sends raw requests, so it recorded each as 'answer stopped early', paid and lost (adversary finding).
    It now continues them: each answer is whole (its JSON parses only when both halves are joined)."""
    emu.configure(continuation_hops=3)
    p, out = run(emu, articles, tmp_path, "--mode", "flex", "--retry-scale", "0.01")
    assert p.returncode == 0, p.stderr
    assert all(x["status"] == "ok" for x in assert_every_id_once(out, articles))
    s = emu.stats()
    assert s["faults_continuation_hops"] == 3 and s["continuation_hops"] == 3
    assert len(s["billed"]) == 60 and set(s["billed"].values()) == {1}


def test_files_uploaded_ahead_that_expire_before_their_create_are_uploaded_again(emu, articles, tmp_path):
    """The Files API keeps a file 48 h (the emulator's file_retention_s); a run under a tight enqueued limit uploads
    the next batches ahead of admission, and a batch that waits longer than that finds its file gone: the create is
    answered 403 "... or it may not exist", the file is uploaded again and the job created, once; every id answered
    once. (At a time scale: files kept 2 s, jobs of 3 s, three at a time.)"""
    emu.configure(enqueued_limit=13500, job_seconds=3.0, pending_fraction=0.1, file_retention_s=2.0)
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, *FAST, "--mode", "batch", "--enqueued-limit", "13500", "--batch-size", "20", out=out)
    assert p.returncode == 0, p.stderr
    assert all(r["status"] == "ok" and r["source"] == "batch" for r in assert_every_id_once(out, articles))
    s = emu.stats()
    batches = json.loads((tmp_path / "st/articles/run.json").read_text())["plan"]["batches"]
    assert s["files_expired"] >= 1 and "uploading again" in p.stderr, s
    assert s["creates"] == batches and set(s["creates_by_display_name"].values()) == {1}, "each batch created once"
    assert len(s["billed"]) == 60 and set(s["billed"].values()) == {1}, "every request billed once"
