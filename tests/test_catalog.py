"""The model catalog and the pure rules built on it: model resolution, thinking, generation config, cost, retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import given
from hypothesis import strategies as st

import batchify as b

CAT = b.builtin_catalog()
TODAY = CAT.as_of


def spec(name: str, today: str = TODAY) -> b.ModelSpec:
    return b.resolve_model(CAT, name, today)


# -- the catalog itself -----------------------------------------------------------------------------
def test_every_served_model_has_prices_lifecycle_and_sources():
    for row in b.catalog_rows(CAT, TODAY):
        s = CAT.spec(row["model"], TODAY)
        assert s.input_price > 0 and s.output_price > 0
        assert "lifecycle" in s.sources, row["model"]
        if row["status"] != "retired":
            for figure in ("prices", "limits", "thinking", "batch", "flex", "enqueued_tokens"):
                assert figure in s.sources, (row["model"], figure)
            # every source names a page (a key of [sources]) or says it is not published
            for figure, text in s.sources.items():
                head = text.split(" ")[0]
                assert head in CAT.sources or "not" in text, (row["model"], figure, text)


def test_current_models_are_known_and_old_ones_retired():
    names = set(CAT.models)
    assert {
        "gemini-3-flash-preview",
        "gemini-3.1-pro-preview",
        "gemini-3.5-flash",
        "gemini-3.5-flash-lite",
        "gemini-3.8-flash",
    } <= names
    for old in ("gemini-2.0-flash", "gemini-2.0-flash-lite", "gemini-3-pro-preview"):
        with pytest.raises(b.UsageError, match="shut down"):
            spec(old)


def test_default_model_is_the_cheapest_current_flash_with_batch_and_published_limits():
    assert b.default_model(CAT) == b.DEFAULT_MODEL
    s = spec(b.DEFAULT_MODEL)
    assert s.status in ("stable", "preview") and s.batch and 1 in s.enqueued_tokens and s.klass == "flash"
    assert b.JobConfig().model == b.DEFAULT_MODEL


def test_readme_models_section_is_generated_from_the_catalog():
    readme = (ROOT / "README.md").read_text()
    assert b.models_markdown(CAT, CAT.as_of) in readme, "README's model table is stale: python batchify.py models --markdown"


# -- resolution: no silent defaults ------------------------------------------------------------------
def test_unknown_model_says_what_to_give():
    with pytest.raises(b.UsageError) as e:
        spec("gemini-9-ultra")
    assert '[models."gemini-9-ultra"]' in str(e.value) and "input_price" in str(e.value) and e.value.exit_code == 2


def test_retired_model_names_its_replacement():
    with pytest.raises(b.UsageError, match=r"gemini-3\.1-pro-preview") as e:
        spec("gemini-3-pro-preview")
    assert e.value.exit_code == 2
    # a shutdown date in the past retires a model that the catalog still calls stable
    with pytest.raises(b.UsageError, match=r"gemini-3\.5-flash-lite"):
        spec("gemini-3.1-flash-lite", "2027-05-07")
    assert spec("gemini-3.1-flash-lite", "2027-05-06").name == "gemini-3.1-flash-lite"


def test_deprecated_model_resolves_with_a_warning():
    s = spec("gemini-2.5-pro")
    w = b.lifecycle_warning(s, TODAY)
    assert w and "deprecated" in w and "gemini-3.8-flash" in w
    assert b.lifecycle_warning(spec("gemini-3-flash-preview"), TODAY) is None


def test_a_model_past_its_reported_shutdown_is_priced_at_the_higher_of_it_and_its_routing_target():
    cat = CAT.merged({"gemini-2.5-flash": {"routed_to": "gemini-3.8-flash"}}, "test")  # a dearer target
    before = b.resolve_model(cat, "gemini-2.5-flash", "2026-11-30")
    after = b.resolve_model(cat, "gemini-2.5-flash", "2026-12-01")
    assert (before.input_price, before.output_price) == (0.30, 2.50)
    assert (after.input_price, after.output_price) == (0.75, 3.75) and "gemini-3.8-flash" in (after.price_note or "")
    pro = spec("gemini-2.5-pro", "2026-12-01")  # its own prices are the higher ones
    assert (pro.input_price, pro.output_price) == (1.25, 10.00)


def test_models_google_retired_since_the_last_catalog_resolve_with_their_routing_named():
    """Google's changelog of 2026-10-08: 3.7 Flash routed to 3.8 Flash, 3.5 Flash to 3.6 Flash; the 2.5 Flash
    routing target read on the deprecations page is 3.5 Flash-Lite (same prices), 2.5 Pro's is 3.8 Flash."""
    for name, target in (
        ("gemini-3.7-flash", "gemini-3.8-flash"),
        ("gemini-3.5-flash", "gemini-3.6-flash"),
        ("gemini-2.5-flash", "gemini-3.5-flash-lite"),
        ("gemini-2.5-pro", "gemini-3.8-flash"),
    ):
        s = spec(name)
        w = b.lifecycle_warning(s, TODAY) or ""
        assert s.status == "deprecated" and s.routed_to == target and target in w and "shut down" in w, (name, w)
        assert target in (s.price_note or ""), name
    assert (spec("gemini-2.5-flash").input_price, spec("gemini-2.5-flash").output_price) == (0.30, 2.50)


