"""A newcomer's day (issue 14): every command twice, runs that own their output, states that tell the truth,
and cancel / resume / cleanup never throwing away what was paid for."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    a_create_recorded,
    cli_env,
    input_ids,
    read_jsonl,
    run_against,
    run_cli,
    run_until_the_job_ended_remotely,
    spawn_cli,
    wait_for,
    zygote,
)

import batchify

FAST = ["--poll-interval", "0.2", "--yes"]


def status_of(tmp_path: Path, run: str = "articles") -> dict:
    p = run_cli(["status", run, "--json", "--state-dir", "st"], tmp_path)
    return json.loads(p.stdout)["runs"][0]


@pytest.mark.slow
def test_readme_quick_start_twice_then_cancel_resume_cleanup(tmp_path):
    """The README's first command, twice in a row, then cancel/resume/cleanup: every paid result kept."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    cmd = ["run", "examples/articles.jsonl", "--waves", "auto", "--endpoint", "local", "--yes"]
    first = run_cli(cmd, tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "examples" / "articles.results.jsonl"
    before = out.read_bytes()
    again = run_cli(cmd, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "ok" in again.stdout and out.read_bytes() == before  # finished: reported, nothing sent or rewritten
    assert run_cli(["resume", "--state-dir", "batch_jobs"], tmp_path).stdout.startswith("nothing to resume")
    c = run_cli(["cancel", "articles"], tmp_path)  # a finished run keeps its state
    assert c.returncode == 0 and "nothing to cancel" in c.stdout
    assert status_of_dir(tmp_path, "batch_jobs")["status"] == "done"
    cl = run_cli(["cleanup", "articles", "--endpoint", "local"], tmp_path)
    assert cl.returncode == 0, cl.stderr
    assert [r["status"] for r in read_jsonl(out)] == ["ok"] * 60


def status_of_dir(tmp_path: Path, state: str) -> dict:
    return json.loads(run_cli(["status", "articles", "--json", "--state-dir", state], tmp_path).stdout)["runs"][0]


@pytest.mark.slow
def test_cleanup_refuses_while_a_finished_jobs_output_is_not_downloaded(emu, articles, tmp_path):
    run_until_the_job_ended_remotely(emu, articles, tmp_path, tmp_path / "o.jsonl")
    emu.configure(download_404=10**6)  # the output is not readable while we cancel and clean up
    assert run_cli(["cancel", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path).returncode == 0
    cl = run_cli(["cleanup", "articles", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
    assert cl.returncode == 2 and "b0001" in cl.stderr and "resume" in cl.stderr, cl.stderr + cl.stdout
    assert emu.stats()["deletes"] == 0
    emu.configure(download_404=0)
    r = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert [x["status"] for x in read_jsonl(tmp_path / "o.jsonl")] == ["ok"] * 60, r.stderr


def test_each_run_owns_its_results_file(emu, articles, tmp_path):
    a = run_against(emu, articles, tmp_path, *FAST)
    assert a.returncode == 0
    own = articles.with_name("articles.results.jsonl")
    first = own.read_bytes()
    emu.configure(line_error_rate=1.0)
    b = run_against(emu, articles, tmp_path, *FAST, "--name", "second", "--mode", "batch", "--max-attempts", "1", "--no-fallback")
    assert b.returncode == 1
    assert own.read_bytes() == first  # the first run's results untouched
    second = articles.with_name("articles.second.results.jsonl")
    assert all(r["status"] == "error" for r in read_jsonl(second))
    # something else overwrites the first run's file: `results` prints that run's own results, not the file
    own.write_text("junk\n")
    r = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert r.returncode == 0 and "changed since" in r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["id"] for x in rows] == input_ids(articles) and all(x["status"] == "ok" for x in rows)
    own.unlink()  # missing: rebuilt from the sidecars
    r = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 60 and own.exists()


def test_dry_run_says_how_to_submit(emu, articles, tmp_path):
    p = run_against(emu, articles, tmp_path, "--dry-run")
    assert p.returncode == 0
    last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1]
    assert "without --dry-run" in last and "batchify resume articles" in p.stdout


def test_dotenv_in_the_working_directory_is_read(emu, articles, tmp_path):
    (tmp_path / ".env").write_text("GEMINI_API_KEY=from-dotenv\n")
    env = {k: v for k, v in cli_env().items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    emu.configure(reject_key="wrong")  # any key but "wrong" is accepted; no key at all is refused
    # forked from the warm zygote (as run_cli) but with this environment as it is: no key in it at all
    p = zygote().spawn(["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", *FAST], tmp_path, env)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    s = emu.stats()
    assert s["creates"] + s["generate_calls"] > 0  # it reached the service, with the key from .env


def test_ctrl_c_and_sigterm_leave_an_interrupted_run_named_in_the_message(emu, articles, tmp_path):
    emu.configure(job_seconds=20)
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        name = f"stop-{code}"
        p = spawn_cli(["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", "--name", name, *FAST], tmp_path)
        wait_for(lambda n=name: a_create_recorded(tmp_path / "st" / n))
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == code, err
        assert name in err and f"batchify resume {name}" in err
        assert status_of(tmp_path, name)["status"] == "interrupted"


def test_a_max_cost_refusal_is_shown_as_refused(emu, articles, tmp_path):
    p = run_against(emu, articles, tmp_path, *FAST, "--max-cost", "0.000001")
    assert p.returncode == 5
    assert "--max-cost $0.000001;" in p.stderr, p.stderr  # not "$0.0000"
    assert status_of(tmp_path)["status"] == "refused"


def test_cancel_of_a_run_in_use_says_how_to_stop_it(emu, articles, tmp_path):
    emu.configure(job_seconds=20)
    p = spawn_cli(["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", *FAST], tmp_path)
    try:
        wait_for(lambda: emu.stats()["creates"] >= 1)
        c = run_cli(["cancel", "articles", "--state-dir", "st"], tmp_path)
        assert c.returncode == 4 and f"kill -INT {p.pid}" in c.stderr, c.stderr
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)


def test_reports_go_to_stdout(emu, articles, tmp_path):
    assert run_against(emu, articles, tmp_path, *FAST).returncode == 0
    s = run_cli(["status", "--state-dir", "st"], tmp_path, COLUMNS="200")
    assert "articles" in s.stdout and "done" in s.stdout
    r = run_cli(["results", "articles", "--summary", "--state-dir", "st"], tmp_path)
    assert "category" in r.stdout


def test_declining_the_plan_submits_nothing_and_is_not_an_error(emu, articles, tmp_path):
    import asyncio

    import batchify

    opts = batchify.RunOptions(poll_interval=0.2)
    with pytest.raises(batchify.Declined) as e:
        asyncio.run(
            batchify.run_file(
                articles, options=opts, state_dir=tmp_path / "st", endpoint=emu.url, api_key="k", confirm=lambda r: False
            )
        )
    assert e.value.exit_code == 0 and "nothing submitted" in str(e.value)
    assert emu.stats()["uploads"] == 0 and emu.stats()["creates"] == 0


def test_every_option_has_help():
    import click

    import batchify

    missing = [
        (name, p.opts[0])
        for name, cmd in batchify.cli.commands.items()
        if name != "emulator"  # a test double's knobs
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not p.help
    ]
    assert not missing, missing


# -- 3. a batch bigger than the real enqueued limit ---------------------------------------------------------
@pytest.mark.slow
def test_told_a_limit_too_high_the_batch_is_split_the_limit_learned_and_status_says_why(emu, articles, tmp_path):
    """Told 10M where the account has 9,000 tokens: the one 26k-token batch is refused with nothing of the
    run enqueued; batchify halves it until the parts fit, learns the limit, and `status` says why."""
    emu.configure(enqueued_limit=9000, job_seconds=0.1)  # the parts run one at a time: short jobs
    out = tmp_path / "o.jsonl"
    # polls (and so the create back-off, which starts at the poll interval) at 50 ms: the 429s and halvings are many
    args = ("--mode", "batch", "--enqueued-limit", "10000000", "--poll-interval", "0.05")
    p = run_against(emu, articles, tmp_path, *FAST, *args, out=out)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(out)] == input_ids(articles)
    assert all(r["status"] == "ok" for r in read_jsonl(out))
    s = emu.stats()
    assert s["creates_refused_429"] >= 1 and s["peak_enqueued_tokens"] <= 9000
    assert all(v == 1 for v in s["creates_by_display_name"].values())
    st = run_cli(["status", "articles", "--state-dir", "st"], tmp_path)
    assert "limit learned" in st.stdout and "refused" in st.stdout, st.stdout
    js = json.loads(run_cli(["status", "articles", "--state-dir", "st", "--json"], tmp_path).stdout)["runs"][0]
    assert js["job_states"]["SPLIT"] >= 1 and js["plan"]["effective_limit"] < 9000


# -- 8. the plan explains its numbers ---------------------------------------------------------------------
def test_the_plan_explains_its_numbers(emu, articles, tmp_path):
    emu.configure(count_tokens_503=10**6)  # countTokens unreachable: the offline guess, and a warning saying so
    p = run_against(emu, articles, tmp_path, "--dry-run", "--waves", "5", "--batch-size", "25")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for words in (
        "per request (est.)",
        "tokens in",
        "answer",
        "prices used (USD / 1M)",
        "jobs per wave",
        "mode flex",
        "mode hybrid",
    ):
        assert words in out, words
    assert emu.url in out  # the endpoint actually used
    assert "countTokens could not be reached" in out and "offline guess" in out
    assert "--waves 5 cannot be honoured" in out
    plan = json.loads(run_against(emu, articles, tmp_path, "--dry-run", "--json", "--name", "j").stdout)["plan"]
    spec = batchify.builtin_catalog().spec(batchify.DEFAULT_MODEL, "2026-12-01")
    assert plan["prices_per_1m"]["batch"]["input"] == pytest.approx(spec.input_price * spec.batch_discount)
    assert plan["jobs_per_wave"] == [1] and set(plan["modes"]) == {"batch", "flex", "standard", "hybrid"}
    assert plan["modes"]["flex"]["cost_usd"] == pytest.approx(plan["modes"]["batch"]["cost_usd"])


def test_status_says_interrupted_not_running_after_a_crash(emu, articles, tmp_path):
    """After a SIGKILL (OOM, reboot, a closed laptop) the sidecars still say "running"; status and list used to
    repeat it, and a user would wait on a dead run. Nobody holds the run's lock: it is shown as interrupted."""
    p = run_against(emu, articles, tmp_path, *FAST, BATCHIFY_CRASH_AT="after_create")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert batchify.RunStore(tmp_path / "st", "articles").load_run().status == "running"  # what the sidecar says
    assert status_of(tmp_path)["status"] == "interrupted"
    listed = run_cli(["list", "--state-dir", "st"], tmp_path)
    assert "interrupted" in listed.stdout and "running" not in listed.stdout, listed.stdout


def test_a_job_sidecar_emptied_by_a_power_cut_status_names_resume_and_resume_mends_it(emu, articles, tmp_path):
    """Prepare's CREATED job sidecars are not fsynced (run.json is the durable record): after a power cut one may
    be empty. `status` refuses it naming the command that mends it (not only "restore from a backup"), and that
    command does: every id once."""
    p = run_against(emu, articles, tmp_path, "--dry-run", "--batch-size", "20")
    assert p.returncode == 0, p.stderr
    (tmp_path / "st" / "articles" / "jobs" / "b0001.json").write_bytes(b"")
    shown = run_cli(["status", "articles", "--state-dir", "st"], tmp_path)
    assert shown.returncode == 3 and "b0001.json" in shown.stderr and "batchify resume articles" in shown.stderr, shown.stderr
    done = run_cli(["resume", "articles", "--state-dir", "st", "--poll-interval", "0.2"], tmp_path)
    assert done.returncode == 0, done.stderr
    out = Path(batchify.RunStore(tmp_path / "st", "articles").load_run().out)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [json.loads(line)["id"] for line in Path(articles).read_text().splitlines()]


def _as_made_by_an_older_batchify(st: Path, made: str, legacy: str) -> None:
    """The run folder `made` renamed to a name an older batchify gave runs (before the name rule, or before a name
    was reserved), its sidecars saying so."""
    (st / made).rename(st / legacy)
    run_json = st / legacy / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "name": legacy}))


