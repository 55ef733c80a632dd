"""Bad input: every case names the file, the line and the fix, exits 2, and uploads nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import read_jsonl, run_against, run_cli

GOOD = '{"id": "a", "text": "Shares rose."}\n'

CASES = [
    ("malformed_json", GOOD + '{"id": "b", "text": "oops"\n', ":2:", "malformed JSON"),
    ("not_an_object", GOOD + '["b", "text"]\n', ":2:", "not an object"),
    ("missing_text", GOOD + '{"id": "b", "title": "t"}\n', ":2:", "no 'text' field"),
    ("empty_text", GOOD + '{"id": "b", "text": "   "}\n', ":2:", "'text' is empty"),
    ("missing_id", GOOD + '{"text": "no id"}\n', ":2:", "no 'id' field"),
    ("duplicate_id", GOOD + '{"id": "a", "text": "again"}\n', ":2:", 'duplicate id "a" (first at line 1)'),
    ("bad_id_type", GOOD + '{"id": {"x": 1}, "text": "t"}\n', ":2:", "non-empty string or an integer"),
]


@pytest.mark.parametrize(("case", "content", "where", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_record(emu, tmp_path, case, content, where, message):
    inp = tmp_path / f"{case}.jsonl"
    inp.write_text(content)
    p = run_against(emu, inp, tmp_path, "--yes")
    assert p.returncode == 2
    assert f"{inp}{where}" in p.stderr and message in p.stderr and "Fix:" in p.stderr
    assert emu.stats()["uploads"] == 0 and emu.stats()["creates"] == 0
    assert emu.stats()["count_tokens_calls"] == 0, "no document text was sent (calibration waits for validation)"
    assert not (tmp_path / "st" / case / "run.json").exists()
    v = run_cli(["validate", str(inp)], tmp_path)  # the same checks alone
    assert v.returncode == 2 and message in v.stderr
    assert "upload" not in v.stderr and "--skip-invalid" not in v.stderr  # neither applies to a check alone


def test_non_utf8_bytes(emu, tmp_path):
    inp = tmp_path / "latin1.jsonl"
    inp.write_bytes(GOOD.encode() + '{"id": "b", "text": "caf\xe9"}\n'.encode("latin-1"))
    p = run_against(emu, inp, tmp_path, "--yes")
    assert p.returncode == 2 and f"{inp}:2:" in p.stderr and "not UTF-8" in p.stderr and "re-encode" in p.stderr
    assert emu.stats()["uploads"] == 0


def test_document_longer_than_context_window(emu, tmp_path):
    inp = tmp_path / "long.jsonl"
    inp.write_text(GOOD + json.dumps({"id": "big", "text": "word " * 1_000_000}) + "\n")
    p = run_against(emu, inp, tmp_path, "--yes")
    assert p.returncode == 2 and f"{inp}:2:" in p.stderr and "context window" in p.stderr and "split or truncate" in p.stderr
    assert emu.stats()["uploads"] == 0


def test_empty_and_missing_files(emu, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    p = run_against(emu, "empty.jsonl", tmp_path, "--yes")
    assert p.returncode == 2 and "empty.jsonl: the file is empty" in p.stderr
    p = run_against(emu, "missing.jsonl", tmp_path, "--yes")
    assert p.returncode == 2 and "missing.jsonl: no such file" in p.stderr
    assert emu.stats()["uploads"] == 0


def test_bom_crlf_and_blank_lines_are_accepted(emu, tmp_path):
    inp = tmp_path / "windows.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "text": "one"}\r\n\r\n{"id": "b", "text": "two"}\r\n\n')
    out = tmp_path / "o.jsonl"
    p = run_against(emu, inp, tmp_path, "--yes", "--poll-interval", "0.2", out=out)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b"]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("colour = 'blue'\n", "unknown key(s) colour"),
        ('schema = \'{"type": "objekt"}\'\n', "not valid JSON Schema"),
        ("schema = '{not json'\n", "'schema' is not valid JSON"),
        ("model = \n", "not valid TOML"),
        ("temperature = 7.0\n", "'temperature' must be a number from 0.0 to 2.0"),
        ("prompt_template = 'Hi {0}'\n", "not a valid template"),
        ("prompt_template = 'Summarise: {title}'\n", "has no {text}"),  # every document the same prompt
    ],
)
def test_bad_config(emu, articles, tmp_path, toml, message):
    cfg = tmp_path / "job.toml"
    cfg.write_text(toml)
    p = run_against(emu, articles, tmp_path, "--config", str(cfg), "--yes")
    assert p.returncode == 2 and str(cfg) in p.stderr and message in p.stderr, p.stderr
    assert emu.stats()["uploads"] == 0


def test_template_field_missing_from_a_record(emu, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text("prompt_template = 'Language: {lang}\\n{text}'\n")
    inp = tmp_path / "docs.jsonl"
    inp.write_text('{"id": 1, "text": "a", "lang": "en"}\n{"id": 2, "text": "b"}\n')
    p = run_against(emu, inp, tmp_path, "--config", str(cfg), "--yes")
    assert p.returncode == 2 and f"{inp}:2:" in p.stderr and "{lang}" in p.stderr


def test_skip_invalid_sets_records_aside(emu, tmp_path):
    inp = tmp_path / "mixed.jsonl"
    inp.write_text(GOOD + '{"id": "b"}\nnot json\n{"id": "c", "text": "fine"}\n')
    out = tmp_path / "o.jsonl"
    p = run_against(emu, inp, tmp_path, "--skip-invalid", "--yes", "--poll-interval", "0.2", out=out)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(out)] == ["a", "c"]
    rejected = read_jsonl(tmp_path / "st" / "mixed" / "mixed.rejected.jsonl")
    assert [r["where"] for r in rejected] == ["line 2", "line 3"]
    assert "no 'text'" in rejected[0]["reason"] and rejected[1]["record"] == "not json"
    assert "2 rejected" in p.stderr
    assert "2 input record(s) set aside" in p.stdout  # and the closing report says so again, beside the counts


def test_files_are_private(emu, articles, tmp_path):
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, "--yes", "--poll-interval", "0.2", out=out)
    assert p.returncode == 0, p.stderr
    files = [f for f in (tmp_path / "st").rglob("*") if f.is_file()] + [out]
    assert len(files) > 5
    for f in files:
        assert os.stat(f).st_mode & 0o077 == 0, f"{f} is readable by others"


def test_api_key_never_written_or_printed(emu, articles, tmp_path):
    secret = "AIzaSECRET-do-not-leak-1234567890"
    out = tmp_path / "o.jsonl"
    p = run_against(emu, articles, tmp_path, "--yes", "--poll-interval", "0.2", out=out, GEMINI_API_KEY=secret)
    assert p.returncode == 0, p.stderr
    emu.configure(forbid_batch=True)
    p2 = run_against(emu, articles, tmp_path, "--name", "again", "--mode", "batch", "--yes", GEMINI_API_KEY=secret)
    assert p2.returncode == 3  # an error path too
    s = run_cli(["status", "--json", "--state-dir", "st"], tmp_path, GEMINI_API_KEY=secret)
    blobs = [p.stdout, p.stderr, p2.stdout, p2.stderr, s.stdout, s.stderr]
    blobs += [f.read_bytes().decode("utf-8", "replace") for f in Path(tmp_path).rglob("*") if f.is_file()]
    assert not any(secret in b for b in blobs)
    assert not any("do-not-leak" in b for b in blobs)


def test_skip_invalid_keeps_the_first_of_duplicate_ids(emu, tmp_path):
    inp = tmp_path / "dups.jsonl"
    inp.write_text(
        '{"id": 1, "text": "one"}\n{"id": "1", "text": "string one"}\n{"id": 1, "text": "again"}\n'
        '{"id": 2, "text": "two"}\n{"id": 2, "text": "two again"}\n'
    )
    out = tmp_path / "o.jsonl"
    p = run_against(emu, inp, tmp_path, "--skip-invalid", "--yes", "--poll-interval", "0.2", out=out)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(out)] == [1, "1", 2]  # 1 and "1" are different ids
    rejected = read_jsonl(tmp_path / "st" / "dups" / "dups.rejected.jsonl")
    assert [(r["where"], r["record"]["text"]) for r in rejected] == [("line 3", "again"), ("line 5", "two again")]
    assert all("duplicate id" in r["reason"] for r in rejected)


def test_gs_input_without_credentials_exits_3_naming_the_fix(tmp_path):
    """gs:// input with no Application Default Credentials (and no storage emulator): exit 3 and the fix, not a
    traceback (the input is listed before any Vertex call, which maps the same error itself). google-auth's
    metadata-server probe is off (NO_GCE_CHECK, which google-auth reads as the exact string "true") and pointed at a
    closed loopback port (never the real 169.254.169.254); HOME and
    CLOUDSDK_CONFIG point at an empty folder (no gcloud credentials file)."""
    import socket

    from conftest import cli_env, zygote

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in cli_env().items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env |= {"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "GCE_METADATA_HOST": closed}
    env |= {"GCE_METADATA_IP": closed, "NO_GCE_CHECK": "true"}
    vertex = ["--backend", "vertex", "--project", "p", "--location", "us-central1", "--bucket", "gs://b/x"]
    p = zygote().spawn(["run", "gs://b/in/", *vertex, "--yes", "--mode", "batch"], tmp_path, env)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert "Application Default Credentials" in err and "gcloud auth application-default login" in err
    assert "Traceback" not in err


# -- --out is checked before anything is sent ----------------------------------------------------------------
@pytest.mark.parametrize(
    "out, message",
    [
        ("articles.jsonl", "is the input file"),  # the results would overwrite the input
        ("articles.jsonl/x.jsonl", "is a file, so no folder can be made under it"),
        ("newdir/", "is a folder, not a file"),
        ("/proc/nope/x.jsonl", "no file can be written in /proc"),
    ],
)
def test_an_out_that_cannot_be_written_exits_2_before_anything_is_sent(emu, articles, tmp_path, out, message):
    before = articles.read_bytes()
    p = run_cli(["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", "--yes", "--out", out], tmp_path)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "--out" in p.stderr
    s = emu.stats()
    assert s["uploads"] == 0 and s["creates"] == 0 and s["generate_calls"] == 0
    assert articles.read_bytes() == before


def test_the_same_run_with_another_out_writes_there_and_results_print_when_out_is_gone(emu, articles, tmp_path):
    args = ["run", str(articles), "--endpoint", emu.url, "--state-dir", "st", "--yes", "--poll-interval", "0.1"]
    assert run_cli([*args, "--out", "first.jsonl"], tmp_path).returncode == 0
    again = run_cli([*args, "--out", "second.jsonl"], tmp_path)  # done: merged again, where it is asked for
    assert again.returncode == 0, again.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "second.jsonl")] == [r["id"] for r in read_jsonl(tmp_path / "first.jsonl")]
    assert emu.stats()["creates"] + emu.stats()["generate_calls"] > 0
    (tmp_path / "second.jsonl").unlink()
    (tmp_path / "blocker").write_text("a file where a folder was meant to be")
    run = json.loads((tmp_path / "st" / "articles" / "run.json").read_text())
    run["out"] = str(tmp_path / "blocker" / "second.jsonl")  # as if the folder became unusable after the run
    (tmp_path / "st" / "articles" / "run.json").write_text(json.dumps(run))
    shown = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "from its sidecars" in shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)


def test_a_compressed_input_is_named_as_such(emu, articles, tmp_path):
    import gzip

    packed = tmp_path / "articles.jsonl.gz"
    packed.write_bytes(gzip.compress(articles.read_bytes()))
    p = run_cli(["run", str(packed), "--endpoint", emu.url, "--state-dir", "st", "--yes"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert "gzip-compressed file, not JSONL" in p.stderr and "gunzip -k" in p.stderr
    assert emu.stats()["count_tokens_calls"] == 0


def test_results_of_an_unfinished_run_say_it_is_unfinished(emu, articles, tmp_path):
    assert run_against(emu, articles, tmp_path, "--dry-run").returncode == 0
    p = run_cli(["results", "articles", "--state-dir", "st"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "is prepared, not finished" in p.stderr and "batchify resume articles" in p.stderr
    assert all(json.loads(line)["error"] == "no result (run not finished)" for line in p.stdout.splitlines())


def test_a_json_array_input_names_the_item_not_a_line(emu, tmp_path):
    inp = tmp_path / "docs.json"
    inp.write_text('[\n {"id": 1, "text": "a"},\n {"id": 2},\n {"id": 3, "text": "c"}\n]\n')
    p = run_cli(["run", str(inp), "--endpoint", emu.url, "--state-dir", "st", "--yes"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert f"{inp}, item 2: no 'text' field" in p.stderr  # item 2 is on line 3: a line number would mislead


def test_text_field_fills_the_text_placeholder(emu, tmp_path):
    """--text-field names the field {text} is filled from: records with only that field are accepted (every one
    was refused: "the prompt template uses {text} but the record has no 'text' field"), and a record that also
    has a 'text' field sends the named field's text (it sent 'text' instead, silently)."""
    (tmp_path / "docs.jsonl").write_text(
        '{"doc_id": "a", "body": "the body of a"}\n{"doc_id": "b", "body": "the body of b", "text": "NOT THIS"}\n'
    )
    args = ["--yes", "--poll-interval", "0.2", "--id-field", "doc_id", "--text-field", "body", "--mode", "batch"]
    p = run_against(emu, "docs.jsonl", tmp_path, *args)
    assert p.returncode == 0, p.stderr
    sent = b"".join(f.read_bytes() for f in (tmp_path / "st" / "docs" / "requests").glob("*"))
    assert b"the body of a" in sent and b"the body of b" in sent and b"NOT THIS" not in sent
    assert [(r["id"], r["status"]) for r in read_jsonl(tmp_path / "docs.results.jsonl")] == [("a", "ok"), ("b", "ok")]