def test_gemini_4_argon_is_priced_by_date_and_thinks_by_level():
    assert (spec("gemini-4-argon", "2026-11-30").input_price, spec("gemini-4-argon", "2026-11-30").output_price) == (2.0, 10.0)
    s = spec("gemini-4-argon", "2026-12-01")
    assert (s.input_price, s.output_price) == (4.0, 20.0)
    assert s.thinking == "level" and s.thinking_default == "medium" and "minimal" not in s.thinking_levels
    assert not s.flex and s.batch is None  # neither confirmed on a Gemini API page: batch allowed, Flex not planned


def test_the_gemini_4_models_of_november_have_their_prices_limits_and_levels():
    """Carbon (GA 2026-11-10), Hydrogen (2026-11-12), Neon (GA 2026-11-18): levels and limits from Google's Vertex
    pages, prices from third parties only (no Gemini API pricing copy names them); batch and Flex not confirmed."""
    carbon_nov, carbon = spec("gemini-4-carbon", "2026-11-30"), spec("gemini-4-carbon", "2026-12-01")
    assert (carbon_nov.input_price, carbon_nov.output_price, carbon.input_price, carbon.output_price) == (2.0, 10.0, 4.0, 20.0)
    assert carbon.cached_input_price is None and carbon.thinking_levels == ("low", "medium", "high")
    assert carbon.thinking_default == "medium" and carbon.output_token_limit == 32_768  # non-streaming: one request's most
    hydrogen, neon = spec("gemini-4-hydrogen"), spec("gemini-4-neon")
    assert (hydrogen.input_price, hydrogen.output_price, hydrogen.cached_input_price) == (1.50, 7.50, 0.075)
    assert (neon.input_price, neon.output_price, neon.cached_input_price) == (3.0, 15.0, 0.15)
    for s in (hydrogen, neon):
        assert s.thinking_levels == ("low", "medium", "high", "xhigh") and s.thinking_default == "high"
        assert (s.input_token_limit, s.output_token_limit) == (1_048_576, 65_536)
    assert "45-day" in (hydrogen.note or "") and "Paid tier only" in (neon.note or "")
    for s in (carbon, hydrogen, neon):
        assert s.batch is None and not s.flex and not s.enqueued_tokens and s.status == "stable"
        assert "nov_3p" in s.sources["prices"]  # honest: third parties only
    assert {"gemini-4-hydrogen", "gemini-4-carbon"} <= set(b.VERTEX_BATCH_MODELS)
    assert "gemini-4-neon" not in b.VERTEX_BATCH_MODELS  # not on Google's (cut) Vertex list


def test_gemini_4_argon_is_planned_within_what_one_non_streaming_request_returns():
    """The 1M is input and output together, reached only by continuing an answer; one non-streaming request (a batch
    line) returns at most 32,768 output tokens: maxOutputTokens never asks for more, however long the answers."""
    s = spec("gemini-4-argon")
    assert (s.input_token_limit, s.output_token_limit) == (1_048_576, 32_768)
    assert b.default_max_output(s, "high", 50_000) == 32_768
    gc = b.generation_config(b.JobConfig(model="gemini-4-argon", expected_output_tokens=20_000), s)
    assert gc["maxOutputTokens"] == 32_768