@pytest.mark.parametrize(("stem", "legacy"), [("my data (v2)", "my data (v2)"), ("inputs", "inputs")])
def test_a_run_an_older_batchify_named_outside_todays_rule_stays_reachable_and_is_never_sent_twice(emu, tmp_path, stem, legacy):
    """An older batchify named runs after the input's stem as it was ("my data (v2)"; "inputs" before it was
    reserved). Main refused those names everywhere: list and status skipped or refused them, resume/results/cleanup
    said "not allowed", and the same `run` command started a new run ("my-data-v2", "inputs-run") that sent every
    request again (the upgrade adversary's reproducers 01 and 02). Existing runs keep their names."""
    inp = tmp_path / f"{stem}.jsonl"
    shutil.copy(ROOT / "examples" / "articles.jsonl", inp)
    p = run_against(emu, inp, tmp_path, "--dry-run", *FAST)
    assert p.returncode == 0, p.stderr
    (made,) = [d.name for d in (tmp_path / "st").iterdir() if (d / "run.json").exists()]
    _as_made_by_an_older_batchify(tmp_path / "st", made, legacy)
    listed = run_cli(["list", "--state-dir", "st"], tmp_path)
    assert listed.returncode == 0 and legacy in listed.stdout, listed.stdout + listed.stderr
    assert run_cli(["status", legacy, "--state-dir", "st"], tmp_path).returncode == 0
    again = run_against(emu, inp, tmp_path, *FAST)  # the same command: it continues the old run
    assert again.returncode == 0, again.stderr
    assert sorted(d.name for d in (tmp_path / "st").iterdir() if (d / "run.json").exists()) == [legacy]
    billed = emu.stats()["billed"]
    assert len(billed) == sum(1 for _ in inp.open()) and set(billed.values()) == {1}
    out = Path(batchify.RunStore(tmp_path / "st", legacy).load_run().out)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        json.loads(line)["id"] for line in inp.read_text().splitlines()
    ]
    assert run_cli(["results", legacy, "--state-dir", "st"], tmp_path).returncode == 0
    if legacy == "inputs":  # its folder is also where runs given in memory keep their records: --local would take those
        (tmp_path / "st" / "inputs" / "other-run.jsonl").write_text("{}\n")
        p = run_cli(["cleanup", legacy, "--local", "--state-dir", "st", "--endpoint", emu.url], tmp_path)
        assert p.returncode == 2 and "runs given in memory" in p.stderr, p.stderr
        assert (tmp_path / "st" / "inputs" / "other-run.jsonl").exists()


def test_a_damaged_run_json_of_a_run_named_jobs_is_not_called_a_job_sidecar(tmp_path):
    said = batchify._sidecar_problem(tmp_path / "st" / "jobs" / "run.json", batchify.StateError("unreadable"))
    assert "resume" not in said and "from a backup" in said, said
    said = batchify._sidecar_problem(tmp_path / "st" / "my data" / "jobs" / "b0001.json", batchify.StateError("x"))
    assert "`batchify resume 'my data'`" in said, said


def test_the_same_command_after_an_upgrade_changed_the_defaults_points_to_resume_first(tmp_path):
    """A run made by an older batchify (other default model, temperature, max tokens) and the same command given
    again: refused as "differs in config", its first fix --name NEW (which sends every request again). The user
    changed nothing, so the message says the defaults changed and names resume first (reproducer 04)."""
    inp = tmp_path / "in.jsonl"
    shutil.copy(ROOT / "examples" / "articles.jsonl", inp)
    assert run_cli(["run", str(inp), "--dry-run", "--endpoint", "local", "--state-dir", "st"], tmp_path).returncode == 0
    run_json = tmp_path / "st" / "in" / "run.json"
    d = json.loads(run_json.read_text())
    d["config"] = {**d["config"], "model": "gemini-3.8-flash", "temperature": 0.3}  # the old version's defaults
    run_json.write_text(json.dumps(d))
    p = run_cli(["run", str(inp), "--dry-run", "--endpoint", "local", "--state-dir", "st"], tmp_path)
    assert p.returncode == 2 and "where this command has this batchify's defaults" in p.stderr, p.stderr
    assert p.stderr.index("batchify resume in") < p.stderr.index("--name NEW"), p.stderr
    p = run_cli(["run", str(inp), "--dry-run", "--endpoint", "local", "--state-dir", "st", "--temperature", "0.7"], tmp_path)
    assert "differs from it in" in p.stderr and "this batchify's defaults" not in p.stderr, p.stderr  # a flag given