def test_thinking_levels_are_checked_as_the_catalog_is_read(tmp_path: Path):
    f = tmp_path / "models.toml"
    ok = '[models."m"]\ninput_price = 1.0\noutput_price = 1.0\nthinking = "level"\nthinking_levels = {levels}\n'
    f.write_text(ok.format(levels='["LOW", "xhigh"]'))
    assert b.resolve_model(b.load_catalog(f), "m", TODAY).thinking_levels == ("low", "xhigh")
    for bad in ('["low", "extreme"]', '["high", "low"]', '["low", "low"]', '"high"'):
        f.write_text(ok.format(levels=bad))
        with pytest.raises(b.ConfigError, match="thinking_levels"):
            b.load_catalog(f)
    for level in b.THINKING_LEVELS:  # every level a model may take has batchify's allowances and the emulator's
        assert level in b.THINKING_ROOM and level in b.THINKING_EXPECTED and level in b.EMULATED_THOUGHTS


def test_dated_price_changes_apply_on_their_day():
    assert spec("gemini-3.8-flash", "2026-12-31").input_price == 0.75
    later = spec("gemini-3.8-flash", "2027-01-01")
    assert (later.input_price, later.output_price, later.cached_input_price) == (1.50, 7.50, 0.15)
    assert "2027-01-01" in (spec("gemini-3.8-flash", "2026-12-31").price_note or "")


def test_unpublished_enqueued_limit_needs_the_users_figure():
    s = spec("gemini-3.8-flash")
    with pytest.raises(b.UsageError, match="--enqueued-limit"):
        b.enqueued_limit_for(s, 1, None)
    assert b.enqueued_limit_for(s, 1, 7_000_000) == 7_000_000
    assert b.enqueued_limit_for(spec("gemini-3.1-pro-preview"), 1, None) == 5_000_000
    assert b.enqueued_limit_for(spec("gemini-2.5-flash"), 2, None) == 400_000_000


def test_models_file_overrides_and_adds(tmp_path: Path):
    f = tmp_path / "models.toml"
    f.write_text(
        '[models."my-tuned"]\ninput_price = 1.0\noutput_price = 2.0\nenqueued_tokens = { tier1 = 123 }\n'
        '[models."gemini-3.8-flash"]\nenqueued_tokens = { tier1 = 4000000 }\n'
    )
    cat = b.load_catalog(f)
    assert b.enqueued_limit_for(b.resolve_model(cat, "gemini-3.8-flash", TODAY), 1, None) == 4_000_000
    mine = b.resolve_model(cat, "my-tuned", TODAY)
    assert (mine.input_price, mine.thinking, b.thinking_choice(mine, None)) == (1.0, "none", None)
    f.write_text('[models."x"]\ninput_price = 1.0\n')
    with pytest.raises(b.ConfigError, match=r"models.toml.*output_price"):
        b.load_catalog(f)
    f.write_text('[models."x"]\ninput_price = 1.0\noutput_price = 1.0\nprize = 3\n')
    with pytest.raises(b.ConfigError, match=r"unknown key.*prize"):
        b.load_catalog(f)


# -- thinking and the generation config ------------------------------------------------------------
@pytest.mark.parametrize(
    "model, given, sent",
    [
        ("gemini-3-flash-preview", None, "minimal"),
        ("gemini-3.1-pro-preview", None, "low"),  # thinking cannot be off on Pro: its lowest level
        ("gemini-3.8-flash", None, "low"),  # minimal is refused by 3.8 Flash
        ("gemini-3-flash-preview", "high", "high"),
        ("gemini-2.5-pro", None, 128),  # budget 0 is refused by 2.5 Pro: its lowest budget
        ("gemini-2.5-flash", None, 0),
        ("gemini-2.5-flash", -1, -1),
        ("gemini-2.5-flash-lite", 600, 600),
        ("gemini-3.1-flash-lite", None, "minimal"),  # its default level is not published: batchify's own, the lowest
        ("gemini-3.1-flash-lite", "high", "high"),
        ("gemini-4-hydrogen", None, "low"),
        ("gemini-4-hydrogen", "xhigh", "xhigh"),
        ("gemini-4-neon", "xhigh", "xhigh"),
        ("gemini-4-carbon", None, "low"),
    ],
)
def test_thinking_choice(model, given, sent):
    assert b.thinking_choice(spec(model), given) == sent


@pytest.mark.parametrize(
    "model, given",
    [
        ("gemini-2.5-pro", 0),
        ("gemini-2.5-pro", 40_000),
        ("gemini-2.5-pro", "low"),
        ("gemini-3-flash-preview", 1024),
        ("gemini-3.8-flash", "minimal"),
        ("gemini-3.1-pro-preview", "extreme"),
        ("gemini-2.5-flash-lite", 100),
        ("gemini-3.1-flash-lite", 512),  # levels only: no page allows it a budget
        ("gemini-4-carbon", "xhigh"),  # Argon and Carbon top out at high
        ("gemini-4-argon", "xhigh"),
        ("gemini-4-neon", "minimal"),
    ],
)
def test_thinking_refused_names_what_is_allowed(model, given):
    with pytest.raises(b.ConfigError, match="not allowed") as e:
        b.thinking_choice(spec(model), given)
    assert e.value.exit_code == 2 and ("use a" in str(e.value) or "leave --thinking out" in str(e.value))


def test_generation_config_per_model():
    cfg = b.JobConfig()
    g3 = b.generation_config(cfg, spec("gemini-3-flash-preview"))
    assert g3["thinkingConfig"] == {"thinkingLevel": "MINIMAL"} and g3["temperature"] == 1.0
    assert g3["maxOutputTokens"] >= b.THINKING_ROOM["minimal"] + 1024
    pro = b.generation_config(b.JobConfig(model="gemini-2.5-pro"), spec("gemini-2.5-pro"))
    assert pro["thinkingConfig"] == {"thinkingBudget": 128} and "temperature" not in pro
    assert pro["maxOutputTokens"] >= 128 + 1024
    high = b.generation_config(b.JobConfig(thinking="high"), spec("gemini-3-flash-preview"))
    assert high["maxOutputTokens"] == b.THINKING_ROOM["high"] + 1024
    given = b.generation_config(b.JobConfig(max_output_tokens=300, temperature=0.2), spec("gemini-3-flash-preview"))
    assert given["maxOutputTokens"] == 300 and given["temperature"] == 0.2
    lite = b.generation_config(b.JobConfig(), spec("gemini-3.1-flash-lite"))
    assert lite["thinkingConfig"] == {"thinkingLevel": "MINIMAL"} and "temperature" not in lite
    assert lite["maxOutputTokens"] == b.THINKING_ROOM["minimal"] + 1024
    xhigh = b.generation_config(b.JobConfig(model="gemini-4-hydrogen", thinking="xhigh"), spec("gemini-4-hydrogen"))
    assert xhigh["thinkingConfig"] == {"thinkingLevel": "XHIGH"} and xhigh["maxOutputTokens"] == b.THINKING_ROOM["xhigh"] + 1024


@given(
    model=st.sampled_from([r["model"] for r in b.catalog_rows(CAT, TODAY) if r["status"] != "retired"]),
    expected=st.integers(0, 20_000),
)
def test_default_max_output_leaves_room_and_respects_the_model(model, expected):
    s = spec(model)
    choice = b.thinking_choice(s, None)
    m = b.default_max_output(s, choice, expected)
    assert m is not None and m <= (s.output_token_limit or 10**9)
    if s.output_token_limit is None or b.thinking_room(choice) + max(1024, 4 * expected) <= s.output_token_limit:
        assert m >= b.thinking_room(choice) + expected


def test_config_file_thinking_budget_is_the_old_name(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('model = "gemini-2.5-flash"\nthinking_budget = 512\n')
    assert b.load_config(f).thinking == 512
    f.write_text('thinking = "low"\n[models."gemini-3-flash-preview"]\nenqueued_tokens = { tier1 = 9 }\n')
    cfg = b.load_config(f)
    assert cfg.thinking == "low" and cfg.models == {"gemini-3-flash-preview": {"enqueued_tokens": {"tier1": 9}}}
    f.write_text("accept_truncated = true\n")
    with pytest.raises(b.ConfigError, match="schema-less"):
        b.load_config(f)


# -- cost: one function for estimates and actuals ----------------------------------------------------
M = 1_000_000


@pytest.mark.parametrize(
    "model, usage, service, usd",
    [
        ("gemini-3-flash-preview", {"promptTokenCount": M, "candidatesTokenCount": M}, "standard", 0.50 + 3.00),
        ("gemini-3-flash-preview", {"promptTokenCount": M, "candidatesTokenCount": M}, "batch", (0.50 + 3.00) / 2),
        ("gemini-3-flash-preview", {"promptTokenCount": M, "candidatesTokenCount": M}, "flex", (0.50 + 3.00) / 2),
        # thinking is billed as output
        ("gemini-3-flash-preview", {"promptTokenCount": 0, "thoughtsTokenCount": M}, "batch", 1.50),
        # cached tokens (part of the prompt) at the standard cache price, in batch too
        ("gemini-3-flash-preview", {"promptTokenCount": M, "cachedContentTokenCount": M // 2}, "batch", 0.5 * 0.25 + 0.5 * 0.05),
        # ... unless the model's Batch table lists its own cache price (3.5 Flash: $0.075)
        ("gemini-3.5-flash", {"promptTokenCount": M, "cachedContentTokenCount": M}, "batch", 0.075),
        # the long-context tier: only the usage of requests above 200k tokens
        ("gemini-2.5-pro", {"promptTokenCount": M, "long.promptTokenCount": M}, "standard", 2.50),
        (
            "gemini-2.5-pro",
            {
                "promptTokenCount": 3 * M,
                "cachedContentTokenCount": M,
                "long.promptTokenCount": 3 * M,
                "long.cachedContentTokenCount": M,
            },
            "batch",
            2 * 1.25 + 0.25,
        ),
        (
            "gemini-2.5-pro",
            {"promptTokenCount": 2 * M, "long.promptTokenCount": M, "candidatesTokenCount": M, "long.candidatesTokenCount": M},
            "batch",
            (1.25 + 2.50 + 15.0) / 2,
        ),
        # Gemini 4: Carbon at its December prices, Hydrogen's cache price in batch
        ("gemini-4-carbon", {"promptTokenCount": M, "candidatesTokenCount": M}, "batch", (4.0 + 20.0) / 2),
        ("gemini-4-hydrogen", {"promptTokenCount": M, "cachedContentTokenCount": M}, "batch", 0.075),
        # a cache price Google does not publish: cached tokens billed as input (an upper bound)
        ("gemini-3.5-flash-lite", {"promptTokenCount": M, "cachedContentTokenCount": M}, "batch", 0.15),
    ],
)
def test_cost_table(model, usage, service, usd):
    assert b.cost_usd(spec(model), usage, service) == pytest.approx(usd)


def test_request_cost_puts_long_requests_in_the_long_tier():
    pro = spec("gemini-2.5-pro")
    assert b.request_cost(pro, {"promptTokenCount": 250_000}, "standard") == pytest.approx(0.25 * 2.50)
    assert b.request_cost(pro, {"promptTokenCount": 150_000}, "standard") == pytest.approx(0.15 * 1.25)
    total: dict[str, int] = {}
    b.add_usages(total, [{"promptTokenCount": 250_000}, {"promptTokenCount": 150_000}], pro.long_context_threshold)
    assert b.cost_usd(pro, total, "standard") == pytest.approx(0.25 * 2.50 + 0.15 * 1.25)


def test_estimate_counts_long_context_documents_at_the_long_prices():
    pro = spec("gemini-2.5-pro")
    short = b.cost_usd(pro, b.expected_usage(b.JobConfig(), pro, 3_000_000, 10), "batch")
    long = b.cost_usd(pro, b.expected_usage(b.JobConfig(), pro, 3_000_000, 10, (10, 3_000_000)), "batch")
    assert long > 1.9 * short


def test_estimate_counts_assumed_thinking():
    plan_usage = b.expected_usage(b.JobConfig(thinking="high"), spec("gemini-3-flash-preview"), 1000, 10)
    assert plan_usage["thoughtsTokenCount"] == 10 * b.THINKING_EXPECTED["high"]
    assert b.expected_usage(b.JobConfig(), spec("gemini-2.5-flash"), 1000, 10)["thoughtsTokenCount"] == 0
    assert (
        b.expected_usage(b.JobConfig(expected_thinking_tokens=7), spec("gemini-2.5-flash"), 1000, 10)["thoughtsTokenCount"] == 70
    )


# -- answers: truncated and blocked ones are errors ------------------------------------------------
def _resp(text: str, finish: str) -> dict:
    return {"candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": finish}]}


def test_max_tokens_is_an_error_unless_accepted_schema_less():
    assert b.parse_answer(_resp("cut off", "MAX_TOKENS"), None)[1].startswith("answer truncated")
    assert b.parse_answer(_resp("cut off", "MAX_TOKENS"), None, accept_truncated=True) == ("cut off", None)
    assert b.parse_answer(_resp('{"a": 1}', "MAX_TOKENS"), {"type": "object"}, accept_truncated=True)[1]
    assert "thinking used up" in b.parse_answer(_resp("", "MAX_TOKENS"), None)[1]
    assert "SAFETY" in b.parse_answer(_resp("x", "SAFETY"), None)[1]
    assert "blockReason=SAFETY" in b.parse_answer({"promptFeedback": {"blockReason": "SAFETY"}}, None)[1]


# -- one retry policy ------------------------------------------------------------------------------------
P = b.RetryPolicy(attempts=4, base=1.0, cap=8.0, deadline=100.0)


@pytest.mark.parametrize(
    "code, message, attempt, server, elapsed, expect",
    [
        (503, "overloaded", 1, None, 0, (0.5, 1.5)),
        (503, "overloaded", 3, None, 0, (2.0, 6.0)),
        (503, "overloaded", 4, None, 0, None),  # attempts spent
        (429, "quota", 1, 57.238747106, 0, (57.238747106, 57.238747106)),  # RetryInfo honoured as given
        (429, "quota", 1, 57.0, 60.0, None),  # ... unless it passes the deadline
        (0, "network error", 2, None, 0, (1.0, 3.0)),
        (400, "Unsupported MIME type: jsonl", 1, None, 0, (0.5, 1.5)),  # reported intermittent: retried
        (400, "Invalid JSON payload", 1, None, 0, None),  # permanent
        (404, "not found", 1, None, 0, None),
        (403, "denied", 1, None, 0, None),
    ],
)
def test_retry_delay_table(code, message, attempt, server, elapsed, expect):
    for jitter in (0.0, 0.5, 0.999):
        d = b.retry_delay(b.RemoteError(message, code=code, retry_delay=server), attempt, P, elapsed, jitter)
        if expect is None:
            assert d is None
        else:
            assert d is not None and expect[0] <= d <= expect[1]


def test_retry_delay_policy_extras_and_fatal_errors():
    dl = b.DOWNLOAD_POLICY
    assert b.retry_delay(b.RemoteError("gone", code=404), 1, dl, 0, 0.5) is not None
    assert b.retry_delay(b.RemoteError("gone", code=404), dl.attempts, dl, 0, 0.5) is None
    assert b.retry_delay(b.AuthError("bad key", code=400), 1, P, 0, 0.5) is None
    assert b.retry_delay(b.BatchRefusedError("no batch", code=403), 1, P, 0, 0.5) is None
    assert b.retry_delay(b.RemoteError("busy", code=503), 1, b.ONCE, 0, 0.5) is None


@given(
    code=st.sampled_from(sorted(b.TRANSIENT_CODES)),
    attempt=st.integers(1, 30),
    elapsed=st.floats(0, 2_000),
    jitter=st.floats(0, 0.999),
    attempts=st.integers(1, 10),
)
def test_retry_delay_properties(code, attempt, elapsed, jitter, attempts):
    pol = b.RetryPolicy(attempts=attempts, base=1.0, cap=30.0, deadline=600.0)
    d = b.retry_delay(b.RemoteError("x", code=code), attempt, pol, elapsed, jitter)
    if attempt >= attempts or elapsed > pol.deadline:
        assert d is None
    if d is not None:
        assert 0 < d <= pol.cap * 1.5 and elapsed + d <= pol.deadline
        # every call ends: the delays of all attempts sum to less than the deadline
    total = sum(x for a in range(1, 50) if (x := b.retry_delay(b.RemoteError("x", code=code), a, pol, 0, jitter)) is not None)
    assert total <= pol.cap * 1.5 * attempts
