"""batchify: run large LLM jobs through the Gemini Batch API at half price, without losing a result.

batchify reads a JSONL (or JSON array) file of documents, turns each into a Gemini request, plans
the batches into waves that keep the tokens enqueued per model under the account's limit, uploads,
creates and polls the batch jobs, downloads and parses every result, and writes one merged results
file in input order. Every step is recorded first in JSON sidecars, so Ctrl-C, a crash or a reboot
loses nothing: ``resume`` finishes the run without creating any job twice. A rate-limited real-time
path finishes what batch cannot (403/404 on create, failed or expired jobs, per-line errors), through Flex
(Google's sheddable tier at the batch price) where the model offers it; `--mode hybrid` runs batch from the head
of the queue and Flex lanes from its tail at once. `--backend vertex` runs the same jobs as Vertex AI batch
prediction over Cloud Storage (gs:// input, request files and results in a bucket).

Quick example::

    python batchify.py run examples/articles.jsonl --waves auto --endpoint local --yes
    python batchify.py status
    python batchify.py resume articles

As a library::

    import asyncio, batchify
    summary = asyncio.run(batchify.run_file("articles.jsonl", endpoint="local"))

Contents (sections are marked with banner comments, in the order data flows)
  1. Config and constants ....... the model catalog (TOML: prices, limits, thinking, lifecycle, sources) and
                                  its rules (resolve_model, thinking_choice, realtime_limits), JobConfig, RunOptions,
                                  Vertex AI's own figures (VERTEX_LIMITS, VERTEX_SOURCES)
  2. Errors ..................... BatchifyError and its exit codes
  3. Data model, state machine .. Hook points, JobState, TRANSITIONS, advance(), Job, the typed Plan, Run,
                                  schema_version and MIGRATIONS
  4. Pure planners .............. record validation, prompts, generation config, tokens, batches, waves, cost,
                                  admission, polling and retry decisions; a job's results put in order
                                  (ExternalSorter: bounded sorted runs, merged); the Vertex backend's rules
  5. Persistence ................ one atomic writer, RunStore and its sidecars, run lock, input reading (local
                                  files and gs:// objects, streamed), results sidecars (local, or GsResults in
                                  the bucket)
  6. Gemini seam ................ Backend protocol, RetryPolicy/retry_delay, GeminiClient (the only code that
                                  imports google.genai), VertexClient (Vertex AI batch prediction + Cloud
                                  Storage), request files (LocalRequests, or GsRequests in the bucket),
                                  RateLimiter (GCRA, with a window ledger), Gate
  7. Prepare .................... calibration, URL fetching (PageFetcher), the streaming pass (RecordChecker,
                                  PassWriter, BatchCutter) that writes request files, the plan; the same pass
                                  again to rebuild a damaged request file or ids.jsonl (rebuild_prepared_files)
  8. Run loop ................... GracefulStop; Engine: repair, upload, admit, create, poll, retrieve, Flex lanes,
                                  hybrid, merge; RequestSender (Flex / standard lanes); cancel_run, cleanup_run
  9. Queries .................... merged results, analytics, run status (no remote calls)
 10. Library API ................ open_client, prepare, submit, run_file, resume, cancel, cleanup (async and
                                  *_sync)
 11. Rendering .................. rich tables: reports on stdout, progress and logs on stderr
 12. REST API ................... RestApi (handlers) and make_api (FastAPI, optional extra "api")
 13. CLI ........................ click commands: run, status, resume, list, results, cancel, models, serve, ...
 14. main() ..................... the one place errors become exit codes
 15. Emulator ................... a local Gemini API server (Developer API and Vertex batch routes) with fault
                                  injection (aiohttp.web); last, because nothing above depends on it: it is
                                  here so tests and `--endpoint local` need nothing but this file
"""

from __future__ import annotations

import array
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import errno
import functools
import glob
import hashlib
import heapq
import inspect
import io
import ipaddress
import itertools
import math
import operator
import os
import random
import re
import secrets
import shlex
import signal
import stat
import statistics
import string
import sys
import tempfile
import threading
import time
import tomllib
import types
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path, PosixPath
from typing import Any, ParamSpec, Protocol, TypedDict, TypeVar, cast

import click
import orjson

__version__ = "0.1.0"
P = ParamSpec("P")
T = TypeVar("T")

# ================================================================================================
# 1. Config and constants
# ================================================================================================

SCHEMA_VERSION = 2
DEFAULT_MODEL = "gemini-3-flash-preview"  # default_model(builtin_catalog()), checked by a test
DEFAULT_STATE_DIR = "batch_jobs"
DEFAULT_BATCH_SIZE = 1_000
MAX_FILE_BYTES = 2 * 1024**3  # the Batch API's limit on one input file
# Share of the enqueued-token limit kept free, against the estimate's error. A create above the real
# limit only costs a 429 and a wait for the next job to finish, so the margin need not be wide.
DEFAULT_MARGIN = 0.10  # with the offline 4 chars/token guess (and the most a calibration can ask for)
# Once countTokens measured chars/token on documents from across the file, the margin is three standard
# errors of that measurement (see estimate_margin), never below MARGIN_FLOOR; CALIBRATED_MARGIN when
# too few documents were counted to see their spread.
CALIBRATED_MARGIN = 0.03
MARGIN_FLOOR = 0.01  # kept free however exact the estimate looks: per-request rounding, a spurious count
CHARS_PER_TOKEN_OFFLINE = 4.0  # documented fallback when countTokens cannot be called
CALIBRATION_SAMPLES = 64  # documents, spread over the input file ...
CALIBRATION_CALLS = 8  # ... counted in this many countTokens calls
DEFAULT_POLL_INTERVAL = 30.0
MAX_POLL_INTERVAL = 300.0
DEFAULT_MAX_ACTIVE_JOBS = 100  # the Batch API's concurrent-job limit
DEFAULT_RPM = 2_000  # real time where Google publishes no RPM for the model (lowered by any 429)
DEFAULT_MAX_ATTEMPTS = 3
SPLIT_AFTER_REFUSALS = 4  # creates of one job refused (429) with nothing of the run enqueued before it is split
DEFAULT_CREATE_TIMEOUT = 1_800.0  # seconds of creates refused with 429 while nothing of the run is enqueued
# A create answered with a timeout or a 5xx may still take effect at the service after the answer (the front end
# gave up, the back end went on), and batches.list may lag a create by seconds: creating again at once pays for the
# batch twice. So after such an answer the job stays SUBMITTING and is looked for by display name for this long
# (first look at once, then CREATE_LOOK_FIRST_S, doubling) before the create counts as not done and is sent
# again. The lags seen are seconds; 90 s is well past them and costs one batch nothing next to its hours of queue.
# The window outlives the process: the send time is in the sidecar (Job.create_sent_at), so a resume inside it waits
# out the rest (resumed_create_since). Both figures are multiplied by --retry-scale, as every retry delay is.
CREATE_SETTLE_S = 90.0
CREATE_LOOK_FIRST_S = 2.0
POLL_REFUSALS = 3  # 404s to a job's get in a row before it counts as gone; other refusals in a row stop the run
POLL_SILENCE_S = 3_600.0  # a job's polls failing (network, 5xx, 429) for this long in a row stop the run, resumably:
# no failure waits forever. The job is kept: it goes on at the service. Scaled by --retry-scale like every retry delay
FLEX_TIMEOUT_S = 1_200.0  # Flex's latency target is 1-15 min; Google advises client timeouts of 10 min or more
REQUEST_TIMEOUT_S = 120.0  # every other API call (standard-tier generateContent among them)
SHORT_OUTPUT_ROUNDS = 3  # downloads of an output with fewer lines than batchStats counts before it is taken as it is
OUTPUT_PATIENCE_S = 3_600.0  # how long a SUCCEEDED job's output may be refused (403/404) before it counts as gone (the job
# failed and sent again, paid twice, said loudly). Users see SUCCEEDED before the output is readable (tidyverse/ellmer#926);
# no bound is published. Scaled by --retry-scale. Downloads failing on the way (network, 5xx, 429) never count toward it:
# for POLL_SILENCE_S they stop the run instead, resumably, the job kept (its output is intact at the service)
RETENTION_LOOK_REFUSALS = 3  # the service's endTime is consulted at this refusal of a streak, not the first: a wall clock
# days ahead must not make the SUCCEEDED-before-readable 403 (OUTPUT_PATIENCE_S's case) count as gone at once
OUTPUT_RETENTION_S = 48 * 3_600.0  # the Files API keeps a file 48 hours ("Files are stored for 48 hours": the document
# processing page's note, read 2026-12-02 through discuss.ai.google.dev/t/50428). Google does not say that a batch's
# output file follows it: taken as a hint only, for an output refused (403/404) of a job that ended longer ago than this
UPLOADS_IN_FLIGHT = 4  # 8 were no faster against the emulator (each upload is mostly CPU in the SDK)
CONTEXT_WINDOW = 1_048_576  # input tokens, where neither the catalog nor models.get gives the model's own
INT_FLAG_MAX = 2**62  # whole-number flags: far above any real figure, within what JSON sidecars hold (64 bits)
NL = orjson.OPT_APPEND_NEWLINE  # JSONL lines: one allocation per line, not two

# The model catalog: every model-specific figure batchify uses, with the page it came from and when
# that page said so. Data, not code: `--models FILE`, env BATCHIFY_MODELS and a `[models.NAME]` table in
# a job config override it key by key (a new NAME needs at least input_price and output_price).
# Prices are USD per 1M tokens at the standard (real-time) tier; batch and flex are shares of them
# (batch_discount defaults to 0.5, the batch page's "50% of the standard price"; a model whose Batch table differs
# says so with its own batch_discount).
# A key left out means Google publishes no figure: batchify then asks for one, it never guesses.
# Tiers: enqueued_tokens / rpm / tpm = { tier1 = ..., tier2 = ..., tier3 = ... }.
MODEL_CATALOG_TOML = """
as_of = "2026-12-01"

[sources]
pricing = "https://ai.google.dev/gemini-api/docs/pricing (full page updated 2026-06-02)"
pricing_late = "https://ai.google.dev/gemini-api/docs/pricing (updated 2026-10-01, verbatim third-party quotes read 2026-09-19 to 2026-10-07)"
rate_limits = "https://ai.google.dev/gemini-api/docs/rate-limits (updated 2026-03-03; unchanged 2026-04-29): batch enqueued tokens; real-time RPM/TPM are 'viewed in Google AI Studio', not published"
rate_limits_2025 = "https://ai.google.dev/gemini-api/docs/rate-limits (2025 edition, the last to publish RPM/TPM, quoted on discuss.ai.google.dev)"
flex = "https://ai.google.dev/gemini-api/docs/flex-inference (updated 2026-09-23): 50% of standard, 1-15 min target, shed with 503 ('at capacity') or 429 ('rate limits or resource exhaustion'), counts toward the general rate limits"
deprecations = "https://ai.google.dev/gemini-api/docs/deprecations (copy of mid-September 2026)"
deprecations_3p = "ai.google.dev/gemini-api/docs/deprecations as read by a third party on 2026-11-10 (no stored Google copy has these rows; a second third party, 2026-11-06, reads the same)"
changelog = "https://ai.google.dev/gemini-api/docs/changelog (entry of 2026-10-08, read 2026-12-01): gemini-3.7-flash and gemini-3.5-flash shut down, their requests routed to gemini-3.8-flash and gemini-3.6-flash (the price of routed requests is not stated)"
latest_model = "https://ai.google.dev/gemini-api/docs/generate-content/latest-model (read 2026-12-01): gemini-4-argon, default thinking medium, levels low/medium/high, $2/$10 through 2026-11-30 then $4/$20, 1M input-output limit"
models = "https://ai.google.dev/gemini-api/docs/models/<model> (as stored, read 2026-12-01)"
whats_new = "https://ai.google.dev/gemini-api/docs/whats-new-gemini-3.6 (2026-07-21)"
thinking = "https://ai.google.dev/gemini-api/docs/thinking and the Gemini 3.x developer guides (as stored, read 2026-12-01)"
thinking_3p = "Google's thinking page as quoted by third-party SDK docs (no stored Google copy for this model)"
temperature = "Gemini 3 prompting guide: 'keep the temperature parameter at its default value of 1.0'; changelog 2026-07-21: temperature/top_p/top_k deprecated"
long_decode = "https://ai.google.dev/gemini-api/docs/generate-content/long-decode (de/pl/vi/he copies, undated; read 2026-12-02): Gemini 4 Argon: one hop returns at most 65,536 output tokens, a non-streaming REST request at most 32,768 (the copies' words, translated); an answer stopped there ends with finishReason CONTINUATION and a continuation_token; max_output_tokens above 65,536 turns long decode on"
vertex_gemini4 = "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/start/get-started-with-gemini-4 and .../models/guides/gemini-4-argon (Vertex AI, now Gemini Enterprise Agent Platform; ja/zh-cn/ko copies, undated; read 2026-12-02): a 1,048,576-token limit shared by input and output; one request returns at most 65,536 output tokens, 32,768 for a non-streaming direct HTTP request"
vertex_carbon = "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/gemini/4-carbon and .../models/guides/gemini-4-carbon (Vertex AI model page and developer guide, undated; read 2026-12-02): levels LOW, MEDIUM (default on gemini-4-carbon), HIGH; a 1,048,576-token limit shared by input and output; 'a single foreground segment generates up to 65,536 output tokens when streaming (or 32,768 tokens when non-streaming)'"
vertex_hydrogen = "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/guides/gemini-4-hydrogen (Vertex AI developer guide, de/ja/ko/en copies, undated; read 2026-12-02): 'LOW, MEDIUM, HIGH (default), and XHIGH'; a 1,048,576-token limit shared by input and output; one 65,536-token segment, streaming or non-streaming; a short-term GA release subject to a minimum 45-day deprecation notice; explicit context caching not supported"
vertex_neon = "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/guides/gemini-4-neon (Vertex AI developer guide, en copy on documentation.s3ns.fr, undated; read 2026-12-02): 'LOW, MEDIUM, HIGH (default), and XHIGH'; a 1,048,576-token limit shared by input and output; one 65,536-token segment, streaming or non-streaming"
vertex_3_1_flash_lite = "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/gemini/3-1-flash-lite (Vertex AI model page, zh-cn copy, undated; read 2026-12-02): thinking levels minimal, low, medium, high; output token limit 65,536; the default level is not stated"
enterprise_notes = "https://docs.cloud.google.com/gemini/enterprise/docs/release-notes (entry of 2026-11-18, read 2026-12-02): 'Gemini 4 Neon is generally available (GA)' in the Gemini Enterprise apps and AI developer tools (not a Gemini API page)"
nov_3p = "Third parties only (no Google pricing-page or changelog copy after 2026-10-08 names these models; read 2026-12-02): apidog.com (2026-11-11 Carbon, 2026-11-13 Hydrogen, 2026-11-19 Neon), docs.laozhang.ai announcements (2026-11-11, 2026-11-14, 2026-11-22, quoting Google's prices), LiteLLM discussions #50970 and #51436, TokenMeter v0.17.0 (cached prices), coder/xum v0.32.5 (2026-11-22: Argon and Carbon refuse xhigh, Neon and Carbon refuse minimal)"

[models."gemini-4-neon"]
class = "pro"
status = "stable"
released = "2026-11-18"
note = "Paid tier only (third parties: apidog, 2026-11-19). Google's Gemini API pages in the store do not name it yet: its prices come from third parties."
input_price = 3.00
output_price = 15.00
cached_input_price = 0.15
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["low", "medium", "high", "xhigh"]
thinking_default = "high"
sources = { prices = "nov_3p ($3/$15, no dated change: apidog 2026-11-19, laozhang 2026-11-22; cached $0.15: TokenMeter v0.17.0 only)", limits = "vertex_neon (input and output share 1,048,576; one request, streaming or not, returns at most 65,536)", thinking = "vertex_neon (minimal refused: nov_3p)", lifecycle = "enterprise_notes (GA 2026-11-18)", batch = "not confirmed on a Gemini API page (not on Vertex's batch-prediction list either: its stored copy is cut short)", flex = "not in the flex page's table of models (a third party, TokenMeter v0.17.0, says Flex at 0.5x)", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-4-hydrogen"]
class = "flash"
status = "stable"
released = "2026-11-12"
note = "Google calls it a short-term GA release subject to a minimum 45-day deprecation notice (Vertex developer guide): it may be shut down 45 days after a notice, so check Google's deprecations page before long or repeated runs. Successor to gemini-3.8-flash."
input_price = 1.50
output_price = 7.50
cached_input_price = 0.075
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["low", "medium", "high", "xhigh"]
thinking_default = "high"
sources = { prices = "nov_3p ($1.50/$7.50 flat, no dated change: apidog 2026-11-13, LiteLLM #51436, laozhang 2026-11-14; cached $0.075, implicit caching only: laozhang 2026-11-14 and TokenMeter v0.17.0)", limits = "vertex_hydrogen (input and output share 1,048,576; one request, streaming or not, returns at most 65,536)", thinking = "vertex_hydrogen", lifecycle = "vertex_hydrogen (released 2026-11-12 per nov_3p; short-term GA, 45-day minimum deprecation notice)", batch = "not confirmed on a Gemini API page (Vertex lists it for batch prediction)", flex = "not in the flex page's table of models (a third party, TokenMeter v0.17.0, says Flex at 0.5x)", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-4-carbon"]
class = "pro"
status = "stable"
released = "2026-11-10"
input_price = 2.00
output_price = 10.00
price_changes = [{ from = "2026-12-01", input_price = 4.00, output_price = 20.00 }]
input_token_limit = 1048576
output_token_limit = 32768
thinking = "level"
thinking_levels = ["low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "nov_3p ($2/$10 through 2026-11-30, then $4/$20: apidog 2026-11-11, laozhang 2026-11-11, LiteLLM #50970; cached price not published by Google)", limits = "vertex_carbon (input and output share 1,048,576; one non-streaming request returns at most 32,768 output tokens, and a batch request is non-streaming: 32,768 here, as for gemini-4-argon)", thinking = "vertex_carbon (no xhigh: 'Argon and Carbon still top out at high', nov_3p)", lifecycle = "nov_3p (GA 2026-11-10; the Vertex model page carries no date)", batch = "not confirmed on a Gemini API page (Vertex lists it for batch prediction)", flex = "not in the flex page's table of models", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-4-argon"]
class = "pro"
status = "stable"
released = "2026-10-13"
input_price = 2.00
output_price = 10.00
price_changes = [{ from = "2026-12-01", input_price = 4.00, output_price = 20.00 }]
input_token_limit = 1048576
output_token_limit = 32768
thinking = "level"
thinking_levels = ["low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "latest_model (cached price not published by Google)", limits = "long_decode (and vertex_gemini4: latest_model's 'unified 1M input-output token limit' is input and output together, reached only by continuing an answer across requests; one request returns at most 65,536 output tokens, 32,768 when non-streaming. A batch request is non-streaming and a batch answer cannot be continued, so 32,768 here: the default maxOutputTokens, the most output a request can be billed for, never asks one request for more than it returns (an answer cut there would end CONTINUATION, an error in a batch) and stays below 65,536, where long decode begins)", thinking = "latest_model (no thinking_budget)", lifecycle = "changelog (GA 2026-10-13)", batch = "not confirmed on a Gemini API page (Vertex lists it for batch prediction)", flex = "not in the flex page's table of models", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.8-flash"]
class = "flash"
status = "stable"
released = "2026-09-02"
batch = true
flex = true
input_price = 0.75
output_price = 3.75
cached_input_price = 0.075
price_changes = [{ from = "2027-01-01", input_price = 1.50, output_price = 7.50, cached_input_price = 0.15 }]
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "pricing_late", limits = "models", thinking = "thinking", lifecycle = "deprecations", batch = "models", flex = "flex", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.7-flash"]
class = "flash"
status = "deprecated"
released = "2026-08-13"
shutdown = "2026-10-08"
replacement = "gemini-3.8-flash"
routed_to = "gemini-3.8-flash"
note = "Google's changelog (2026-10-08): no longer selectable in AI Studio; API requests for it are routed to gemini-3.8-flash (a third party quotes 'the price is the same'). Use --model gemini-3.8-flash."
batch = true
flex = true
input_price = 0.75
output_price = 3.75
price_changes = [{ from = "2027-01-01", input_price = 1.50, output_price = 7.50 }]
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "pricing_late (cached price not published)", limits = "models", thinking = "thinking", lifecycle = "changelog", batch = "models (models/gemini-3.7-flash: 'Batch API: supported')", flex = "flex", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.6-flash"]
class = "flash"
status = "stable"
released = "2026-07-21"
flex = true
input_price = 0.75
output_price = 3.75
price_changes = [{ from = "2027-01-01", input_price = 1.50, output_price = 7.50 }]
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["minimal", "low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "pricing_late (launched at 1.50/7.50 per whats_new; introductory 0.75/3.75 to 2026-12-31)", limits = "whats_new", thinking = "whats_new", lifecycle = "deprecations", batch = "not confirmed on a Google page", flex = "flex", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.5-flash"]
class = "flash"
status = "deprecated"
released = "2026-05-19"
shutdown = "2026-10-08"
replacement = "gemini-3.6-flash"
routed_to = "gemini-3.6-flash"
note = "Google's changelog (2026-10-08): no longer selectable in AI Studio; API requests for it are routed to gemini-3.6-flash. Use --model gemini-3.6-flash (or gemini-3.8-flash)."
batch = true
flex = true
input_price = 1.50
output_price = 9.00
cached_input_price = 0.15
batch_cached_input_price = 0.075
flex_cached_input_price = 0.08
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["minimal", "low", "medium", "high"]
thinking_default = "medium"
sources = { prices = "pricing", limits = "models (output limit from a third party)", thinking = "thinking_3p", lifecycle = "changelog", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.5-flash-lite"]
class = "flash-lite"
status = "stable"
released = "2026-07-21"
batch = true
flex = true
input_price = 0.30
output_price = 2.50
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["minimal", "low", "medium", "high"]
thinking_default = "minimal"
sources = { prices = "pricing_late (cached price not published)", limits = "whats_new", thinking = "whats_new", lifecycle = "deprecations", batch = "models (models/gemini-3.5-flash-lite: 'Batch API: supported')", flex = "flex", enqueued_tokens = "rate_limits (not published for this model)" }

[models."gemini-3.1-flash-lite"]
class = "flash-lite"
status = "stable"
released = "2026-05-07"
shutdown = "2027-05-07"
replacement = "gemini-3.5-flash-lite"
batch = true
flex = true
input_price = 0.25
output_price = 1.50
cached_input_price = 0.025
batch_cached_input_price = 0.0125
flex_cached_input_price = 0.0125
flex_discount = 0.5
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["minimal", "low", "medium", "high"]
sources = { prices = "pricing", limits = "models (output limit: vertex_3_1_flash_lite)", thinking = "vertex_3_1_flash_lite (the model's default level is not published, so thinking_default is left out; batchify never needs it: it sends its own default, the lowest level, minimal, which the page lists; no thinkingBudget, which no page allows)", lifecycle = "deprecations", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits (published only for gemini-3.1-flash-lite-preview: 10M/500M/1B)" }

[models."gemini-3.1-pro-preview"]
class = "pro"
status = "preview"
released = "2026-02-19"
batch = true
flex = true
input_price = 2.00
output_price = 12.00
cached_input_price = 0.20
long_context_threshold = 200000
long_input_price = 4.00
long_output_price = 18.00
long_cached_input_price = 0.40
flex_discount = 0.5
enqueued_tokens = { tier1 = 5_000_000, tier2 = 500_000_000, tier3 = 1_000_000_000 }
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["low", "medium", "high"]
thinking_default = "high"
legacy_budget = true
temperature = 1.0
sources = { prices = "pricing (batch and flex: cached tokens at the standard cache price)", limits = "models", thinking = "thinking (thinking cannot be turned off)", lifecycle = "deprecations", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits", temperature = "temperature" }

[models."gemini-3-flash-preview"]
class = "flash"
status = "preview"
released = "2025-12-17"
batch = true
flex = true
input_price = 0.50
output_price = 3.00
cached_input_price = 0.05
flex_discount = 0.5
enqueued_tokens = { tier1 = 3_000_000, tier2 = 400_000_000, tier3 = 1_000_000_000 }
input_token_limit = 1048576
output_token_limit = 65536
thinking = "level"
thinking_levels = ["minimal", "low", "medium", "high"]
thinking_default = "high"
legacy_budget = true
temperature = 1.0
sources = { prices = "pricing (batch and flex: cached tokens at the standard cache price)", limits = "models (as transcribed by third parties)", thinking = "thinking_3p", lifecycle = "deprecations", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits (tier 2/3 rows labelled 'Gemini 3.1 Flash Preview' on Google's page)", temperature = "temperature" }

[models."gemini-3-pro-preview"]
class = "pro"
status = "retired"
shutdown = "2026-03-09"
replacement = "gemini-3.1-pro-preview"
input_price = 2.00
output_price = 12.00
sources = { lifecycle = "deprecations" }

[models."gemini-2.5-pro"]
class = "pro"
status = "deprecated"
released = "2025-06-17"
shutdown = "2026-12-01"
replacement = "gemini-3.8-flash"
routed_to = "gemini-3.8-flash"
note = "Google's own copies give the shutdown as 'earliest 2026-06-17'; two third parties read 2026-12-01 on the page, with requests then routed to gemini-3.8-flash (the recommended replacement) at that model's prices and access limited to existing users; resellers report the id answering 503 since 2026-11-12. A 404 from the service ends a run with exit 2."
batch = true
flex = true
input_price = 1.25
output_price = 10.00
cached_input_price = 0.125
long_context_threshold = 200000
long_input_price = 2.50
long_output_price = 15.00
long_cached_input_price = 0.25
flex_discount = 0.5
enqueued_tokens = { tier1 = 5_000_000, tier2 = 500_000_000, tier3 = 1_000_000_000 }
rpm = { tier1 = 150, tier2 = 1_000, tier3 = 2_000 }
tpm = { tier1 = 2_000_000, tier2 = 5_000_000, tier3 = 8_000_000 }
input_token_limit = 1048576
output_token_limit = 65536
thinking = "budget"
thinking_budget_min = 128
thinking_budget_max = 32768
thinking_budget_zero = false
thinking_dynamic = true
sources = { prices = "pricing", limits = "models", thinking = "thinking_3p (budget 0 answered 400: vercel/ai#8027)", lifecycle = "deprecations_3p", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits", rpm = "rate_limits_2025", tpm = "rate_limits_2025" }

[models."gemini-2.5-flash"]
class = "flash"
status = "deprecated"
released = "2025-06-17"
shutdown = "2026-12-01"
replacement = "gemini-3.5-flash-lite"
routed_to = "gemini-3.5-flash-lite"
note = "Google's own copies give the shutdown as 'earliest 2026-06-17' (replacement gemini-3-flash-preview); two third parties read 2026-12-01 on the page, with requests then routed to gemini-3.5-flash-lite at that model's prices (Google's Vertex page for 3.5 Flash-Lite calls it 'a suitable replacement for Gemini 2.5 Flash'). A 404 from the service ends a run with exit 2."
batch = true
flex = true
input_price = 0.30
output_price = 2.50
cached_input_price = 0.03
flex_discount = 0.5
enqueued_tokens = { tier1 = 3_000_000, tier2 = 400_000_000, tier3 = 1_000_000_000 }
rpm = { tier1 = 1_000 }
tpm = { tier1 = 1_000_000 }
input_token_limit = 1048576
output_token_limit = 65536
thinking = "budget"
thinking_budget_min = 1
thinking_budget_max = 24576
thinking_budget_zero = true
thinking_dynamic = true
sources = { prices = "pricing", limits = "models", thinking = "thinking_3p", lifecycle = "deprecations_3p", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits", rpm = "rate_limits_2025", tpm = "rate_limits_2025" }

[models."gemini-2.5-flash-lite"]
class = "flash-lite"
status = "deprecated"
released = "2025-07-22"
replacement = "gemini-3.5-flash-lite"
note = "Google's deprecations page lists it (shutdown 'earliest 2026-07-22', a date now past); a third party read on 2026-11-10 that it stays available until further notice. A 404 from the service ends a run with exit 2."
batch = true
flex = true
input_price = 0.10
output_price = 0.40
cached_input_price = 0.01
flex_discount = 0.5
enqueued_tokens = { tier1 = 10_000_000, tier2 = 500_000_000, tier3 = 1_000_000_000 }
rpm = { tier1 = 4_000 }
tpm = { tier1 = 4_000_000 }
input_token_limit = 1048576
output_token_limit = 65536
thinking = "budget"
thinking_budget_min = 512
thinking_budget_max = 24576
thinking_budget_zero = true
thinking_dynamic = true
sources = { prices = "pricing", limits = "models", thinking = "thinking_3p", lifecycle = "deprecations_3p", batch = "pricing", flex = "flex", enqueued_tokens = "rate_limits", rpm = "rate_limits_2025", tpm = "rate_limits_2025" }

[models."gemini-2.0-flash"]
class = "flash"
status = "retired"
shutdown = "2026-06-01"
replacement = "gemini-2.5-flash-lite"
input_price = 0.10
output_price = 0.40
sources = { lifecycle = "pricing (banner: shut down June 1, 2026)" }

[models."gemini-2.0-flash-lite"]
class = "flash-lite"
status = "retired"
shutdown = "2026-06-01"
replacement = "gemini-2.5-flash-lite"
input_price = 0.075
output_price = 0.30
sources = { lifecycle = "pricing (banner: shut down June 1, 2026)" }
"""


@dataclass(frozen=True)
class ModelSpec:
    """One model's figures and rules, from the catalog (after overrides and dated price changes)."""

    name: str
    klass: str  # flash | flash-lite | pro | other
    status: str  # stable | preview | deprecated | retired
    input_price: float  # standard, USD per 1M tokens
    output_price: float  # thinking included
    released: str | None = None
    shutdown: str | None = None
    replacement: str | None = None
    routed_to: str | None = None  # reported: after its shutdown, requests go to this model, at its prices
    note: str | None = None
    batch: bool | None = None  # None: Google's pages do not say
    flex: bool | None = None
    cached_input_price: float | None = None  # standard cache price (batch bills cached tokens at it too)
    batch_cached_input_price: float | None = None  # where the Batch table lists its own
    flex_cached_input_price: float | None = None
    long_context_threshold: int | None = None  # prompt tokens above which a request is billed at long_*
    long_input_price: float | None = None
    long_output_price: float | None = None
    long_cached_input_price: float | None = None
    batch_discount: float = 0.5
    flex_discount: float | None = None
    enqueued_tokens: dict[int, int] = field(default_factory=dict)  # tier -> batch enqueued-token limit
    rpm: dict[int, int] = field(default_factory=dict)  # tier -> requests per minute (real time)
    tpm: dict[int, int] = field(default_factory=dict)  # tier -> input tokens per minute (real time)
    input_token_limit: int | None = None
    output_token_limit: int | None = None
    thinking: str = "none"  # level | budget | none (nothing sent)
    thinking_levels: tuple[str, ...] = ()  # lowest first
    thinking_default: str | None = None  # the model's own default level
    thinking_budget_min: int | None = None  # smallest positive budget
    thinking_budget_max: int | None = None
    thinking_budget_zero: bool = False  # 0 turns thinking off
    thinking_dynamic: bool = False  # -1: the model decides
    legacy_budget: bool = False  # a level model that still accepts thinkingBudget (Gemini 3 / 3.1)
    temperature: float | None = None  # Google's advice; None: nothing is sent (the model's default)
    sources: dict[str, str] = field(default_factory=dict)
    price_note: str | None = None  # a dated price change in effect or ahead

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("enqueued_tokens", "rpm", "tpm"):
            d[k] = {f"tier{t}": v for t, v in sorted(d[k].items())}
        d["class"] = d.pop("klass")
        d["thinking_levels"] = list(self.thinking_levels)
        return d


_SPEC_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec)}
_SPEC_KEYS = (set(_SPEC_FIELDS) - {"name", "klass", "price_note"}) | {"class", "price_changes"}
_PRICE_KEYS = {"input_price", "output_price", "cached_input_price", "batch_cached_input_price", "flex_cached_input_price"}
_PRICE_KEYS |= {"long_input_price", "long_output_price", "long_cached_input_price"}
MODEL_STATUSES = ("stable", "preview", "deprecated", "retired")
THINKING_STYLES = ("level", "budget", "none")
THINKING_LEVELS = ("minimal", "low", "medium", "high", "xhigh")  # every level a model may take, lowest first


def _tiers(value: Any, where: str, key: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table such as {{ tier1 = 3000000 }}.")
    out: dict[int, int] = {}
    for k, v in value.items():
        m = re.fullmatch(r"(?:tier)?([1-9])", str(k))
        if m is None or type(v) is not int or v < 1:
            raise ConfigError(f"{where}: '{key}.{k}' must be tierN = a whole number >= 1.")
        out[int(m.group(1))] = v
    return out


def model_spec(name: str, raw: dict[str, Any], where: str, today: str) -> ModelSpec:
    """A catalog entry (TOML table) -> ModelSpec, checked key by key (_spec_value), then as a whole
    (_check_spec); price changes dated on or before `today` (YYYY-MM-DD) applied (_price_changes)."""
    entry = f"{where} [models.{name!r}]"
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{entry}: unknown key(s) {', '.join(unknown)}. Fix: use only {', '.join(sorted(_SPEC_KEYS))}.")
    missing = [k for k in ("input_price", "output_price") if k not in raw]
    if missing:
        raise ConfigError(
            f"{entry}: {' and '.join(missing)} missing. Fix: give the model's standard prices in USD per 1M tokens "
            "from https://ai.google.dev/gemini-api/docs/pricing."
        )
    kw: dict[str, Any] = {"name": name, "klass": raw.get("class", "other"), "status": raw.get("status", "stable")}
    kw.update({k: _spec_value(entry, k, v) for k, v in raw.items() if k not in ("class", "status", "price_changes")})
    _check_spec(entry, kw)
    prices, ahead = _price_changes(entry, raw.get("price_changes", []), today)
    kw.update(prices)
    if ahead:
        kw["price_note"] = ahead
    return ModelSpec(**kw)


_SPEC_WHOLE = ("long_context_threshold", "input_token_limit", "output_token_limit", "thinking_budget_min", "thinking_budget_max")
_SPEC_FLAGS = ("batch", "flex", "thinking_budget_zero", "thinking_dynamic", "legacy_budget")


def _spec_value(entry: str, k: str, v: Any) -> Any:
    """One catalog key's value, checked and converted (ConfigError naming the entry and the key)."""
    if k in ("enqueued_tokens", "rpm", "tpm"):
        return _tiers(v, entry, k)
    if k in _PRICE_KEYS or k in ("batch_discount", "flex_discount", "temperature"):
        if type(v) not in (int, float) or not (0 <= v < 1e6) or v != v:
            raise ConfigError(f"{entry}: '{k}' must be a number >= 0.")
        return float(v)
    if k in _SPEC_WHOLE:
        if type(v) is not int or v < 0:
            raise ConfigError(f"{entry}: '{k}' must be a whole number >= 0.")
        return v
    if k in _SPEC_FLAGS:
        if type(v) is not bool:
            raise ConfigError(f"{entry}: '{k}' must be true or false.")
        return v
    if k == "thinking_levels":
        levels = tuple(x.lower() for x in v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else None
        if (
            levels is None
            or any(x not in THINKING_LEVELS for x in levels)
            or list(levels) != sorted(set(levels), key=THINKING_LEVELS.index)
        ):
            raise ConfigError(
                f"{entry}: 'thinking_levels' must be a list of levels from {', '.join(THINKING_LEVELS)}, lowest first."
            )
        return levels
    if k == "sources":
        if not isinstance(v, dict):
            raise ConfigError(f"{entry}: 'sources' must be a table of figure = source.")
        return {str(a): str(b) for a, b in v.items()}
    if not isinstance(v, str):
        raise ConfigError(f"{entry}: '{k}' must be a string.")
    return v.lower() if k in ("thinking", "thinking_default") else v


def _check_spec(entry: str, kw: dict[str, Any]) -> None:
    """The rules between a catalog entry's keys: status, discounts, thinking style and its figures, dates."""
    if kw["status"] not in MODEL_STATUSES:
        raise ConfigError(f"{entry}: 'status' must be one of {', '.join(MODEL_STATUSES)}.")
    for k in ("batch_discount", "flex_discount"):
        if k in kw and not 0 < kw[k] <= 1:
            raise ConfigError(
                f"{entry}: '{k}' is the share of the standard price paid (0.5 for half): a number above 0, at most 1."
            )
    if kw.get("thinking_default") and kw["thinking_default"] not in kw.get("thinking_levels", ()):
        raise ConfigError(f"{entry}: 'thinking_default' must be one of thinking_levels.")
    if kw.get("thinking") == "budget":
        lo, hi = kw.get("thinking_budget_min", 0), kw.get("thinking_budget_max", 0)
        if not 1 <= lo <= hi:
            raise ConfigError(
                f"{entry}: thinking_budget_min must be at least 1 and at most thinking_budget_max (0 is thinking_budget_zero)."
            )
    if kw.get("thinking", "none") not in THINKING_STYLES:
        raise ConfigError(f"{entry}: 'thinking' must be one of {', '.join(THINKING_STYLES)}.")
    if kw.get("thinking") == "level" and not kw.get("thinking_levels"):
        raise ConfigError(f'{entry}: thinking = "level" needs thinking_levels (lowest first).')
    if kw.get("thinking") == "budget" and not (kw.get("thinking_budget_max") and kw.get("thinking_budget_min") is not None):
        raise ConfigError(f'{entry}: thinking = "budget" needs thinking_budget_min and thinking_budget_max.')
    for k in ("released", "shutdown"):
        if k in kw and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", kw[k]):
            raise ConfigError(f"{entry}: '{k}' must be a date YYYY-MM-DD.")


def _price_changes(entry: str, changes: Any, today: str) -> tuple[dict[str, float], str]:
    """(the prices in force `today` from dated changes, a note on the changes still ahead)."""
    if not isinstance(changes, list):
        raise ConfigError(f"{entry}: 'price_changes' must be a list of {{ from = \"YYYY-MM-DD\", input_price = ... }}.")
    now: dict[str, float] = {}
    ahead = []
    for ch in sorted(changes, key=lambda c: str(c.get("from", "")) if isinstance(c, dict) else ""):
        if (
            not isinstance(ch, dict)
            or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(ch.get("from", "")))
            or set(ch) - _PRICE_KEYS - {"from"}
        ):
            raise ConfigError(f'{entry}: each price change is {{ from = "YYYY-MM-DD", <price keys> = USD }}.')
        prices = {k: float(v) for k, v in ch.items() if k != "from"}
        if ch["from"] <= today:
            now.update(prices)
        else:
            ahead.append(f"from {ch['from']}: " + ", ".join(f"{k} {v:g}" for k, v in prices.items()))
    return now, "; ".join(ahead)


@dataclass(frozen=True)
class Catalog:
    """The model catalog: the built-in table with the user's overrides merged in, key by key."""

    as_of: str
    models: dict[str, dict[str, Any]]
    sources: dict[str, str]
    user_models: dict[str, dict[str, Any]] = field(default_factory=dict)  # the override tables alone

    def merged(self, tables: dict[str, Any], where: str) -> Catalog:
        """This catalog with `[models.NAME]` tables (from a models file or a job config) laid over it."""
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(f"{where}: 'models' must hold [models.\"NAME\"] tables.")
        models = {k: dict(v) for k, v in self.models.items()}
        for name, table in tables.items():
            models[name.removeprefix("models/")] = {**models.get(name.removeprefix("models/"), {}), **table}
        user = {**self.user_models, **{n.removeprefix("models/"): t for n, t in tables.items()}}
        merged = Catalog(self.as_of, models, self.sources, user)
        for name in tables:  # check now, naming the file that brought the table
            model_spec(name.removeprefix("models/"), merged.models[name.removeprefix("models/")], where, self.as_of)
        return merged

    def spec(self, name: str, today: str) -> ModelSpec:
        n = name.removeprefix("models/")
        return model_spec(n, self.models[n], "model catalog", today)

    def source(self, spec: ModelSpec, figure: str) -> str:
        """Where a figure of a model came from, in words (the catalog's source keys expanded)."""
        s = spec.sources.get(figure, "")
        if not s:
            return "not published by Google" if figure in ("enqueued_tokens", "rpm", "tpm") else "user-given"
        head, _, rest = s.partition(" ")
        return self.sources.get(head, head) + (f" {rest}" if rest else "")


@functools.cache
def builtin_catalog() -> Catalog:
    data = tomllib.loads(MODEL_CATALOG_TOML)
    return Catalog(str(data["as_of"]), data["models"], data["sources"])


def load_catalog(models_file: str | Path | None = None) -> Catalog:
    """The built-in catalog with a models file (--models / BATCHIFY_MODELS) laid over it."""
    cat = builtin_catalog()
    return cat.merged(read_models_file(models_file), str(models_file)) if models_file else cat


def read_models_file(path: str | Path) -> dict[str, Any]:
    """A TOML file of `[models."NAME"]` tables (for --models / BATCHIFY_MODELS)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the models file ({e.strerror}). Fix: check the path given to --models.") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}. Fix: correct the TOML syntax.") from e
    if set(data) - {"models"}:
        raise ConfigError(
            f'{p}: only [models."NAME"] tables belong in a models file (found {", ".join(sorted(set(data) - {"models"}))}).'
        )
    return dict(data.get("models") or {})


def resolve_model(catalog: Catalog, name: str, today: str) -> ModelSpec:
    """The catalog's spec for `name`, or UsageError (exit 2): unknown names say what to give; retired ones
    name their replacement. Deprecated models resolve (the plan warns: see lifecycle_warning)."""
    n = name.removeprefix("models/")
    if n not in catalog.models:
        known = ", ".join(m for m in catalog.models if catalog.models[m].get("status") != "retired")
        raise UsageError(
            f"model {n!r} is not in batchify's model catalog (as of {catalog.as_of}), so its prices, limits and "
            f"thinking rules are unknown. Fix: use a known model ({known}), or describe it in a models file "
            f"given with --models FILE (or env BATCHIFY_MODELS, or a [models] table in --config):\n"
            f'  [models."{n}"]\n  input_price = <USD per 1M input tokens>\n  output_price = <USD per 1M output tokens>\n'
            "  enqueued_tokens = { tier1 = <batch enqueued-token limit> }   # or pass --enqueued-limit\n"
            '  thinking = "none"   # or "level" with thinking_levels, or "budget" with its range'
        )
    spec = catalog.spec(n, today)
    retired = spec.status == "retired" or (spec.status != "deprecated" and spec.shutdown is not None and spec.shutdown <= today)
    if retired:
        instead = f"use --model {spec.replacement}" if spec.replacement else "choose another model (`batchify models`)"
        raise UsageError(f"model {n!r} was shut down on {spec.shutdown or 'an earlier date'} (model catalog). Fix: {instead}.")
    if spec.routed_to and spec.shutdown and spec.shutdown <= today and spec.routed_to in catalog.models:
        # Past its (reported) shutdown, its requests may be served by another model at that model's prices:
        # plan and bill at the higher of the two, so that --max-cost never under-protects.
        other = catalog.spec(spec.routed_to, today)
        higher = {
            k: max(x for x in (getattr(spec, k), getattr(other, k)) if x is not None) for k in ("input_price", "output_price")
        }
        for k in ("cached_input_price", "batch_cached_input_price", "flex_cached_input_price"):
            vals = [x for x in (getattr(spec, k), getattr(other, k)) if x is not None]
            if vals:
                higher[k] = max(vals)
        note = f"priced at the higher of its own and {other.name}'s prices (requests may be routed there after {spec.shutdown})"
        spec = dataclasses.replace(spec, price_note="; ".join(x for x in (spec.price_note, note) if x), **higher)
    return spec


def price_timeline(catalog: Catalog, name: str, today: str, opts: RunOptions) -> list[dict[str, Any]]:
    """The dated price changes after `today` that a run prepared today is billed by when it sends later: for each
    later date on which the prices in force may change (the model's own price_changes; for a model whose requests
    are routed to another after its shutdown, that date and the other model's changes), every price in force from
    that date (resolve_model's, as the backend serves it). Kept in the plan (model_spec's price_changes), so that
    a run resumed after a change is costed, and capped by --max-cost, at the new prices (run_model_spec)."""
    n = name.removeprefix("models/")
    raw = catalog.models.get(n, {})
    dates = {c.get("from") for c in raw.get("price_changes", []) if isinstance(c, dict)}
    other = raw.get("routed_to")
    if other in catalog.models and raw.get("shutdown"):
        dates |= {raw["shutdown"]} | {
            c.get("from") for c in catalog.models[other].get("price_changes", []) if isinstance(c, dict)
        }
    out: list[dict[str, Any]] = []
    for day in sorted(d for d in dates if isinstance(d, str) and d > today):
        try:
            s = backend_spec(resolve_model(catalog, n, day), opts)
        except UsageError:  # shut down by then: nothing more is sent (model_retired), nothing more is billed
            break
        out.append({"from": day, **{k: getattr(s, k) for k in sorted(_PRICE_KEYS) if getattr(s, k) is not None}})
    return out


def lifecycle_warning(spec: ModelSpec, today: str) -> str | None:
    if spec.status != "deprecated" and not spec.shutdown:
        return None
    when = spec.shutdown or "a date not yet announced"
    tense = "was due to shut down" if spec.shutdown and spec.shutdown <= today else "shuts down"
    instead = f"; its replacement is {spec.replacement}" if spec.replacement else ""
    if spec.status == "deprecated":
        return f"{spec.name} is deprecated and {tense} on {when}{instead}. {spec.note or ''}".strip()
    return f"{spec.name} {tense} on {when}{instead}." if spec.shutdown and spec.shutdown <= _add_days(today, 183) else None


def _add_days(day: str, n: int) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) + timedelta(days=n)).isoformat()


def default_model(catalog: Catalog, tier: int = 1) -> str:
    """The cheapest current (stable or preview) Flash-class model that supports batch and whose enqueued-token
    limit Google publishes (so a first run needs no figure from the user). DEFAULT_MODEL is this, checked by a test."""
    cands = []
    for name in catalog.models:
        s = catalog.spec(name, catalog.as_of)
        if s.klass in ("flash", "flash-lite") and s.status in ("stable", "preview") and s.batch and tier in s.enqueued_tokens:
            cands.append((s.input_price + s.output_price, s.input_price, name))
    return min(cands)[2]


def catalog_rows(catalog: Catalog, today: str) -> list[dict[str, Any]]:
    """One plain row per model (what `batchify models` shows): stable, preview, deprecated, retired; by name."""
    rows = []
    for name in catalog.models:
        s = catalog.spec(name, today)
        retired = s.status == "retired" or (s.status != "deprecated" and bool(s.shutdown) and str(s.shutdown) <= today)
        rows.append(
            {
                "model": name,
                "class": s.klass,
                "status": "retired" if retired else s.status,
                "shutdown": s.shutdown,
                "replacement": s.replacement,
                "input_price": s.input_price,
                "output_price": s.output_price,
                "cached_input_price": s.cached_input_price,
                "long_context": (
                    {"above": s.long_context_threshold, "input_price": s.long_input_price, "output_price": s.long_output_price}
                    if s.long_context_threshold
                    else None
                ),
                "batch": s.batch,
                "batch_discount": s.batch_discount,
                "flex": s.flex,
                "flex_discount": s.flex_discount,
                "enqueued_tokens": {f"tier{t}": v for t, v in sorted(s.enqueued_tokens.items())},
                "rpm": {f"tier{t}": v for t, v in sorted(s.rpm.items())},
                "tpm": {f"tier{t}": v for t, v in sorted(s.tpm.items())},
                "input_token_limit": s.input_token_limit,
                "output_token_limit": s.output_token_limit,
                "thinking": s.thinking,
                "thinking_allowed": thinking_allowed(s) if s.thinking != "none" else None,
                "thinking_default_sent": thinking_choice(s, None),
                "temperature": s.temperature,
                "price_note": s.price_note,
                "note": s.note,
                "sources": {k: catalog.source(s, k) for k in s.sources},
                "default": name == DEFAULT_MODEL,
            }
        )
    order = {"stable": 0, "preview": 1, "deprecated": 2, "retired": 3}
    return sorted(rows, key=lambda r: (order[r["status"]], r["model"]), reverse=False)


def _millions(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M" if n >= 1e6 else f"{n:,}"


def models_markdown(catalog: Catalog, today: str) -> str:
    """The README's model table, generated from the catalog (a test keeps the README equal to it)."""
    out = [
        f"Model catalog as of {catalog.as_of} (prices USD per 1M tokens, standard tier; batch and flex bill 50% of it).",
        "",
        "| model | status | input / output | cached input | batch | flex | enqueued tokens T1 / T2 / T3 | thinking (batchify's default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in catalog_rows(catalog, today):
        status = r["status"] + (
            f" (shutdown {r['shutdown']}" + (f", use {r['replacement']})" if r["replacement"] else ")") if r["shutdown"] else ""
        )
        price = f"${r['input_price']:g} / ${r['output_price']:g}"
        if r["long_context"]:
            price += f" (>{r['long_context']['above'] // 1000}k: ${r['long_context']['input_price']:g} / ${r['long_context']['output_price']:g})"
        if r["price_note"]:
            price += f"; {r['price_note']}"
        yes = {True: "yes", False: "no", None: "not published"}
        enq = r["enqueued_tokens"]
        tiers = " / ".join(_millions(enq.get(f"tier{t}")) for t in (1, 2, 3)) if enq else "not published"
        think = "-" if r["thinking"] == "none" else f"{r['thinking']} ({r['thinking_default_sent']})"
        cached = f"${r['cached_input_price']:g}" if r["cached_input_price"] is not None else "not published"
        name = f"**{r['model']}** (default)" if r["default"] else r["model"]
        if r["status"] == "retired":
            price = cached = tiers = think = "-"
        out.append(f"| {name} | {status} | {price} | {cached} | {yes[r['batch']]} | {yes[r['flex']]} | {tiers} | {think} |")
    out += ["", "Sources:", ""]
    out += [f"- `{k}`: {v}" for k, v in catalog.sources.items()]
    return "\n".join(out) + "\n"


def enqueued_limit_for(spec: ModelSpec, tier: int, override: int | None, where: str = "the model catalog") -> int:
    if override:
        return override
    if tier in spec.enqueued_tokens:
        return spec.enqueued_tokens[tier]
    raise UsageError(
        f"Google publishes no batch enqueued-token limit for {spec.name} at tier {tier} ({where}). "
        f"Fix: pass --enqueued-limit N with your project's figure (Google AI Studio shows it), or add "
        f'enqueued_tokens = {{ tier{tier} = N }} under [models."{spec.name}"] in a --models file.'
    )


def realtime_limits(spec: ModelSpec, tier: int, rpm: int | None, tpm: int | None) -> RealtimeLimits:
    """Requests and tokens per minute for the real-time path and where each figure came from."""
    if rpm:
        rpm_, rpm_source = rpm, "--rpm"
    elif tier in spec.rpm:
        rpm_, rpm_source = spec.rpm[tier], f"catalog, tier {tier} ({spec.sources.get('rpm', 'user-given')})"
    else:
        rpm_, rpm_source = DEFAULT_RPM, "not published by Google: batchify's 2,000, lowered by any 429"
    tpm_: int | None
    if tpm:
        tpm_, tpm_source = tpm, "--tpm"
    elif tier in spec.tpm:
        tpm_, tpm_source = spec.tpm[tier], f"catalog, tier {tier} ({spec.sources.get('tpm', 'user-given')})"
    else:
        tpm_, tpm_source = None, "not published by Google: no token bucket; 429s slow the rate"
    return RealtimeLimits(rpm=rpm_, rpm_source=rpm_source, tpm=tpm_, tpm_source=tpm_source)


# -- thinking and the generation config a model accepts ----------------------------------------------
# batchify's own allowances (Google publishes no token figure per level): room left in maxOutputTokens for
# thinking, and the thinking tokens the cost estimate assumes per request.
THINKING_ROOM = {"minimal": 2_048, "low": 4_096, "medium": 8_192, "high": 16_384, "xhigh": 32_768, "dynamic": 8_192}
THINKING_EXPECTED = {"minimal": 0, "low": 256, "medium": 1_024, "high": 2_048, "xhigh": 4_096, "dynamic": 1_024}
ANSWER_ROOM_MIN = 1_024


def parse_thinking(value: Any) -> str | int | None:
    """--thinking / `thinking` as given: a level name, a whole-number budget (-1: dynamic), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"'thinking' must be a level name ({', '.join(THINKING_LEVELS)}) or a whole-number budget.")
    if isinstance(value, int):
        return value
    s = str(value).strip().lower()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    return s


def thinking_choice(spec: ModelSpec, thinking: str | int | None) -> str | int | None:
    """The thinking setting to send, checked against the model's rules; None: send nothing.
    The default is the lowest the model allows (thinking costs output tokens and shares maxOutputTokens)."""
    allowed = thinking_allowed(spec)
    if thinking is None:
        if spec.thinking == "level":
            return spec.thinking_levels[0]
        if spec.thinking == "budget":
            return 0 if spec.thinking_budget_zero else spec.thinking_budget_min
        return None
    if spec.thinking == "level":
        if isinstance(thinking, str) and thinking in spec.thinking_levels:
            return thinking
    elif spec.thinking == "budget":
        lo, hi = spec.thinking_budget_min or 0, spec.thinking_budget_max or 0
        if isinstance(thinking, int) and (
            lo <= thinking <= hi or (thinking == 0 and spec.thinking_budget_zero) or (thinking == -1 and spec.thinking_dynamic)
        ):
            return thinking
    raise ConfigError(f"thinking {thinking!r} is not allowed for {spec.name}: {allowed}.")


def thinking_allowed(spec: ModelSpec) -> str:
    if spec.thinking == "level":
        return "use a level: " + ", ".join(spec.thinking_levels) + f" (--thinking {spec.thinking_levels[0]} is the lowest)"
    if spec.thinking == "budget":
        extra = (", 0 (off)" if spec.thinking_budget_zero else "") + (", -1 (dynamic)" if spec.thinking_dynamic else "")
        return f"use a budget of {spec.thinking_budget_min} to {spec.thinking_budget_max} tokens{extra}"
    return "its thinking is not configurable in batchify's catalog: leave --thinking out"


def _thinking_key(choice: str | int | None) -> str:
    if isinstance(choice, str):
        return choice
    return "dynamic" if choice == -1 else "budget"


def thinking_room(choice: str | int | None) -> int:
    if choice is None:
        return THINKING_ROOM["medium"]  # nothing sent: the model thinks as it likes
    if isinstance(choice, int) and choice >= 0:
        return choice
    return THINKING_ROOM.get(_thinking_key(choice), THINKING_ROOM["high"])


def thinking_expected(choice: str | int | None) -> int:
    if isinstance(choice, int) and choice >= 0:
        return min(choice, THINKING_EXPECTED["medium"]) if choice else 0
    return THINKING_EXPECTED.get(_thinking_key(choice) if choice is not None else "medium", THINKING_EXPECTED["high"])


NEWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "page_title": {"type": "string", "description": "The article's title as a reader sees it"},
        "is_financial": {"type": "string", "enum": ["Yes", "No"]},
        "category": {
            "type": "string",
            "enum": [
                "markets",
                "companies",
                "economy",
                "technology",
                "politics",
                "science",
                "health",
                "sports",
                "entertainment",
                "other",
            ],
        },
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "companies": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string", "description": "One line"},
    },
    "required": ["page_title", "is_financial", "category", "sentiment", "companies", "summary"],
}

NEWS_SYSTEM_INSTRUCTION = (
    "You classify news articles. Answer only with JSON that follows the schema: the page title, "
    "whether the article is about finance (Yes/No), its category, its overall sentiment, the "
    "companies it names, and a one-line summary."
)
NEWS_PROMPT = "Title: {title}\nURL: {url}\n\n{text}"


@dataclass(frozen=True)
class JobConfig:
    """What to ask the model: one per run, from --config TOML and flags."""

    model: str = DEFAULT_MODEL
    system_instruction: str = NEWS_SYSTEM_INSTRUCTION
    prompt_template: str = NEWS_PROMPT
    schema: dict[str, Any] | None = field(default_factory=lambda: dict(NEWS_SCHEMA))
    temperature: float | None = None  # None: the catalog's advice for the model, else nothing sent
    max_output_tokens: int | None = None  # None: room for the thinking setting plus the answer (default_max_output)
    thinking: str | int | None = None  # a level, a budget (-1 dynamic); None: the lowest the model allows
    expected_output_tokens: int = 200  # answer tokens per request, for the cost estimate
    expected_thinking_tokens: int | None = None  # None: batchify's assumption per thinking setting (THINKING_EXPECTED)
    accept_truncated: bool = False  # schema-less runs only: a MAX_TOKENS answer counts as ok
    models: dict[str, Any] | None = None  # [models."NAME"] tables laid over the model catalog

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        return cls(**{k: d[k] for k in CONFIG_KEYS if k in d})


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(JobConfig))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a job definition from TOML (stdlib tomllib), apply flag overrides, validate it."""
    data: dict[str, Any] = {}
    where = str(path) if path else "built-in default"
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror}). Fix: check the path given to --config.") from e
        try:
            data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))  # a BOM (Windows editors)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML: {e}. Fix: correct the TOML syntax.") from e
        unknown = sorted(set(data) - set(CONFIG_KEYS) - {"schema_file", "thinking_budget"})
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}. Fix: use only {', '.join(CONFIG_KEYS)}, schema_file.")
        if "thinking_budget" in data:  # the name before the catalog: a budget is one form of `thinking`
            old = data.pop("thinking_budget")  # 0 meant "thinking off": now, the lowest the model allows
            data.setdefault("thinking", None if old == 0 else old)
        if "schema_file" in data:
            sp = (p.parent / str(data.pop("schema_file"))).resolve()
            try:
                data["schema"] = orjson.loads(sp.read_bytes())
            except (OSError, orjson.JSONDecodeError) as e:
                raise ConfigError(
                    f"{p}: schema_file {sp} is not readable JSON ({e}). Fix: point it at a JSON Schema file."
                ) from e
        if isinstance(data.get("schema"), str):
            try:
                data["schema"] = orjson.loads(data["schema"])
            except orjson.JSONDecodeError as e:
                raise ConfigError(f"{p}: key 'schema' is not valid JSON ({e}). Fix: give a JSON Schema object.") from e
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    if "thinking" in data:
        data["thinking"] = parse_thinking(data["thinking"])
    cfg = JobConfig(**{**JobConfig().to_dict(), **data})
    validate_config(cfg, where, [k for k, v in (overrides or {}).items() if v is not None])
    return cfg


def validate_config(cfg: JobConfig, where: str, flags: Iterable[str] = ()) -> None:
    """Every key checked; an error blames the flag that gave the value (`flags`), else `where` (the file)."""
    given = set(flags)

    def blame(key: str) -> str:
        return f"--{key.replace('_', '-')}" if key in given else where

    if not isinstance(cfg.model, str) or not cfg.model:
        raise ConfigError(f"{blame('model')}: 'model' must be a model name such as {DEFAULT_MODEL}.")
    if not isinstance(cfg.prompt_template, str) or not cfg.prompt_template.strip():
        raise ConfigError(f"{blame('prompt_template')}: 'prompt_template' must be a non-empty string with {{text}} in it.")
    try:
        used = template_fields(cfg.prompt_template)
    except ValueError as e:
        raise ConfigError(
            f"{blame('prompt_template')}: 'prompt_template' is not a valid template ({e}). Fix: write literal braces as {{{{ and }}}}."
        ) from e
    if "text" not in used:  # every document would be sent the same prompt, and paid for
        raise ConfigError(
            f"{blame('prompt_template')}: 'prompt_template' has no {{text}}, so no document's text would be sent. "
            "Fix: put {text} where each document's text goes (it is filled from the record's --text-field, 'text' by default)."
        )
    if cfg.schema is not None:
        if not isinstance(cfg.schema, dict):
            raise ConfigError(f"{where}: 'schema' must be a JSON Schema object.")
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(cfg.schema)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"{where}: 'schema' is not valid JSON Schema: {e.message}. Fix: correct the schema.") from e
    for name, lo, hi in (("temperature", 0.0, 2.0),):
        v = getattr(cfg, name)
        if v is not None and not (type(v) in (int, float) and lo <= v <= hi):
            raise ConfigError(f"{blame(name)}: '{name}' must be a number from {lo} to {hi}.")
    for name in ("max_output_tokens", "expected_output_tokens", "expected_thinking_tokens"):
        v = getattr(cfg, name)
        if v is not None and not (type(v) is int and v >= 0):
            raise ConfigError(f"{blame(name)}: '{name}' must be a whole number >= 0.")
    if cfg.thinking is not None and not (type(cfg.thinking) is int or (isinstance(cfg.thinking, str) and cfg.thinking)):
        raise ConfigError(f"{blame('thinking')}: 'thinking' must be a level name or a whole-number budget.")
    if cfg.accept_truncated and cfg.schema is not None:
        raise ConfigError(f"{where}: 'accept_truncated' is for schema-less runs only (a cut JSON answer is never valid).")
    if cfg.models is not None:
        builtin_catalog().merged(cfg.models, where)  # each [models.NAME] table checked here, naming the file


def default_poll_interval(given: float | None, endpoint: str | None) -> float:
    """An explicit poll interval is kept (against the local emulator too); not given: 1 s for the local
    emulator (its jobs take seconds), else DEFAULT_POLL_INTERVAL."""
    if given is not None:
        return given
    return 1.0 if endpoint == "local" else DEFAULT_POLL_INTERVAL


def _waves_value(ctx: Any, param: Any, value: str | int) -> str | int:
    """--waves: 'auto' or a whole number of waves (at least 1)."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter("use 'auto' or a whole number of waves") from None
    if n < 1:
        raise click.BadParameter("must be at least 1")
    return n


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that refuses NaN and the infinities: a range only compares, NaN compares False (so nan
    passed every range) and inf passes any lower bound (a poll interval of inf never polled again)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number. Fix: give a number, {self._describe_range()}", param, ctx)
        return rv


def _positive_usd(ctx: Any, param: Any, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter("must be a number of US dollars above 0 (leave it out for no cap)")
    return value


def _mode_value(ctx: Any, param: Any, value: str) -> str:
    return "realtime" if value == "standard" else value  # standard is the tier's name; realtime the mode's old one


def _check_flag_value(value: Any, default: Any, kw: dict[str, Any]) -> Any:
    """`value` as the flag would take it (its click type's and callback's conversions: "standard" -> "realtime",
    "3" -> 3), or click.BadParameter when it breaks the flag's rules (RunOptions.checked)."""
    kind = type(default) if default is not None else None
    if (kw.get("is_flag") or kind is bool) and not isinstance(value, bool):
        raise click.BadParameter("must be True or False")
    if isinstance(value, bool) and not (kw.get("is_flag") or kind is bool):
        raise click.BadParameter("must be a number or a string, not True/False")
    if isinstance(kw.get("type"), click.IntRange) and isinstance(value, float) and not value.is_integer():
        raise click.BadParameter(f"{value} is not a whole number")
    if isinstance(kw.get("type"), click.Path) and not isinstance(value, (str, os.PathLike)):
        raise click.BadParameter("must be a path")
    if isinstance(kw.get("type"), click.ParamType):
        value = kw["type"].convert(value, None, None)
    elif kw.get("type") is float and not isinstance(value, (int, float)):
        raise click.BadParameter("must be a number")
    elif kind is str and kw.get("callback") is None and not isinstance(value, str):
        raise click.BadParameter("must be a string")
    if kw.get("callback") is not None:
        value = kw["callback"](None, None, value)
    return value


def flag(default: Any, help: str, *decls: str, **click_kw: Any) -> Any:
    """A RunOptions field that is also a flag of `run` (and of the REST API's options): RunOptions is the
    option table, so a new option is one line here. `decls` default to --field-name; the default is shown
    in --help unless it is None (then the help says what None means)."""
    return field(default=default, metadata={"flag": (decls, help, click_kw)})


@dataclass
class RunOptions:
    """How to run: everything a command-line flag can set, with the library's defaults. None means "not
    given": the value is then decided where the context is known (the margin from the calibration, the poll
    interval from the endpoint, RPM/TPM from the catalog)."""

    id_field: str = flag("id", "The field holding each record's unique id.")
    text_field: str = flag("text", "The field holding each record's document text.")
    name: str | None = flag(None, "Run name (default: the input file's stem).")
    out: str | None = flag(
        None,
        "Results file [default: <input stem>.results.jsonl beside the input; <input stem>.<name>.results.jsonl for a --name "
        "other than the stem]",
        type=click.Path(dir_okay=False),
    )
    waves: str | int = flag("auto", "'auto' or a number of waves.", callback=_waves_value)
    batch_size: int = flag(DEFAULT_BATCH_SIZE, "Requests per batch job at most.", type=click.IntRange(1, INT_FLAG_MAX))
    tier: int = flag(1, "Your project's usage tier: picks the catalog's limits.", type=click.IntRange(1, 3))
    enqueued_limit: int | None = flag(
        None, "Enqueued-token limit (overrides the tier table).", type=click.IntRange(1, INT_FLAG_MAX)
    )
    margin: float | None = flag(
        None,
        "Share of the enqueued-token limit kept free. [default: three standard errors of the countTokens "
        f"calibration, {MARGIN_FLOOR} to {DEFAULT_MARGIN}; {DEFAULT_MARGIN} with the offline guess]",
        type=FiniteFloatRange(0, 0.9),
    )
    barrier: bool = flag(False, "Strict waves: wait for a whole wave before the next.", is_flag=True)
    max_active_jobs: int = flag(
        DEFAULT_MAX_ACTIVE_JOBS,
        "Batch jobs pending or running at once (the API allows 100).",
        type=click.IntRange(1, INT_FLAG_MAX),
    )
    poll_interval: float | None = flag(
        None, f"Seconds between polls [default: {DEFAULT_POLL_INTERVAL:g}; 1 for --endpoint local].", type=FiniteFloatRange(0.05)
    )
    mode: str = flag(
        "auto",
        "auto: batch, with a fallback for what batch could not finish; flex: every request through Flex (the batch "
        "price, minutes each); hybrid: batch jobs from the head of the queue and Flex lanes from its tail at once, "
        "meeting in the middle (the same price, sooner); realtime/standard: every request at the standard price.",
        type=click.Choice(["auto", "batch", "hybrid", "flex", "realtime", "standard"]),
        callback=_mode_value,
    )
    flex_lanes: int = flag(
        0,
        "Hybrid: at most this many batches drained through Flex at once (0: as many as keep the Flex pipe full, "
        "sized from the latency measured).",
        type=click.IntRange(0, INT_FLAG_MAX),
    )
    fallback_tier: str = flag(
        "auto",
        "What finishes what batch could not: flex (the batch price) where the model has it, else standard (2x).",
        type=click.Choice(["auto", "flex", "standard"]),
    )
    fallback: bool = flag(True, "Real-time fallback in auto mode.", "--fallback/--no-fallback")
    allow_standard: bool = flag(
        False,
        "Let the fallback use the standard tier (2x the batch price) where the model has no Flex tier (within --max-cost).",
        is_flag=True,
    )
    max_attempts: int = flag(
        DEFAULT_MAX_ATTEMPTS,
        "Batch jobs tried per batch (FAILED/EXPIRED ones are resubmitted).",
        type=click.IntRange(1, INT_FLAG_MAX),
    )
    rpm: int | None = flag(
        None,
        f"Real-time requests per minute. [default: the catalog's for the model and tier, else {DEFAULT_RPM:,}]",
        type=click.IntRange(1, INT_FLAG_MAX),
    )
    tpm: int | None = flag(
        None,
        "Real-time input tokens per minute. [default: the catalog's, else none (429s slow the rate)]",
        type=click.IntRange(1, INT_FLAG_MAX),
    )
    create_timeout: float = flag(
        DEFAULT_CREATE_TIMEOUT,
        "Seconds of batch creates refused (429) with nothing of the run enqueued before its ids go to the fallback.",
        type=FiniteFloatRange(0),
    )
    concurrency: int = flag(
        64,
        "Standard-tier requests in flight at most; for Flex the least in flight (its pipe is sized from the latency).",
        type=click.IntRange(1, INT_FLAG_MAX),
    )
    retry_scale: float = flag(1.0, "Multiplies every retry delay (drills).", type=FiniteFloatRange(0), hidden=True)
    rate_window: float = flag(60.0, "Seconds per RPM/TPM window.", type=FiniteFloatRange(0.1), hidden=True)
    max_cost: float | None = flag(None, "Stop before spending more than this many USD (> 0).", type=float, callback=_positive_usd)
    skip_invalid: bool = flag(False, "Set invalid records aside in <run>.rejected.jsonl and go on.", is_flag=True)
    allow_private_urls: bool = flag(
        False, "Fetch URLs that lead to loopback/private/link-local addresses too (off: refused).", is_flag=True
    )
    backend: str = flag(
        "gemini",
        "gemini: the Gemini Developer API's Batch API (an API key); vertex: Vertex AI batch prediction in your Google "
        "Cloud project, through Cloud Storage (--project, --location, --bucket; Application Default Credentials).",
        type=click.Choice(["gemini", "vertex"]),
    )
    project: str | None = flag(
        None, "Vertex: the Google Cloud project [default: env GOOGLE_CLOUD_PROJECT].", envvar="GOOGLE_CLOUD_PROJECT"
    )
    location: str | None = flag(
        None, "Vertex: the region, or global [default: env GOOGLE_CLOUD_LOCATION].", envvar="GOOGLE_CLOUD_LOCATION"
    )
    bucket: str | None = flag(None, "Vertex: gs://BUCKET[/PREFIX], batchify's staging area (request files and job outputs).")
    # library-only settings (no flag)
    max_file_bytes: int = MAX_FILE_BYTES
    max_poll_interval: float = MAX_POLL_INTERVAL
    calibrate: bool = True
    fetch: bool = True  # fetch the pages of records that have a url and no text

    @property
    def poll(self) -> float:
        """The base poll interval in seconds (the run's own once it started: run_file decides it)."""
        return self.poll_interval if self.poll_interval is not None else DEFAULT_POLL_INTERVAL

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checked(self, who: str = "RunOptions") -> RunOptions:
        """The options as a library caller gave them, held to the flags' own rules and taken as the flags take them
        (the option table's click types and callbacks: mode "standard" is "realtime", waves "3" is 3): UsageError
        (exit 2) naming the option. None means "not given" and always passes. A copy when anything was converted."""
        taken: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or "flag" not in f.metadata:
                continue
            if isinstance(value, os.PathLike):  # out=Path(...), as state_dir takes one: the flag's text
                value = taken[f.name] = os.fspath(value)
            decls, _help, kw = f.metadata["flag"]
            try:
                taken[f.name] = _check_flag_value(value, f.default, kw)
            except click.BadParameter as e:
                flag_name = decls[0].split("/")[0] if decls else f"--{f.name.replace('_', '-')}"
                raise UsageError(f"{who} {f.name}={value!r} ({flag_name}): {e.message}") from None
        mpi = self.max_poll_interval
        if isinstance(mpi, bool) or not isinstance(mpi, (int, float)) or not (math.isfinite(mpi) and mpi > 0):
            raise UsageError(
                f"RunOptions max_poll_interval={mpi!r}: must be a finite number of seconds above 0. Fix: leave it out "
                f"(default {MAX_POLL_INTERVAL:g}) or give such a number."
            )
        changed = {k: v for k, v in taken.items() if v != getattr(self, k) or type(v) is not type(getattr(self, k))}
        return dataclasses.replace(self, **changed) if changed else self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- Vertex AI's own figures for Gemini batch prediction (docs/VERTEX_NOTES.md A3; pages read 2026-12-01) -----
# Data, like the model catalog: each figure with the page it came from. None: Google publishes no figure (the
# plan says so, and the flag that sets it is named), never a guess.
VERTEX_SOURCES = {
    "batch_inference": "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/capabilities/batch-inference "
    "(formerly cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini; no date on the page; read 2026-12-01)",
    "batch_gemini": "https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini "
    "(zh-CN copy 'last updated 2025-09-03'; read 2026-12-01)",
    "batch_gemini_old": "https://cloud-dot-devsite-v2-prod.appspot.com/vertex-ai/generative-ai/docs/batch-prediction (older edition, "
    "superseded; read 2026-12-01)",
    "models_list": "https://docs.cloud.google.com/gemini-enterprise-agent-platform/reference/models/batch-prediction-api "
    "('Supported models', no date; read 2026-12-01, again 2026-12-02: Gemini 4 Hydrogen, 4 Carbon, 4 Argon, 3.8 Flash, "
    "3.7 Flash, 3.6 Flash, 3.5 Flash-Lite, ... "
    "(the stored copy is cut there); the older ones from GoogleCloudPlatform/generative-ai's batch-prediction guide, "
    "https://mintlify.com/GoogleCloudPlatform/generative-ai/gemini/batch-prediction, read 2026-12-01)",
    "flex_paygo": "https://docs.cloud.google.com/gemini-enterprise-agent-platform/models/flex-paygo (preview; read "
    "2026-12-01): Vertex's Flex PayGo, 50% off, asked for with the X-Vertex-AI-LLM-Shared-Request-Type header on the "
    "global endpoint only, 'not supported in newer Gemini models such as Gemini 4 Argon'",
    "pricing": "https://cloud.google.com/vertex-ai/generative-ai/pricing is not in the stored copies: per-model Vertex prices "
    "unpublished here; third parties (deploybase.ai, 2025-04-17) list the Developer API's paid prices for 2.5 Flash/Pro",
}
VERTEX_LIMITS: dict[str, Any] = {
    "requests_per_job": 200_000,  # batch_inference: at most 200,000 requests in one batch job
    "input_bytes_per_job": 1_000_000_000,  # batch_inference: an input file of at most 1 GB (read as 10^9, the smaller)
    "concurrent_jobs": None,  # batch_inference: "no predefined quota" (a shared pool); batch_gemini_old said 8, queued beyond
    "queue_hours": 72,  # batch_inference: a job waits in the queue up to 72 h, then expires
    "run_hours": 24,  # batch_inference: most jobs end within 24 h of starting; after 24 h the rest is cancelled (paid as done)
    "batch_discount": 0.5,  # batch_gemini: "50% discounted rate compared to real-time inference"
}
VERTEX_BATCH_MODELS = (
    "gemini-4-hydrogen",
    "gemini-4-carbon",
    "gemini-4-argon",
    "gemini-3.8-flash",
    "gemini-3.7-flash",
    "gemini-3.6-flash",
    "gemini-3.5-flash-lite",
    "gemini-3.1-pro-preview",
    "gemini-3-flash-preview",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.0-flash",
)
VERTEX_LINE_OVERHEAD = 32  # bytes a Vertex request line may have over the Developer API's (the key moves into labels: 20)
VERTEX_NO_TOKEN_LIMIT = 10**15  # Vertex has no enqueued-token limit: admission is by jobs at once (--max-active-jobs)


# ================================================================================================
# 2. Errors
# ================================================================================================


DISK_EXIT = 6  # the exit code for a disk that refuses writes (full, read-only): see main()


class BatchifyError(Exception):
    """The root of every error batchify raises on purpose; exit_code is what the CLI returns."""

    exit_code = 3


class UsageError(BatchifyError):
    exit_code = 2


class NoApiKeyError(UsageError):
    """No API key was given (the library reads no environment; the CLI says which variable to set)."""


class Declined(BatchifyError):
    """The user said no to the plan: nothing was submitted, which is not an error."""

    exit_code = 0


class InputError(BatchifyError):
    """Bad input: the message names the file, the line and the fix."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class InvalidRecords(InputError):
    """Records that fail validation; `checked` is the message for a check alone (`validate`: nothing was
    going to be sent, and --skip-invalid does not apply)."""

    def __init__(self, message: str, problems: list[str], checked: str):
        super().__init__(message, problems)
        self.checked = checked


class ConfigError(InputError):
    pass


class StateError(BatchifyError):
    """A sidecar is corrupt or a transition is illegal."""


class LockedError(BatchifyError):
    exit_code = 4


class CostCapError(BatchifyError):
    exit_code = 5


class Interrupted(BatchifyError):
    """A run stopped because its caller asked (GracefulStop.request(): the CLI's first Ctrl-C or SIGTERM) once the
    real-time requests already sent were answered: every step so far is saved, `resume` finishes the run.
    `kept`: the answers that arrived (and were saved) after the request."""

    exit_code = 130

    def __init__(self, message: str, kept: int = 0):
        super().__init__(message)
        self.kept = kept


class RemoteError(BatchifyError):
    """An error answered by the Gemini API (or the network on the way)."""

    def __init__(self, message: str, code: int = 0, status: str = "", retry_delay: float | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_delay = retry_delay

    # A create's 400/403: does it say the uploaded input is gone (upload it again) or not (final)? None: the
    # backend does not say, and the engine reads the words (the Developer API names the File).
    input_gone: bool | None = None
    timed_out = False  # the client gave up waiting (the request may still be answered, and billed, at the service)

    @property
    def transient(self) -> bool:
        """Worth trying again: network errors (code 0), 408, 429, 5xx, and the 400 "Unsupported MIME type"
        that users report the upload endpoint answering intermittently (python-genai#1547)."""
        return self.code in TRANSIENT_CODES or (self.code == 400 and "Unsupported MIME type" in str(self))


TRANSIENT_CODES = frozenset({0, 408, 429, 500, 502, 503, 504})


class OutWriteError(RemoteError):
    """The merge could not write --out gs://… (a bucket gone, a write refused, the network): the results are
    whole in the run's sidecars; Engine.merge names the fix."""


class ShortOutput(RemoteError):
    """A job's output came back with fewer lines than its batchStats counts (a download cut short)."""


class StagedRequestGone(RemoteError):
    """A request object prepare staged in the bucket answers 404 (deleted since: a lifecycle rule, a `gsutil rm`):
    GsRequests.remote_file. The engine writes it again from the input before the job is created (Engine._restage)."""

    def __init__(self, message: str, uri: str):
        super().__init__(message, code=404)
        self.uri = uri


class BatchRefusedError(RemoteError):
    """Batch creation refused for good (403 permission/billing, 404 model without batch)."""


class AuthError(RemoteError):
    """The API key was refused (400 API_KEY_INVALID, 401, 403 naming the key): nothing will work; stop at once."""


class ServiceSilent(RemoteError):
    """A job's polls failed (network errors, 5xx, 429) for POLL_SILENCE_S in a row: the service or the way to it is
    down. The run stops as a graceful stop does (Engine.halt), every job kept as it is (it may still run at the
    service; failing it and creating it again would pay twice); `resume` goes on once the service answers."""


class ServiceRefused(AuthError):
    """The service refuses the account's calls for a reason no retry mends and the request does not cause: 403
    PERMISSION_DENIED or 400 FAILED_PRECONDITION (billing, the user's location, project permissions), or a job's
    polls refused POLL_REFUSALS times in a row. The run stops as a graceful stop does (Engine.halt: nothing new is
    sent, the requests already sent are waited for), every job kept as it is (a job whose polls are refused has not
    ended: failing it and creating it again would pay twice); `resume` goes on once it is mended."""


def account_refusal(e: RemoteError) -> bool:
    """An answer about the account, not the request (account-wide: stop, do not record it against an id): 403, or
    a 400 FAILED_PRECONDITION ("User location is not supported", "enable billing", the free tier's countries). Not
    one that names a file: "You do not have permission to access the File ... or it may not exist" (a fileData URI
    expired after 48 h, or another project's) and "File ... is not in an ACTIVE state" are about that request."""
    if re.search(r"\bfiles?\b", str(e), re.I):
        return False
    return e.code == 403 or (e.code == 400 and (e.status == "FAILED_PRECONDITION" or "FAILED_PRECONDITION" in str(e)))


# ================================================================================================
# 3. Data model and state machine
# ================================================================================================


class Hook(StrEnum):
    """The points where the engine calls its hook (tests and the crash drills: BATCHIFY_CRASH_AT=point[:n]).
    Each is a moment a crash must be survivable from."""

    PREPARE = "prepare"  # a request file written and closed by prepare (on Vertex: an object in the bucket)
    BEFORE_UPLOAD = "before_upload"  # UPLOADING recorded, the upload not yet started
    AFTER_UPLOAD = "after_upload"  # uploaded, UPLOADED recorded
    AFTER_INTENT = "after_intent"  # SUBMITTING recorded, batches.create not yet called
    AFTER_CREATE = "after_create"  # batches.create answered, the answer not yet recorded (still SUBMITTING)
    AFTER_POLL = "after_poll"  # batches.get answered, the answer not yet recorded
    AFTER_DOWNLOAD = "after_download"  # a job's results downloaded, not yet written nor recorded
    AFTER_REALTIME = "after_realtime"  # a real-time / Flex answer appended
    MERGE = "merge"  # every 16th line written by merge


class JobState(StrEnum):
    CREATED = "CREATED"  # request file written
    UPLOADING = "UPLOADING"  # intent to upload recorded
    UPLOADED = "UPLOADED"  # remote file known
    SUBMITTING = "SUBMITTING"  # intent to create recorded; reconcile by display name on resume
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"
    RESULTS_DOWNLOADED = "RESULTS_DOWNLOADED"
    FLEXED = "FLEXED"  # its requests went through a Flex lane (never created as a batch job); results in realtime.jsonl
    SPLIT = "SPLIT"  # too big for the enqueued limit the service showed: its requests are in smaller jobs (its parts)


_REMOTE_OUTCOMES = frozenset(
    {JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}
)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.UPLOADING, JobState.CANCELLED, JobState.FAILED, JobState.FLEXED, JobState.SPLIT}),
    JobState.UPLOADING: frozenset(
        {JobState.UPLOADED, JobState.CREATED, JobState.CANCELLED, JobState.FAILED}
    ),  # FAILED: upload refused N times
    JobState.UPLOADED: frozenset(
        {JobState.SUBMITTING, JobState.UPLOADING, JobState.CANCELLED, JobState.FAILED, JobState.FLEXED, JobState.SPLIT}
    ),  # FAILED: creates refused too long
    JobState.SUBMITTING: _REMOTE_OUTCOMES | {JobState.UPLOADED},
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED}),
    # FAILED: the output not downloadable for OUTPUT_PATIENCE_S
    JobState.SUCCEEDED: frozenset({JobState.RESULTS_DOWNLOADED, JobState.FAILED}),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.EXPIRED: frozenset(),
    JobState.RESULTS_DOWNLOADED: frozenset(),
    JobState.FLEXED: frozenset(),
    JobState.SPLIT: frozenset(),
}
ACTIVE_STATES = frozenset({JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING})  # count against the enqueued limit
REMOTE_LIVE = frozenset({JobState.PENDING, JobState.RUNNING})
ENDED_UNFINISHED = frozenset({JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED})  # ended with its work not all done
FINAL_STATES = frozenset(
    {JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.RESULTS_DOWNLOADED, JobState.FLEXED, JobState.SPLIT}
)
UNSUBMITTED = frozenset({JobState.CREATED, JobState.UPLOADING, JobState.UPLOADED})


def parse_remote_state(value: str | None) -> JobState:
    """Map BATCH_STATE_* (REST) and JOB_STATE_* (SDK) names to our state; unknown is an error. No state at all
    (None, or ""): proto3 JSON leaves out an enum's value 0, BATCH_STATE_UNSPECIFIED, read as PENDING."""
    if value is None or str(value) in ("", "None"):
        return JobState.PENDING
    v = str(value).split(".")[-1].upper()
    for prefix in ("BATCH_STATE_", "JOB_STATE_"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
            break
    aliases = {
        "QUEUED": "PENDING",
        "CANCELLING": "RUNNING",
        "PAUSED": "RUNNING",
        "UPDATING": "RUNNING",
        "PARTIALLY_SUCCEEDED": "SUCCEEDED",
        "UNSPECIFIED": "PENDING",
    }
    v = aliases.get(v, v)
    if v in (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED):
        return JobState(v)
    raise StateError(f"unknown remote batch state {value!r}")


@dataclass(frozen=True)
class Job:
    """One batch job (one request file, one remote job), persisted as jobs/<name>.json."""

    name: str  # local name: b0001, or b0001-r2 for a retry
    index: int
    display_name: str  # unique per run and attempt: how a crashed create is found again
    request_file: str  # relative to the run folder
    request_count: int
    tokens: int
    bytes: int
    wave: int = 0
    start: int | None = None  # the ordinals [start, end) of a primary batch
    end: int | None = None
    attempt: int = 1
    retry_of: str | None = None
    state: JobState = JobState.CREATED
    remote_file: str | None = None
    remote_job: str | None = None
    output_file: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    cancelled_by_user: bool = False
    no_retry: bool = False  # failed in a way another attempt cannot mend (creates refused for too long)
    lane: str = "batch"  # batch | flex: who owns it, recorded before the Flex lane sends any of its requests
    part: str = ""  # ".1", ".2", ".1.2", ...: a part of a split job (in its name and display name)
    split_cap: int = 0  # SPLIT: the token cap its parts were cut to (repair makes missing parts with it)
    usage: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    failed: int = 0
    timestamps: dict[str, str] = field(default_factory=dict)
    # Wall clock (epoch seconds) when its last create was sent, written with the SUBMITTING intent: a resume soon
    # after an interruption there waits out the create's settle window from it (resumed_create_since). Absent from
    # the sidecars of older batchify versions (None: one listing decides), ignored by them.
    create_sent_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = str(self.state)
        return {"schema_version": SCHEMA_VERSION, "kind": "job", **d}

    @property
    def done(self) -> int:
        """Its requests done so far: all of them once its results are in; a Flex-drained batch's answers; else what
        the service's batchStats count (successful + failed)."""
        if self.state == JobState.RESULTS_DOWNLOADED:
            return self.request_count
        if self.state == JobState.FLEXED:
            return self.ok + self.failed
        return self.stats.get("successfulRequestCount", 0) + self.stats.get("failedRequestCount", 0)

    @property
    def primary_range(self) -> range | None:
        """The ordinals [start, end) of a batch's first job as prepare cut it (its "primary"), read from the
        input's order; None for a retry, a split part or the line retry, whose requests are in their own file."""
        if self.start is None or self.end is None or self.attempt != 1 or self.retry_of is not None:
            return None
        return range(self.start, self.end)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        validate_job_dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["state"] = JobState(kw["state"])
        return cls(**kw)


# The migration hook: (kind, version) -> a function that rewrites a sidecar of that version, in place, into
# the next version's form (and sets its schema_version). Version 1 is the first, so there is none yet; a
# change to Job or Run that old sidecars do not satisfy adds one here and bumps SCHEMA_VERSION.
def _run_v1_to_v2(d: dict[str, Any]) -> None:
    """v2: run.json's "realtime" (flags about batch creates, never about real time) is named "notes"."""
    d["notes"] = d.pop("realtime", None) or {}


MIGRATIONS: dict[tuple[str, int], Callable[[dict[str, Any]], None]] = {
    ("run", 1): _run_v1_to_v2,
    ("job", 1): lambda d: None,  # v2 changed run.json only
}


def check_schema_version(d: dict[str, Any], kind: str) -> None:
    """Bring a sidecar to SCHEMA_VERSION through MIGRATIONS (in place); a newer one was written by a newer
    batchify and is refused with the hint to upgrade."""
    v = d.get("schema_version")
    if type(v) is int and v > SCHEMA_VERSION:
        raise StateError(
            f"{kind} sidecar schema_version {v} is newer than this batchify's {SCHEMA_VERSION}: upgrade batchify to read it"
        )
    while type(v) is int and v < SCHEMA_VERSION and (kind, v) in MIGRATIONS:
        MIGRATIONS[(kind, v)](d)
        if d.get("schema_version") == v:
            d["schema_version"] = v + 1
        v = d["schema_version"]
    if v != SCHEMA_VERSION:
        raise StateError(f"{kind} sidecar schema_version {v!r}, expected {SCHEMA_VERSION}")


def validate_job_dict(d: dict[str, Any]) -> None:
    if not isinstance(d, dict) or d.get("kind") != "job":
        raise StateError('not a job sidecar (no "kind": "job")')
    check_schema_version(d, "job")
    for k, t in (
        ("name", str),
        ("display_name", str),
        ("request_file", str),
        ("request_count", int),
        ("tokens", int),
        ("state", str),
        ("attempt", int),
    ):
        if not isinstance(d.get(k), t):
            raise StateError(f"job sidecar field {k!r} missing or not {t.__name__}")
    if d["state"] not in JobState.__members__:
        raise StateError(f"job sidecar has unknown state {d['state']!r}")
    sent = d.get("create_sent_at")
    if sent is not None and (isinstance(sent, bool) or not isinstance(sent, int | float)):
        raise StateError("job sidecar field 'create_sent_at' not a number")


def listed_state(value: Any) -> JobState:
    """A state in batches.list: as parse_remote_state, but one batchify does not know (someone else's job, or a
    state added since) is taken as live (PENDING) rather than failing the whole list, which reconciling needs."""
    try:
        return parse_remote_state(value)
    except StateError:
        return JobState.PENDING


def observed_state(current: JobState, remote: JobState) -> JobState:
    """The state a poll moves a job to: the service's, unless no transition leads there from where the job
    is (a stale answer from a replica behind, RUNNING -> PENDING): then the job stays where it is."""
    return remote if remote == current or remote in TRANSITIONS[current] else current


def retrieved_state(remote: JobState, output_file: str | None, exports_rows: bool) -> JobState:
    """The state to take a job's end as. A job the service ended FAILED, EXPIRED or CANCELLED naming an output that
    holds rows (`exports_rows`: a backend that exports, and bills, the rows it completed before the end, as Vertex
    does after its 24 h limit, a failure or a cancel: docs/VERTEX_NOTES.md A5) is retrieved like a SUCCEEDED one:
    its rows are kept and only its requests missing from them go again (line retry, real-time fallback), never
    the whole job, paid twice. Otherwise the service's own state."""
    if exports_rows and output_file and remote in ENDED_UNFINISHED:
        return JobState.SUCCEEDED
    return remote


def advance(job: Job, new: JobState, now: str, **changes: Any) -> Job:
    """The one way a job changes state: refuses moves not in TRANSITIONS (same-state is a no-op move)."""
    if new != job.state and new not in TRANSITIONS[job.state]:
        raise StateError(f"job {job.name}: illegal transition {job.state} -> {new}")
    ts = dict(job.timestamps)
    if new != job.state:
        ts[str(new)] = now
    return dataclasses.replace(job, state=new, timestamps=ts, **changes)


class RealtimeLimits(TypedDict):
    """Requests and tokens per minute for the Flex / standard lanes, and where each figure came from."""

    rpm: int
    rpm_source: str
    tpm: int | None
    tpm_source: str


class ModeEstimate(TypedDict):
    cost_usd: float
    time: str


class Plan(TypedDict, total=False):
    """run.json's "plan": written by prepare (estimate_plan, then _full_plan), read by the engine, status and
    the renderers. Only effective_limit and limit_learned change after prepare (a limit learned from 429s)."""

    model: str
    records: int
    batches: int
    waves: int
    input_tokens: int
    expected_output_tokens: int
    expected_thinking_tokens: int
    enqueued_limit: int
    effective_limit: int  # the limit planned to (after the margin; lowered when one is learned)
    estimated_cost_usd: float
    estimated_cost_realtime_usd: float
    realtime_share: float
    estimated_time: str
    wave_tokens: list[int]
    jobs_per_wave: list[int]
    batch_size_max: int
    prices_per_1m: dict[str, dict[str, float]]  # service -> {"input", "output"} USD per 1M tokens
    wave_of_batch: dict[str, int]  # batch number (as a string: JSON keys) -> its wave, 0-based
    batch_ranges: list[list[int]]  # per batch: [first ordinal, end ordinal, tokens, bytes]
    model_spec: dict[str, Any]  # the figures this run plans and bills with, whatever the catalog says later
    catalog_as_of: str
    generation_config: dict[str, Any]
    generation_config_json: str  # the whole generationConfig as the requests carry it, in its order (rebuilds)
    context_limit: int
    enqueued_limit_source: str
    realtime_limits: RealtimeLimits
    margin: float
    batch_token_cap: int
    warnings: list[str]
    lanes: str  # batch | flex | standard | hybrid (lanes_for)
    modes: dict[str, ModeEstimate]
    limit_learned: str


class RunNotes(TypedDict, total=False):
    """run.json's "notes": what the engine learned about the run that must survive a restart."""

    create_refused: str  # why batch creates are being refused (429s with nothing enqueued)
    batch_refused: str  # the service refused the batch API for this key/model: the fallback took over
    line_retry_done: bool  # the one round of re-sending per-line errors happened
    repairs: list[str]  # what resume rebuilt from the service, with when


@dataclass
class Run:
    """One run: its input, job definition, options and plan; persisted as run.json."""

    name: str
    run_id: str
    input_path: str
    input_sha256: str
    input_format: str
    config: dict[str, Any]
    options: dict[str, Any]
    endpoint: str | None
    records: int
    rejected: int
    chars_per_token: float
    calibrated: bool
    plan: Plan
    out: str
    created_at: str
    status: str = "prepared"  # prepared | running | done | cancelled
    notes: RunNotes = field(default_factory=lambda: RunNotes())
    summary: dict[str, Any] = field(default_factory=dict)
    updated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "run", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        validate_run_dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def job_config(self) -> JobConfig:
        return JobConfig.from_dict(self.config)

    @property
    def run_options(self) -> RunOptions:
        return RunOptions.from_dict(self.options)


_NUMBER = (int, float)
# run.json's fields as prepare writes them, grouped by type. Checked on load (validate_run_dict), so that a
# hand edit or a damaged file is a StateError naming the field, not a traceback wherever the value is first used.
_FieldTypes = tuple[tuple[tuple[str, ...], type | tuple[type, ...], bool], ...]  # (fields, types, required)
RUN_FIELD_TYPES: _FieldTypes = (
    (("name", "run_id", "input_path", "input_sha256", "input_format", "out", "created_at"), str, True),
    (("config", "options", "plan"), dict, True),
    (("records", "rejected"), int, True),
    (("chars_per_token",), _NUMBER, True),
    (("calibrated",), bool, True),
    (("endpoint",), (str, type(None)), True),
    (("status", "updated_at"), str, False),
    (("notes", "summary"), dict, False),
)
PLAN_FIELD_TYPES: _FieldTypes = (  # when present: every plan prepare writes has them
    (("batch_ranges",), list, False),
    (("effective_limit", "estimated_cost_usd"), _NUMBER, False),
)


def _type_names(t: type | tuple[type, ...]) -> str:
    return " or ".join("null" if x is type(None) else x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _check_fields(d: dict[str, Any], fields: _FieldTypes, where: str) -> None:
    for names, t, required in fields:
        for k in names:
            if k not in d and not required:
                continue
            v = d.get(k)
            if not isinstance(v, t) or (isinstance(v, bool) and t is not bool):  # JSON true is no count
                got = "missing" if k not in d else f"is {orjson.dumps(v).decode()[:40]}"
                raise StateError(f"damaged run.json: field {where + k!r} {got}, not {_type_names(t)}")


def validate_run_dict(d: dict[str, Any]) -> None:
    if not isinstance(d, dict) or d.get("kind") != "run":
        raise StateError('not a run sidecar (no "kind": "run")')
    check_schema_version(d, "run")
    _check_fields(d, RUN_FIELD_TYPES, "")
    _check_fields(d["plan"], PLAN_FIELD_TYPES, "plan.")
    if not d["out"].strip():
        raise StateError("damaged run.json: field 'out' is empty, not the results file's path")
    for r in d["plan"].get("batch_ranges", []):
        if not isinstance(r, list) or len(r) < 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise StateError(
                f"damaged run.json: field 'plan.batch_ranges' holds {orjson.dumps(r).decode()[:40]}, not [start, end, ...]"
            )


def run_model_spec(run: Run, today: str = "0000-00-00") -> ModelSpec:
    """The model figures a run was planned with (kept in its plan), or, for a run prepared before the
    catalog, the built-in catalog's entry for its model. With `today` (YYYY-MM-DD), the prices in force that day:
    the plan's dated price changes (price_timeline, kept since prepare) dated on or before it applied. The default
    is the prices of the day the run was prepared. A plan from before price_changes were kept (no such key) takes
    the built-in catalog's dated changes after its prepare day, when the catalog priced its model as the plan did
    that day: else a run prepared by an older batchify and resumed after a change was costed, and capped by
    --max-cost, at half what is billed (the upgrade adversary's reproducer 03)."""
    d = run.plan.get("model_spec")
    if isinstance(d, dict):
        raw = {k: v for k, v in d.items() if k not in ("name", "price_note") and v is not None and v != {} and v != []}
        if "price_changes" not in d:
            raw["price_changes"] = _catalog_price_changes(run, str(d.get("name", "")), raw)
        return model_spec(str(d.get("name", "")), raw, f"run {run.name!r}", today)
    model = str(run.config.get("model") or DEFAULT_MODEL).removeprefix("models/")
    cat = builtin_catalog()
    if model in cat.models:
        return cat.spec(model, cat.as_of)
    return ModelSpec(model, "other", "stable", 0.0, 0.0, note="not in the catalog when this run was prepared: cost unknown")


def _catalog_price_changes(run: Run, name: str, planned: dict[str, Any]) -> list[dict[str, Any]]:
    """For a plan kept without its dated price changes: the built-in catalog's after the run's prepare day, if the
    catalog's prices for the model that day are the plan's (the same model, not one a --models table defined). The
    day is run.created_at's, or the day before (a prepare that began before midnight UTC priced on that day)."""
    cat, created = builtin_catalog(), run.created_at[:10]
    if name not in cat.models or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", created):
        return []
    for day in (created, _add_days(created, -1)):
        try:
            then = backend_spec(resolve_model(cat, name, day), run.run_options)
        except (UsageError, ConfigError):
            continue
        if all(planned.get(k) == getattr(then, k) for k in ("input_price", "output_price")):
            return price_timeline(cat, name, day, run.run_options)
    return []


# ================================================================================================
# 4. Pure planners: records, prompts, requests, tokens, batches, waves, cost
# ================================================================================================

OPTIONAL_FIELDS = ("title", "url")


def template_fields(template: str) -> list[str]:
    """The {field} names a prompt template uses (raises ValueError on a malformed template)."""
    out = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if name == "" or not name.isidentifier():
                raise ValueError(f"field {{{name}}} is not a plain field name")
            out.append(name)
    return out


def check_record(obj: Any, id_field: str, text_field: str, fields: Iterable[str]) -> str | None:
    """None when the record is usable, else what is wrong with it and how to fix it."""
    if type(obj) is dict:  # the common case, checked without building anything (prepare's hot loop)
        rid = obj.get(id_field)
        text = obj.get(text_field)
        if (type(rid) is int or (type(rid) is str and rid)) and type(text) is str and text and not text.isspace():
            for f in fields:
                if f not in obj and f != text_field and f != "text" and f not in OPTIONAL_FIELDS:
                    break
            else:
                return None
    if not isinstance(obj, dict):
        return f"record is a JSON {type(obj).__name__}, not an object. Fix: one JSON object per line"
    if id_field not in obj:
        return f"no '{id_field}' field. Fix: give every record a unique id (or name the field with --id-field)"
    rid = obj[id_field]
    if type(rid) is float and rid.is_integer() and abs(rid) >= 2**63:
        return (
            f"'{id_field}' is an integer too large for 64 bits (about {rid:.3g}); it would not come back as given. "
            "Fix: give such ids as strings"
        )
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return (
            f"'{id_field}' must be a non-empty string or an integer, not {orjson.dumps(rid).decode()[:40]}. "
            "Fix: give the record a unique string or integer id"
        )
    text = obj.get(text_field)
    if text is None:
        return f"no '{text_field}' field. Fix: add the document text (or name the field with --text-field)"
    if not isinstance(text, str) or not text or text.isspace():  # isspace: no copy of a long text
        return f"'{text_field}' is empty or not a string. Fix: give the document text as a non-empty string"
    for f in fields:  # {text} is the document text, from `text_field`
        if f not in (text_field, "text", *OPTIONAL_FIELDS) and f not in obj:
            return f"the prompt template uses {{{f}}} but the record has no '{f}' field. Fix: add it or change the template"
    return None


class _PromptValues(dict[str, Any]):
    """A record seen by the template: {title} and {url} may be missing, None prints as nothing."""

    __slots__ = ("text_field",)
    text_field: str

    def __missing__(self, key: str) -> Any:
        if key in OPTIONAL_FIELDS:
            return ""
        raise KeyError(key)

    def __getitem__(self, key: str) -> Any:
        if key == "text" and self.text_field != "text":  # {text} is the document text: --text-field's, always
            key = self.text_field
        v = super().__getitem__(key)
        return "" if v is None else v


@functools.lru_cache(maxsize=16)
def _fields_of(template: str) -> tuple[str, ...]:
    return tuple(template_fields(template))


_ABSENT = object()


def render_prompt(template: str, record: dict[str, Any], text_field: str) -> str:
    """The template filled from a record by _PromptValues' rules. The hot loop's cases skip building one: every
    field present and not None (the record itself fills the template), or every field found by those rules (a
    plain dict of just the template's values: 6.7 -> 2.4 us a record with {title} and {url} missing). A field
    not found takes _PromptValues' path, which raises as it always did."""
    fields = _fields_of(template)
    if text_field == "text":
        for f in fields:
            if record.get(f) is None:
                break
        else:
            return template.format_map(record)
    if type(record) is dict:
        values: dict[str, Any] = {}
        for f in fields:
            v = record.get(text_field if f == "text" else f, _ABSENT)  # {text} is --text-field's, always
            if v is _ABSENT:
                if f in OPTIONAL_FIELDS or (f == "text" and text_field in OPTIONAL_FIELDS):
                    v = ""
                if v is _ABSENT:
                    break
            values[f] = "" if v is None else v
        else:
            return template.format_map(values)
    slow = _PromptValues(record)
    slow.text_field = text_field
    return template.format_map(slow)


def default_max_output(spec: ModelSpec, choice: str | int | None, expected_output_tokens: int) -> int | None:
    """maxOutputTokens when none is given: thinking shares it with the answer, so leave room for both
    (a cap of 1,024 with thinking on gives MAX_TOKENS and cut JSON); never above the model's own limit."""
    room = thinking_room(choice) + max(ANSWER_ROOM_MIN, 4 * expected_output_tokens)
    return min(room, spec.output_token_limit) if spec.output_token_limit else room


def generation_config(cfg: JobConfig, spec: ModelSpec) -> dict[str, Any]:
    """The generationConfig a request carries, in the field each model takes: thinkingLevel (Gemini 3),
    thinkingBudget (2.5), nothing where the catalog knows no rule; never a value the model refuses."""
    gc: dict[str, Any] = {}
    temperature = cfg.temperature if cfg.temperature is not None else spec.temperature
    if temperature is not None:
        gc["temperature"] = temperature
    choice = thinking_choice(spec, cfg.thinking)
    max_out = (
        cfg.max_output_tokens
        if cfg.max_output_tokens is not None
        else default_max_output(spec, choice, cfg.expected_output_tokens)
    )
    if max_out is not None:
        gc["maxOutputTokens"] = max_out
    if isinstance(choice, str):
        gc["thinkingConfig"] = {"thinkingLevel": choice.upper()}  # the SDK's spelling of the enum
    elif isinstance(choice, int):
        gc["thinkingConfig"] = {"thinkingBudget": choice}
    if cfg.schema is not None:
        gc["responseMimeType"] = "application/json"
        gc["responseJsonSchema"] = cfg.schema
    return gc


def build_request(cfg: JobConfig, prompt: str, gen_config: dict[str, Any]) -> dict[str, Any]:
    """A GenerateContentRequest in the wire's camelCase, as one line of a batch file carries it."""
    req: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    if cfg.system_instruction:
        req["systemInstruction"] = {"parts": [{"text": cfg.system_instruction}]}
    gc = gen_config
    if gc:
        req["generationConfig"] = gc
    return req


class RequestLines:
    """Prepare's request lines, {"key": str(n), "request": build_request(cfg, prompt, gc)} as orjson writes them,
    made by splicing: the parts around the key and the prompt are the same in every line (the system instruction,
    the generationConfig with its schema), so they are encoded once, and each line encodes its key and prompt alone
    (4.5 -> 2.6 us a line of 12 KB). The same bytes as the dict's (a hypothesis property pins it); a config whose
    encoding would not split cleanly falls back to the dict. `entry`: also give (key, request) for a sink that
    stores another form (RequestFiles.needs_entry), which is built from the dict as before."""

    def __init__(self, cfg: JobConfig, gc: dict[str, Any], entry: bool = False):
        self.cfg, self.gc = cfg, gc
        marker = f"\x00batchify-{secrets.token_hex(8)}\x00"  # in no config: \x00 is escaped, the token random
        whole = orjson.dumps({"key": marker, "request": build_request(cfg, marker, gc)}, option=NL)
        parts = whole.split(orjson.dumps(marker))
        self.parts = tuple(parts) if len(parts) == 3 and not entry else None

    def make(self, n: int, prompt: str) -> tuple[bytes, tuple[str, dict[str, Any]] | None]:
        """(the line for request `n`, its (key, request) when `entry`, else None)."""
        if self.parts is not None:
            head, mid, tail = self.parts
            return b"".join((head, b'"%d"' % n, mid, orjson.dumps(prompt), tail)), None
        key, req = str(n), build_request(self.cfg, prompt, self.gc)
        return orjson.dumps({"key": key, "request": req}, option=NL), (key, req)


def request_chars(req: dict[str, Any]) -> int:
    """The characters of text a request sends (contents and system instruction): what token estimates count."""
    chars = sum(len(p.get("text", "")) for c in req["contents"] for p in c["parts"])
    return chars + sum(len(p.get("text", "")) for p in (req.get("systemInstruction") or {}).get("parts", []))


def estimate_tokens(chars: int, chars_per_token: float) -> int:
    return max(1, math.ceil(chars / chars_per_token))


def calibrate_chars_per_token(samples: list[tuple[int, int]]) -> float:
    """(characters, counted tokens) pairs -> characters per token, clamped to a sane range."""
    chars = sum(c for c, _ in samples)
    tokens = sum(t for _, t in samples)
    if chars <= 0 or tokens <= 0:
        return CHARS_PER_TOKEN_OFFLINE
    return min(8.0, max(1.0, chars / tokens))


def should_cut(
    count: int, tokens: int, nbytes: int, next_tokens: int, next_bytes: int, batch_size: int, token_cap: int, max_bytes: int
) -> bool:
    """Whether the next request must start a new batch (the current one is full)."""
    if count == 0:
        return False
    return count >= batch_size or tokens + next_tokens > token_cap or nbytes + next_bytes > max_bytes


@dataclass(frozen=True)
class BatchPlan:
    start: int  # the ordinals [start, end) it covers (failed fetches included: they have no request)
    end: int
    tokens: int
    bytes: int
    requests: int | None = None  # the requests in it; None: one per ordinal

    @property
    def count(self) -> int:
        return self.end - self.start if self.requests is None else self.requests


class BatchCutter:
    """The one batch cutter: requests, in input order, into contiguous batches where should_cut() says. Used
    by plan_batches() and by prepare's streaming pass (which writes each batch's file as it goes). Plain
    data in, plain data out: no I/O.

    Ordinals that carry no request (a URL that could not be fetched keeps its place with an error line)
    belong to the batch before them, so the batches' ranges cover every ordinal exactly once."""

    def __init__(self, batch_size: int, token_cap: int, max_bytes: int):
        self.batch_size, self.token_cap, self.max_bytes = batch_size, token_cap, max_bytes
        self.batches: list[BatchPlan] = []
        self.start = self.count = self.tokens = self.nbytes = 0

    def add(self, ordinal: int, tokens: int, nbytes: int) -> bool:
        """Count the request at `ordinal`; True when it starts a new batch (the one before, if any, is closed
        at this ordinal)."""
        new = self.count == 0
        if should_cut(self.count, self.tokens, self.nbytes, tokens, nbytes, self.batch_size, self.token_cap, self.max_bytes):
            self.batches.append(BatchPlan(self.start, ordinal, self.tokens, self.nbytes, self.count))
            self.start, self.count, self.tokens, self.nbytes = ordinal, 0, 0, 0
            new = True
        self.count += 1
        self.tokens += tokens
        self.nbytes += nbytes
        return new

    def finish(self, end: int) -> list[BatchPlan]:
        """Close the last batch at `end` (the number of ordinals): trailing request-less ordinals join it; with
        no request at all, one range of them (no job is made for it)."""
        if self.count:
            self.batches.append(BatchPlan(self.start, end, self.tokens, self.nbytes, self.count))
        elif self.batches and self.batches[-1].end < end:
            last = self.batches[-1]
            self.batches[-1] = BatchPlan(last.start, end, last.tokens, last.bytes, last.count)
        elif not self.batches and end:
            self.batches.append(BatchPlan(0, end, 0, 0, 0))
        self.count = 0
        return self.batches


def plan_batches(sizes: Iterable[tuple[int, int]], batch_size: int, token_cap: int, max_bytes: int) -> list[BatchPlan]:
    """Cut (tokens, bytes) per request, in input order, into contiguous batches."""
    cutter = BatchCutter(batch_size, token_cap, max_bytes)
    n = 0
    for n, (t, b) in enumerate(sizes, 1):
        cutter.add(n - 1, t, b)
    return cutter.finish(n)


def estimate_margin(samples: list[tuple[int, int]]) -> float:
    """Share of the limit to keep free for the token estimate's error, from the calibration itself.

    samples: (characters, counted tokens) of each calibration call, each over different documents.
    The estimate's chars/token is their pooled ratio; its relative standard error is the spread of
    the per-call ratios over the square root of their number. Three of those, between MARGIN_FLOOR
    and DEFAULT_MARGIN; CALIBRATED_MARGIN when fewer than 4 calls show no usable spread.
    (Documents of one batch err in both directions and mostly cancel: the calibration's own error is
    shared by every batch enqueued at once, so that is what the margin covers.)"""
    ratios = [t / c for c, t in samples if c > 0 and t > 0]
    if len(ratios) < 4:
        return CALIBRATED_MARGIN
    rse = statistics.stdev(ratios) / statistics.fmean(ratios) / math.sqrt(len(ratios))
    return round(min(DEFAULT_MARGIN, max(MARGIN_FLOOR, 3 * rse)), 4)


def margin_for(margin: float | None, estimated: float | None) -> float:
    """The margin asked for; else the one the calibration warrants; else DEFAULT_MARGIN (offline guess)."""
    if margin is not None:
        return margin
    return DEFAULT_MARGIN if estimated is None else estimated


def batch_token_cap(eff: int, batch_size: int, tokens_per_doc: float, max_jobs: int) -> int:
    """Most tokens one batch may hold: a whole number of batches fills the usable limit exactly.

    Batches of `batch_size` documents would leave up to one batch's worth of the limit idle for the
    whole run (3 batches of 2.9M under 9.7M use 90% of it); capping each at eff/k tokens, k being the
    next whole number of batches, lets k of them run at once. Not when k would pass the concurrent-job
    limit (then the job count binds, not the tokens)."""
    full = batch_size * tokens_per_doc
    if full <= 0 or full >= eff:
        return eff
    k = math.ceil(eff / full - 1e-9)
    if k > max_jobs or eff // (eff // k) > max_jobs:  # at tiny limits eff // k rounds down enough to fit more than k
        return eff
    return eff // k


def effective_limit(limit: int, margin: float) -> int:
    return max(1, int(limit * (1.0 - margin)))


def plan_waves(batch_tokens: list[int], limit: int, waves: str | int = "auto") -> list[list[int]]:
    """Greedily pack batches (in order) into waves whose token sums stay within the limit.

    waves="auto" fills each wave up to the limit; an integer N aims for N waves of even size,
    never above the limit (so more waves than N when the limit demands it).
    """
    if any(t > limit for t in batch_tokens):
        raise InputError(f"a batch of {max(batch_tokens)} tokens exceeds the enqueued limit {limit}")
    target = limit
    if waves != "auto":
        n = max(1, int(waves))
        target = min(limit, max(max(batch_tokens, default=1), math.ceil(sum(batch_tokens) / n)))
    out: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for i, t in enumerate(batch_tokens):
        if cur and acc + t > target:
            out.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += t
    if cur:
        out.append(cur)
    return out


def admit(active_tokens: int, active_jobs: int, candidate_tokens: int, limit: int, max_jobs: int) -> bool:
    """Rolling admission: may a batch of candidate_tokens be created now?"""
    return active_jobs < max_jobs and active_tokens + candidate_tokens <= limit


def jobs_to_retry(jobs: Iterable[Job], max_attempts: int, run_cancelled: bool) -> list[Job]:
    """The jobs that ended FAILED/EXPIRED and get another attempt (a new job with the same requests): not
    cancelled by the user, not marked final, not retried already, attempts left. In admission order."""
    if run_cancelled:
        return []
    jobs = list(jobs)
    retried = {j.retry_of for j in jobs if j.retry_of}
    return sorted(
        (
            j
            for j in jobs
            if j.state in (JobState.FAILED, JobState.EXPIRED)
            and not j.cancelled_by_user
            and not j.no_retry
            and j.name not in retried
            and j.attempt < max_attempts
        ),
        key=lambda j: (j.index, j.attempt),
    )


def plan_admission(jobs: Iterable[Job], limit: int, max_jobs: int, barrier: bool) -> list[str]:
    """Which batch-lane jobs to create now, in order: rolling admission from the head of the queue while the
    enqueued tokens stay under `limit` and the live jobs under `max_jobs`; with `barrier`, never a job of a
    later wave while an earlier wave is unfinished. Stops at the first job that does not fit or is not
    uploaded yet (order is kept: the head is never overtaken). Each answer assumes the creates before it
    succeed; the engine stops at the first one refused."""
    ordered = sorted(jobs, key=lambda j: (j.index, j.attempt))
    live_tokens = sum(j.tokens for j in ordered if j.state in ACTIVE_STATES)
    live_jobs = sum(1 for j in ordered if j.state in ACTIVE_STATES)
    open_waves = [j.wave for j in ordered if j.state not in FINAL_STATES]
    first_open_wave = min(open_waves, default=0)
    out: list[str] = []
    for j in ordered:
        if j.state not in UNSUBMITTED or j.lane != "batch":
            continue
        if barrier and first_open_wave < j.wave:
            break
        if not admit(live_tokens, live_jobs, j.tokens, limit, max_jobs) or j.state != JobState.UPLOADED:
            break
        out.append(j.name)
        live_tokens += j.tokens
        live_jobs += 1
    return out


def due_for_poll(jobs: Iterable[Job], next_poll: dict[str, float], timed: set[str], now: float, base: float) -> list[str]:
    """The jobs to poll in this pass: live at the service (or SUCCEEDED without its output file yet) and due.
    Jobs due within a fifth of the base interval ride along (fewer wake-ups), except those timed to their
    end (`timed`): polled early, they would be found still running and wait a whole interval more."""
    return [
        j.name
        for j in sorted(jobs, key=lambda j: (j.index, j.attempt))
        if (j.state in REMOTE_LIVE or (j.state == JobState.SUCCEEDED and not j.output_file))
        and next_poll.get(j.name, 0.0) <= now + (0.0 if j.name in timed else 0.2 * base)
    ]


def due_for_retrieval(
    jobs: Iterable[Job], polled: set[str], next_poll: dict[str, float], now: float, retrieving: set[str]
) -> list[str]:
    """The SUCCEEDED jobs whose output to download now: seen finished by this very pass (so the end-to-download
    lag is the download alone), or due again after a failed download; never one already being downloaded."""
    return [
        j.name
        for j in sorted(jobs, key=lambda j: (j.index, j.attempt))
        if j.state == JobState.SUCCEEDED
        and j.output_file
        and (j.name in polled or next_poll.get(j.name, 0.0) <= now)
        and j.name not in retrieving
    ]


def next_wake(
    jobs: Iterable[Job],
    next_poll: dict[str, float],
    retrieving: set[str],
    now: float,
    base: float,
    create_after: float,
    freed: bool,
    looks: Iterable[float] = (),
) -> float:
    """The moment the scheduler should look again: the earliest poll due (of jobs live or awaiting their
    output, not being downloaded) or look for an ambiguous create (`looks`: next_create_look's answers); with jobs
    waiting for admission, now if a job just left the enqueued set (admit into the room it made at once), else the
    create back-off or one base interval. At least `now`."""
    jobs = list(jobs)
    state = {j.name: j.state for j in jobs}
    waits = [
        t for name, t in next_poll.items() if state.get(name) in REMOTE_LIVE | {JobState.SUCCEEDED} and name not in retrieving
    ]
    waits.extend(looks)
    if any(j.state in UNSUBMITTED for j in jobs):
        waits.append(now if freed else max(create_after, now + base))
    return max(now, min(waits, default=now + base))


def ambiguous_create_verdict(listed: bool, since: float, now: float, window: float = CREATE_SETTLE_S) -> str:
    """After a create answered with a timeout or a 5xx at `since`, a look by display name at `now`: "adopt" when
    the job is listed, "wait" (look again at next_create_look) while the settle window (CREATE_SETTLE_S, scaled by
    --retry-scale) has not passed, else "resend" (the create did not happen: create again)."""
    if listed:
        return "adopt"
    return "wait" if now < since + window else "resend"  # the very sum next_create_look's last look is at


def next_create_look(
    since: float, looks: int, now: float, window: float = CREATE_SETTLE_S, first: float = CREATE_LOOK_FIRST_S
) -> float:
    """When to list again for an ambiguous create looked for `looks` times: back off from `first`, doubling, at
    most a quarter of the window apart, and never after the window ends (the last look decides)."""
    return min(now + min(first * 2.0 ** min(max(0, looks - 1), 60), window / 4), since + window)


def resumed_create_since(sent_at: float | None, wall_now: float, now: float, window: float) -> float | None:
    """A job a fresh engine finds SUBMITTING (its process ended after the intent, before the create's answer was
    recorded): when its create counts as sent on this process's clock (`now` less its age by the wall clock: the
    sidecar's `sent_at`, epoch seconds, against `wall_now`), if that was less than `window` ago. It is then looked
    for as an ambiguous create of this process until the window ends. None with no `sent_at` (a sidecar of an older
    batchify) or past the window: one listing decides. A `sent_at` ahead of the wall clock (set back since) counts
    as sent now: the whole window, never longer."""
    if sent_at is None:
        return None
    age = max(0.0, wall_now - sent_at)
    return now - age if age < window else None


def halt_reason(e: BaseException) -> str:
    """What a run stopping on `e` (Engine.halt) says it stops for, in the log line before the error itself."""
    if isinstance(e, ServiceSilent):
        return "the service has not answered for too long"
    if isinstance(e, AuthError) and not isinstance(e, ServiceRefused):
        return "the service refused the API key"
    if isinstance(e, CostCapError):
        return "--max-cost is reached"
    if isinstance(e, OSError):
        return "a write was refused"
    if isinstance(e, ServiceRefused):
        return "the service refused this account's calls"
    return "an error ends the run"


def poll_failure_verdict(transient: bool, in_a_row: int, failing_for: float, patience: float) -> str:
    """What a job's failed poll (not a 404: poll_answered_404) means, after `in_a_row` failures of its kind, the first
    `failing_for` seconds ago: "refused" (the account: stop) at the POLL_REFUSALS-th refusal (400, 403) in a row;
    "silent" (stop, resumable) once transient failures have lasted `patience`; else "again" (poll it as usual)."""
    if not transient:
        return "refused" if in_a_row >= POLL_REFUSALS else "again"
    return "silent" if failing_for >= patience else "again"


def service_silent(what: str, failing_for: float, e: RemoteError, kept: str, run: str) -> ServiceSilent:
    """The error a run stopped by calls failing on the way (network, 5xx, 429) for POLL_SILENCE_S ends with: what went
    unanswered and for how long, what was kept as it is (never failed: that would pay twice), and the fix."""
    return ServiceSilent(
        f"{what} for {failing_for / 60:.0f} min (the last: {e}). {kept} Fix: check the network and the endpoint (and "
        f"Google's status page), then `batchify resume {shlex.quote(run)}`.",
        code=e.code,
        status=e.status,
    )


def poll_silent(job: Job, failing_for: float, e: RemoteError, run: str) -> ServiceSilent:
    """A job's polls unanswered for POLL_SILENCE_S: the job was not failed (it may still run at the service)."""
    kept = "It is kept as it is, not counted as failed: it may still run at the service, and creating it again would pay twice."
    return service_silent(f"{job.name} ({job.remote_job}): no poll of it was answered", failing_for, e, kept, run)


def account_refused(e: RemoteError, run: str) -> ServiceRefused:
    """The error a run stopped by an account refusal of a real-time request ends with (account_refusal)."""
    return _refused(f"{e}. Nothing is recorded against the requests it refused", e, run)


def poll_refused(job: Job, n: int, e: RemoteError, run: str) -> ServiceRefused:
    """The error a run stopped by refused polls ends with: the job was not failed, why, and the fix."""
    what = (
        f"{job.name} ({job.remote_job}): the service refused to show its state {n} times in a row ({e}). It is kept as "
        "it is, not counted as failed: it may still run and be billed, and creating it again would pay twice"
    )
    return _refused(what, e, run)


def _refused(what: str, e: RemoteError, run: str) -> ServiceRefused:
    fix = f"fix what the service names (billing, the project's permissions, the location calling from), then `batchify resume {shlex.quote(run)}`"
    return ServiceRefused(f"{what}. {fix[0].upper()}{fix[1:]}.", code=e.code, status=e.status)


def leading_error(eg: BaseExceptionGroup[Any]) -> BaseException:
    """The error that ended a TaskGroup, out of its (perhaps nested) group: the first that is not a cancellation
    (the siblings it cancelled), else the first."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [eg]
    while todo:
        e = todo.pop(0)
        if isinstance(e, BaseExceptionGroup):
            todo[:0] = e.exceptions
        else:
            leaves.append(e)
    return next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0] if leaves else eg)


def orphan_action(job: Job | None, remote: RemoteJob) -> str | None:
    """A job listed at the service carrying this run's display name: what to do with it when no record owns it
    (an ambiguous create that took effect after all, or a second one). None: its record owns it, or no record has
    that display name (repair's business). "adopt": its record is still waiting to be created (SUBMITTING or
    UPLOADED in the batch lane, no remote job). Otherwise its record went on without it (created again, claimed
    by a Flex lane, cancelled): "cancel" while it lives; "paid" when it already succeeded (billed, nothing to
    stop: say so); None when it ended otherwise."""
    if job is None or (job.remote_job or "").rsplit("/", 1)[-1] == remote.name.rsplit("/", 1)[-1]:
        return None  # its own (compared by id: a project number and an id spell one Vertex name two ways)
    if job.remote_job is None and job.lane == "batch" and job.state in (JobState.SUBMITTING, JobState.UPLOADED):
        return "adopt"
    if remote.state in REMOTE_LIVE:
        return "cancel"
    return "paid" if remote.state == JobState.SUCCEEDED else None


def flex_latency_estimate(longest_seen: float, minute: float = 60.0) -> float:
    """The Flex latency (seconds) to size the pipe by: the longest answer seen, but never below the middle of
    Google's 1-15 minute target until an answer took longer. The first answers back are the quick ones (two
    minutes into a run nothing slower can have come back yet): a pipe sized by them holds the requests up at
    the gate, not at the RPM/TPM limits, for the first minutes. A larger gate costs sockets only: the limits
    pace. `minute`: seconds in a minute (a drill's shortened rate window stands for one)."""
    return max(longest_seen, FLEX_LATENCY_MINUTES[1] / 2 * minute)


def flex_in_flight(rate_per_s: float, latency_s: float, floor: int, ceiling: int) -> int:
    """Requests to keep in flight (Little's law: in flight = arrival rate x time in the system), with a quarter
    more for the latency's spread: the rate the RPM/TPM limits allow, times the latency measured (Flex:
    minutes, so thousands in flight). Within [floor, ceiling] (the ceiling: the open-file limit's share)."""
    return max(floor, min(ceiling, math.ceil(rate_per_s * latency_s * 1.25)))


def lanes_for(mode: str, flex: bool, waves: int) -> str:
    """What carries a run's batches: "hybrid" (batch jobs from the head, Flex lanes from the tail, meeting in
    the middle) when asked for, and in auto mode where the model offers Flex and the enqueued limit makes more
    than one wave (the later waves would wait for batch capacity; Flex, at the same price, does not wait for
    it); "batch" otherwise; "none" when every request goes through generateContent (flex, realtime modes)."""
    if mode in ("flex", "realtime"):
        return "none"
    if mode == "hybrid" or (mode == "auto" and flex and waves > 1):
        return "hybrid"
    return "batch"


def hybrid_admits(unstarted_tokens: int, flex_tokens_per_s: float, durations: list[float], created: int) -> bool:
    """Hybrid: may batch create another job, or should the Flex lanes take what nobody has started?

    Until a job has finished, batch fills the enqueued limit (the first fill: batch capacity is free, and the
    price is the same). Afterwards a new job is worth it only while Flex alone would need much longer than a
    batch job takes to drain what is left: longer than 1.5x the longest job seen so far, and only once half the
    jobs created have finished (the first to finish are the short ones: their durations alone would promise
    too much). Else the job would end after Flex could have done its requests, and the run would wait for it."""
    if not durations:
        return True
    if flex_tokens_per_s <= 0 or 2 * len(durations) < created:
        return False
    return unstarted_tokens / flex_tokens_per_s > 1.5 * max(durations)


def next_poll_interval(current: float, changed: bool, base: float, maximum: float) -> float:
    """A job's poll interval: back to base when its state moved, else 1.5x longer up to maximum."""
    return base if changed else min(maximum, current * 1.5)


def progress_eta(first: tuple[float, int], last: tuple[float, int], total: int) -> float | None:
    """Seconds from the last observation until a job's requests are all done, at the rate seen between
    two (time, requests done) observations; None when there is no rate to go by.

    Counts are whole requests, so each observation may be up to one request behind: the slowest rate
    they allow is used, which makes the answer late rather than early (an early poll finds the job
    still running and costs a whole base interval).

    Every request counted done: 0.0 (the end is due: the service is writing the output), even at the first
    look, when there is no rate yet (a short job found done at once would otherwise back off while it ends)."""
    (t0, d0), (t1, d1) = first, last
    if total > 0 and d1 >= total:
        return 0.0
    if total <= 0 or d1 - d0 <= 1 or t1 <= t0:
        return None
    return max(0.0, (total - d1) * (t1 - t0) / (d1 - d0 - 1))


def expected_output_lines(stats: dict[str, int], requests: int) -> int:
    """How many lines a finished job's output should have: what its batchStats counts as done (successful +
    failed), never more than the requests it was sent; 0 where the service gives no counts."""
    return min(requests, stats.get("successfulRequestCount", 0) + stats.get("failedRequestCount", 0))


def download_failure_verdict(
    transient: bool,
    rounds: int,
    failing_for: float,
    refused_for: float | None,
    base: float,
    cap: float,
    patience: float,
    silence: float,
) -> tuple[str, float]:
    """What a failed download of a SUCCEEDED job's output means, after `rounds` failed rounds, the first `failing_for`
    seconds ago, and refusals (403/404: not `transient`) since `refused_for` seconds (None: none in this streak):
    ("gone", 0) once the last failure is a refusal and refusals have lasted `patience` (retention deleted the output, a
    name that never worked): the job is failed and its requests sent again, paid twice, said loudly;
    ("silent", 0) once the last failure is on the way (network, 5xx, 429, an output cut short) and failures have lasted
    `silence`: the run stops, resumably, the job kept as it is (its output is intact at the service: an outage on
    the way to it never makes its answers paid twice);
    else ("again", seconds until the next round: the poll interval, doubling, at most `cap`, never past the end of
    the wait that applies)."""
    if not transient and refused_for is not None:
        if refused_for >= patience:
            return "gone", 0.0
        left = patience - refused_for
    else:
        if failing_for >= silence:
            return "silent", 0.0
        left = silence - failing_for
    return "again", max(0.0, min(base * 2.0 ** max(0, rounds - 1), cap, left))


def download_silent(job: Job, failing_for: float, e: RemoteError, run: str) -> ServiceSilent:
    """A finished job's output failing to download on the way for POLL_SILENCE_S: the job kept SUCCEEDED."""
    kept = (
        "The job is kept as it is, SUCCEEDED: its answers are paid for and its output is at the service, so nothing is "
        "sent again."
    )
    return service_silent(f"{job.name} ({job.remote_job}): its output could not be downloaded", failing_for, e, kept, run)


def poll_delay(interval: float, eta: float | None, base: float, room_wanted: bool = False) -> float:
    """When to poll a job next: after its backed-off interval; or, when its progress says it will be
    done before the poll after that one could happen, just after that moment. Never sooner than
    `base`: at most one get per job per base interval.

    With no progress to go by while a batch waits for room (`room_wanted`: admission held it back), every
    base interval: the end of a live job is the only way the engine learns that room was made, and a
    back-off would leave that room idle (told the true limit, the run was slower than one that had to
    learn it, whose refused creates, retried on their own back-off, find the room without a poll).

    An end more than three base intervals off gets one look two intervals before it first: the rate
    the counts allow is taken at its slowest, which errs late in proportion to the time left, so a
    fresh count close to the end pins the end down (one more get, the end seen seconds sooner)."""
    if eta is None:
        return base if room_wanted else interval
    done_at = eta + 0.05 * base
    if done_at >= interval + base:
        return interval
    if done_at > 3 * base:
        return done_at - 2 * base
    return max(base, done_at)


SERVICES = ("batch", "flex", "standard")


def usd(amount: float) -> str:
    """A dollar amount as people read it: four decimals, and below $0.0001 two significant digits, so that a
    small cost is not shown as "$0.0000" (a --max-cost of $0.00002 reads "$0.00002", $0.0000123 "$0.000012")."""
    if amount == 0 or abs(amount) >= 1e-4:
        return f"${amount:.4f}"
    exponent = int(f"{abs(amount):.1e}".split("e")[1])  # from the text, not log10: 1e-6 is exactly -6
    return f"${amount:.{1 - exponent}f}".rstrip("0")


def cost_usd(spec: ModelSpec, usage: dict[str, int], service: str) -> float:
    """USD for summed usage at one service tier: the one cost rule, for estimates and actuals alike.

    Input tokens at the input price, cached tokens (part of promptTokenCount) at the cache price, output
    and thinking tokens at the output price; batch and flex at their share of standard, except cached
    tokens, which Google bills at the standard cache price in batch too unless the model's Batch/Flex table
    lists its own. Usage from requests above the long-context threshold comes in `long.`-prefixed keys
    (long_usage) and is billed at the long-context prices. A cache price Google does not publish: cached
    tokens billed as uncached input (an upper bound)."""
    factor = {"standard": 1.0, "batch": spec.batch_discount, "flex": spec.flex_discount or spec.batch_discount}[service]
    own_cache = {"batch": spec.batch_cached_input_price, "flex": spec.flex_cached_input_price}.get(service)

    def part(u: dict[str, int], prefix: str, pin: float, pout: float, pcache: float | None) -> float:
        prompt = u.get(prefix + "promptTokenCount", 0)
        cached = min(prompt, u.get(prefix + "cachedContentTokenCount", 0))
        out = u.get(prefix + "candidatesTokenCount", 0) + u.get(prefix + "thoughtsTokenCount", 0)
        cache_price = pcache if pcache is not None else pin * factor
        return ((prompt - cached) * pin * factor + cached * cache_price + out * pout * factor) / 1e6

    short = {k: v - usage.get("long." + k, 0) for k, v in usage.items() if not k.startswith("long.")}
    total = part(short, "", spec.input_price, spec.output_price, own_cache if own_cache is not None else spec.cached_input_price)
    if any(k.startswith("long.") for k in usage):
        total += part(
            usage,
            "long.",
            spec.long_input_price or spec.input_price,
            spec.long_output_price or spec.output_price,
            spec.long_cached_input_price if spec.long_cached_input_price is not None else spec.cached_input_price,
        )
    return total


def long_usage(total: dict[str, int], usages: Iterable[Any], threshold: int | None) -> None:
    """Add, under `long.` keys, the usage of the requests whose prompt passed the long-context threshold."""
    if not threshold:
        return
    for u in usages:
        if isinstance(u, dict) and type(p := u.get("promptTokenCount")) is int and p > threshold:
            for k in USAGE_KEYS:
                if type(v := u.get(k)) is int:
                    total["long." + k] = total.get("long." + k, 0) + v


def cost_cap_allows(spent: float, committed: float, next_cost: float, overrun: float, cap: float | None) -> bool:
    """--max-cost: may one more job or request estimated at `next_cost` start, with `spent` known, `committed` the
    estimate of the work under way (jobs live, requests sent), every estimate scaled by `overrun` (actual over
    estimated cost of what has ended; at least 1: answers longer than assumed make every estimate low)? No cap: yes."""
    return cap is None or spent + (committed + next_cost) * max(1.0, overrun) <= cap


def request_cost(spec: ModelSpec, usage: dict[str, Any] | None, service: str) -> float:
    """cost_usd() of one request's usageMetadata."""
    total: dict[str, int] = {}
    add_usage(total, usage)
    long_usage(total, [usage], spec.long_context_threshold)
    return cost_usd(spec, total, service)


# One line of a results sidecar (results/*.jsonl, realtime.jsonl), keys in this order; merge's output
# line is the same with "id" in place of "n".
RESULT_KEYS = ("n", "status", "result", "error", "source", "usage")


def result_record(n: int, result: Any, error: str | None, source: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One results-sidecar record (ok when there is no error), keys in RESULT_KEYS order: merge splices
    lines of exactly that layout into its output and re-encodes any other."""
    return {
        "n": n,
        "status": "ok" if error is None else "error",
        "result": result,
        "error": error,
        "source": source,
        "usage": usage,
    }


USAGE_KEYS = frozenset(
    {"promptTokenCount", "cachedContentTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount"}
)


def add_usage(total: dict[str, int], usage: dict[str, Any] | None) -> None:
    for k, v in (usage or {}).items():
        if (k in USAGE_KEYS or k.startswith("long.")) and type(v) is int:
            total[k] = total.get(k, 0) + v


def add_usages(total: dict[str, int], usages: list[dict[str, Any]], long_threshold: int | None = None) -> None:
    """add_usage() for many usage dicts at once: one C-level sum per key (merge sums 200k of them);
    a key whose values are not all ints (a foreign line) falls back to add_usage's per-value rule
    (the one difference: a bool counts as 1 on the fast path; our writers never store one)."""
    try:
        keys = USAGE_KEYS.intersection(set().union(*usages))  # the keys any usage holds: each summed in one pass
    except TypeError:  # a non-dict somewhere
        keys = USAGE_KEYS
    for k in keys:
        try:
            v = sum(map(dict.get, usages, itertools.repeat(k), itertools.repeat(0)))
        except TypeError:
            v = None
        if type(v) is not int:  # a float, a string or a non-dict somewhere: count only the ints
            v = sum(x for u in usages if isinstance(u, dict) and type(x := u.get(k)) is int)
        if v or any(isinstance(u, dict) and type(u.get(k)) is int for u in usages):  # a key seen, even as 0
            total[k] = total.get(k, 0) + v
    long_usage(total, usages, long_threshold)


def expected_usage(
    cfg: JobConfig, spec: ModelSpec, input_tokens: int, records: int, long: tuple[int, int] = (0, 0)
) -> dict[str, int]:
    """The usage a run is expected to have: its input, the answer tokens assumed per request and the
    thinking tokens assumed for its thinking setting (expected_thinking_tokens overrides); `long`: the
    (documents, tokens) above the model's long-context threshold, under `long.` keys as cost_usd takes them."""
    choice = thinking_choice(spec, cfg.thinking)
    per_thought = cfg.expected_thinking_tokens if cfg.expected_thinking_tokens is not None else thinking_expected(choice)
    usage = {
        "promptTokenCount": input_tokens,
        "candidatesTokenCount": records * cfg.expected_output_tokens,
        "thoughtsTokenCount": records * per_thought,
    }
    docs, tokens = long
    if docs:
        usage.update(
            {
                "long.promptTokenCount": tokens,
                "long.candidatesTokenCount": docs * cfg.expected_output_tokens,
                "long.thoughtsTokenCount": docs * per_thought,
            }
        )
    return usage


def estimate_plan(
    cfg: JobConfig,
    spec: ModelSpec,
    batches: list[BatchPlan],
    waves: list[list[int]],
    limit: int,
    eff_limit: int,
    records: int,
    realtime_share: float = 0.0,
    long: tuple[int, int] = (0, 0),
) -> Plan:
    tokens = sum(b.tokens for b in batches)
    usage = expected_usage(cfg, spec, tokens, records, long)
    batch_cost = cost_usd(spec, usage, "batch")
    rt_cost = cost_usd(spec, usage, "standard")
    return {  # a Plan
        "model": spec.name,
        "records": records,
        "batches": len(batches),
        "waves": len(waves),
        "input_tokens": tokens,
        "expected_output_tokens": usage["candidatesTokenCount"],
        "expected_thinking_tokens": usage["thoughtsTokenCount"],
        "enqueued_limit": limit,
        "effective_limit": eff_limit,
        "estimated_cost_usd": round(batch_cost * (1 - realtime_share) + rt_cost * realtime_share, 6),
        "estimated_cost_realtime_usd": round(rt_cost, 6),
        "realtime_share": realtime_share,
        "estimated_time": f"{len(waves)} wave(s): at most ~{24 * len(waves)} h at Google's 24 h target per job; usually far "
        "less (jobs often end within minutes to a few hours)",
        "wave_tokens": [sum(batches[i].tokens for i in w) for w in waves],
        "jobs_per_wave": [len(w) for w in waves],
        "batch_size_max": max((b.count for b in batches), default=0),
        "prices_per_1m": {
            svc: {
                "input": round(cost_usd(spec, {"promptTokenCount": 1_000_000}, svc), 6),
                "output": round(cost_usd(spec, {"candidatesTokenCount": 1_000_000}, svc), 6),
            }
            for svc in SERVICES
        },
        "wave_of_batch": {str(i): wi for wi, w in enumerate(waves) for i in w},
    }


FLEX_LATENCY_MINUTES = (1.0, 15.0)  # Google's Flex latency target, minutes (flex-inference page, 2026-09-23)


def mode_estimates(spec: ModelSpec, cfg: JobConfig, plan: Plan, records: int, limits: RealtimeLimits) -> dict[str, ModeEstimate]:
    """Cost and time of the same run in each mode, from the plan and the real-time limits: batch (the
    batch price, its waves of jobs), flex (the Flex price where the model has it; requests / RPM, or tokens
    / TPM when that is slower, plus Flex's latency target), standard (2x), and hybrid (batch's price,
    sooner than the faster of the two: Flex lanes drain the tail while batch jobs run)."""
    usage = expected_usage(cfg, spec, plan["input_tokens"], records)
    rpm = limits.get("rpm") or DEFAULT_RPM
    tpm = limits.get("tpm")
    minutes = max(records / rpm, plan["input_tokens"] / tpm if tpm else 0.0)
    out: dict[str, ModeEstimate] = {
        "batch": {"cost_usd": round(cost_usd(spec, usage, "batch"), 6), "time": f"{plan['waves']} wave(s) of batch jobs"},
        "standard": {
            "cost_usd": round(cost_usd(spec, usage, "standard"), 6),
            "time": f"~{max(1.0, minutes):,.0f} min at {rpm:,} RPM" + (f" / {tpm:,} TPM" if tpm else ""),
        },
    }
    if spec.flex:
        lo, hi = minutes + FLEX_LATENCY_MINUTES[0], minutes + FLEX_LATENCY_MINUTES[1]
        out["flex"] = {
            "cost_usd": round(cost_usd(spec, usage, "flex"), 6),
            "time": f"~{lo:,.0f}-{hi:,.0f} min (the rate limits, plus Flex's 1-15 min latency), if Flex is not shedding",
        }
        out["hybrid"] = {
            "cost_usd": out["batch"]["cost_usd"],
            "time": f"sooner than the faster of batch and flex (at most ~{hi:,.0f} min)",
        }
    return out


def response_text(response: dict[str, Any], accept_truncated: bool = False) -> tuple[str | None, str | None]:
    """The text of a GenerateContentResponse (thought parts skipped) or why there is none."""
    cands = response.get("candidates") or []
    if not cands:
        fb = response.get("promptFeedback") or {}
        return None, f"no candidates (blockReason={fb.get('blockReason', 'unknown') if isinstance(fb, dict) else 'unknown'})"
    cand = cands[0] if isinstance(cands, list) else None
    content = cand.get("content") if isinstance(cand, dict) else None
    if not isinstance(cand, dict) or not isinstance(content, (dict, type(None))):
        return None, f"an answer of an unknown shape (candidates: {orjson.dumps(cands).decode()[:80]})"
    parts = (content or {}).get("parts") or []
    parts = parts if isinstance(parts, list) else []
    text = "".join(p["text"] for p in parts if isinstance(p, dict) and not p.get("thought") and isinstance(p.get("text"), str))
    finish = cand.get("finishReason", "STOP")
    if not text:
        hint = (
            " (thinking used up maxOutputTokens: raise max_output_tokens or lower --thinking)" if finish == "MAX_TOKENS" else ""
        )
        return None, f"empty answer (finishReason={finish}){hint}"
    if finish == "MAX_TOKENS" and not accept_truncated:
        return None, "answer truncated (finishReason=MAX_TOKENS): raise max_output_tokens or lower --thinking"
    if finish not in ("STOP", "FINISH_REASON_UNSPECIFIED", "MAX_TOKENS", None):
        return None, f"answer stopped early (finishReason={finish})"
    return text, None


def parse_answer(
    response: dict[str, Any], schema: dict[str, Any] | None, accept_truncated: bool = False
) -> tuple[Any, str | None]:
    """(result, None) or (None, error) for one response: JSON parsed and checked against the schema.
    A MAX_TOKENS (truncated) answer is an error unless accept_truncated (schema-less runs only)."""
    text, err = response_text(response, accept_truncated and schema is None)
    if err is not None:
        return None, err
    assert text is not None
    if schema is None:
        return text, None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        fin = response["candidates"][0].get("finishReason")  # response_text found the text in this very place
        hint = " (truncated: raise max_output_tokens)" if fin == "MAX_TOKENS" else ""
        return None, f"answer is not valid JSON{hint}: {text[:80]!r}"
    problem = schema_problem(value, schema)
    if problem:
        return None, f"answer does not match the schema: {problem}"
    return value, None


_VALIDATORS: dict[str, tuple[Callable[[Any], bool] | None, list[Any]]] = {}
# the schema object last asked about and its validators: a run asks about one schema once per answer, and
# encoding it (keys sorted) for the key above cost ~2 us an answer; measured on the bench's 100k answers, the
# retrieval's CPU 6.8 -> 6.4 s. A schema is not changed in place once a run has it.
_LAST_SCHEMA: tuple[Any, tuple[Callable[[Any], bool] | None, list[Any]]] | None = None


def schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    """What is wrong with `value` under `schema` (jsonschema, Draft 2020-12), or None. A schema within the
    common subset fast_schema_check knows is checked by it first: a value it passes is valid, anything else
    (and any other schema) is jsonschema's to judge, so every message is jsonschema's own."""
    global _LAST_SCHEMA
    last = _LAST_SCHEMA  # read once: a consistent pair, whichever thread set it
    if last is not None and last[0] is schema:
        got = last[1]
    else:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
        cached = _VALIDATORS.get(key)
        got = cached if cached is not None else _VALIDATORS.setdefault(key, (fast_schema_check(schema), []))
        _LAST_SCHEMA = (schema, got)
    fast, slow = got
    if fast is not None and fast(value):
        return None
    if not slow:
        import jsonschema

        slow.append(jsonschema.Draft202012Validator(schema))
    err = next(iter(slow[0].iter_errors(value)), None)
    return None if err is None else f"{'/'.join(map(str, err.absolute_path)) or '(root)'}: {err.message}"[:200]


_FAST_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "object": (dict,),
    "array": (list,),
    "boolean": (bool,),
    "null": (type(None),),
    "integer": (int,),  # 1.0 is an integer to jsonschema too: not passed here, so jsonschema decides
    "number": (int, float),
}
_FAST_SCALARS = (str, int, float, bool, type(None))
_FAST_KEYWORDS = frozenset(
    {"type", "enum", "properties", "required", "additionalProperties", "items", "minItems", "maxItems"}
    | {"description", "title", "$comment", "examples", "default", "propertyOrdering"}  # annotations: no check
)


def fast_schema_check(schema: Any) -> Callable[[Any], bool] | None:
    """A quick check for a schema within a common subset (type, enum of scalars, properties, required,
    additionalProperties, items, minItems, maxItems; annotations), True only for a value jsonschema finds
    valid (False: not sure, ask jsonschema); None for a schema outside the subset. Values are orjson's: exact
    built-in types (a bool is no integer)."""
    if type(schema) is bool:
        return _fast_any if schema else (lambda v: False)
    if not isinstance(schema, dict) or not set(schema) <= _FAST_KEYWORDS:
        return None
    checks: list[Callable[[Any], bool]] = []
    if "type" in schema:
        names = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in _FAST_TYPES for n in names):
            return None
        kinds = tuple(k for n in names for k in _FAST_TYPES[n])
        checks.append(lambda v: type(v) in kinds)
    if "enum" in schema:
        members = schema["enum"]
        if not isinstance(members, list) or not all(type(m) in _FAST_SCALARS for m in members):
            return None
        allowed = {(type(m), m) for m in members}
        checks.append(lambda v: type(v) in _FAST_SCALARS and (type(v), v) in allowed)
    for part in (_fast_object_check(schema), _fast_array_check(schema)):
        if part is None:
            return None
        if part is not _fast_any:
            checks.append(part)
    if len(checks) <= 1:
        return checks[0] if checks else _fast_any

    def every(v: Any) -> bool:
        for c in checks:
            if not c(v):
                return False
        return True

    return every


def _fast_any(v: Any) -> bool:
    return True


def _fast_object_check(schema: dict[str, Any]) -> Callable[[Any], bool] | None:
    """properties, required and additionalProperties (they check objects only); None: outside the subset."""
    props, required = schema.get("properties", {}), schema.get("required", [])
    extra = fast_schema_check(schema.get("additionalProperties", True))
    if not isinstance(props, dict) or not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return None
    sub = {k: fast_schema_check(x) for k, x in props.items()}
    if extra is None or any(c is None for c in sub.values()):
        return None
    checks = cast(dict[str, Callable[[Any], bool]], sub)
    if not checks and not required and extra is _fast_any:
        return _fast_any

    def ok(v: Any) -> bool:  # once per answer (and per nested object): plain loops, no generators
        if type(v) is not dict:
            return True
        for r in required:
            if r not in v:
                return False
        get = checks.get
        for k, x in v.items():
            if not get(k, extra)(x):
                return False
        return True

    return ok


def _fast_array_check(schema: dict[str, Any]) -> Callable[[Any], bool] | None:
    """items (one schema for every item), minItems, maxItems (they check arrays only); None: outside the subset."""
    item = fast_schema_check(schema.get("items", True))
    least, most = schema.get("minItems", 0), schema.get("maxItems")
    if item is None or type(least) is not int or (most is not None and type(most) is not int):
        return None

    if item is _fast_any and least == 0 and most is None:
        return _fast_any

    def ok(v: Any) -> bool:
        if type(v) is not list:
            return True
        if len(v) < least or (most is not None and len(v) > most):
            return False
        return all(map(item, v))  # the iteration in C: no generator

    return ok


def error_kind(error: Any) -> str:
    """The part of an error message that names its kind (before any detail), for counting."""
    return re.sub(r"[:(].*", "", str(error))[:60].strip() or "error"


NO_ANSWER = "no answer"  # a real-time request given up on with no answer (shed, throttled, cut off): sent again later


def answered_result(r: dict[str, Any]) -> bool:
    """A realtime.jsonl line that settles its id: ok, or an error the service answered with (SAFETY, a bad request).
    Not a NO_ANSWER error: that request's tries ended on a shed, a throttle or a network error (Flex is best effort,
    a daily quota can run out), so resume and the fallback send it again."""
    return r.get("status") == "ok" or not str(r.get("error") or "").startswith(NO_ANSWER)


def merge_choice(current: dict[str, Any] | None, candidate: dict[str, Any]) -> dict[str, Any]:
    """Which of two results for one id to keep: the first ok one wins; otherwise the latest error."""
    if current is None:
        return candidate
    if current.get("status") == "ok":
        return current
    return candidate


# -- a job's results in request order: an external sort by ordinal in bounded runs (docs/VERTEX_NOTES.md C2) -----
RESULT_RUN_BYTES = 32 * 1024 * 1024  # result lines a sorted run holds at most (Vertex output is shuffled)


class ResultsSink(Protocol):
    """Where a job's results lines are kept, each under a name: LocalResults (files in the run folder) or
    GsResults (objects in the staging bucket). put() is atomic: the name holds all of the lines or none."""

    def put(self, name: str, lines: Iterable[bytes]) -> None: ...
    def lines(self, name: str, run: bool = False) -> Iterator[bytes]: ...  # run: one of the sorted runs
    def exists(self, name: str) -> bool: ...
    def drop_runs(self, name: str) -> None: ...


def line_ordinal(line: bytes) -> int:
    """The ordinal of one of our results lines ({"n":123,...}: result_record's layout, encoded by orjson)."""
    return int(line[5 : line.index(b",", 5)])


def line_is_ok(line: bytes) -> bool:
    return line.startswith(b'"status":"ok"', line.index(b",", 5) + 1)


def join_keys(pairs: Iterator[tuple[int, bytes]], keys: Iterable[int], missing: Callable[[int], bytes]) -> Iterator[bytes]:
    """One line per key, keys ascending: of the lines `pairs` (ascending by ordinal, stable) has for it, the
    first ok one, else the first; missing(key) when it has none; lines of ordinals that are not keys are
    dropped. An output that answers one key twice (ok, then an error) keeps the paid answer, as merge_choice
    does: the last line winning used to throw it away and send the request again. Pure."""
    nxt = next(pairs, None)
    for k in keys:
        while nxt is not None and nxt[0] < k:
            nxt = next(pairs, None)
        got = None
        while nxt is not None and nxt[0] == k:
            if got is None or (not line_is_ok(got) and line_is_ok(nxt[1])):
                got = nxt[1]
            nxt = next(pairs, None)
        yield got if got is not None else missing(k)


class ExternalSorter:
    """A job's results lines, added in any order, written under `name` in ordinal order: lines are kept in
    memory until they would pass `run_bytes`, then that run is sorted and put beside the result
    (NAME.run-NNNN); finish() merges the runs (heapq.merge: one reader per run) into the result. Memory: one
    run plus a reader per run. Ties keep the order added; join_keys picks among them (the first ok line wins)."""

    def __init__(self, sink: ResultsSink, name: str, run_bytes: int = RESULT_RUN_BYTES):
        self.sink, self.name, self.run_bytes = sink, name, run_bytes
        self.buf: list[tuple[int, bytes]] = []
        self.size = 0
        self.runs: list[str] = []

    def add(self, n: int, line: bytes) -> None:
        if self.buf and self.size + len(line) > self.run_bytes:
            self._spill()
        self.buf.append((n, line))
        self.size += len(line)

    def _spill(self) -> None:
        self.buf.sort(key=_first)
        run = f"{self.name}.run-{len(self.runs) + 1:04d}"
        self.sink.put(run, (line for _n, line in self.buf))
        self.runs.append(run)
        self.buf, self.size = [], 0

    def finish(self, keys: Iterable[int], missing: Callable[[int], bytes]) -> tuple[int, int]:
        """Write the result (one line per key, ascending), remove the runs; (ok, failed) lines written."""
        if self.runs and self.buf:
            self._spill()
        if self.runs:
            readers = [((line_ordinal(x), x) for x in self.sink.lines(r, run=True)) for r in self.runs]
            pairs: Iterator[tuple[int, bytes]] = heapq.merge(*readers, key=_first)
        else:
            self.buf.sort(key=_first)
            pairs = iter(self.buf)
        tally = [0, 0]

        def counted() -> Iterator[bytes]:
            for line in join_keys(pairs, keys, missing):
                tally[0 if line_is_ok(line) else 1] += 1
                yield line

        self.sink.put(self.name, counted())
        self.buf, self.size = [], 0
        with contextlib.suppress(RemoteError):  # the result is whole: a run left behind goes with cleanup's
            self.sink.drop_runs(self.name)  # results/ folder, and must not cost a fresh download of paid answers
        return tally[0], tally[1]


def _first(pair: tuple[int, bytes]) -> int:
    return pair[0]


# -- the backend's own rules (--backend vertex): what a run on Vertex may do, and how it is named ----------
VERTEX_NO_FLEX = (
    "batchify's Flex lanes use the Gemini Developer API's Flex tier (serviceTier flex); on Vertex AI batchify runs batch "
    "prediction only (Vertex's own Flex PayGo, a request header on the global endpoint, in preview, is not used). Fix: --mode batch or auto "
    "(with --allow-standard for a standard-tier fallback at 2x the batch price), or --backend gemini."
)


def check_backend_mode(opts: RunOptions) -> None:
    """Exit 2 (UsageError) before anything is sent for a mode the backend cannot run: on Vertex, every mode
    that sends through Flex (--mode flex or hybrid, --fallback-tier flex)."""
    if opts.backend != "vertex":
        if (opts.out or "").startswith("gs://"):
            raise UsageError(
                f"--out {opts.out}: results in Cloud Storage need --backend vertex (--project, --location, --bucket)."
            )
        return
    if opts.mode in ("flex", "hybrid"):
        raise UsageError(f"--mode {opts.mode} with --backend vertex: {VERTEX_NO_FLEX}")
    if opts.fallback_tier == "flex":
        raise UsageError(f"--fallback-tier flex with --backend vertex: {VERTEX_NO_FLEX}")


def backend_spec(spec: ModelSpec, opts: RunOptions) -> ModelSpec:
    """The model's figures as the run's backend serves it: on Vertex, no Flex tier (so auto mode never plans
    hybrid lanes and the fallback never picks Flex: lanes_for, Engine._fallback_tier read the spec)."""
    if opts.backend != "vertex":
        return spec
    listed = spec.name in VERTEX_BATCH_MODELS
    sources = {
        **spec.sources,
        "flex": f"not used on Vertex AI: batchify runs batch prediction only (Vertex's Flex PayGo: {VERTEX_SOURCES['flex_paygo']})",
        "enqueued_tokens": "none on Vertex AI: admission by jobs at once (--max-active-jobs)",
        "batch": VERTEX_SOURCES["models_list"] if listed else "not confirmed on a Vertex AI page",
        "prices": f"the catalog's standard prices (Vertex's own per model: {VERTEX_SOURCES['pricing']}); batch at "
        f"{VERTEX_LIMITS['batch_discount']:.0%} ({VERTEX_SOURCES['batch_gemini']})",
    }
    return dataclasses.replace(
        spec,
        flex=False,
        flex_discount=None,
        flex_cached_input_price=None,
        enqueued_tokens={},
        batch=True if listed else None,
        batch_discount=VERTEX_LIMITS["batch_discount"],
        sources=sources,
    )


def backend_job_caps(opts: RunOptions) -> RunOptions:
    """The options the batch cutter works with: on Vertex, --batch-size and the bytes a request file may hold
    within Vertex's per-job limits (requests, input bytes less the label each line carries on the way)."""
    if opts.backend != "vertex":
        return opts
    n = min(opts.batch_size, VERTEX_LIMITS["requests_per_job"])
    room = VERTEX_LIMITS["input_bytes_per_job"] - n * VERTEX_LINE_OVERHEAD
    return dataclasses.replace(opts, batch_size=n, max_file_bytes=min(opts.max_file_bytes, room))


def vertex_warnings(spec: ModelSpec, opts: RunOptions) -> list[str]:
    """What a Vertex plan must say out loud: a model no Vertex page confirms for batch."""
    if opts.backend != "vertex" or spec.name in VERTEX_BATCH_MODELS:
        return []
    return [
        f"{spec.name} is not on the list of Gemini models that serve batch on Vertex AI ({', '.join(VERTEX_BATCH_MODELS)}; "
        f"{VERTEX_SOURCES['models_list']}): a create may be refused (404/400). Check the model's Vertex page."
    ]


def admission_rows(run: Run) -> list[tuple[str, str]]:
    """The plan's limit rows: the enqueued-token limit (Gemini API), or Vertex's jobs at once and job caps."""
    p, o = run.plan, run.run_options
    if o.backend != "vertex":
        return [("enqueued limit", _limit_words(p))]
    jobs = o.max_active_jobs
    own = f"--enqueued-limit {p['enqueued_limit']:,} tokens, and " if o.enqueued_limit else ""
    rounds = -(-p["batches"] // jobs)
    return [
        (
            "admission",
            f"{own}at most {jobs:,} job(s) at once (--max-active-jobs; {rounds:,} round(s)): Vertex AI has no enqueued-token "
            f'limit, and Google publishes no concurrent-job quota for Gemini batch ("no predefined quota", a shared pool; '
            f"jobs queue up to {VERTEX_LIMITS['queue_hours']} h, then expire)",
        ),
        (
            "job caps",
            f"{VERTEX_LIMITS['requests_per_job']:,} requests and {VERTEX_LIMITS['input_bytes_per_job']:,} bytes a job "
            f"({VERTEX_SOURCES['batch_inference']})",
        ),
    ]


def pin_backend(opts: RunOptions) -> RunOptions:
    """A Vertex run's project, location and bucket as given now (the CLI's flags, else GOOGLE_CLOUD_PROJECT /
    GOOGLE_CLOUD_LOCATION), kept in its options: a resume in another shell talks to the same project and
    bucket, and the same `run` again with other ones is told so (backend_differences). A mode the backend
    cannot run exits 2 here, before a client or a run folder is made."""
    check_backend_mode(opts)
    settings = vertex_settings(opts)
    if settings is None:
        return opts
    project, location, bucket = settings
    return dataclasses.replace(opts, project=project, location=location, bucket=bucket.rstrip("/"))


def backend_differences(was: RunOptions, now: RunOptions) -> list[str]:
    """The backend options that differ between an existing run and the same `run` again: the backend (a run
    made before --backend existed reads as gemini), else, on Vertex, the project, location and bucket."""
    if was.backend != now.backend:
        return ["backend"]
    if now.backend != "vertex":
        return []
    return [k for k in ("project", "location", "bucket") if (getattr(was, k) or "") != (getattr(now, k) or "")]


def backend_words(run: Run) -> str:
    """Where a run's batches go, in words (the plan's and status's "endpoint")."""
    o = run.run_options
    if o.backend != "vertex":
        return run.endpoint or "Gemini API"
    at = f" at {run.endpoint}" if run.endpoint else ""
    return f"Vertex AI ({o.project or '?'}, {o.location or '?'}, {o.bucket or '?'}){at}"


# ================================================================================================
# 5. Persistence: atomic JSON sidecars, the run store, the run lock, input reading
# ================================================================================================


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.contextmanager
def atomic_file(path: Path, unique: bool = True, durable: bool = True) -> Iterator[Any]:
    """The one atomic writer, for every sidecar, results file and the merged output: yields a binary file
    beside `path` (0600); on success it is flushed, fsynced, moved over `path` with os.replace and the
    folder fsynced, so a reader (or a crash) sees the old file or the new one, never part of one. On error
    the temp file is removed. `unique=False` names the temp file after `path` alone (writers that hold the
    run lock: a crash's leftover is overwritten by the next try instead of piling up beside the output).
    `durable=False` skips both fsyncs, for files a crash may lose because they are made again from a durable one:
    a reader still sees the old file or the new one, but after a power cut the file may be gone or empty."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp" if unique else f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    held = _hold(fd)  # the writer's mark until its temp file is moved into place: remove_dead_temps leaves it alone
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            e.filename = str(path)  # a write() that found the disk full names no file: the one being written
        raise
    finally:
        if held is not None:
            os.close(held)
    if durable:
        fsync_dir(path.parent)


def _hold(fd: int) -> int | None:
    """An exclusive flock on a temp file, kept by a second descriptor (it outlives the file object closed before
    os.replace): a process on any host sharing the folder sees the temp is being written. None without fcntl."""
    try:
        import fcntl
    except ImportError:
        return None
    held = os.dup(fd)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(held)
        return None
    return held


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace `path` with `data` atomically (atomic_file)."""
    with atomic_file(path, durable=durable) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def private_dir(path: Path) -> None:
    """Make a folder (and its parents) private: run folders hold documents and results (files are 0600)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def save_json(path: Path, obj: dict[str, Any], durable: bool = True) -> None:
    atomic_write(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n", durable)


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, orjson.JSONDecodeError) as e:
        raise StateError(f"{path}: unreadable sidecar ({e})") from e
    if not isinstance(data, dict):
        raise StateError(f"{path}: sidecar is not a JSON object")
    return data


def open_private(path: Path, mode: str = "wb") -> Any:
    """Open a file for writing, created 0600 (results may be sensitive)."""
    private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode, buffering=1 << 20 if "a" not in mode else -1)


# The one rule for run names (CLI, library, REST): a folder name inside the state dir and a safe part of
# a display name. No "/", no "..", nothing absolute.
RUN_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RUN_NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
# Folders of the state dir that are no run's: <state_dir>/inputs/ holds the records of runs given in memory (and,
# beside them, those runs' default results files), so a run of that name would share them (its cleanup deleted them).
RESERVED_RUN_NAMES = ("inputs",)


def check_run_name(name: str, arg: str = "--name (name= in the library)") -> str:
    """The name, or UsageError naming the rule and `arg` (where the name was given) as the fix. Matched whole
    (re.fullmatch: "$" alone lets a trailing newline through)."""
    if not isinstance(name, str) or not re.fullmatch(RUN_NAME_RE, name) or ".." in name:
        raise UsageError(f"run name {name!r} is not allowed: {RUN_NAME_RULE}. Fix: pass {arg} with such a name.")
    if name.lower() in RESERVED_RUN_NAMES:  # any case: the same folder on a case-insensitive file system
        raise UsageError(
            f"run name {name!r} is reserved: <state dir>/{name}/ holds the records of runs given in memory and their "
            f"results files. Fix: pass {arg} with another name, e.g. '{name}-run'."
        )
    return name


def legacy_run(state_dir: str | Path, name: Any) -> bool:
    """A run folder an older batchify made under a name the rule now refuses ("my data (v2)", before the rule;
    "inputs", before it was reserved): one plain path component holding a run.json. Such a run stays reachable
    under its name (status, list, resume, results, cancel, cleanup, the same `run` command); new runs follow the
    rule. Unreachable, its results were never merged and the same command sent every request again."""
    return _plain_component(name) and (Path(state_dir) / name / "run.json").is_file()


def _plain_component(name: Any) -> bool:
    """A name that stands for one folder inside the state dir: no separator, NUL, "." or ".."."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")


def run_name_for(state_dir: str | Path, given: str | None, path: str | Path) -> str:
    """The run's name: `given` (checked by the rule unless it names a legacy_run), else default_run_name(path)."""
    if given is not None:
        return given if legacy_run(state_dir, given) else check_run_name(given)
    return default_run_name(path, state_dir)


def default_run_name(path: str | Path, state_dir: str | Path | None = None) -> str:
    """A run name from an input file's stem, made to follow the name rule ("my file (2)" -> "my-file-2"); with
    `state_dir`, the stem itself where an older batchify made a run under it (legacy_run): the same command
    continues that run instead of starting another that sends every request again."""
    stem = gs_stem(str(path)) if str(path).startswith("gs://") else Path(path).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")[:64].replace("..", ".") or "run"
    name = f"{name}-run" if name.lower() in RESERVED_RUN_NAMES else name  # inputs.jsonl: run "inputs-run"
    if state_dir is not None and stem != name and legacy_run(state_dir, stem) and not legacy_run(state_dir, name):
        return stem
    return name


class RunStore:
    """The sidecars of one run folder: <state_dir>/<run>/{run.json, jobs/, requests/, results/, ...}."""

    def __init__(self, state_dir: str | Path, name: str):
        if not legacy_run(state_dir, name):
            check_run_name(name)
        self.state_dir = Path(state_dir)
        self.name = name
        self.dir = self.state_dir / name

    # paths
    @property
    def run_path(self) -> Path:
        return self.dir / "run.json"

    @property
    def jobs_dir(self) -> Path:
        return self.dir / "jobs"

    @property
    def ids_path(self) -> Path:
        return self.dir / "ids.jsonl"

    @property
    def realtime_path(self) -> Path:
        return self.dir / "realtime.jsonl"

    @property
    def fetch_cache_path(self) -> Path:
        return self.dir / "fetched.jsonl"

    @property
    def fetch_errors_path(self) -> Path:
        return self.dir / "fetch_errors.jsonl"

    @property
    def rejected_path(self) -> Path:
        return self.dir / f"{self.name}.rejected.jsonl"

    def request_path(self, job: Job) -> Path:
        return self.dir / job.request_file

    def result_path(self, job: Job) -> Path:
        return self.dir / "results" / f"{job.name}.jsonl"

    def exists(self) -> bool:
        return self.run_path.exists()

    # the one save/load pair per kind
    def save_run(self, run: Run) -> None:
        run.updated_at = utcnow()
        d = run.to_dict()
        validate_run_dict(d)
        save_json(self.run_path, d)

    def load_run(self) -> Run:
        try:
            return Run.from_dict(load_json(self.run_path))
        except FileNotFoundError:
            hint = (
                " A `run` was interrupted while preparing it (nothing was uploaded): run the same `batchify run` command again."
                if self.dir.is_dir()
                else " Fix: see `batchify list`."
            )
            with contextlib.suppress(BatchifyError, OSError):
                if (at := load_requests_marker(self)) is not None:
                    hint = (
                        f" A `run` was interrupted while preparing it; the request objects it staged are still in the "
                        f"bucket (gs://{at[0]}/{at[1]}*). Fix: run the same `batchify run` command again (it deletes them "
                        f"first), or `batchify cleanup {shlex.quote(self.name)}` to delete them."
                    )
            raise UsageError(f"no run named {self.name!r} in {self.state_dir}.{hint}") from None
        except StateError as e:
            raise StateError(_sidecar_problem(self.run_path, e)) from None

    def load_jobs(self, quarantine: list[str] | None = None) -> list[Job]:
        """Every job sidecar. A damaged one raises StateError naming it, or, given `quarantine`, is moved
        aside to <name>.json.damaged (its path appended there) for the engine to rebuild from the service."""
        if not self.jobs_dir.exists():
            return []
        jobs = []
        for p in sorted(self.jobs_dir.glob("*.json")):
            try:
                jobs.append(Job.from_dict(load_json(p)))
            except StateError as e:
                if quarantine is None:
                    raise StateError(_sidecar_problem(p, e)) from None
                os.replace(p, p.with_name(p.name + ".damaged"))
                quarantine.append(str(p))
        return sorted(jobs, key=lambda j: (j.index, j.attempt, j.name))

    def save_job(self, job: Job, durable: bool = True) -> None:
        d = job.to_dict()
        validate_job_dict(d)
        save_json(self.jobs_dir / f"{job.name}.json", d, durable)


def _sidecar_problem(path: Path, e: Exception) -> str:
    text = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
    if path.parent.name == "jobs" and path.suffix == ".json" and path.name != "run.json":  # resume rebuilds it (repair)
        return (
            f"{text}. Fix: `batchify resume {shlex.quote(path.parent.parent.name)}` moves it aside and rebuilds it from the service "
            "(the run's jobs, found by display name, before anything is sent), or restore it from a backup."
        )
    return (
        f"{text}. Fix: restore the file from a backup (or move the run folder {path.parent if path.name == 'run.json' else path.parent.parent} "
        "away); every other run is untouched."
    )


def list_runs(state_dir: str | Path) -> list[str]:
    d = Path(state_dir)
    if not d.is_dir():
        return []
    return sorted(p.parent.name for p in d.glob("*/run.json") if _plain_component(p.parent.name))  # legacy_run's too


LOCK_PROBE_WAIT_S = 0.5  # how long a lock taken for a moment by someone looking (status, held()) is waited for


def _lock_owner(fd: int) -> tuple[int | None, str]:
    """The pid named in a lock file (None: none) and the whole line ("pid N (what) since ...")."""
    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    owner = re.search(r"pid (\d+)", holder)
    return (int(owner.group(1)) if owner else None), holder


def _lock_probe_deadline(fd: int) -> float:
    """Until when a held lock is tried again: LOCK_PROBE_WAIT_S when the holder named in the lock file is not alive (the
    last owner left; `status` or `list` is only looking, a shared lock taken for a moment by RunLock.held) or is a
    reader of this process (reader_lock, "results", held for a moment), so that a resume landing in that moment is not
    refused for it; 0 (refused at once) when a live process owns the run, this one included (another call in it)."""
    pid, holder = _lock_owner(fd)
    if pid is not None and pid == os.getpid() and "(results)" not in holder:
        return 0.0  # another run, resume, prepare, cancel or cleanup in this very process: waiting frees nothing
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        return 0.0  # a live process owns the run: no waiting
    return time.monotonic() + LOCK_PROBE_WAIT_S


def _flock_briefly_contended(fd: int, how: int) -> None:
    """flock without blocking, tried again until _lock_probe_deadline (never on a running event loop: that would
    freeze every task of it; async callers use _flock_briefly_contended_async). BlockingIOError when it is still
    held: a process owns the run."""
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    deadline = 0.0 if on_loop else _lock_probe_deadline(fd)
    while not _try_flock(fd, how, deadline):
        time.sleep(0.02)


async def _flock_briefly_contended_async(fd: int, how: int) -> None:
    """_flock_briefly_contended for a coroutine: it waits with asyncio.sleep, the event loop's other tasks going on."""
    deadline = _lock_probe_deadline(fd)
    while not _try_flock(fd, how, deadline):
        await asyncio.sleep(0.02)


def _try_flock(fd: int, how: int, deadline: float) -> bool:
    """One non-blocking flock: True when taken, False to try again, BlockingIOError once `deadline` has passed."""
    import fcntl

    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if time.monotonic() >= deadline:
            raise
        return False


class RunLock:
    """One writer per run: an fcntl lock on <run>/lock that names its holder. Coroutines take it with
    acquire_async (a brief wait does not block the event loop)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "lock"
        self.fd: int | None = None

    def _open(self) -> int:
        try:
            import fcntl  # noqa: F401  POSIX only: imported here so that `import batchify` works everywhere
        except ImportError:
            raise UsageError("running a batch needs a POSIX system (Linux, macOS, WSL): the run lock uses fcntl") from None
        private_dir(self.path.parent)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def _refused(self, fd: int) -> LockedError:
        pid, holder = _lock_owner(fd)
        os.close(fd)
        name = self.path.parent.name
        if pid == os.getpid():  # no kill advice: that would be the caller's own process
            return LockedError(
                f"run {name!r} is in use by another call in this same process ({holder}). Fix: wait for that call to "
                "finish (await it), or stop it (its GracefulStop, or cancel its task: it saves everything), then try again."
            )
        how = f"Ctrl-C in its terminal, or `kill -INT {pid}`" if pid else "Ctrl-C in its terminal"
        return LockedError(
            f"run {name!r} is in use by {holder or 'another process'}. Fix: wait for it to finish, or stop it ({how}; "
            "it saves everything), then try again."
        )

    def _own(self, fd: int, what: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}) since {utcnow()}\n".encode(), 0)
        self.fd = fd

    def acquire(self, what: str) -> None:
        fd = self._open()
        import fcntl

        try:
            _flock_briefly_contended(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            raise self._refused(fd) from None
        self._own(fd, what)

    async def acquire_async(self, what: str) -> None:
        fd = self._open()
        import fcntl

        try:
            await _flock_briefly_contended_async(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            raise self._refused(fd) from None
        self._own(fd, what)

    def held(self) -> bool | None:
        """Whether a process holds this run now (None: cannot tell, no fcntl). Asked with a shared, non-blocking
        try that is let go at once; a run whose sidecars say "running" but whose lock nobody holds was stopped
        by a crash, a SIGKILL or a reboot."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)  # closing lets a shared lock we took go
        return False

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(slots=True)
class InputRecord:
    kind: str  # "line" or "item"
    number: int
    obj: Any
    error: str | None = None
    raw: bytes = b""

    @property
    def where(self) -> str:
        return f"{self.kind} {self.number}"


def check_input_file(path: Path) -> None:
    """InputError unless `path` is a regular file batchify can read more than once."""
    if isinstance(path, GsInput):  # objects in Cloud Storage: there must be at least one
        path.listing()
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if str(path) == "-":  # stdin, as many tools take it
            raise InputError(
                "-: batchify does not read its input from stdin: it reads it more than once and checks its hash on "
                "resume. Fix: save it to a file first (e.g. `cat ... > input.jsonl`)."
            ) from None
        raise InputError(f"{path}: no such file. Fix: check the path.") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror}).") from e
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{path}: not a regular file (a pipe, FIFO or device): batchify reads its input more than once and checks "
            "its hash on resume. Fix: save it to a file first (e.g. `cat ... > input.jsonl`)."
        )
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind, fix in _PACKED:
        if head.startswith(magic):
            raise InputError(f"{path}: a {kind} file, not JSONL. Fix: unpack it first (e.g. `{fix} {path}`).")


_PACKED = (  # the first bytes of packed files users pass for JSONL: (magic, what it is, the command that unpacks it)
    (b"\x1f\x8b", "gzip-compressed", "gunzip -k"),
    (b"BZh", "bzip2-compressed", "bunzip2 -k"),
    (b"\xfd7zXZ\x00", "xz-compressed", "unxz -k"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "unzstd"),
    (b"PK\x03\x04", "zip", "unzip"),
)


def read_input(path: Path) -> Iterator[InputRecord]:
    """Stream the records of a JSONL file (or a JSON array file), with where each one stands.

    A UTF-8 BOM, CRLF line ends and blank lines are accepted; malformed JSON and non-UTF-8 bytes are
    reported per line.
    """
    check_input_file(path)
    try:
        f = path.open("rb", buffering=1 << 20)  # lines of ~10 KB: a small buffer splits each one
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror}).") from e
    with f:
        head = f.read(4096)
        f.seek(0)
        if _input_shape(path, head) == "array":
            try:
                items = orjson.loads(f.read().removeprefix(b"\xef\xbb\xbf"))
            except orjson.JSONDecodeError as e:
                raise InputError(f"{path}: not valid JSON ({e}). Fix: give a JSON array of objects, or JSONL.") from e
            for i, obj in enumerate(items, 1):
                yield InputRecord("item", i, obj)
            return
        yield from jsonl_records(f)


def _input_shape(path: Path, head: bytes) -> str:
    """ "array" or "jsonl" from a file's first 4 KB, or InputError for what batchify cannot read (UTF-16,
    an empty file, pretty-printed JSON), with the fix."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) > 1 and head.count(b"\x00") > len(head) // 4):
        raise InputError(
            f"{path}: the file is UTF-16 (or another wide encoding); batchify expects UTF-8 JSONL. "
            f"Fix: convert it, e.g. `iconv -f UTF-16 -t UTF-8 {path} > input.jsonl`."
        )
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body:
        raise InputError(f"{path}: the file is empty. Fix: give one JSON object per line.")
    if body.split(b"\n", 1)[0].strip() == b"{":
        raise InputError(
            f"{path}: the file starts with a JSON object spread over several lines (pretty-printed); batchify "
            "expects JSONL (one complete object per line) or a JSON array of objects. "
            "Fix: e.g. `jq -c . file > input.jsonl` (one object per line)."
        )
    return "array" if body.startswith(b"[") else "jsonl"


def jsonl_records(lines: Iterable[bytes]) -> Iterator[InputRecord]:
    """The records of JSONL lines (1-based line numbers; a BOM on the first line and blank lines skipped)."""
    for lineno, line in enumerate(lines, 1):
        if lineno == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line.isspace() or not line:
            continue
        try:
            obj = orjson.loads(line)  # surrounding white space (CRLF too) is valid JSON
        except orjson.JSONDecodeError as e:
            yield InputRecord("line", lineno, None, _why_unreadable(line, e), line.strip())
            continue
        yield InputRecord("line", lineno, obj, None, line)


def _why_unreadable(line: bytes, e: orjson.JSONDecodeError) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as ue:
        return f"bytes that are not UTF-8 at column {ue.start + 1}. Fix: re-encode the file as UTF-8"
    return f"malformed JSON ({e.msg} at column {e.colno}). Fix: one complete JSON object per line"


def file_sha256(path: Path) -> str:
    if isinstance(path, GsInput):  # objects in Cloud Storage: the hash of their listing (GsInput)
        return path.fingerprint()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _newlines(path: Path) -> tuple[int, bool]:
    """(newlines in a file, whether it ends in one), read in 1 MiB chunks; (-1, False) for a file that is gone."""
    count, last = 0, b"\n"
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except FileNotFoundError:
        return -1, False
    return count, last == b"\n"


def repair_jsonl_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so that the next append starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        pos = f.seek(0, os.SEEK_END)
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(pos - step + nl + 1)
                return
            pos -= step
        f.truncate(0)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a torn last line after a crash: that request is simply not done


# -- gs:// input (--backend vertex): the input read as a stream from Cloud Storage, never whole ------------
GS_READ_CHUNK = 8 * 1024 * 1024  # bytes a ranged GET fetches when reading on from the start
GS_SEEK_CHUNK = 256 * 1024  # ... and after a seek elsewhere (calibration reads a line at 64 offsets)


@functools.cache
@functools.cache
def gs_read_kwargs() -> dict[str, Any]:
    """blob.download_as_bytes options for _GsConcat's ranged GETs: each body read in one call
    (single_shot_download, google-cloud-storage 3.2+) rather than 8 KiB at a time in Python (measured on the storage
    emulator, 100 MB in 8 MiB GETs: 0.53 s -> 0.24 s, the client's CPU 0.46 s -> 0.17 s); {} where the client lacks
    it (the download kwargs it lists). Worked out once."""
    from google.cloud.storage import fileio

    return {"single_shot_download": True} if "single_shot_download" in getattr(fileio, "VALID_DOWNLOAD_KWARGS", ()) else {}


def gs_stem(uri: str) -> str:
    """A run name's stem for gs://bucket/prefix/*.jsonl: the last path segment with no wildcard in it."""
    parts = [p for p in uri.removeprefix("gs://").split("/") if p and not any(c in p for c in "*?[")]
    return Path(parts[-1]).stem if parts else "run"


class _GsConcat(io.RawIOBase):
    """The bytes of several Cloud Storage objects, one after another, as one seekable raw stream. Each object
    is read at the generation listed (a rewrite since then fails the read instead of mixing two versions), in
    ranged GETs of `chunk` bytes (blob.download_as_bytes, served from the bytes it returns: a BlobReader's own
    buffer copied each byte twice more; measured, 372 MiB read line by line: CPU 1.06 -> ~0.55 s).

    `line_ends` (an input of several JSONL objects): each object is read as a text file of its own is, so that no
    record runs into the next object's: one byte follows each object but the last, a line end if it does not end
    in one (many writers leave none after the last line), else a space (a line's leading white space: the line
    count stays the objects' own), and a UTF-8 BOM at the start of an object but the first reads as three spaces
    (the first one's is the reader's, as in a local file). The stream is then len(blobs) - 1 bytes longer than
    the objects; one object reads as it is."""

    def __init__(self, blobs: list[Any], sizes: list[int], line_ends: bool = False):
        self.blobs, self.sizes = blobs, sizes
        self.extra = 1 if line_ends else 0  # bytes after each object but the last
        self.last: dict[int, bytes] = {}  # an object's last byte, once read
        self.pos, self.chunk = 0, GS_READ_CHUNK
        self.data, self.at = memoryview(b""), 0  # the last GET's bytes, and how many of them are served

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        total = sum(self.sizes) + self.extra * max(0, len(self.sizes) - 1)
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: total + offset}[whence]
        target = max(0, min(total, target))
        if target != self.pos:
            self.data, self.at = memoryview(b""), 0
            self.pos, self.chunk = target, (GS_READ_CHUNK if target == 0 else GS_SEEK_CHUNK)
        return self.pos

    def _fetch(self) -> bool:
        """The next ranged GET from self.pos (within the object it falls in); False at the end."""
        idx, start = 0, 0
        while idx < len(self.sizes):
            size = self.sizes[idx]
            if self.pos < start + size:
                off = self.pos - start
                got = self.blobs[idx].download_as_bytes(
                    start=off, end=min(size, off + self.chunk) - 1, checksum=None, **gs_read_kwargs()
                )  # end inclusive
                if got:
                    if self.extra:
                        got = self._line_ends(idx, off, size, got)
                    self.data, self.at = memoryview(got), 0
                    return True
                self.pos = start + size  # shorter than listed (it cannot be, at its generation): the next object
            if self._between(idx) and self.pos == start + size:  # the byte after the object (reached by a seek)
                if idx not in self.last:
                    tail = (
                        b""
                        if not size
                        else self.blobs[idx].download_as_bytes(start=size - 1, end=size - 1, checksum=None, **gs_read_kwargs())
                    )
                    self.last[idx] = bytes(tail[-1:])
                self.data, self.at = memoryview(self._after(idx)), 0
                return True
            idx, start = idx + 1, start + size + self._between(idx)
        return False

    def _between(self, idx: int) -> int:
        """The bytes after object `idx`: one between two objects (line_ends), else none."""
        return self.extra if idx < len(self.sizes) - 1 else 0

    def _after(self, idx: int) -> bytes:
        return b"\n" if self.last.get(idx, b"") not in (b"\n", b"") else b" "

    def _line_ends(self, idx: int, off: int, size: int, got: bytes) -> bytes:
        """A GET's bytes of object `idx` from `off`: a BOM at its start as spaces (not the first object's), and the
        byte after it appended when the GET reached its end (not after the last)."""
        if off == 0 and idx and got.startswith(b"\xef\xbb\xbf"):
            got = b"   " + got[3:]
        if off + len(got) >= size and self._between(idx):
            self.last[idx] = got[-1:]
            got += self._after(idx)
        return got

    def readinto(self, b: Any) -> int:
        if self.at >= len(self.data) and not self._fetch():
            return 0
        n = min(len(b), len(self.data) - self.at)
        b[:n] = self.data[self.at : self.at + n]
        self.at += n
        self.pos += n
        return n

    def close(self) -> None:
        self.data = memoryview(b"")
        super().close()


def gs_client(project: str | None) -> Any:
    """A Cloud Storage client by the client library's own rules (STORAGE_EMULATOR_HOST, then Application Default
    Credentials): gs:// input and output, and a Vertex run's results. No credentials is an AuthError naming the
    fix (exit 3), not a traceback. (VertexClient makes its own, with its endpoint, and maps the same error.)"""
    from google.auth import exceptions as auth_exc
    from google.cloud import storage

    try:
        return storage.Client(project=project)
    except auth_exc.DefaultCredentialsError as e:
        raise AuthError(f"Cloud Storage: no usable Application Default Credentials ({e}). Fix: {ADC_FIX}.", code=401) from e


ADC_FIX = "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)"


def gs_errors() -> tuple[type[BaseException], ...]:
    """What a Cloud Storage call raises (gs_error converts each): the API's errors (api_core's GoogleAPIError: its
    answers, and RetryError once its deadline passed with the network down), credentials', resumable-media's
    (an upload chunk's bad answer, a checksum), the transport's (requests'; a socket's OSError)."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from google.cloud.storage import exceptions as sexc
    from requests.exceptions import RequestException

    return (gexc.GoogleAPIError, auth_exc.GoogleAuthError, sexc.InvalidResponse, sexc.DataCorruption, RequestException, OSError)


def gs_error(e: BaseException, what: str) -> RemoteError:
    """One of gs_errors() as batchify's: credentials AuthError (ADC_FIX); else RemoteError with the HTTP code where
    there is one (0: the network, RetryError after its deadline: transient, as any network error)."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(e, auth_exc.GoogleAuthError):
        return AuthError(f"{what}: no usable Application Default Credentials ({e}). Fix: {ADC_FIX}.", code=401)
    if isinstance(e, gexc.GoogleAPICallError):
        return RemoteError(f"{what}: {e.code} {e.message}", code=int(e.code or 0))
    code = getattr(e, "code", None) or getattr(getattr(e, "response", None), "status_code", 0)
    return RemoteError(f"{what}: {type(e).__name__}: {e}", code=code if isinstance(code, int) else 0)


@contextlib.contextmanager
def gs_look_errors(uri: str, what: str, role: str = "input") -> Iterator[None]:
    """Cloud Storage's refusals of a look at the input (or --out: `role`) as errors naming the fix, never a
    traceback: no such bucket (404) and no permission (403) are InputError (exit 2: nothing was sent; the URI or
    the account's roles are to mend); other answers and the network's errors are RemoteError, credentials that do
    not work AuthError (exit 3)."""
    from google.api_core import exceptions as gexc

    bucket = split_gs_uri(uri)[0]
    look_errors: tuple[type[BaseException], ...] = (*gs_errors(), ValueError)
    try:
        yield
    except BatchifyError:
        raise
    except gexc.NotFound:
        where = "the input's gs:// URI" if role == "input" else f"{role} (or create the bucket)"
        raise InputError(
            f"{uri}: the bucket gs://{bucket} does not exist (404). Fix: check the bucket's name in {where} "
            f"(`gcloud storage ls gs://{bucket}`)."
        ) from None
    except gexc.Forbidden as e:
        roles = "roles/storage.objectViewer" if role == "input" else "roles/storage.objectUser"
        raise InputError(
            f"{uri}: no permission to {what} objects in gs://{bucket} (403 {e.message}). Fix: grant the account "
            f"batchify runs as {roles} on gs://{bucket} (`gcloud storage buckets add-iam-policy-binding gs://{bucket} "
            f"--member=user:YOU --role={roles}`), or check the URI."
        ) from None
    except look_errors as e:
        raise gs_error(e, f"{uri}: {what}") from e


class GsInput(PosixPath):
    """An input given as gs://BUCKET/PATH.jsonl, gs://BUCKET/PREFIX/ (its *.jsonl objects) or a glob
    (gs://BUCKET/PREFIX/*.jsonl), in object-name order. A Path, so that the input's readers take it as they
    are: open() streams the objects (_GsConcat), stat() gives their total size, str() the URI, resolve() itself.
    Its hash (file_sha256) is of the objects' listing (name, generation, size, crc32c): Cloud Storage gives an
    object a new generation whenever it is written, so a changed input reads as changed without a second pass.
    The Cloud Storage client follows its own rules (STORAGE_EMULATOR_HOST, then ADC)."""

    uri: str
    project: str | None

    def __new__(cls, uri: str, project: str | None = None) -> GsInput:
        return super().__new__(cls, uri)  # the path "gs:/..." (as Path() reads it)

    def __init__(self, uri: str, project: str | None = None) -> None:
        if sys.version_info >= (3, 12):
            super().__init__(uri)
        self.uri, self.project = uri, project
        self._listing: list[tuple[str, int | None, int, str | None]] | None = None
        self._storage: Any = None
        self.only: frozenset[str] | None = None  # the objects a run's prepare listed (recorded_input): those alone
        split_gs_uri(uri)

    def __str__(self) -> str:
        return getattr(self, "uri", None) or super().__str__()

    def __repr__(self) -> str:
        return f"GsInput({str(self)!r})"

    def __fspath__(self) -> str:
        raise TypeError(f"{self} is in Cloud Storage: it has no local path")

    @property
    def stem(self) -> str:
        return gs_stem(str(self))

    def resolve(self, strict: bool = False) -> GsInput:
        return self

    def with_name(self, name: str) -> Path:  # type: ignore[override]
        """Files named after the input (the default results file) go to the working directory."""
        return Path.cwd() / name

    def listing(self) -> list[tuple[str, int | None, int, str | None]]:
        """The input's objects as (name, generation, size, crc32c), listed once, sorted by name (a snapshot:
        the client's Blob objects change their properties as they are read); InputError when there are none."""
        if self._listing is None:
            bucket, name = split_gs_uri(self.uri)
            client = self._client()
            with gs_look_errors(self.uri, "list"):
                if self.kind == "glob":
                    found = list(client.list_blobs(bucket, match_glob=name))
                elif self.kind == "object":
                    one = client.bucket(bucket).get_blob(name)
                    found = [one] if one is not None else []
                else:
                    found = [b for b in client.list_blobs(bucket, prefix=name) if b.name.endswith((".jsonl", ".json"))]
            if self.only is not None:  # an object added since prepare is not this run's input
                found = [b for b in found if b.name in self.only]
            self._listing = sorted((b.name, b.generation, int(b.size or 0), b.crc32c) for b in found)
        if not self._listing:
            raise InputError(f"{self}: no such object (nothing matches). Fix: check the gs:// URI.")
        return list(self._listing)

    def _client(self) -> Any:
        if self._storage is None:
            self._storage = gs_client(self.project)
        return self._storage

    def blobs(self) -> list[Any]:
        """Fresh Blob objects for reading, each at the generation listed."""
        bucket = self._client().bucket(split_gs_uri(self.uri)[0])
        return [bucket.blob(n, generation=g) for n, g, _size, _crc in self.listing()]

    def exists(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return bool(self.listing())
        except InputError:
            return False

    def stat(self, *args: Any, **kwargs: Any) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, sum(x[2] for x in self.listing()), 0, 0, 0))

    def open(self, mode: str = "rb", buffering: int = -1, *args: Any, **kwargs: Any) -> Any:
        if mode != "rb":
            raise UsageError(f"{self}: the input in Cloud Storage is read only")
        sizes = [x[2] for x in self.listing()]
        raw = _GsConcat(self.blobs(), sizes, line_ends=True)  # each object's records end with it
        return io.BufferedReader(raw, buffer_size=buffering if buffering > 0 else 1 << 20)

    def fingerprint(self) -> str:
        return hashlib.sha256(orjson.dumps([self.uri, self.listing()])).hexdigest()

    @property
    def kind(self) -> str:
        """How the URI names its objects: "glob" (a match_glob), "object" (one object), or "prefix" (its *.jsonl and
        *.json objects): the one reading of it that listing, takes() and save_input_objects share."""
        name = split_gs_uri(self.uri)[1]
        if any(c in name for c in "*?["):
            return "glob"
        return "object" if name and not name.endswith("/") else "prefix"

    def takes(self, uri: str) -> bool:
        """Whether the object `uri` is one of this input's objects, or would be once written (a listing of the
        input would read it): the object itself, a *.jsonl / *.json object under the prefix, or one the glob
        matches."""
        bucket, name = split_gs_uri(self.uri)
        at, obj = split_gs_uri(uri)
        if at != bucket:
            return False
        if self.kind == "glob":
            return gs_glob_regex(name).fullmatch(obj) is not None
        if self.kind == "object":
            return obj == name
        return obj.startswith(name) and obj.endswith((".jsonl", ".json"))


def gs_glob_regex(pattern: str) -> re.Pattern[str]:
    """A Cloud Storage match_glob as a regex: `*` and `?` stop at a `/`, `**` does not, [..] / [!..] are classes,
    {a,b} alternatives."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        end = pattern.find("]", i + 2) if c == "[" else pattern.find("}", i + 1) if c == "{" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and end > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        elif c == "{" and end > 0:
            out.append("(?:" + "|".join(re.escape(a) for a in pattern[i + 1 : end].split(",")) + ")")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.S)


INPUT_OBJECTS = "input.json"  # a gs:// input's objects as prepare listed them (names), in the run folder


def save_input_objects(store: RunStore, path: Path) -> None:
    """Record the objects a gs:// prefix or glob input was read from (nothing for another input)."""
    if not isinstance(path, GsInput):
        return
    if path.kind == "object":
        return  # one object: its listing cannot grow
    d = {"kind": "input", "schema_version": SCHEMA_VERSION, "uri": path.uri, "objects": [x[0] for x in path.listing()]}
    save_json(store.dir / INPUT_OBJECTS, d)


def recorded_input(store: RunStore, path: Path) -> Path:
    """A run's gs:// prefix or glob input as prepare read it: the objects it listed then, each checked at its
    generation by the run's hash, and none added since (a pipeline's new part file, batchify's own objects when the
    staging area is under the prefix) that would make the input read as changed. A run prepared before input.json
    was written (or an input of one object, or local) is listed afresh, as before."""
    if isinstance(path, GsInput):
        with contextlib.suppress(OSError, ValueError):
            d = orjson.loads((store.dir / INPUT_OBJECTS).read_bytes())
            if isinstance(d, dict) and d.get("uri") == path.uri and isinstance(d.get("objects"), list):
                path.only = frozenset(str(n) for n in d["objects"])
    return path


def check_gs_staging(path: Path, opts: RunOptions, name: str) -> None:
    """UsageError when a gs:// input's prefix or glob takes the staging area's objects (--bucket under the input
    prefix): the run's own request and output objects would be read as input by the next listing."""
    settings = vertex_settings(opts) if isinstance(path, GsInput) else None
    if settings is None or not isinstance(path, GsInput):  # (both: mypy narrows `path` by the second)
        return
    bucket, root = split_gs_uri(settings[2].rstrip("/"))
    root = f"{root.strip('/')}/batchify" if root.strip("/") else "batchify"
    staged = ("requests/000000-b0001.jsonl", "results/x.jsonl", "output/x/predictions.jsonl")  # names it writes
    if any(path.takes(f"gs://{bucket}/{root}/{obj}") for obj in (*(f"{name}/{x}" for x in staged), staged[2])):
        raise UsageError(
            f"--bucket {settings[2]}: batchify's staging area gs://{bucket}/{root}/ is under the input {path.uri}: its "
            f"request and output objects would be read as input. Fix: give --bucket a place outside the input "
            f"(another bucket, or another prefix: --bucket gs://{bucket}/staging if the input is not the whole bucket)."
        )


def input_location(path: str | Path, opts: RunOptions | None = None) -> Path:
    """The run's input as a Path: a local file, or a GsInput for a gs:// URI (with --backend vertex only: the
    Developer API takes its requests from files uploaded from this machine)."""
    if isinstance(path, GsInput):
        return path
    if not str(path).startswith("gs://"):
        return Path(path)
    if opts is not None and opts.backend != "vertex":
        raise UsageError(f"{path}: input from Cloud Storage needs --backend vertex (with --project, --location, --bucket).")
    return GsInput(str(path), opts.project if opts is not None else None)


# -- gs:// results (--out gs://BUCKET/PATH.jsonl, --backend vertex): the merged output streamed to Cloud Storage -----
GS_WRITE_CHUNK = 32 * 1024 * 1024  # bytes a resumable upload sends at once (a multiple of 256 KiB; fewer round trips)


def out_uri(out: str) -> str:
    """The results file as a run keeps it: a local path made absolute, a gs:// URI as given."""
    return out if out.startswith("gs://") else str(Path(out).expanduser().resolve())


def out_location(out: str, project: str | None = None) -> Path:
    """A run's results file as a Path: a local one, or a GsOutput for gs://."""
    return GsOutput(out, project) if out.startswith("gs://") else Path(out)


def out_moved(out: str) -> str | None:
    """Why a run's recorded results file cannot be its own any more: its folder is gone (the project folder was
    moved or renamed since the run began; writing there would make the old folder again). None: it is there (or in
    Cloud Storage)."""
    if out.startswith("gs://") or Path(out).parent.is_dir():
        return None
    return f"its results file is recorded as {out}, and {Path(out).parent} no longer exists (moved or renamed?)"


def check_out(out: str, input_path: Path, store: RunStore | None = None, project: str | None = None, probe: bool = True) -> None:
    """Exit 2 (UsageError) before anything is sent when the results file cannot be written where --out says, so a
    paid run never ends unable to merge: a folder, the input itself, something not a regular file (the merge
    replaces what is at that path: /dev/null itself, as root), a path under a file, a folder that takes no new file
    (probed with a temporary file in the nearest folder that exists). With the run's `store`: not a file of its
    state dir's run folders, nor another run's results file there (one file keeps only the last run's rows). A
    gs:// one: check_gs_out (`project` its client's, `probe` whether to write there)."""
    if out.startswith("gs://"):
        return check_gs_out(out, input_path, store, project, probe)
    p = Path(out).expanduser()
    fix = "Fix: give --out a file path in a folder you can write to."
    if out.endswith(("/", os.sep)) or p.is_dir():
        raise UsageError(f"--out {out} is a folder, not a file. Fix: name the file, e.g. --out {p / 'results.jsonl'}.")
    if not isinstance(input_path, GsInput) and p.resolve() == input_path.resolve():
        raise UsageError(f"--out {out} is the input file: the results would overwrite it. Fix: give --out another path.")
    if p.exists() and not p.is_file():
        raise UsageError(
            f"--out {out} is not a regular file (a device, a pipe or a socket): the results file replaces what is at "
            "that path. Fix: give --out a regular file's path (`batchify results RUN` prints the results)."
        )
    if store is not None:
        _check_out_of_others(out, p.resolve(), store)
    folder = p.resolve().parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is a file, so no folder can be made under it. {fix}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: no file can be written in {folder} ({e.strerror or e}). {fix}") from None


def check_gs_out(
    out: str, input_path: Path, store: RunStore | None = None, project: str | None = None, probe: bool = True
) -> None:
    """check_out for --out gs://BUCKET/NAME: one object (GsOutput), not the gs:// input nor an object the input's
    prefix or glob would take (the merge would overwrite the input, or a later listing read the results as input),
    nor (with the run's `store`) another run's results object there (one object keeps only the last run's rows).
    With `probe`, the bucket is tried as the merge uses it: an empty object beside the output written and deleted
    (probe_gs_out), so that a missing bucket or one the account may not write is said now, not after every job
    is paid."""
    GsOutput(out)  # one object, not a prefix or a glob: UsageError
    if isinstance(input_path, GsInput) and input_path.takes(out):
        what = "the input object" if out == input_path.uri else f"an object of the input {input_path.uri}"
        raise UsageError(
            f"--out {out} is {what}: the results would overwrite the input, or be read as input by the next listing "
            f"of it. Fix: give --out an object outside the input (e.g. gs://{split_gs_uri(out)[0]}/results/"
            f"{input_path.stem}.results.jsonl), or a local file."
        )
    if store is not None:
        _check_out_of_others(out, out, store)
    if probe:
        probe_gs_out(out, project)


def probe_gs_out(out: str, project: str | None = None) -> None:
    """Write an empty object beside --out gs://BUCKET/NAME and delete it, as the merge writes and deletes its
    temporary object: InputError naming the fix (exit 2) when the bucket does not exist or refuses (gs_look_errors)."""
    bucket, name = split_gs_uri(out)
    blob = gs_client(project).bucket(bucket).blob(f"{name}.batchify-probe-{secrets.token_hex(4)}")
    with gs_look_errors(out, "write (and delete)", "--out"):
        blob.upload_from_string(b"", content_type="text/plain")
        blob.delete()


def _check_out_of_others(out: str, resolved: Path | str, store: RunStore) -> None:
    """--out must not be in a run's folder (its sidecars), nor another run's results file (both in this state dir).
    `resolved`: the local path made absolute, or a gs:// URI as given (out_uri)."""
    state = store.state_dir.resolve()
    rel = resolved.relative_to(state).parts if isinstance(resolved, Path) and resolved.is_relative_to(state) else ()
    if len(rel) > 1 and (rel[0] == store.name or (state / rel[0] / "run.json").exists()):
        raise UsageError(
            f"--out {out} is inside run {rel[0]!r}'s folder: the results would overwrite its files. "
            "Fix: give --out a path outside the run folders."
        )
    for other in list_runs(store.state_dir):
        if other == store.name:
            continue
        with contextlib.suppress(OSError, ValueError, StateError):
            if orjson.loads((store.state_dir / other / "run.json").read_bytes()).get("out") == str(resolved):
                raise UsageError(
                    f"--out {out} is run {other!r}'s results file: one file keeps only the last run's rows. Fix: give "
                    f"this run another --out (or `batchify cleanup {shlex.quote(other)}` first, if you are done with it)."
                )


def results_writer(out: Path) -> Any:
    """The merge's atomic writer: atomic_file for a local file, GsOutput.atomic_writer in Cloud Storage. Locally
    the temp file's name is the writer's own (atomic_file's unique name: two processes writing one --out, say two
    runs given the same file, never write one temp file), and what writers that died left beside the output is
    removed first (remove_dead_temps), as the fixed name once did by overwriting it."""
    if isinstance(out, GsOutput):
        return out.atomic_writer()
    remove_dead_temps(out)
    return atomic_file(out)


TEMP_GRACE_S = 10.0  # a temp file younger than this is never taken for a dead writer's (it may be about to be locked)


def remove_dead_temps(path: Path) -> None:
    """Delete atomic_file's temp files beside `path` left by writers that are gone (a crash mid-write), and the
    fixed-name one older versions used. A live writer's is left alone: it holds an exclusive flock on its temp
    (atomic_file), which works across processes, PID namespaces and (where the filesystem supports it) hosts;
    without fcntl, its pid answering is the sign. Temps younger than TEMP_GRACE_S are left too."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.\d+\.)?tmp")
    now = time.time()
    for p in path.parent.glob(f".{glob.escape(path.name)}.*tmp"):
        m = pattern.fullmatch(p.name)
        with contextlib.suppress(OSError):
            if m is None or now - p.stat().st_mtime < TEMP_GRACE_S:
                continue
            _remove_unless_held(p, int(m.group(1)) if m.group(1) else None)


def _remove_unless_held(p: Path, pid: int | None) -> None:
    try:
        import fcntl
    except ImportError:
        if pid is None or not pid_alive(pid):
            p.unlink()
        return
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): a writer holds it
        p.unlink()
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts: it may be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class _GsLines:
    """A binary writer that hands a BlobWriter 1 MiB at a time (the merge writes one short line per call)."""

    def __init__(self, raw: Any):
        self.raw, self.buf = raw, bytearray()

    def write(self, b: bytes) -> int:
        self.buf += b
        if len(self.buf) >= 1 << 20:
            self.flush()
        return len(b)

    def flush(self) -> None:
        if self.buf:
            self.raw.write(bytes(self.buf))
            self.buf.clear()


class GsOutput(GsInput):
    """A results file in Cloud Storage, gs://BUCKET/NAME: read like a one-object GsInput (open() streams it);
    stat()'s st_mtime_ns is the object's generation (a rewrite changes it, as a local file's mtime changes), so
    `results` tells this run's output from someone else's. atomic_writer() is atomic_file's counterpart."""

    def __init__(self, uri: str, project: str | None = None) -> None:
        super().__init__(uri, project)
        if not split_gs_uri(uri)[1] or uri.endswith("/") or any(c in uri for c in "*?["):
            raise UsageError(f"--out {uri}: results go to one object. Fix: --out gs://BUCKET/PATH/results.jsonl.")

    def __repr__(self) -> str:
        return f"GsOutput({str(self)!r})"

    def stat(self, *args: Any, **kwargs: Any) -> os.stat_result:
        _name, generation, size, _crc = self.listing()[0]
        return os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, size, 0, 0, 0), {"st_mtime_ns": int(generation or 0)})

    @contextlib.contextmanager
    def atomic_writer(self) -> Iterator[Any]:
        """Yield a binary writer streaming to a temporary object beside the output (resumable upload,
        GS_RESULTS_WRITE_CHUNK in memory at most); on success the temporary object is copied over the output (a
        server-side rewrite: a reader sees the old object or the new one, never part of one) and deleted. Its name is fixed, like
        atomic_file(unique=False): the writer holds the run lock, and a crash's leftover is overwritten next time."""
        bucket_name, name = split_gs_uri(self.uri)
        bucket = self._client().bucket(bucket_name)
        tmp = bucket.blob(f"{name}.batchify-tmp")
        written = False
        try:
            with tmp.open("wb", chunk_size=GS_RESULTS_WRITE_CHUNK, content_type="application/jsonl", ignore_flush=True) as raw:
                w = _GsLines(raw)
                yield w
                w.flush()
            final, token = bucket.blob(name), None
            while True:
                token, _done, _total = final.rewrite(tmp, token=token)
                if token is None:
                    break
            written = True
        except gs_errors() as e:
            from requests.exceptions import RequestException  # the transport's (an OSError too)

            if isinstance(e, OSError) and not isinstance(e, RequestException):
                raise  # the caller's own (its disk, reading the results): as itself, not as the bucket's refusal
            code = gs_error(e, "").code
            why = {404: "the bucket does not exist", 403: "the account may not write there"}.get(code, type(e).__name__)
            raise OutWriteError(f"the results could not be written to {self.uri} ({code or ''} {why}: {e})", code=code) from e
        finally:
            self._listing = None
            with contextlib.suppress(Exception):  # a leftover is overwritten next time; after a failure, not waited on
                tmp.delete() if written else tmp.delete(retry=None, timeout=10)


# -- results sidecars: files in the run folder, or objects in the staging bucket (--backend vertex) ----------------
GS_RUN_READ_CHUNK = 1024 * 1024  # bytes a ranged GET fetches for each sorted run the K-way merge reads
# bytes a results upload (a job's results object, its sorted runs, the merged output) sends at once: a multiple of
# 256 KiB; the upload holds about three copies of it at its peak (measured: 32 MiB cost ~65 MB more RSS at the merge)
GS_RESULTS_WRITE_CHUNK = 8 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024  # result lines VertexClient.download hands the engine at once


class LocalResults:
    """Results sidecars as files, results/NAME.jsonl in the run folder (atomic_file)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.jsonl"

    def put(self, name: str, lines: Iterable[bytes]) -> None:
        with atomic_file(self.path(name), unique=False) as f:
            for line in lines:
                f.write(line)

    def lines(self, name: str, run: bool = False) -> Iterator[bytes]:
        with open(self.path(name), "rb") as f:
            yield from f

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def drop_runs(self, name: str) -> None:
        for p in self.folder.glob(f"{glob_escape(name)}.run-*.jsonl"):
            p.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def vertex_results_prefix(bucket: str, run: str) -> str:
    """gs://BUCKET/[PREFIX/]batchify/RUN/results: where a Vertex run keeps its primary results, beside the
    requests/ and output/ folders VertexClient stages (the same root rule)."""
    name, root = split_gs_uri(bucket.rstrip("/"))
    root = f"{root.strip('/')}/batchify" if root.strip("/") else "batchify"
    return f"gs://{name}/{root}/{run}/results"


class GsResults:
    """Results sidecars as objects under gs://…/RUN/results/ (NAME.jsonl), for a Vertex run: a job's output
    never lands on local disk. put() is one resumable upload that is finalized only when every line is sent
    (an error or a crash before leaves no object, or the old one); lines() streams an object back. Errors
    become RemoteError (the engine counts them as a failed download round). The client follows the Cloud
    Storage client's own rules (STORAGE_EMULATOR_HOST, then ADC), like GsOutput."""

    def __init__(self, prefix: str, project: str | None = None):
        self.bucket_name, self.prefix = split_gs_uri(prefix.rstrip("/"))
        self.project = project
        self._storage: Any = None

    def _client(self) -> Any:
        if self._storage is None:
            self._storage = gs_client(self.project)
        return self._storage

    def _bucket(self) -> Any:
        return self._client().bucket(self.bucket_name)

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{self.prefix}/{name}.jsonl"

    @contextlib.contextmanager
    def _remote(self, what: str) -> Iterator[None]:
        """Every error of a call becomes a RemoteError (the engine counts it as a failed round), an expired or
        missing credential an AuthError: not only the API's and the transport's, but also resumable-media's
        InvalidResponse / DataCorruption of an upload chunk, which derive from Exception alone."""
        try:
            yield
        except BatchifyError:
            raise
        except Exception as e:  # gs_errors(), and a resumable upload's refusals of every other kind
            raise gs_error(e, what) from e

    def put(self, name: str, lines: Iterable[bytes]) -> None:
        with self._remote(f"write {self.uri(name)}"):
            blob = self._bucket().blob(f"{self.prefix}/{name}.jsonl")
            with blob.open("wb", chunk_size=GS_RESULTS_WRITE_CHUNK, content_type="application/jsonl", ignore_flush=True) as raw:
                w = _GsLines(raw)
                for line in lines:
                    w.write(line)
                w.flush()

    def lines(self, name: str, run: bool = False) -> Iterator[bytes]:
        """An object's lines, streamed: GS_READ_CHUNK a GET, GS_RUN_READ_CHUNK for a sorted run (the K-way merge
        holds a reader per run)."""
        with self._remote(f"read {self.uri(name)}"):
            blob = self._bucket().get_blob(f"{self.prefix}/{name}.jsonl")
            if blob is None:
                raise RemoteError(f"read {self.uri(name)}: no such object", code=404)
            raw = _GsConcat([blob], [int(blob.size or 0)])
            raw.chunk = GS_RUN_READ_CHUNK if run else GS_READ_CHUNK
            with io.BufferedReader(raw, buffer_size=GS_RUN_READ_CHUNK) as f:
                yield from f

    def exists(self, name: str) -> bool:
        with self._remote(f"look up {self.uri(name)}"):
            return self._bucket().get_blob(f"{self.prefix}/{name}.jsonl") is not None

    def drop_runs(self, name: str) -> None:
        with self._remote(f"delete the sorted runs of {self.uri(name)}"):
            _delete_prefix(self._client(), self.bucket_name, f"{self.prefix}/{name}.run-")


# ================================================================================================
# 6. Gemini seam: the only section that imports google.genai; SDK objects stop here
# ================================================================================================


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size_bytes: int
    state: str


@dataclass(frozen=True)
class RemoteJob:
    name: str
    display_name: str | None
    state: JobState
    output_file: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    inlined: list[dict[str, Any]] | None = None
    ended_at: float | None = None  # when the service says the job ended (seconds since the epoch), where it says


class Backend(Protocol):
    """What the engine needs from a batch service: GeminiClient (the Developer API through google-genai) is
    the one in use; tests drive the engine's rules with tests/fakes.py:FakeGemini against a fake clock.
    Every call raises RemoteError (or AuthError) after the seam's retry policy, never an SDK exception."""

    async def upload(self, path: Path, display_name: str) -> RemoteFile: ...
    async def create_batch(self, model: str, src: str | list[dict[str, Any]], display_name: str) -> RemoteJob: ...
    async def get_batch(self, name: str) -> RemoteJob: ...
    async def list_batches(self) -> list[RemoteJob]: ...
    async def cancel_batch(self, name: str) -> None: ...
    def download(self, name: str) -> AsyncIterator[bytes]: ...  # result lines, in chunks of whole lines
    async def delete_batch(self, name: str) -> None: ...
    async def delete_file(self, name: str) -> None: ...
    async def generate(self, model: str, request: dict[str, Any], flex: bool = False) -> dict[str, Any]: ...
    async def get_model(self, model: str, replacement: str | None = None) -> ModelInfo: ...  # a 404: UsageError
    async def close(self) -> None: ...


def json_object_answer(what: str, body: bytes | str | None) -> dict[str, Any]:
    """A 200 answer's body as the JSON object it must be, else a transient RemoteError (code 0: tried again, as a
    connection cut mid-answer is): a body cut short behind a proxy, a proxy's or captive portal's HTML page, a list."""
    try:
        answer = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as e:
        raise RemoteError(f"{what}: the answer (HTTP 200) is not valid JSON ({e}); cut short on the way?", code=0) from e
    if not isinstance(answer, dict):
        raise RemoteError(f"{what}: the answer (HTTP 200) is a JSON {type(answer).__name__}, not an object", code=0)
    return answer


CONTINUATION_HOPS = 32  # a generation continued this many times and still not finished: taken as it stands


def first_candidate(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer's first candidate, {} where there is none of the shape a candidate has."""
    cands = answer.get("candidates")
    return cands[0] if isinstance(cands, list) and cands and isinstance(cands[0], dict) else {}


def continuation_token(answer: dict[str, Any]) -> str | None:
    """The token to continue an answer with: its first candidate stopped with finishReason CONTINUATION (the
    per-request output limit reached, generation not complete: google-genai 3.x FinishReason.CONTINUATION) and
    carries a continuationToken. None: the answer is complete (or of a shape that says nothing of it)."""
    cand = first_candidate(answer)
    token = cand.get("continuationToken")
    return token if cand.get("finishReason") == "CONTINUATION" and isinstance(token, str) and token else None


def merge_continuation(hops: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer from the hops of a continued generation, as the SDK's automatic continuation merges them: the first
    candidate's parts in order, the last hop's finishReason (and token), usage counts summed (each hop is billed)."""
    if len(hops) == 1:
        return hops[0]
    parts: list[Any] = []
    usage: dict[str, Any] = {}
    for hop in hops:
        content = first_candidate(hop).get("content")
        got = content.get("parts") if isinstance(content, dict) else None
        parts.extend(got if isinstance(got, list) else [])
        for k, v in (hop.get("usageMetadata") or {}).items():
            if k.endswith("Count") and type(v) is int:
                usage[k] = usage.get(k, 0) + v
    last = hops[-1]
    cand = {**first_candidate(last), "content": {"role": "model", "parts": parts}}
    return {**last, "candidates": [cand], "usageMetadata": usage}


def _retry_delay(details: Any) -> float | None:
    """RetryInfo.retryDelay ("36s") from a Google error body, if any."""
    try:
        for d in (details or {}).get("error", {}).get("details", []) or []:
            if isinstance(d, dict) and "retryDelay" in d:
                return float(str(d["retryDelay"]).rstrip("s"))
    except (AttributeError, ValueError):
        return None
    return None


def file_resource_name(value: Any) -> str | None:
    """A responsesFile as the Files API names it, "files/ID": also from a full URI (".../v1beta/files/ID",
    ":download?alt=media" and all), which the SDK would otherwise cut to "files/batch" and ask for in vain."""
    if not value:
        return None
    text = str(value)
    at = text.rfind("files/")
    if at < 0 or ("://" not in text and at > 0):
        return text
    return "files/" + re.split(r"[:?#/]", text[at + len("files/") :], maxsplit=1)[0]


def operation_to_job(op: dict[str, Any]) -> RemoteJob:
    """A raw Operation (batches.get over REST) -> RemoteJob, with batchStats the SDK drops."""
    meta = op.get("metadata") or {}
    stats_raw = meta.get("batchStats") or {}
    stats = {
        k: int(stats_raw.get(k, "0"))
        for k in ("requestCount", "successfulRequestCount", "failedRequestCount", "pendingRequestCount")
    }
    output = meta.get("output") or op.get("response") or {}
    err = op.get("error")
    inl = (output.get("inlinedResponses") or {}).get("inlinedResponses") if isinstance(output, dict) else None
    return RemoteJob(
        name=op.get("name") or meta.get("name", ""),
        display_name=meta.get("displayName"),
        state=parse_remote_state(meta.get("state", "BATCH_STATE_PENDING")),
        output_file=file_resource_name(output.get("responsesFile")) if isinstance(output, dict) else None,
        stats=stats,
        error=(f"{err.get('message', '')} (code {err.get('code')})" if isinstance(err, dict) else None),
        inlined=inl,
        ended_at=rfc3339_epoch(meta.get("endTime")),
    )


def rfc3339_epoch(value: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 timestamp ("2026-12-02T08:00:00.123456789Z") or a datetime; None for
    anything else (the service may leave it out)."""
    if isinstance(value, datetime):
        return value.timestamp() if value.tzinfo else value.replace(tzinfo=timezone.utc).timestamp()
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", value.strip())
    if m is None:
        return None
    frac = float(m.group(2) or 0.0)  # nanoseconds are more digits than fromisoformat takes in 3.11
    return datetime.fromisoformat(m.group(1) + m.group(3).replace("Z", "+00:00")).timestamp() + frac


@dataclass(frozen=True)
class ModelInfo:
    name: str
    input_token_limit: int | None
    output_token_limit: int | None


# -- one retry policy for every remote call -----------------------------------------------------------
# Where a retry is told (a callable taking one line), or None: the CLI sets its stderr log for the command's run, so
# that a service that stops answering is reported at each try instead of minutes of silence.
RETRY_NOTE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("RETRY_NOTE", default=None)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one remote call is tried. `also`: codes retried for this call only (a
    download answering 403/404 for an output that is not readable yet)."""

    attempts: int = 5
    base: float = 1.0  # seconds before the 2nd try; doubled each time, with jitter
    cap: float = 60.0
    deadline: float = 900.0  # seconds from the first try after which nothing more is tried
    also: frozenset[int] = frozenset()


CALL_POLICY = RetryPolicy()  # get, list, count tokens, models.get, cancel, delete, upload
DOWNLOAD_POLICY = RetryPolicy(attempts=3, base=2.0, cap=30.0, deadline=300.0, also=frozenset({403, 404}))
ONCE = RetryPolicy(attempts=1)  # create (not idempotent: the engine looks the job up instead) and generate (the engine paces it)


def retry_delay(error: RemoteError, attempt: int, policy: RetryPolicy, elapsed: float, jitter: float) -> float | None:
    """Seconds to wait before trying a call again after its `attempt`-th failure, or None: give up.
    The server's RetryInfo delay is honoured as given; otherwise exponential back-off with jitter
    (`jitter` in [0, 1) from the caller). Pure: no clock, no randomness of its own."""
    if isinstance(error, (AuthError, BatchRefusedError)) or attempt >= policy.attempts:
        return None
    if not (error.transient or error.code in policy.also):
        return None
    if error.retry_delay is not None:
        delay = max(0.0, error.retry_delay)
    else:
        delay = min(policy.cap, policy.base * 2 ** (attempt - 1)) * (0.5 + jitter)
    if elapsed + delay > policy.deadline:
        return None
    return delay


class GeminiClient:
    """Async access to the Gemini API through the unmodified google-genai SDK.

    base_url None lets the SDK resolve it (GOOGLE_GEMINI_BASE_URL, else Google). Every call goes
    through _call: SDK objects become our dataclasses, every exception becomes a RemoteError naming
    the call, and retries follow one RetryPolicy (the SDK's own retries are off). 429s on create and
    generate are left to the engine, which knows whether they mean "enqueued tokens full" or "slow down".
    """

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        key_source: str = "the API key",
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        retry_scale: float = 1.0,
    ):
        from google import genai
        from google.genai import types

        self._types = types
        self.key_source = key_source
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()
        self.retry_scale = retry_scale
        once = types.HttpRetryOptions(attempts=1)
        # v1beta: every batch page of Google's documents it (SDK 3.x would otherwise send /v1/).
        opts = types.HttpOptions(base_url=base_url, api_version="v1beta", timeout=int(timeout_s * 1000), retry_options=once)
        self._client = genai.Client(api_key=api_key, vertexai=False, http_options=opts)
        self.aio = self._client.aio

    def _wrap(self, e: BaseException, what: str) -> RemoteError:
        """Any exception of a call -> RemoteError naming the call (AuthError, BatchRefusedError as such)."""
        from google.genai import errors

        if isinstance(e, RemoteError):
            return e
        if isinstance(e, errors.APIError):
            code = int(e.code or 0)
            text = e.message or ""
            msg = f"{what}: {code} {e.status or ''} {text}".strip()
            if code == 401 or (code in (400, 403) and re.search(r"API[ _]key|API_KEY|unregistered callers", text, re.I)):
                return AuthError(
                    f"{what}: the service refused {self.key_source} ({code} {e.status or ''}: {text[:160]}). "
                    "Fix: set a valid API key (GEMINI_API_KEY, or GOOGLE_API_KEY, which wins over it; or in .env); "
                    "nothing more was sent.",
                    code=code,
                    status=e.status or "",
                )
            if what == "create batch" and code in (403, 404) and "File" not in text:
                hint = (
                    " Fix: enable billing for the API key's project (the Batch API needs it) and check the key's "
                    "permissions, or run with --mode realtime."
                    if code == 403
                    else " Fix: this model has no Batch API: choose another --model, or run with --mode realtime."
                )
                return BatchRefusedError(msg + hint, code=code, status=e.status or "")
            details = e.details if isinstance(e.details, dict) else {}
            return RemoteError(msg, code=code, status=e.status or "", retry_delay=_retry_delay(details))
        name = type(e).__name__  # a read timeout (httpx's own class too); a connect, pool or write timeout: the request
        # never reached the service whole (a network error, tried again)
        if (isinstance(e, TimeoutError) or name.endswith(("Timeout", "TimeoutError"))) and not name.startswith(
            ("Connect", "Pool", "Write")
        ):
            err = RemoteError(f"{what}: no answer within the client's timeout ({type(e).__name__}: {e})", code=0)
            err.timed_out = True
            return err
        if isinstance(e, (ConnectionError, OSError)):
            return RemoteError(f"{what}: network error ({type(e).__name__}: {e})", code=0)
        # Anything else the SDK lets escape (KeyError 'file' on an upload answered without its file,
        # a transport error class of its own): named, and treated as transient like a network error.
        return RemoteError(f"{what}: unexpected answer ({type(e).__name__}: {e})", code=0)

    async def _call(self, what: str, make: Callable[[], Awaitable[Any]], policy: RetryPolicy = CALL_POLICY) -> Any:
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await make()
            except Exception as e:  # translated at the boundary
                err = self._wrap(e, what)
                cause: BaseException = e
            delay = retry_delay(err, attempt, policy, self._clock() - start, self._rng.random())
            if delay is None:
                if attempt > 1:
                    err.args = (f"{err} (after {attempt} tries)",)
                raise err from cause
            if (note := RETRY_NOTE.get()) is not None:  # a caller's log (the CLI's stderr): no silent minutes
                note(f"{err}; try {attempt} of {policy.attempts} failed, trying again in {delay * self.retry_scale:.0f} s")
            await self._sleep(delay * self.retry_scale)

    async def get_model(self, model: str, replacement: str | None = None) -> ModelInfo:
        """models.get: does the service serve this model, and with which token limits? A 404: exit 2."""
        try:
            m = await self._call("get model", lambda: self.aio.models.get(model=model))
        except RemoteError as e:
            if e.code != 404:
                raise
            instead = f"use --model {replacement}" if replacement else "choose another model (`batchify models`)"
            raise UsageError(
                f"the service does not serve model {model!r} ({e}); it may have been shut down. Fix: {instead}."
            ) from e
        return ModelInfo(m.name or model, m.input_token_limit, m.output_token_limit)

    async def upload(self, path: Path, display_name: str) -> RemoteFile:
        cfg = self._types.UploadFileConfig(mime_type="jsonl", display_name=display_name)
        f = await self._call("upload", lambda: self.aio.files.upload(file=str(path), config=cfg))
        return RemoteFile(name=f.name or "", size_bytes=int(f.size_bytes or 0), state=str(f.state))

    async def create_batch(self, model: str, src: str | list[dict[str, Any]], display_name: str) -> RemoteJob:
        # Tried once: create is not idempotent, and a retried create after a lost answer makes a second
        # job. The engine looks the job up by display name instead (Engine.create_job).
        cfg = self._types.CreateBatchJobConfig(display_name=display_name)
        j = await self._call("create batch", lambda: self.aio.batches.create(model=model, src=src, config=cfg), ONCE)  # type: ignore[arg-type]
        return RemoteJob(name=j.name or "", display_name=j.display_name, state=parse_remote_state(str(j.state)))

    async def get_batch(self, name: str) -> RemoteJob:
        # A raw GET through the SDK's own client (auth, base URL): the typed batches.get() never fills
        # batchStats or the Operation error for Gemini batches.
        return operation_to_job(await self._call("get batch", lambda: self._json("get batch", "get", name, {})))

    async def list_batches(self) -> list[RemoteJob]:
        async def every_page() -> list[RemoteJob]:
            out = []
            async for j in await self.aio.batches.list(config={"page_size": 100}):
                out.append(RemoteJob(name=j.name or "", display_name=j.display_name, state=listed_state(j.state)))
            return out

        return list(await self._call("list batches", every_page))

    async def cancel_batch(self, name: str) -> None:
        await self._call("cancel batch", lambda: self.aio.batches.cancel(name=name))

    async def delete_batch(self, name: str) -> None:
        await self._call("delete batch", lambda: self.aio.batches.delete(name=name))

    async def delete_file(self, name: str) -> None:
        await self._call("delete file", lambda: self.aio.files.delete(name=name))

    async def download(self, name: str) -> AsyncIterator[bytes]:
        """A finished job's result lines: the Developer API's responses file, fetched whole (one chunk)."""
        data = await self._call("download", lambda: self.aio.files.download(file=name), DOWNLOAD_POLICY)
        yield bytes(data)

    async def count_tokens(self, model: str, texts: str | list[str]) -> int:
        """Tokens of one text, or of several counted together in one call."""
        r = await self._call("count tokens", lambda: self.aio.models.count_tokens(model=model, contents=texts))
        return int(r.total_tokens or 0)

    async def generate(self, model: str, request: dict[str, Any], flex: bool = False) -> dict[str, Any]:
        """One real-time call with the very wire-form request a batch line carries; tried once (the
        real-time path paces and retries it under the same RetryPolicy rule).

        Sent through the SDK's own client (auth, base URL) as a raw POST: the typed generate_content()
        re-validates and deep-copies every request and response through pydantic, which measured ~5 ms
        of CPU per call and capped one process below 200 requests/s (bench/realtime.py).
        """
        path = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
        body = dict(request)
        opts: Any = None
        if flex:  # top-level serviceTier, as the SDK sends it; Flex answers in minutes: a client timeout above its target
            body["serviceTier"] = "flex"
            opts = self._types.HttpOptions(timeout=int(FLEX_TIMEOUT_S * 1000))
        hops: list[dict[str, Any]] = []
        while True:  # an answer stopped at the per-request output limit is continued with its token, as the SDK does
            hop: dict[str, Any] = await self._call(  # a later hop is retried with its token: the earlier ones are paid
                "generate",
                functools.partial(self._json, "generate", "post", f"{path}:generateContent", body, opts),
                CALL_POLICY if hops else ONCE,
            )
            hops.append(hop)
            token = continuation_token(hop)
            if token is None or len(hops) >= CONTINUATION_HOPS:
                return merge_continuation(hops)
            body = {**body, "continuationToken": token}

    async def _json(self, what: str, method: str, path: str, body: dict[str, Any], opts: Any = None) -> dict[str, Any]:
        """A raw request through the SDK's own client (auth, base URL), its answer a JSON object (json_object_answer)."""
        resp = await self.aio._api_client.async_request(method, path, body, opts)
        return json_object_answer(what, resp.body)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.aio.aclose()


# -- Vertex AI batch prediction over Cloud Storage (--backend vertex) -------------------------------
# Vertex reads a job's requests from one JSONL object in Cloud Storage, lines {"request": ...} with no
# place for a key of our own, and writes its answers, in no particular order, as lines {"status",
# "processed_time", "request", "response"} that echo the request whole (docs/VERTEX_NOTES.md A1). So the
# key rides inside the request, as the label VERTEX_KEY_LABEL (what LiteLLM and Bifrost do): label values
# are lowercase [a-z0-9_-], at most 63 characters. The engine's keys are line ordinals ("0", "1234"), which
# are label values as they are; any other key is written "x-" + the hex of its UTF-8 (so at most 30
# bytes), and a key that is label-safe but starts with "x-" is hex-encoded too, so the encoding is
# reversible with no lookup table. Whether Vertex also echoes a top-level "key" is unpublished: not relied on.
VERTEX_KEY_LABEL = "batchify_key"
_LABEL_SAFE = re.compile(r"[a-z0-9_-]{1,63}")
_GRPC_CODES = {
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}


def encode_label_key(key: str) -> str:
    """A batch line's key as a GCP label value (reversible: decode_label_key)."""
    if _LABEL_SAFE.fullmatch(key) and not key.startswith("x-"):
        return key
    encoded = "x-" + key.encode().hex()
    if len(encoded) > 63:
        raise UsageError(f"key {key[:40]!r} is too long to ride in a Vertex label (at most 30 bytes when not [a-z0-9_-]).")
    return encoded


def decode_label_key(value: str) -> str:
    return bytes.fromhex(value[2:]).decode() if value.startswith("x-") else value


def split_gs_uri(uri: str) -> tuple[str, str]:
    """gs://bucket/some/object -> ("bucket", "some/object")."""
    if not uri.startswith("gs://") or not uri[5:].split("/", 1)[0]:
        raise UsageError(f"{uri!r} is not a Cloud Storage URI. Fix: give gs://BUCKET[/PREFIX].")
    bucket, _, name = uri[5:].partition("/")
    return bucket, name


def vertex_request_line(line: bytes, entry: tuple[str, dict[str, Any]] | None = None) -> bytes:
    """A Developer-API batch line {"key": k, "request": {...}} -> a Vertex input line {"request": {...}}
    with k in request.labels[VERTEX_KEY_LABEL] (the request's own labels are kept). `entry`: the line's
    (key, request) when the caller has them (prepare), so that the line is not parsed back."""
    if entry is None:
        obj = orjson.loads(line)
        entry = str(obj["key"]), obj["request"]
    key, req = entry[0], dict(entry[1])
    req["labels"] = {**(req.get("labels") or {}), VERTEX_KEY_LABEL: encode_label_key(key)}
    return orjson.dumps({"request": req}, option=NL)


def vertex_result_line(line: bytes | str) -> bytes | None:
    """A Vertex output line -> the Developer API's result line the engine merges: {"key": k, "response": ...}
    or {"key": k, "error": {"code", "message"}} (the row's `status` text: Google publishes no schema for it,
    so its code is read from a leading gRPC status name when there is one, else 2 UNKNOWN). None for a line
    with no key label, or not JSON at all (a torn line): output order is not the input's, so it cannot be placed;
    its id reads as missing and is tried again on its own, as a Developer-API line would be (ResultsRecorder).
    Raising instead failed the whole download, then the job, and sent every request of it again."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    req = obj.get("request") if isinstance(obj, dict) else None
    label = ((req.get("labels") or {}) if isinstance(req, dict) else {}).get(VERTEX_KEY_LABEL)
    if not isinstance(label, str) or not label:
        return None
    out: dict[str, Any] = {"key": decode_label_key(label)}
    status = obj.get("status")
    if status:
        text = str(status) if not isinstance(status, dict) else str(status.get("message", status))
        m = re.match(r"([A-Z_]+)\b", text)
        out["error"] = {"code": _GRPC_CODES.get(m.group(1) if m else "", 2), "message": text}
    elif isinstance(obj.get("response"), dict):
        out["response"] = obj["response"]  # blocked prompts come as a response without candidates: parse_answer says so
    else:
        out["error"] = {"code": 2, "message": "the Vertex output line has neither a status nor a response"}
    return orjson.dumps(out) + b"\n"


def _loopback_url(url: str | None) -> bool:
    host = urllib.parse.urlsplit(url or "").hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class VertexClient(GeminiClient):
    """The Backend over Vertex AI batch prediction: google-genai in Vertex mode for the jobs, and
    google-cloud-storage for the staging bucket. Request files are streamed to
    <bucket>/batchify/<run>/requests/<display name>.jsonl (keys moved into labels: vertex_request_line), each
    job writes under <bucket>/batchify/<run>/output/<display name>/, and download() turns the job's output
    objects back into the Developer API's result lines, so the engine is the same for both backends.

    Every call goes through GeminiClient._call (one RetryPolicy); Cloud Storage calls, which are synchronous,
    run in worker threads. Credentials: Application Default Credentials, except against a loopback
    base_url (an emulator), which gets a static token and never the user's. storage_endpoint: a Cloud
    Storage emulator's URL (anonymous); else the client's own rules (STORAGE_EMULATOR_HOST, then ADC)."""

    def __init__(
        self,
        project: str,
        location: str,
        bucket: str,
        base_url: str | None = None,
        storage_endpoint: str | None = None,
        credentials: Any = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        retry_scale: float = 1.0,
    ):
        try:
            from google.cloud import storage  # noqa: F401  (made on first use: _storage)
        except ImportError:
            raise UsageError('--backend vertex needs google-cloud-storage. Fix: pip install -e ".[vertex]"') from None
        from google import genai
        from google.genai import types

        if not project or not location:
            raise UsageError("--backend vertex needs --project and --location (e.g. --location us-central1, or global).")
        self._types = types
        self.key_source = "Application Default Credentials"
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()
        self.retry_scale = retry_scale
        self.project, self.location = project, location
        self.bucket_name, root = split_gs_uri(bucket.rstrip("/"))
        self.root = f"{root.strip('/')}/batchify" if root.strip("/") else "batchify"
        if credentials is None and _loopback_url(base_url):
            import google.oauth2.credentials

            credentials = google.oauth2.credentials.Credentials(token="batchify-local")  # type: ignore[no-untyped-call]  # never the user's token
        once = types.HttpRetryOptions(attempts=1)
        opts = types.HttpOptions(base_url=base_url, timeout=int(timeout_s * 1000), retry_options=once)  # v1beta1
        self._client = genai.Client(vertexai=True, project=project, location=location, credentials=credentials, http_options=opts)
        self.aio = self._client.aio
        self._storage_endpoint = storage_endpoint
        self._storage_client: Any = None
        self._storage_lock = threading.Lock()

    @property
    def _storage(self) -> Any:
        """The Cloud Storage client, made on first use (in a worker thread: finding ADC may take a moment, and
        a dry run never needs it); its errors (no credentials) reach _wrap like any call's."""
        with self._storage_lock:
            if self._storage_client is None:
                from google.api_core.client_options import ClientOptions
                from google.cloud import storage

                if self._storage_endpoint:
                    self._storage_client = storage.Client(
                        project=self.project,
                        client_options=ClientOptions(api_endpoint=self._storage_endpoint),
                        use_auth_w_custom_endpoint=False,
                    )
                else:
                    self._storage_client = storage.Client(project=self.project)
            return self._storage_client

    @property
    def _bucket(self) -> Any:
        return self._storage.bucket(self.bucket_name)

    def _wrap(self, e: BaseException, what: str) -> RemoteError:
        """GeminiClient's rules, plus Cloud Storage's and google-auth's exceptions, and Vertex's own hints."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc
        from google.genai import errors

        fix = ADC_FIX
        if isinstance(e, UsageError):  # a key too long for a label: not worth a retry
            return RemoteError(f"{what}: {e}", code=400)
        if isinstance(e, auth_exc.GoogleAuthError):
            return AuthError(f"{what}: no usable {self.key_source} ({type(e).__name__}: {e}). Fix: {fix}.", code=401)
        code = 0
        if isinstance(e, gexc.GoogleAPICallError):
            code, text = int(e.code or 0), str(e.message or e)
        elif isinstance(getattr(getattr(e, "response", None), "status_code", None), int):  # resumable-media's errors
            code, text = int(e.response.status_code), str(e)  # type: ignore[attr-defined]
        elif isinstance(e, errors.APIError):
            code, text = int(e.code or 0), str(e.message or "")
            if what == "create batch" and code in (403, 404):
                return BatchRefusedError(
                    f"{what}: {code} {e.status or ''} {text}. Fix: enable the Vertex AI API and billing in project "
                    f"{self.project!r}, let the caller create batch prediction jobs (roles/aiplatform.user), and check "
                    f"that the model serves batch in {self.location!r}; or run with --backend gemini.",
                    code=code,
                    status=e.status or "",
                )
            if code != 401:
                return self._create_400(super()._wrap(e, what), what)
        else:
            return super()._wrap(e, what)
        if code in (401, 403) and what != "create batch":
            return AuthError(
                f"{what}: {code} {text[:200]}. Fix: {fix}, and give it access to gs://{self.bucket_name}.", code=code
            )
        return self._create_400(RemoteError(f"{what}: {code} {text}".strip(), code=code), what)

    @staticmethod
    def _create_400(err: RemoteError, what: str) -> RemoteError:
        """A create answered 400 is final (over a per-job limit, a bad request: FAILED with the service's words),
        unless it says the staged input object is missing, which a new upload mends. Vertex names its input
        "file" in both ("The input file ... is larger than 1 GB"), so the engine's reading of the words for the
        Developer API would upload again forever: the client says which it is."""
        if what == "create batch" and err.code == 400:
            err.input_gone = bool(re.search(r"does not exist|not found|no such object|cannot be read", str(err), re.I))
        return err

    def _run_dir(self, path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "requests" else path.parent.name

    def _put_requests(self, path: Path, obj: str) -> int:
        """Stream one request file to the bucket, line by line converted (worker thread); bytes written."""
        written = 0
        blob = self._bucket.blob(obj)
        with open(path, "rb") as src, blob.open("wb", chunk_size=8 * 1024 * 1024, content_type="application/jsonl") as dst:
            w = _GsLines(dst)
            for line in src:
                if line.strip():
                    written += w.write(vertex_request_line(line))
            w.flush()
        return written

    async def upload(self, path: Path, display_name: str) -> RemoteFile:
        obj = f"{self.root}/{self._run_dir(path)}/requests/{display_name}.jsonl"
        size = await self._call("upload", lambda: asyncio.to_thread(self._put_requests, path, obj))
        return RemoteFile(name=f"gs://{self.bucket_name}/{obj}", size_bytes=int(size), state="ACTIVE")

    def output_prefix(self, src: str, display_name: str) -> str:
        """Where a job writes: <run folder>/output/<display name> beside <run folder>/requests/, else
        <bucket>/batchify/output/<display name> for an input from elsewhere."""
        head = src.rsplit("/", 1)[0]
        if head.startswith(f"gs://{self.bucket_name}/{self.root}/") and head.endswith("/requests"):
            return f"{head.removesuffix('/requests')}/output/{display_name}"
        return f"gs://{self.bucket_name}/{self.root}/output/{display_name}"

    def _remote_job(self, j: Any) -> RemoteJob:
        cs = j.completion_stats
        stats: dict[str, int] = {}
        if cs is not None:
            ok, failed, left = (int(x or 0) for x in (cs.successful_count, cs.failed_count, cs.incomplete_count))
            stats = {
                k: v
                for k, v in (
                    ("requestCount", ok + failed + left),
                    ("successfulRequestCount", ok),
                    ("failedRequestCount", failed),
                    ("pendingRequestCount", left),
                )
                if v
            }
        out = j.output_info.gcs_output_directory if j.output_info is not None else None
        err = j.error
        return RemoteJob(
            name=j.name or "",
            display_name=j.display_name,
            state=parse_remote_state(str(j.state or "JOB_STATE_PENDING")),
            output_file=out or None,
            stats=stats,
            error=f"{err.message or ''} (code {err.code})" if err is not None and (err.message or err.code) else None,
            ended_at=rfc3339_epoch(j.end_time),
        )

    async def create_batch(self, model: str, src: str | list[dict[str, Any]], display_name: str) -> RemoteJob:
        if not isinstance(src, str):
            raise UsageError("Vertex batch prediction takes its requests from Cloud Storage only (no inline requests).")
        cfg = self._types.CreateBatchJobConfig(display_name=display_name, dest=self.output_prefix(src, display_name))
        m = model.removeprefix("models/")
        j = await self._call("create batch", lambda: self.aio.batches.create(model=m, src=src, config=cfg), ONCE)
        return self._remote_job(j)

    async def get_batch(self, name: str) -> RemoteJob:
        """The job, and where its output is: the directory the service names, else (a job that ended, naming none:
        an older surface, a converter that drops outputInfo, a failed job) the prediction-model-* directory under
        the prefix batchify gave it. A job that ended FAILED, EXPIRED or CANCELLED names an output only when rows
        are exported there: Vertex exports (and bills) the rows it completed before the end (docs/VERTEX_NOTES.md
        A5), which are retrieved like a finished job's; else it names none (nothing to retrieve: sent again)."""
        j = await self._call("get batch", lambda: self.aio.batches.get(name=name))
        rj = self._remote_job(j)
        ended = rj.state in ENDED_UNFINISHED
        if ended or (rj.state == JobState.SUCCEEDED and not rj.output_file):
            prefix = self._job_prefix(j)
            try:
                found = await self._call("list output", lambda: asyncio.to_thread(self._exported_dir, rj.output_file, prefix))
            except AuthError:
                raise
            except RemoteError as e:
                if e.transient:
                    raise  # the poll is tried again
                found = None  # refused (403/404: the bucket or the objects gone): no rows to retrieve
            if found != rj.output_file:
                rj = dataclasses.replace(rj, output_file=found)
        return rj

    def _job_prefix(self, j: Any) -> str | None:
        """The outputUriPrefix a job was created with: its own (dest), else the one output_prefix() gives it."""
        dest = getattr(getattr(j, "dest", None), "gcs_uri", None)
        if dest:
            return str(dest).rstrip("/")
        uris = getattr(getattr(j, "src", None), "gcs_uri", None) or []
        return self.output_prefix(str(uris[0]), j.display_name) if uris and j.display_name else None

    def _exported_dir(self, named: str | None, prefix: str | None) -> str | None:
        """The output directory holding exported rows (a non-empty *.jsonl): `named` (the service's), else the
        last prediction-model-* directory under `prefix`; None when there is none (worker thread)."""
        if named:
            return named if any(int(b.size or 0) > 0 for b in self._output_objects(named)) else None
        if not prefix:
            return None
        bucket, path = split_gs_uri(prefix)
        dirs = {
            b.name.rsplit("/", 1)[0]
            for b in self._storage.list_blobs(bucket, prefix=f"{path}/prediction-")
            if b.name.endswith(".jsonl") and int(b.size or 0) > 0
        }
        return f"gs://{bucket}/{max(dirs)}" if dirs else None

    def _output_objects(self, directory: str) -> list[Any]:
        bucket, prefix = split_gs_uri(directory.rstrip("/"))
        blobs = self._storage.list_blobs(bucket, prefix=prefix + "/")
        return sorted((b for b in blobs if b.name.endswith(".jsonl")), key=lambda b: b.name)

    def _output_blobs(self, directory: str) -> list[Any]:
        blobs = self._output_objects(directory)
        if not blobs:
            from google.api_core import exceptions as gexc

            raise gexc.NotFound(f"no *.jsonl output under {directory} (yet)")  # type: ignore[no-untyped-call]
        return blobs

    @staticmethod
    def _output_chunks(blobs: list[Any]) -> Generator[bytes]:
        """Every *.jsonl object under a job's output directory (Vertex may write more than one), streamed (ranged
        reads of GS_READ_CHUNK under a 1 MiB buffer: a BlobReader iterated as it is reads one byte a call,
        docs/VERTEX_NOTES.md B2), as result lines (vertex_result_line) in chunks of about DOWNLOAD_CHUNK_BYTES:
        never the whole output at once."""
        raw = _GsConcat(blobs, [int(b.size or 0) for b in blobs])
        out = bytearray()
        with io.BufferedReader(raw, buffer_size=GS_RUN_READ_CHUNK) as f:
            for line in f:
                converted = vertex_result_line(line) if line.strip() else None
                if converted is not None:
                    out += converted
                    if len(out) >= DOWNLOAD_CHUNK_BYTES:
                        yield bytes(out)
                        out.clear()
        if out:
            yield bytes(out)

    async def download(self, name: str) -> AsyncIterator[bytes]:
        """A finished job's result lines, streamed: the listing is tried under DOWNLOAD_POLICY (an output not
        there yet answers 404), each chunk once (a failure ends this download round; the engine starts over)."""
        blobs = await self._call("download", lambda: asyncio.to_thread(self._output_blobs, name), DOWNLOAD_POLICY)
        chunks = self._output_chunks(blobs)
        try:
            while (chunk := await self._call("download", lambda: asyncio.to_thread(next, chunks, b""), ONCE)) != b"":
                yield chunk
        finally:
            with contextlib.suppress(ValueError):  # cancelled while a worker thread still reads it
                chunks.close()

    def _delete_objects(self, name: str) -> int:
        """One staged object (…jsonl), every object under a job's output directory (its predictions and anything
        else the job wrote there), or, for a name ending in *, every object whose name starts with the rest; already
        gone is fine. Directories and name prefixes are deleted only inside batchify's staging area: a prefix
        elsewhere is not batchify's to empty."""
        from google.api_core import exceptions as gexc

        bucket, obj = split_gs_uri(name.rstrip("/"))
        starts = obj[:-1] if obj.endswith("*") else obj + "/"
        if obj.endswith(".jsonl"):
            blobs = [self._storage.bucket(bucket).blob(obj)]
        elif bucket == self.bucket_name and obj.startswith(f"{self.root}/"):
            blobs = list(self._storage.list_blobs(bucket, prefix=starts))
        else:
            raise RemoteError(
                f"{name} is outside batchify's staging area gs://{self.bucket_name}/{self.root}/: left as it is", 400
            )
        for b in blobs:
            with contextlib.suppress(gexc.NotFound):
                b.delete()
        return len(blobs)

    async def delete_file(self, name: str) -> None:
        await self._call("delete file", lambda: asyncio.to_thread(self._delete_objects, name))

    async def generate(self, model: str, request: dict[str, Any], flex: bool = False) -> dict[str, Any]:
        """One real-time call on the publisher model (standard tier). Flex through Vertex is not wired yet."""
        if flex:
            raise RemoteError(
                "generate: Flex is not available with --backend vertex yet (use --fallback-tier standard)", code=400
            )
        path = f"publishers/google/models/{model.removeprefix('models/')}:generateContent"
        answer: dict[str, Any] = await self._call("generate", lambda: self._json("generate", "post", path, dict(request)), ONCE)
        return answer

    async def close(self) -> None:
        await super().close()
        if self._storage_client is not None:
            with contextlib.suppress(Exception):
                self._storage_client.close()


# -- where a run's request files live: the run folder, or the staging bucket (--backend vertex) -----------------
# On the Gemini API (and a dry run on Vertex) prepare writes requests/bNNNN.jsonl in the run folder and the
# backend uploads each file. On --backend vertex prepare writes each one straight to the staging bucket, in Vertex
# form, as gs://BUCKET/<prefix>/batchify/<run>/requests/<run id>-bNNNN.jsonl (the run id keeps two runs of one
# name in different state dirs apart): local disk stays flat whatever the input's size, and the object is the
# job's input (nothing to upload; every attempt of a batch reuses it). The run folder's requests.json says which
# (its absence: the run folder), and is written before the first object: the intent a crashed prepare is
# cleaned up from. The engine works on request files only through a RequestFiles and request_entry().
REQUESTS_MARKER = "requests.json"


def save_requests_marker(store: RunStore, bucket: str, prefix: str, project: str = "", location: str = "") -> None:
    """`project` and `location`: the Vertex client's, for `cleanup` of a prepare that never finished (no run.json)."""
    d = {"kind": "requests", "schema_version": SCHEMA_VERSION, "bucket": bucket, "prefix": prefix}
    if project and location:
        d |= {"project": project, "location": location}
    save_json(store.dir / REQUESTS_MARKER, d)


def load_requests_marker(store: RunStore) -> tuple[str, str] | None:
    """(bucket, prefix) from the run folder's requests.json; None without one (the requests are in the folder)."""
    path = store.dir / REQUESTS_MARKER
    if not path.exists():
        return None
    d = load_json(path)
    if d.get("kind") != "requests" or not isinstance(d.get("bucket"), str) or not isinstance(d.get("prefix"), str):
        raise StateError(_sidecar_problem(path, StateError("not a requests sidecar (kind, bucket, prefix)")))
    check_schema_version(d, "requests")
    return d["bucket"], d["prefix"]


def request_entry(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line of either form -> (key, request): the Developer API's {"key", "request"}, or Vertex's
    {"request"} with the key in request.labels[VERTEX_KEY_LABEL] (taken out again; other labels are kept)."""
    obj = orjson.loads(line)
    req: dict[str, Any] = obj["request"]
    if "key" in obj:
        return str(obj["key"]), req
    labels = dict(req.get("labels") or {})
    key = decode_label_key(labels.pop(VERTEX_KEY_LABEL))
    req = {k: v for k, v in req.items() if k != "labels"}
    if labels:
        req["labels"] = labels
    return key, req


class RequestFiles(Protocol):
    """A run's request files, named by their path in the run folder ("requests/b0001.jsonl")."""

    needs_entry: bool  # encode() wants the (key, request) of each line prepare writes (it stores another form)

    def begin(self) -> None: ...  # before prepare writes the first one
    def clear(self) -> None: ...  # remove what an unfinished prepare wrote
    # a Developer-API line {"key", "request"} in the stored form (entry: its key and request, when at hand)
    def encode(self, line: bytes, entry: tuple[str, dict[str, Any]] | None = None) -> bytes: ...
    def open(self, rel: str, atomic: bool = False) -> Any: ...  # a binary writer (stored-form lines); a context manager
    def exists(self, rel: str) -> bool: ...
    def count(self, rel: str) -> int: ...
    def lines(self, rel: str) -> Iterator[bytes]: ...  # the non-blank lines, as stored (request_entry reads them)
    async def remote_file(self, client: Backend, job: Job) -> RemoteFile: ...  # the job's input at the service
    def owns(self, name: str) -> bool: ...  # a remote file name that is one of these
    async def delete_all(self) -> int: ...  # cleanup: the remote ones, once


class LocalRequests:
    """Request files in the run folder, uploaded by the backend (client.upload) when a job needs one."""

    needs_entry = False  # stored as written

    def __init__(self, store: RunStore):
        self.store = store

    def begin(self) -> None:
        private_dir(self.store.dir / "requests")
        (self.store.dir / REQUESTS_MARKER).unlink(missing_ok=True)  # the requests are here, not in a bucket

    def clear(self) -> None:
        (self.store.dir / REQUESTS_MARKER).unlink(missing_ok=True)  # the requests/ folder goes with the prepare's leftovers

    def encode(self, line: bytes, entry: tuple[str, dict[str, Any]] | None = None) -> bytes:
        return line

    def open(self, rel: str, atomic: bool = False) -> Any:
        return atomic_file(self.store.dir / rel) if atomic else open_private(self.store.dir / rel)

    def exists(self, rel: str) -> bool:
        return (self.store.dir / rel).exists()

    def count(self, rel: str) -> int:
        return (self.store.dir / rel).read_bytes().count(b"\n")

    def lines(self, rel: str) -> Iterator[bytes]:
        with open(self.store.dir / rel, "rb") as f:
            for line in f:
                if line.strip():
                    yield line

    async def remote_file(self, client: Backend, job: Job) -> RemoteFile:
        return await client.upload(self.store.request_path(job), job.display_name)

    def owns(self, name: str) -> bool:
        return False

    async def delete_all(self) -> int:
        return 0


class _GsRequestWriter:
    """One request object being written: 1 MiB writes into a resumable upload (GS_WRITE_CHUNK in memory at most).
    close() finalizes it: the object appears whole or not at all. Leaving a `with` on an error abandons it."""

    def __init__(self, raw: Any, wrap: Callable[[BaseException], RemoteError]):
        self.raw, self.buf, self.wrap = raw, _GsLines(raw), wrap

    def write(self, b: bytes) -> int:
        try:
            return self.buf.write(b)
        except Exception as e:
            raise self.wrap(e) from e

    def close(self) -> None:
        if self.raw.closed:
            return
        try:
            self.buf.flush()
            self.raw.close()
        except Exception as e:
            raise self.wrap(e) from e

    def __enter__(self) -> _GsRequestWriter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.raw.terminate()


class GsRequests:
    """A Vertex run's request files as objects gs://<bucket>/<prefix><file name> (prefix: <root>/<run>/requests/
    <run id>-), in Vertex form. Cloud Storage calls here are synchronous (prepare and the engine's readers are);
    their errors come out as RemoteError (VertexClient._wrap)."""

    needs_entry = True  # Vertex form: encode() builds each line from its (key, request)

    def __init__(self, store: RunStore, client: VertexClient, bucket: str, prefix: str):
        self.store, self.client, self.bucket, self.prefix = store, client, bucket, prefix

    @classmethod
    def for_prepare(cls, store: RunStore, client: VertexClient, run_id: str) -> GsRequests:
        return cls(store, client, client.bucket_name, f"{client.root}/{store.name}/requests/{run_id}-")

    def _blob(self, rel: str) -> Any:
        return self.client._storage.bucket(self.bucket).blob(self.prefix + rel.rsplit("/", 1)[-1])

    def uri(self, rel: str) -> str:
        return f"gs://{self.bucket}/{self.prefix}{rel.rsplit('/', 1)[-1]}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except RemoteError:
            raise
        except Exception as e:
            raise self.client._wrap(e, what) from e

    def begin(self) -> None:
        save_requests_marker(self.store, self.bucket, self.prefix, self.client.project, self.client.location)  # before any object

    def clear(self) -> None:
        """Delete the objects an unfinished prepare wrote (those its requests.json names), then requests.json."""
        was = load_requests_marker(self.store)
        if was is not None:
            with self._errors("delete unfinished request objects"):
                _delete_prefix(self.client._storage, *was)
            (self.store.dir / REQUESTS_MARKER).unlink()

    def encode(self, line: bytes, entry: tuple[str, dict[str, Any]] | None = None) -> bytes:
        return vertex_request_line(line, entry)

    def open(self, rel: str, atomic: bool = False) -> Any:
        with self._errors("write requests"):
            raw = self._blob(rel).open("wb", chunk_size=GS_WRITE_CHUNK, content_type="application/jsonl", ignore_flush=True)
        return _GsRequestWriter(raw, lambda e: self.client._wrap(e, f"write {self.uri(rel)}"))

    def exists(self, rel: str) -> bool:
        with self._errors("look up requests"):
            return bool(self._blob(rel).exists())

    def count(self, rel: str) -> int:
        return sum(1 for _ in self.lines(rel))

    def lines(self, rel: str) -> Iterator[bytes]:
        """Streamed: GS_READ_CHUNK a ranged GET (_GsConcat, as every other gs:// read), through a 1 MiB buffer."""
        with self._errors(f"read {self.uri(rel)}"):
            blob = self._blob(rel)
            blob.reload()  # its size, and the generation every GET is pinned to
            with io.BufferedReader(_GsConcat([blob], [int(blob.size or 0)]), 1 << 20) as f:
                for line in f:
                    if line.strip():
                        yield line

    def _size(self, rel: str) -> int:
        blob = self._blob(rel)
        blob.reload()
        return int(blob.size or 0)

    async def remote_file(self, client: Backend, job: Job) -> RemoteFile:
        """The object prepare wrote is the job's input (no upload); it is gone: StagedRequestGone (a 404)."""
        try:
            size = await self.client._call("upload", lambda: asyncio.to_thread(self._size, job.request_file))
        except RemoteError as e:
            if e.code == 404:
                raise StagedRequestGone(str(e), self.uri(job.request_file)) from e
            raise
        return RemoteFile(name=self.uri(job.request_file), size_bytes=int(size), state="ACTIVE")

    def owns(self, name: str) -> bool:
        return name.startswith(f"gs://{self.bucket}/{self.prefix}")

    async def delete_all(self) -> int:
        storage = self.client._storage
        return int(
            await self.client._call(
                "delete requests", lambda: asyncio.to_thread(_delete_prefix, storage, self.bucket, self.prefix)
            )
        )


def _delete_prefix(storage: Any, bucket: str, prefix: str) -> int:
    """Delete every object whose name starts with `prefix` (already gone is fine); how many there were."""
    from google.api_core import exceptions as gexc

    blobs = list(storage.list_blobs(bucket, prefix=prefix))
    for b in blobs:
        with contextlib.suppress(gexc.NotFound):
            b.delete()
    return len(blobs)


def primary_request_files(ranges: list[Any], only: set[int] | None) -> list[str]:
    """The request files prepare wrote (one per batch range), less those with none of the ordinals `only`: a
    file holds the keys of its range alone, and in the bucket each one read is a download."""
    wanted = sorted(only) if only is not None else None
    names = []
    for i, (start, end, *_rest) in enumerate(ranges, 1):
        at = bisect.bisect_left(wanted, start) if wanted is not None else 0
        if wanted is None or (at < len(wanted) and wanted[at] < end):
            names.append(f"requests/b{i:04d}.jsonl")
    return names


def request_sink(store: RunStore, client: Any, run_id: str, dry_run: bool) -> RequestFiles:
    """Where prepare writes a run's request files: the bucket on Vertex (not for a dry run: it touches no bucket)."""
    if isinstance(client, VertexClient) and not dry_run:
        return GsRequests.for_prepare(store, client, run_id)
    return LocalRequests(store)


def run_requests(store: RunStore, client: Backend | None) -> RequestFiles:
    """Where a prepared run's request files are (requests.json, else the run folder)."""
    at = load_requests_marker(store)
    if at is None:
        return LocalRequests(store)
    if not isinstance(client, VertexClient):
        raise UsageError(f"run {store.name!r} keeps its requests in gs://{at[0]}/: this step needs --backend vertex.")
    return GsRequests(store, client, *at)


# -- rate limiting for real-time calls ------------------------------------------------------------
def window_room_at(
    grants: Iterable[tuple[float, float]], total: float, amount: float, cap: float, window: float, now: float
) -> float:
    """When (at the earliest `now`) a grant of `amount` keeps every `window`-second window within `cap`: `grants`
    are the (time, amount) granted less than `window` ago, oldest first, summing to `total`. Now if it fits;
    else once enough of the oldest have left the window (a grant at t leaves it at t + window, as a server
    counting a sliding window drops it). An amount over `cap` on its own: once every grant has left."""
    need = total + amount - cap
    last = now
    for t, a in grants:
        if need <= 1e-9:
            break
        need -= a
        last = t + window
    return max(now, last)


class RateLimiter:
    """A leaky bucket (GCRA): at most `burst + rate*W` units in any window W; at the start, `initial` units at once
    (all of `burst` unless told fewer).

    With `window` and `cap`, it also keeps a ledger of what it granted in the last `window` seconds and never
    lets that pass `cap` (a server counts its limit over a sliding window): then `burst` may be large, so
    that time the caller lost (an event loop held up, a pause) is made up afterwards instead of lost, and
    still no window goes over. Callers queue FIFO; nobody spins. On a 429 `pause()` holds everyone for the
    server's retry delay and `slow_down()` lowers the rate, which `recover()` raises again step by step.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        window: float = 0.0,
        cap: float = math.inf,
        initial: float | None = None,
    ):
        """`initial`: the units that may go at once at the start: `burst` when None, as after a long idle."""
        self.base_rate = rate_per_s
        self.factor = 1.0
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        # theoretical arrival time: `initial` units may go at once (all of `burst`: starts "now")
        self.tat = clock() + max(0.0, burst - (burst if initial is None else initial)) / rate_per_s
        self.last_cut = -math.inf
        self._lock = asyncio.Lock()
        self.window, self.cap = window, cap
        self.ledger: collections.deque[tuple[float, float]] = collections.deque()  # (time, amount) granted
        self.in_ledger = 0.0

    @property
    def rate(self) -> float:
        return self.base_rate * self.factor

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until `amount` may go; returns the time it was granted at (for `give_back`)."""
        async with self._lock:
            while True:
                now = self.clock()
                while self.ledger and self.ledger[0][0] + self.window <= now:  # as window_room_at reckons it
                    self.in_ledger -= self.ledger.popleft()[1]
                tolerance = max(0.0, (self.burst - amount) / self.rate)
                start = max(now, self.tat - tolerance)
                if self.window > 0:
                    start = max(start, window_room_at(self.ledger, self.in_ledger, amount, self.cap, self.window, now))
                if start <= now:
                    break
                await self.sleep(start - now)
            self.tat = max(self.tat, now) + amount / self.rate
            if self.window > 0:
                self.ledger.append((now, amount))
                self.in_ledger += amount
            return now

    def give_back(self, granted: float, amount: float) -> None:
        """A grant the server refused (a 429 is not counted against its limit) goes back: out of the ledger,
        and its time back to the bucket. Only a ledger bucket gives back: the ledger still caps every window."""
        if self.window <= 0:
            return
        with contextlib.suppress(ValueError):
            self.ledger.remove((granted, amount))
            self.in_ledger -= amount
            self.tat -= amount / self.rate

    def pause(self, seconds: float) -> None:
        """Nothing goes for `seconds`, and then no burst: the time saved up to make up for is forfeit (the
        server said its window is full: the ledger's view of it was too hopeful)."""
        self.tat = max(self.tat, self.clock() + seconds + max(0.0, self.burst - 1.0) / self.rate)

    def slow_down(self, by: float = 0.8, once_per: float = 0.0) -> None:
        """Lower the rate (never below a quarter). `once_per`: not again within that many seconds of the
        last cut: one burst of 429s (every request in flight into the same full window) is one signal, and
        cutting once per refusal would collapse the rate to the floor for a single overshoot."""
        now = self.clock()
        if once_per and now - self.last_cut < once_per:
            return
        self.last_cut = now
        self.factor = max(0.25, self.factor * by)

    def recover(self) -> None:
        self.factor = min(1.0, self.factor + 0.005)


class Gate:
    """A semaphore whose capacity can change while it is held (Flex sizes its requests in flight from the
    latency it measures: Little's law). Waiters are served in order; `room` is set whenever a slot is free
    and nobody waits (a caller that tops the pipe up waits on it)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.room = asyncio.Event()
        self.room.set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.used < self.capacity and not self._waiters:
            self.used += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # the slot is handed over by release()/resize(): `used` already counts it
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.release()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        self._update_room()

    def release(self) -> None:
        self.used -= 1
        self._hand_over()

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.used < self.capacity:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)
        self._update_room()

    def _update_room(self) -> None:
        if self.used < self.capacity and not self._waiters:
            self.room.set()
        else:
            self.room.clear()


# ================================================================================================
# 7. Prepare: sample and calibrate, fetch URLs, validate, build request files, plan
# ================================================================================================


def display_name_for(run: str, run_id: str, index: int, attempt: int, part: str = "") -> str:
    return f"{display_name_prefix(run, run_id)}b{index:04d}-a{attempt}{part}"


def display_name_prefix(run: str, run_id: str) -> str:
    """What every display name of one run (of this name and run id) starts with, and no other run's."""
    return f"batchify-{run[:40]}-{run_id}-"


async def calibrate(client: GeminiClient | None, model: str, prompts: list[str]) -> tuple[float, float | None, str | None]:
    """Characters per token, measured with countTokens on the prompts of documents sampled from across
    the input (a file sorted by language or source would mislead a sample of its head), in
    CALIBRATION_CALLS calls, and the margin that measurement's spread warrants (estimate_margin).
    The offline constant, None and why, when the service cannot be asked."""
    if client is None or not prompts:
        return CHARS_PER_TOKEN_OFFLINE, None, ("no records to sample" if client is not None else None)
    groups = [prompts[i::CALIBRATION_CALLS] for i in range(min(CALIBRATION_CALLS, len(prompts)))]
    try:
        counts = await asyncio.gather(*(client.count_tokens(model, g) for g in groups))
    except AuthError:
        raise
    except RemoteError as e:
        return CHARS_PER_TOKEN_OFFLINE, None, f"countTokens could not be reached ({e})"
    samples = [(sum(map(len, g)), c) for g, c in zip(groups, counts, strict=True)]
    return calibrate_chars_per_token(samples), estimate_margin(samples), None


def sample_prompts(path: Path, cfg: JobConfig, id_field: str, text_field: str) -> list[str]:
    """The prompts of up to CALIBRATION_SAMPLES valid records from across the input."""
    fields = template_fields(cfg.prompt_template)
    try:
        return [
            render_prompt(cfg.prompt_template, obj, text_field)
            for obj in calibration_sample(path, CALIBRATION_SAMPLES)
            if check_record(obj, id_field, text_field, fields) is None
        ]
    except (InputError, KeyError, IndexError, ValueError):
        return []


def calibration_sample(path: Path, n: int) -> Iterator[Any]:
    """Up to n records spread evenly over a JSONL file: seek to n offsets, take the next whole line
    (n seeks, not a pass over the file). A JSON array file: its first n items. Bad lines are skipped."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError:
        return
    with f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            for rec in itertools.islice(read_input(path), n):
                if rec.error is None:
                    yield rec.obj
            return
        starts: set[int] = set()
        for k in range(n):
            f.seek(size * k // n)
            if k:
                f.readline()  # the rest of the line the offset fell into
            start = f.tell()
            line = f.readline()
            if start in starts or not line.strip(b"\xef\xbb\xbf \t\r\n"):
                continue
            starts.add(start)
            with contextlib.suppress(orjson.JSONDecodeError):
                yield orjson.loads(line.removeprefix(b"\xef\xbb\xbf"))


def needs_fetch(obj: Any, text_field: str) -> bool:
    """A record with a url and no text: its text is fetched and extracted first."""
    if not isinstance(obj, dict) or not isinstance(obj.get("url"), str) or not obj["url"]:
        return False
    text = obj.get(text_field)
    return not (isinstance(text, str) and text and not text.isspace())


def load_fetch_cache(path: Path) -> dict[str, dict[str, str]]:
    return {r["url"]: r for r in iter_jsonl(path) if "url" in r}


FETCH_MAX_BYTES = 5_000_000


def urls_to_fetch(path: Path, text_field: str, cache: dict[str, dict[str, str]]) -> list[str]:
    """The distinct urls of valid records that have no text and no answer in the fetch cache, in input order."""
    todo: dict[str, None] = {}
    for rec in read_input(path):
        if rec.error is None and needs_fetch(rec.obj, text_field):
            url = rec.obj["url"]
            if url not in cache:
                todo[url] = None
    return list(todo)


async def fetch_urls(
    path: Path,
    store: RunStore,
    text_field: str,
    concurrency: int = 16,
    timeout_s: float = 20.0,
    max_bytes: int = FETCH_MAX_BYTES,
    max_redirects: int = 5,
    allow_private: bool = False,
) -> dict[str, int]:
    """Fetch the pages of records that have a url and no text, and extract their main text (PageFetcher).
    Each outcome (text or error) is appended to the run's fetched.jsonl as it arrives, so a prepare
    that is interrupted and run again fetches only what is missing."""
    cache = load_fetch_cache(store.fetch_cache_path)
    todo = urls_to_fetch(path, text_field, cache)
    if not todo:
        return {"fetched": 0, "cached": len(cache)}
    try:
        import trafilatura
    except ImportError:
        raise UsageError(
            f"{path}: {len(todo)} record(s) have a url and no text, and fetching them needs trafilatura. "
            'Fix: pip install -e ".[urls]" (or give each record its text).'
        ) from None
    private_dir(store.dir)
    counts = {"fetched": 0, "failed": 0, "cached": len(cache)}
    fetcher = PageFetcher(trafilatura.extract, concurrency, max_bytes, max_redirects, allow_private)
    with open_private(store.fetch_cache_path, "ab") as f:
        async with contextlib.aclosing(fetcher.fetch_all(todo, timeout_s)) as pages:  # a write error stops the fetches
            async for r in pages:
                f.write(orjson.dumps(r, option=NL))
                f.flush()
                counts["fetched" if "text" in r else "failed"] += 1
    return counts


class PageFetcher:
    """Fetches pages and extracts their main text: bounded concurrency, a size cap, at most max_redirects
    redirects (followed by hand, each target checked), http/https only. Loopback, private, link-local,
    multicast and reserved targets are refused (after DNS resolution and after each redirect) unless
    allow_private: a URL in a request must not reach the machine's own network."""

    def __init__(
        self, extract: Callable[[str], str | None], concurrency: int, max_bytes: int, max_redirects: int, allow_private: bool
    ):
        self.extract, self.max_bytes, self.max_redirects = extract, max_bytes, max_redirects
        self.allow_private = allow_private
        self.sem = asyncio.Semaphore(concurrency)

    async def fetch_all(self, urls: list[str], timeout_s: float) -> Any:
        """Yield {"url", "text"[, "title"]} or {"url", "error"} for each url, as they complete."""
        import aiohttp

        connector = aiohttp.TCPConnector(resolver=_public_only_resolver(self.allow_private))
        headers = {"User-Agent": f"batchify/{__version__}"}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector) as session:
            tasks = [asyncio.ensure_future(self.one(session, u)) for u in urls]
            try:
                for fut in asyncio.as_completed(tasks):
                    yield await fut
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def refused(self, target: str) -> str | None:
        """Why a URL's literal host may not be fetched (None: it may)."""
        host = (urllib.parse.urlsplit(target).hostname or "").strip("[]")
        if self.allow_private or not host:
            return None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return "refused: a local name" if host == "localhost" or host.endswith((".localhost", ".local")) else None
        if public_address(str(literal)):
            return None
        return f"refused: {host} is a private or local address (see --allow-private-urls)"

    async def one(self, session: Any, url: str) -> dict[str, str]:
        import aiohttp

        if not re.match(r"^https?://", url, re.I):
            return {"url": url, "error": "only http and https URLs are fetched"}
        try:
            async with self.sem:
                html, error = await self.get_html(session, url)
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeError, ValueError, LookupError) as e:
            return {"url": url, "error": f"{type(e).__name__}: {e}"[:200]}  # LookupError: an unknown charset
        if html is None:
            return {"url": url, "error": error or "no page"}
        text = await asyncio.to_thread(self.extract, html)
        if not text or not text.strip():
            return {"url": url, "error": "no main text found on the page"}
        title = page_title(html)
        return {"url": url, "text": text, **({"title": title} if title else {})}

    async def get_html(self, session: Any, url: str) -> tuple[str | None, str | None]:
        """(the page's html, None) or (None, why not), following redirects by hand."""
        target = url
        for _hop in range(self.max_redirects + 1):
            why = self.refused(target)
            if why:
                return None, why
            async with session.get(target, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                    target = urllib.parse.urljoin(target, resp.headers["Location"])
                    if not re.match(r"^https?://", target, re.I):
                        return None, "redirected to a URL that is not http(s)"
                    continue
                if resp.status != 200:
                    return None, f"HTTP {resp.status}"
                body = await resp.content.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    return None, f"page larger than {self.max_bytes:,} bytes"
                return body.decode(resp.charset or "utf-8", "replace"), None
        return None, f"more than {self.max_redirects} redirects"


def _public_only_resolver(allow_private: bool) -> Any:
    """An aiohttp resolver that refuses names leading to an address of the machine's own networks."""
    import aiohttp

    class PublicOnly(aiohttp.abc.AbstractResolver):
        def __init__(self) -> None:
            self.inner = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0, family: int = 0) -> Any:
            infos = await self.inner.resolve(host, port, family)  # type: ignore[arg-type]
            bad = [i["host"] for i in infos if not public_address(i["host"])]
            if bad and not allow_private:
                raise OSError(f"refused: {host} resolves to a private or local address ({bad[0]}); see --allow-private-urls")
            return infos

        async def close(self) -> None:
            await self.inner.close()

    return PublicOnly()


def page_title(html: str) -> str | None:
    """The text of a page's <title>, whitespace collapsed and entities decoded (None when there is none)."""
    import html as html_lib

    m = re.search(r"<title[^>]*>(.*?)</title\s*>", html[:200_000], re.IGNORECASE | re.DOTALL)
    if not m:
        return None
    title = " ".join(html_lib.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split())
    return title[:500] or None


def public_address(ip: str) -> bool:
    """An address on the public internet (not loopback, private, link-local, multicast, reserved, unspecified)."""
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return not (a.is_private or a.is_loopback or a.is_link_local or a.is_multicast or a.is_reserved or a.is_unspecified)


def id_digest(rid: Any) -> int:
    """A 64-bit digest of an id (1 and "1" differ): 8 bytes per record for the duplicate check.

    Python's own hash (SipHash, salted per process) is enough: digests only live within one prepare,
    and a collision merely triggers the exact second pass."""
    return hash((type(rid) is str, rid)) & 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class _Pass:
    batches: list[BatchPlan]
    records: int
    n_problems: int
    problems: list[str]
    sha256: str  # the input's; "" from a validation pass (write=False)
    duplicate_digests: set[int]
    unfetched: int
    long_docs: int = 0  # documents above the model's long-context threshold (billed at its long prices)
    long_tokens: int = 0


def _prepare_pass(
    store: RunStore,
    path: Path,
    cfg: JobConfig,
    opts: RunOptions,
    cpt: float,
    eff: int,
    cap: int,
    suspects: set[int],
    hook: Callable[[Hook], None] | None,
    gc: dict[str, Any],
    context: int = CONTEXT_WINDOW,
    long_at: int | None = None,
    write: bool = True,
    sink: RequestFiles | None = None,
) -> _Pass:
    """One streaming pass: validate each record (RecordChecker), write request files and ids (PassWriter).
    Memory stays flat: ids are kept as 8-byte digests in an array; only ids whose digest repeats
    (`suspects`, known after a first pass) are compared exactly, in a second pass that runs only when
    there are any. `write=False`, no `sink`: validate only (records, ids, the prompt template), no request file."""
    _clear_unfinished_prepare(store, sink)
    # The input's hash, beside the pass on the other core (hashlib and reads release the GIL); a validation pass: none
    hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchify-hash")
    sha = hashing.submit(file_sha256 if write else lambda _: "", path)
    hashing.shutdown(wait=False)
    checker = RecordChecker(store, cfg, opts, cpt, eff, context, suspects)
    check = checker.check
    digests = [array.array("Q") for _ in range(64)]  # 64 buckets by the digest's low bits
    problems: list[str] = []
    n_problems = n = 0
    long_threshold = long_at or 1 << 62
    long_docs = long_tokens = 0
    cutter = BatchCutter(opts.batch_size, cap, opts.max_file_bytes)
    request_lines = RequestLines(cfg, gc, entry=sink is not None and sink.needs_entry)
    with PassWriter(store, hook, sink) as out:
        for rec in read_input(path):
            err, fetch_error, prompt, t, rid, digest = check(rec)
            if err is not None:
                n_problems += 1
                if opts.skip_invalid:
                    out.reject(rec, err)
                elif len(problems) < 20:
                    problems.append(f"{path}:{rec.number}: {err}" if rec.kind == "line" else f"{path}, {rec.where}: {err}")
                continue
            digests[digest & 63].append(digest)
            if not write:
                n += 1
                continue
            if fetch_error is not None:  # the id keeps its place and gets an error line; nothing is sent
                out.fetch_failed(n, rid, fetch_error)
                n += 1
                continue
            line, entry = request_lines.make(n, prompt)
            out.request(line, rid, cutter.add(n, t, len(line)), len(cutter.batches), entry)
            if t > long_threshold:
                long_docs += 1
                long_tokens += t
            n += 1
        batches = cutter.finish(n)
    dupes = set() if suspects else _repeated_digests(digests)
    return _Pass(batches, n, n_problems, problems, sha.result(), dupes, checker.unfetched, long_docs, long_tokens)


def _clear_unfinished_prepare(store: RunStore, sink: RequestFiles | None = None) -> None:
    """Remove what a prepare that never finished wrote (nothing of it was uploaded; request objects it streamed
    to the bucket are deleted by the sink, from the requests.json it wrote before the first one)."""
    import shutil

    if sink is not None:
        sink.clear()
    for leftover in ("requests", "jobs", "results"):
        shutil.rmtree(store.dir / leftover, ignore_errors=True)
    for leftover_file in (store.ids_path, store.rejected_path, store.fetch_errors_path, store.realtime_path):
        leftover_file.unlink(missing_ok=True)


def _repeated_digests(digests: list[Any]) -> set[int]:
    """Digests seen more than once, one bucket's set at a time (~1/64 of the ids in memory at once)."""
    dupes: set[int] = set()
    for bucket in digests:
        seen: set[int] = set()
        for d in bucket:
            if d in seen:
                dupes.add(d)
            seen.add(d)
    return dupes


class RecordChecker:
    """Checks one input record for a prepare pass: fills a fetched page's text (or notes the fetch error),
    the record's fields and id (exact duplicate check for `suspects` digests), the prompt template, and its
    token estimate against the context window and the enqueued limit. The hot loop calls `check` per record."""

    def __init__(self, store: RunStore, cfg: JobConfig, opts: RunOptions, cpt: float, eff: int, context: int, suspects: set[int]):
        self.fetched = load_fetch_cache(store.fetch_cache_path)
        self.fields = template_fields(cfg.prompt_template)
        self.template, self.id_field, self.text_field = cfg.prompt_template, opts.id_field, opts.text_field
        self.si_chars = len(cfg.system_instruction or "")
        self.cpt, self.eff, self.context, self.suspects = cpt, eff, context, suspects
        self.first_seen: dict[bytes, str] = {}  # exact ids, for suspects only
        self.unfetched = 0  # pages to fetch after this pass (which is then made again), or left for `run`

    def _fill_fetched(self, obj: dict[str, Any]) -> str | None:
        """Put a fetched page's text (and <title>) in the record; the fetch error, if it failed."""
        got = self.fetched.get(obj["url"])
        if got is None:
            self.unfetched += 1
            got = {"text": "(to fetch)"}
        if "text" in got:
            obj[self.text_field] = got["text"]
            if got.get("title") and not obj.get("title"):  # the page's <title> fills {title}
                obj["title"] = got["title"]
            return None
        obj[self.text_field] = "(not fetched)"  # checked as usual; no request is made for it
        return f"fetching {obj['url']} failed: {got['error']}"

    def check(self, rec: InputRecord) -> tuple[str | None, str | None, str, int, Any, int]:
        """(error, fetch error, prompt, estimated tokens, id, id digest) for one record."""
        fetch_error = None
        err = rec.error or check_record(rec.obj, self.id_field, self.text_field, self.fields)
        if err is not None and rec.error is None and needs_fetch(rec.obj, self.text_field):  # a usable text needs none
            fetch_error = self._fill_fetched(rec.obj)
            err = check_record(rec.obj, self.id_field, self.text_field, self.fields)
        if err is not None:
            return err, fetch_error, "", 0, None, 0
        rid = rec.obj[self.id_field]
        digest = id_digest(rid)
        if digest in self.suspects:
            key = orjson.dumps(rid)
            if key in self.first_seen:
                err = f"duplicate id {key.decode()[:60]} (first at {self.first_seen[key]}). Fix: make ids unique"
                return err, fetch_error, "", 0, rid, digest
            self.first_seen[key] = rec.where
        try:
            prompt = render_prompt(self.template, rec.obj, self.text_field)
        except (KeyError, IndexError, ValueError) as e:
            err = f"the prompt template cannot be filled ({e}). Fix: add the field or change the template"
            return err, fetch_error, "", 0, rid, digest
        t = math.ceil((len(prompt) + self.si_chars) / self.cpt) or 1  # estimate_tokens(), inlined: hot loop
        if t > self.context:
            err = (
                f"document of about {t:,} tokens is longer than the model's context window "
                f"(input limit {self.context:,} tokens). Fix: split or truncate it"
            )
        elif t > self.eff:
            err = (
                f"document of about {t:,} tokens exceeds the enqueued-token limit ({self.eff:,} after margin) "
                "by itself. Fix: raise --enqueued-limit/--tier or shorten it"
            )
        return err, fetch_error, prompt, t, rid, digest


class PassWriter:
    """The files a prepare pass writes: ids.jsonl (one line per kept record), the request files (a new one
    at each batch cut, through `sink`; the hook runs as each is closed), rejected.jsonl and fetch errors (opened
    on first use). `sink` None: a pass that writes no request file (validation only)."""

    def __init__(self, store: RunStore, hook: Callable[[Hook], None] | None, sink: RequestFiles | None = None):
        self.store, self.hook, self.sink = store, hook, sink
        self.stack = contextlib.ExitStack()
        self.rej_f: Any = None
        self.fail_f: Any = None
        self.cur_f: Any = None

    def __enter__(self) -> PassWriter:
        if self.sink is not None:
            self.sink.begin()
        self.ids_f = self.stack.enter_context(open_private(self.store.ids_path))
        self.stack.callback(self.close_file)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()

    def close_file(self) -> None:
        if self.cur_f is not None:
            self.cur_f.close()
            self.cur_f = None
            if self.hook is not None:
                self.hook(Hook.PREPARE)

    def request(
        self, line: bytes, rid: Any, new_batch: bool, batch_number: int, entry: tuple[str, dict[str, Any]] | None
    ) -> None:
        """One request line (entry: its key and request, as the line encodes them, when the sink needs them) and its id."""
        sink = self.sink
        assert sink is not None, "a validation pass writes no request"
        if new_batch:  # this request starts a new batch: a new request file
            self.close_file()
            self.cur_f = sink.open(f"requests/b{batch_number + 1:04d}.jsonl")
        self.cur_f.write(sink.encode(line, entry))
        self.ids_f.write(orjson.dumps(rid, option=NL))

    def reject(self, rec: InputRecord, err: str) -> None:
        if self.rej_f is None:
            self.rej_f = self.stack.enter_context(open_private(self.store.rejected_path))
        raw = rec.obj if rec.error is None else rec.raw.decode("utf-8", "replace")
        self.rej_f.write(orjson.dumps({"where": rec.where, "reason": err, "record": raw}, option=NL))

    def fetch_failed(self, n: int, rid: Any, error: str) -> None:
        if self.fail_f is None:
            self.fail_f = self.stack.enter_context(open_private(self.store.fetch_errors_path))
        self.fail_f.write(orjson.dumps(result_record(n, None, error, "fetch"), option=NL))
        self.ids_f.write(orjson.dumps(rid, option=NL))


def _refuse_invalid(store: RunStore, path: Path, p: _Pass) -> None:
    """Bad records and no --skip-invalid: remove the half-made run and name every problem (file:line, fix)."""
    import shutil

    shutil.rmtree(store.dir, ignore_errors=True)
    more = f" (and {p.n_problems - len(p.problems)} more)" if p.n_problems > len(p.problems) else ""
    raise InvalidRecords(
        f"{path}: {p.n_problems} invalid record(s){more}; nothing was sent or uploaded. "
        "Fix them, or pass --skip-invalid to set them aside.",
        p.problems,
        f"{path}: {p.n_problems} invalid record(s){more}. Fix each line named below.",
    )


async def prepare_run(
    store: RunStore,
    input_path: str | Path,
    cfg: JobConfig,
    opts: RunOptions,
    client: GeminiClient | None = None,
    endpoint: str | None = None,
    hook: Callable[[Hook], None] | None = None,
    catalog: Catalog | None = None,
    today: str | None = None,
    dry_run: bool = False,
) -> Run:
    """Validate the input, write the request files, ids and job sidecars, and plan the waves.

    Streams record by record in flat memory; nothing remote is touched except models.get and a few
    countTokens calls for calibration (after every record is validated). On bad input (and no skip_invalid)
    the run folder is removed and InputError names every problem (file:line and the fix). With a VertexClient the
    request files are written to the staging bucket (request_sink), unless `dry_run`.
    """
    path = input_location(input_path, opts)
    out = _check_places(path, opts, store, dry_run)
    opts = dataclasses.replace(opts, poll_interval=default_poll_interval(opts.poll_interval, endpoint))
    private_dir(store.dir)
    os.chmod(store.dir, 0o700)
    today = today or utcnow()[:10]
    catalog = catalog or builtin_catalog()
    if cfg.models:
        catalog = catalog.merged(cfg.models, "the job config")
    spec, gc, limit = _model_and_limit(cfg, opts, catalog, today)
    context = await _context_window(client, cfg, spec, gc)
    if client is not None and opts.calibrate and not opts.skip_invalid:
        _validate_only(store, path, cfg, opts, gc)  # calibration sends documents: nothing before validation
    z = await _sizing(client, path, cfg, opts, limit)
    run_id = secrets.token_hex(3)
    sink = request_sink(store, client, run_id, dry_run)
    p = await _passes(store, path, cfg, opts, (z.cpt, z.eff, z.cap, context), spec, gc, hook, sink)
    limits = {"limit": limit, "eff": z.eff, "cap": z.cap, "context": context, "margin": z.margin}
    plan = _full_plan(cfg, opts, spec, catalog, p, gc, limits, today, z.offline_why)
    if opts.mode not in ("realtime", "flex"):
        _save_first_jobs(store, run_id, p.batches, plan["wave_of_batch"])
    run = Run(
        name=store.name,
        run_id=run_id,
        input_path=str(path.resolve()),
        input_sha256=p.sha256,
        input_format="json" if str(path).endswith(".json") else "jsonl",
        config=cfg.to_dict(),
        options=opts.to_dict(),
        endpoint=endpoint,
        records=p.records,
        rejected=p.n_problems,
        chars_per_token=z.cpt,
        calibrated=z.warranted is not None,
        plan=plan,
        out=out_uri(out),
        created_at=utcnow(),
    )
    save_input_objects(store, path)  # before run.json: a prepared run's gs:// input is the objects listed here
    store.save_run(run)  # the run exists from here on: its presence marks a finished prepare
    return run


def _check_places(path: Path, opts: RunOptions, store: RunStore, dry_run: bool) -> str:
    """Where a run reads and writes, checked before anything is opened or sent: the input a regular file (a FIFO with
    no writer would block the first read), a staging area not under a gs:// input, an --out the merge can write (a
    paid run must be able to merge). The --out to use."""
    check_input_file(path)
    out = opts.out or default_out(path, store.name)
    check_gs_staging(path, opts, store.name)
    check_out(out, path, store, opts.project, probe=not dry_run)
    return out


async def _context_window(client: GeminiClient | None, cfg: JobConfig, spec: ModelSpec, gc: dict[str, Any]) -> int:
    """The model's input token limit. With a client, the service confirms the model (a 404: retired or
    unknown there) and its limits, and maxOutputTokens in `gc` is lowered to the model's if above it."""
    context = spec.input_token_limit or CONTEXT_WINDOW
    if client is not None:
        info = await client.get_model(cfg.model, replacement=spec.replacement)
        context = info.input_token_limit or context
        if info.output_token_limit and gc.get("maxOutputTokens", 0) > info.output_token_limit:
            gc["maxOutputTokens"] = info.output_token_limit
    return context


@dataclass(frozen=True)
class _Sizing:
    cpt: float  # characters per token
    warranted: float | None  # how far calibration trusts cpt (None: offline estimate)
    offline_why: str | None  # why calibration was offline
    margin: float  # share of the enqueued limit kept free
    eff: int  # the limit planned to
    cap: int  # tokens a batch may hold


async def _sizing(client: GeminiClient | None, path: Path, cfg: JobConfig, opts: RunOptions, limit: int) -> _Sizing:
    """Calibrate characters per token on a sample (countTokens, or the offline figure), then the margin,
    the limit to plan to and the batch token cap that follow from it."""
    sample = sample_prompts(path, cfg, opts.id_field, opts.text_field)
    cpt, warranted, offline_why = (
        (await calibrate(client, cfg.model, sample)) if opts.calibrate else (CHARS_PER_TOKEN_OFFLINE, None, None)
    )
    margin = margin_for(opts.margin, warranted)
    eff = effective_limit(limit, margin)
    si_chars = len(cfg.system_instruction or "")
    per_doc = sum(len(p) + si_chars for p in sample) / len(sample) / cpt if sample else 0.0
    cap = batch_token_cap(eff, opts.batch_size, per_doc, opts.max_active_jobs)
    return _Sizing(cpt, warranted, offline_why, margin, eff, cap)


def _full_plan(
    cfg: JobConfig,
    opts: RunOptions,
    spec: ModelSpec,
    catalog: Catalog,
    p: _Pass,
    gc: dict[str, Any],
    limits: dict[str, Any],
    today: str,
    offline_why: str | None,
) -> Plan:
    """The run's plan as recorded in run.json: waves, estimates (estimate_plan), the figures it was made with
    (model spec, catalog date, generation config, limits and their sources), warnings, and each mode's cost."""
    limit, eff, cap, context, margin = (limits[k] for k in ("limit", "eff", "cap", "context", "margin"))
    waves = plan_waves([b.tokens for b in p.batches], eff, opts.waves)
    plan = estimate_plan(
        cfg, spec, p.batches, waves, limit, eff, p.records, 1.0 if opts.mode == "realtime" else 0.0, (p.long_docs, p.long_tokens)
    )
    if opts.mode == "flex":  # every request through Flex: the flex price
        usage = expected_usage(cfg, spec, plan["input_tokens"], p.records, (p.long_docs, p.long_tokens))
        plan["estimated_cost_usd"] = round(cost_usd(spec, usage, "flex"), 6)
    plan["batch_ranges"] = [[b.start, b.end, b.tokens, b.bytes] for b in p.batches]
    plan["model_spec"] = {**spec.to_dict(), "price_changes": price_timeline(catalog, cfg.model, today, opts)}
    plan["catalog_as_of"] = catalog.as_of
    plan["generation_config"] = {k: v for k, v in gc.items() if k not in ("responseJsonSchema", "responseMimeType")}
    plan["generation_config_json"] = orjson.dumps(gc).decode()  # as sent, in its order (run.json sorts dict keys)
    plan["context_limit"] = context
    plan["enqueued_limit_source"] = (
        "--enqueued-limit"
        if opts.enqueued_limit
        else "not used (--mode realtime)"
        if opts.mode in ("realtime", "flex")
        else catalog.source(spec, "enqueued_tokens")
    )
    plan["realtime_limits"] = realtime_limits(spec, opts.tier, opts.rpm, opts.tpm)
    plan["margin"] = margin
    plan["batch_token_cap"] = cap
    plan["warnings"] = _plan_warnings(spec, today, opts, offline_why, margin, len(p.batches), len(waves), eff)
    plan["warnings"] += vertex_warnings(spec, opts)
    plan["lanes"] = lanes_for(opts.mode, bool(spec.flex), len(waves))
    plan["modes"] = mode_estimates(spec, cfg, plan, p.records, plan["realtime_limits"])
    return plan


def _model_and_limit(cfg: JobConfig, opts: RunOptions, catalog: Catalog, today: str) -> tuple[ModelSpec, dict[str, Any], int]:
    """The model's figures and rules, the generation config it accepts, and the enqueued-token limit to plan
    under: exit 2 (before anything is sent) for an unknown or retired model, a thinking setting it refuses,
    or a Flex mode on a model without Flex."""
    check_backend_mode(opts)
    spec = backend_spec(resolve_model(catalog, cfg.model, today), opts)
    gc = generation_config(cfg, spec)
    if opts.mode in ("flex", "hybrid") and not spec.flex:
        having = ", ".join(
            m for m in catalog.models if catalog.models[m].get("flex") and catalog.models[m].get("status") != "retired"
        )
        raise UsageError(
            f"model {spec.name!r} has no Flex tier (model catalog). Fix: --mode batch or standard, or a model with Flex: {having}."
        )
    if opts.mode in ("realtime", "flex") or opts.backend == "vertex":  # Vertex: no enqueued-token limit (backend_spec)
        limit = opts.enqueued_limit or spec.enqueued_tokens.get(opts.tier) or VERTEX_NO_TOKEN_LIMIT  # nothing to fit under
    else:
        limit = enqueued_limit_for(spec, opts.tier, opts.enqueued_limit, catalog.source(spec, "enqueued_tokens"))
    return spec, gc, limit


def _validate_only(store: RunStore, path: Path, cfg: JobConfig, opts: RunOptions, gc: dict[str, Any]) -> None:
    """Every record checked (a pass that writes nothing), so that a file refused has sent nothing at all;
    sizes against the limits are checked in the real pass, with the calibrated token estimate."""
    unbounded = 1 << 62
    v = _prepare_pass(
        store, path, cfg, opts, CHARS_PER_TOKEN_OFFLINE, unbounded, unbounded, set(), None, gc, unbounded, write=False
    )
    if v.duplicate_digests and not v.n_problems:
        v = _prepare_pass(
            store,
            path,
            cfg,
            opts,
            CHARS_PER_TOKEN_OFFLINE,
            unbounded,
            unbounded,
            v.duplicate_digests,
            None,
            gc,
            unbounded,
            write=False,
        )
    if v.n_problems:
        _refuse_invalid(store, path, v)


async def _passes(
    store: RunStore,
    path: Path,
    cfg: JobConfig,
    opts: RunOptions,
    sizes: tuple[float, int, int, int],
    spec: ModelSpec,
    gc: dict[str, Any],
    hook: Callable[[Hook], None] | None,
    sink: RequestFiles,
) -> _Pass:
    """The streaming pass that writes the request files (through `sink`), once more after fetching the pages of
    records that have a url and no text, or to compare ids whose digests collided; refuses bad records or no records."""
    cpt, eff, cap, context = sizes
    long_at = spec.long_context_threshold
    opts = backend_job_caps(opts)  # Vertex's per-job limits bind the cutter too

    def once(suspects: set[int]) -> _Pass:
        return _prepare_pass(store, path, cfg, opts, cpt, eff, cap, suspects, hook, gc, context, long_at, sink=sink)

    p = once(set())
    if p.unfetched and opts.fetch:
        await fetch_urls(path, store, opts.text_field, allow_private=opts.allow_private_urls)
        p = once(p.duplicate_digests)
        if p.unfetched:  # every URL gets an entry (text or error); a gap means the fetch was cut short
            raise BatchifyError(f"{path}: {p.unfetched} page(s) were not fetched; nothing was uploaded. Run again.")
    elif p.duplicate_digests:  # rare: once more, comparing just those ids exactly
        p = once(p.duplicate_digests)
    if (p.n_problems and not opts.skip_invalid) or p.records == 0:
        sink.clear()  # the run folder goes: so do the request objects it names
    if p.n_problems and not opts.skip_invalid:
        _refuse_invalid(store, path, p)
    if p.records == 0:
        import shutil

        shutil.rmtree(store.dir, ignore_errors=True)
        raise InputError(
            f"{path}: no valid records. Fix: give one JSON object per line with '{opts.id_field}' and '{opts.text_field}'."
        )
    return p


def _plan_warnings(
    spec: ModelSpec, today: str, opts: RunOptions, offline_why: str | None, margin: float, batches: int, waves: int, eff: int
) -> list[str]:
    """What the plan must say out loud: the model's lifecycle, a price change ahead, an offline token guess
    (and why), a --waves N that cannot be honoured."""
    found = (
        lifecycle_warning(spec, today),
        spec.price_note and f"price change ahead: {spec.price_note}",
        offline_why
        and f"{offline_why}: token counts are the offline guess ({CHARS_PER_TOKEN_OFFLINE} characters a token) with a "
        f"{margin:.0%} margin kept free of the enqueued limit",
        isinstance(opts.waves, int)
        and opts.waves != waves
        and f"--waves {opts.waves} cannot be honoured: {batches} batch(es) under a {eff:,}-token limit make {waves} wave(s)",
    )
    return [w for w in found if w]


def _save_first_jobs(store: RunStore, run_id: str, batches: list[BatchPlan], wave_of: dict[str, int]) -> None:
    """One job sidecar per batch that holds requests (a range of failed fetches only has none), in state CREATED.
    Not fsynced (200 fsyncs were 0.34 s of a 4.4 s prepare, with 8 threads): like the request files, they are made
    again from run.json (fsynced after them) if a power cut loses them, by Engine.repair (a sidecar gone or empty:
    rebuilt from the plan, after the service is asked for the run's jobs by display name). Every later write of a
    job, the intent before each create first, is fsynced."""
    jobs = [
        Job(
            name=f"b{i:04d}",
            index=i,
            display_name=display_name_for(store.name, run_id, i, 1),
            request_file=f"requests/b{i:04d}.jsonl",
            request_count=b.count,
            tokens=b.tokens,
            bytes=b.bytes,
            wave=wave_of[str(i - 1)],
            start=b.start,
            end=b.end,
            timestamps={"CREATED": utcnow()},
        )
        for i, b in enumerate(batches, 1)
        if b.bytes
    ]
    for job in jobs:
        store.save_job(job, durable=False)


def damaged_prepared_files(store: RunStore, run: Run, requests: bool = True) -> list[Path]:
    """The files prepare wrote that no longer match what it recorded (a crash mid-write, a truncation, a file
    gone): ids.jsonl (one whole line per record) and, with `requests` and when they are in the run folder, the
    request files (each exactly its batch's bytes, from the plan). Sizes, and one streamed read of ids.jsonl."""
    bad = []
    if _newlines(store.ids_path) != (run.records, True):
        bad.append(store.ids_path)
    if requests and load_requests_marker(store) is None:  # in the bucket, a request object is written whole or not at all
        for i, (_s, _e, _t, nbytes) in enumerate(run.plan.get("batch_ranges") or [], 1):
            path = store.dir / f"requests/b{i:04d}.jsonl"
            if nbytes and (not path.exists() or path.stat().st_size != nbytes):
                bad.append(path)
    return bad


def rebuild_prepared_files(store: RunStore, run: Run, spec: ModelSpec, damaged: list[Path], what: str | None = None) -> None:
    """Write the `damaged` files prepare wrote (damaged_prepared_files) again from the run's input, when it is
    still there and unchanged (its hash), by the same pass into a scratch folder; kept only when that pass cuts
    exactly the recorded batches. Else StateError naming the files (or `what` was wrong) and the fix: nothing
    damaged is ever sent."""
    import shutil

    what = what or f"{', '.join(str(p) for p in damaged)}: damaged (not what prepare wrote)"
    opts = backend_job_caps(run.run_options)
    path = recorded_input(store, input_location(run.input_path, opts))
    if not path.exists() or file_sha256(path) != run.input_sha256:
        raise StateError(
            f"{what} and the input {path} is gone or changed, so it cannot be rebuilt. "
            f"Fix: restore {path} as it was and resume (batchify rebuilds the file from it), or move the run folder "
            f"{store.dir} away and start a new run; every other run is untouched."
        )
    scratch = RunStore(store.dir, "rebuild")
    shutil.rmtree(scratch.dir, ignore_errors=True)
    try:
        private_dir(scratch.dir)
        if store.fetch_cache_path.exists():  # the pages fetched for the run: the requests hold their text
            shutil.copyfile(store.fetch_cache_path, scratch.fetch_cache_path)
        sink = _RebuiltRequests(scratch, {str(bad.relative_to(store.dir)) for bad in damaged})
        p = _rebuild_pass(scratch, path, run, spec, opts, _written_generation_config(store, run), sink)
        if p.records != run.records or [[b.start, b.end, b.tokens, b.bytes] for b in p.batches] != run.plan.get("batch_ranges"):
            raise StateError(
                f"{what}, and the input no longer gives the same requests (another "
                f"batchify version or model catalog?). Fix: move the run folder {store.dir} away and start a new run."
            )
        for bad in damaged:
            private_dir(bad.parent)  # requests/ itself may be gone
            os.replace(scratch.dir / bad.relative_to(store.dir), bad)
    finally:
        shutil.rmtree(scratch.dir, ignore_errors=True)


def _written_generation_config(store: RunStore, run: Run) -> dict[str, Any]:
    """The generationConfig prepare wrote (every request carries the same one), in its order: as the plan kept it
    (generation_config_json), else as the first whole request line in the run folder has it (run.json sorts the
    keys of the config's schema, which Gemini reads in order). StateError when neither is there: a rebuild from
    the job config could differ from what was sent."""
    if isinstance(kept := run.plan.get("generation_config_json"), str):
        return dict(orjson.loads(kept))
    for i in range(1, len(run.plan.get("batch_ranges") or []) + 1):
        with contextlib.suppress(OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            with open(store.dir / f"requests/b{i:04d}.jsonl", "rb") as f:
                line = f.readline()
            if line.endswith(b"\n"):
                return dict(request_entry(line)[1].get("generationConfig") or {})
    raise StateError(
        f"{store.dir / 'requests'}: no whole request is left to read the generation config from, and this run was "
        f"prepared before batchify kept it in its plan. Fix: move the run folder {store.dir} away and start a new run."
    )


class _RebuiltRequests(LocalRequests):
    """A rebuild's request files: only the damaged ones (`keep`, paths in the run folder) are written; prepare's pass
    still makes the others, for their sizes and the ids, into /dev/null (on Vertex the requests are in the bucket,
    and a big run's would fill the local disk)."""

    def __init__(self, store: RunStore, keep: set[str]):
        super().__init__(store)
        self.keep = keep

    def open(self, rel: str, atomic: bool = False) -> Any:
        return super().open(rel, atomic) if rel in self.keep else open(os.devnull, "wb")


def _rebuild_pass(
    scratch: RunStore, path: Path, run: Run, spec: ModelSpec, opts: RunOptions, gc: dict[str, Any], sink: RequestFiles
) -> _Pass:
    """Prepare's pass again, with the figures the run recorded and the generation config `gc` its requests carry,
    writing into `scratch` through `sink` (rebuild_prepared_files)."""
    plan, cfg = run.plan, run.job_config
    eff = effective_limit(plan["enqueued_limit"], plan["margin"])  # as planned (a limit learned later lowers the plan's)
    suspects: set[int] = set()
    while True:  # once more, comparing exactly the ids whose digests collided (as prepare did)
        p = _prepare_pass(
            scratch,
            path,
            cfg,
            opts,
            run.chars_per_token,
            eff,
            plan["batch_token_cap"],
            suspects,
            None,
            gc,
            plan["context_limit"],
            spec.long_context_threshold,
            sink=sink,
        )
        if suspects or not p.duplicate_digests:
            return p
        suspects = p.duplicate_digests


def default_out(path: Path, run_name: str) -> str:
    """Each run owns its output: named after the input, plus the run's name when that is not the input's own
    (a second run of the same input under --name never overwrites the first one's results)."""
    own = path.stem if run_name in (default_run_name(path), path.stem) else f"{path.stem}.{run_name}"  # stem: legacy_run
    own += ".results.jsonl"
    return str(path.with_name(own))


# ================================================================================================
# 8. Run loop: the engine (upload, admit, create, poll, retrieve, Flex lanes, hybrid, merge), cancel, cleanup
# ================================================================================================


@dataclass
class JobView:
    name: str
    state: str
    done: int
    total: int
    tokens: int
    wave: int
    first: bool = True  # its ids' first job (a batch or a part of one): its total counts toward the run's progress


@dataclass
class RealtimeView:
    done: int = 0
    total: int = 0
    errors: int = 0
    retries: int = 0
    throttled: int = 0
    rpm: float = 0.0
    tpm: float = 0.0
    cost_usd: float = 0.0
    in_flight: int = 0
    shed: int = 0
    lane: str = "real time"  # "flex" or "real time" (the standard tier)


@dataclass
class ProgressView:
    run: str
    jobs: list[JobView]
    realtime: RealtimeView | None
    records: int


class Reporter(Protocol):
    def update(self, view: ProgressView) -> None: ...

    def log(self, message: str) -> None: ...


class NullReporter:
    def update(self, view: ProgressView) -> None:
        pass

    def log(self, message: str) -> None:
        pass


@dataclass
class Summary:
    run: str
    out: str
    total: int
    ok: int
    errors: int
    by_source: dict[str, int]
    error_kinds: dict[str, int]
    usage: dict[str, int]
    cost_batch_usd: float
    cost_realtime_usd: float
    status: str
    cost_flex_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summary_of(run: Run) -> Summary:
    """The Summary a finished run recorded."""
    names = {f.name for f in dataclasses.fields(Summary)}
    return Summary(**{k: v for k, v in run.summary.items() if k in names})


NO_RESULT: dict[str, Any] = {
    "status": "error",
    "result": None,
    "usage": None,
    "source": "none",
    "error": "no result (run not finished)",
}


def merged_line(id_line: bytes, r: dict[str, Any]) -> bytes:
    """One line of the merged results file for a result that has no encoded line to splice (an override, an
    error made here, no result yet); Engine.merge splices the rest's bytes itself (its hot path)."""
    rest = {
        "status": r["status"],
        "result": r.get("result"),
        "error": r.get("error"),
        "source": r.get("source") or "batch",
        "usage": r.get("usage"),
    }
    return b'{"id":' + id_line.rstrip(b"\r\n") + b"," + orjson.dumps(rest)[1:] + b"\n"


_PRICE_LANE = {"standard": "standard", "realtime": "standard", "flex": "flex"}  # a result's source -> its price


def _no_fields(result: Any) -> str:
    return ""  # MergeTally.fields_of for a schema with no categorical field: one combos key for every row


class MergeTally:
    """What a merge counts while it writes: ok and error rows, rows per source, error kinds, and usage per
    price lane (batch, flex, standard) and the schema's categorical fields.

    Two ways in. `add(r)`: any row, counted as it comes. Merge's fast path (Engine._splice_in_order) counts an ok
    batch row itself, in two steps that cost a dict update and a list append: `combos` counts the rows by their
    categorical values taken at once (`fields_of(result)`), `pending["batch"]` keeps their usage. `combos` holds only
    keys of strings (`plain`): True, 1 and 1.0 are one dict key but three labels, and a string equals none of them,
    so a row whose values are not all strings (a boolean field, an integer enum), a list of enums or a key left out
    goes to `add`. Usage and those values are summed in bulk a few thousand rows at a time (sum_usage): every count
    is whole after it."""

    def __init__(self, long_at: int | None, fields: Iterable[str] = ()):
        self.long_at = long_at
        self.fields: dict[str, dict[str, int]] = {k: {} for k in fields}  # schema_categoricals: value -> rows
        self.field_values: dict[str, list[Any]] = {k: [] for k in self.fields}  # values not counted yet
        self.field_items = list(self.field_values.items())
        names = list(self.fields)
        # a row's categorical values at once: a tuple, one value, or "" when there is none to count
        self.fields_of: Callable[[Any], Any] = operator.itemgetter(*names) if names else _no_fields
        self.combos: dict[Any, int] = {}  # ok batch rows by fields_of(result), not counted yet
        self.ok = self.err = 0
        self.by_source: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.usage: dict[str, dict[str, int]] = {"batch": {}, "flex": {}, "standard": {}}
        self.pending: dict[str, list[dict[str, Any]]] = {"batch": [], "flex": [], "standard": []}

    def add(self, r: dict[str, Any]) -> None:
        source: str = r.get("source") or "batch"
        if r["status"] == "ok":
            self.ok += 1
            if self.field_items and type(result := r.get("result")) is dict:  # kept, counted in bulk (_flush_fields)
                for k, values in self.field_items:
                    values.append(result.get(k))
        else:
            self.err += 1
            kind = error_kind(r.get("error"))
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        by_source = self.by_source
        by_source[source] = by_source.get(source, 0) + 1
        usage = r.get("usage")
        if usage:
            self.pending[_PRICE_LANE.get(source, "batch")].append(usage)

    def _values(self, key: Any) -> tuple[Any, ...]:
        """A combos key as one value per categorical field."""
        return () if not self.fields else key if len(self.fields) > 1 else (key,)

    def plain(self, key: Any) -> bool:
        """Whether a combos key holds only strings (the class docstring says why that matters)."""
        return all(type(v) is str for v in self._values(key))

    def _flush_combos(self) -> None:
        rows = 0
        for key, n in self.combos.items():
            rows += n
            for name, label in zip(self.fields, self._values(key), strict=True):
                self.fields[name][label] = self.fields[name].get(label, 0) + n
        self.ok += rows
        if rows:
            self.by_source["batch"] = self.by_source.get("batch", 0) + rows
        self.combos.clear()

    def _flush_fields(self) -> None:
        """Count the values kept, as analytics() counts them (json_label; each item of a list): a C-speed Counter
        when they are all strings (enums: nearly always), one by one otherwise (True and 1 must not merge)."""
        for k, values in self.field_values.items():
            counts = self.fields[k]
            try:
                bulk: collections.Counter[Any] | None = collections.Counter(values)
            except TypeError:  # lists (arrays of enums) or objects
                bulk = None
            if bulk is not None and all(type(v) is str for v in bulk):
                for label, n in bulk.items():
                    counts[label] = counts.get(label, 0) + n
            else:
                for v in values:
                    for item in v if isinstance(v, list) else [v]:
                        label = json_label(item)
                        counts[label] = counts.get(label, 0) + 1
            values.clear()

    def sum_usage(self) -> None:
        self._flush_combos()
        for lane, usages in self.pending.items():
            add_usages(self.usage[lane], usages, self.long_at)
            usages.clear()
        self._flush_fields()

    def summary(
        self, name: str, out: str, records: int, status: str, spec: ModelSpec, batch_billed: dict[str, int] | None = None
    ) -> Summary:
        """`batch_billed`: the usage of every line the batch jobs answered (Engine: the jobs' own usage), kept rows
        or not: an answer billed in batch and then done again by the fallback was paid for twice, and the closing
        report says so instead of counting only the row kept (the adversarial pass's F9)."""
        if batch_billed is not None:  # each count at least what the kept rows show (a job's own usage may be unknown)
            kept = self.usage["batch"]
            self.usage["batch"] = {k: max(kept.get(k, 0), batch_billed.get(k, 0)) for k in kept.keys() | batch_billed.keys()}
        total = dict(self.usage["batch"])
        add_usage(total, self.usage["standard"])
        add_usage(total, self.usage["flex"])
        cost = {lane: round(cost_usd(spec, self.usage[lane], lane), 6) for lane in self.usage}
        return Summary(
            name, out, records, self.ok, self.err, self.by_source, self.kinds, total,
            cost["batch"], cost["standard"], status, cost["flex"],
        )  # fmt: skip


@dataclass
class _Timers:
    """The run loop's bookkeeping between passes: when each job is next polled, its backed-off interval,
    which polls are timed to a job's predicted end, and the create back-off after a refusal."""

    create_backoff: float
    create_after: float = 0.0
    next_poll: dict[str, float] = field(default_factory=dict)
    interval: dict[str, float] = field(default_factory=dict)
    timed: set[str] = field(default_factory=set)


def positions_trusted(lines: int, requests: int, aligned: bool) -> bool:
    """Whether an output line with no key may take the key of its place among the job's requests (the Developer
    API keeps input order): only when the output has one line per request and every keyed line sat at its own
    request's place. Otherwise a line is missing, extra or moved, every later place is off, and a keyless line
    cannot be told apart: its id counts as missing from the output, never as another id's answer."""
    return lines == requests and aligned


class ResultsRecorder:
    """One job's output, chunk by chunk (whole lines; called from worker threads, one at a time), parsed into
    results lines (Engine._line_result) that an ExternalSorter keeps in ordinal order; usage summed over every
    line parsed. A line with no key takes the key of its place among the job's keys (the Developer API's
    order) only if positions_trusted at the end: known once every line is counted, so such lines wait in a
    spooled file (memory: up to RESULT_RUN_BYTES, then disk) and go to the sorter in finish(), or are dropped and
    counted in `unattributed` (their ids then missing). keys: the job's ordinals in request order
    (Engine._job_keys)."""

    def __init__(
        self,
        sorter: ExternalSorter,
        keys: range | list[int],
        line_result: Callable[[int, dict[str, Any], str], dict[str, Any]],
        long_at: int | None,
    ):
        self.sorter, self.keys, self.line_result, self.long_at = sorter, keys, line_result, long_at
        self.pos = 0
        self.usage: dict[str, int] = {}
        self.aligned = True  # every keyed line so far sat at its request's place
        self.keyless: tempfile.SpooledTemporaryFile[bytes] | None = None  # results lines of keyless lines, by place
        self.unattributed = 0  # keyless lines dropped at finish (positions not trusted)

    def add(self, chunk: bytes) -> None:
        keys, loads, add, pos = self.keys, orjson.loads, self.sorter.add, self.pos
        for raw in chunk.splitlines():
            if not raw.strip():
                continue
            pos += 1
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                continue
            key = obj.get("key")
            keyless = key is None
            spare = keyless and pos > len(keys)  # more lines than requests: billed all the same, nobody's answer
            if spare:
                self.unattributed += 1
                n = 0
            else:
                try:
                    n = int(keys[pos - 1] if keyless else key)
                except (TypeError, ValueError):
                    continue
                if not keyless and self.aligned and (pos > len(keys) or keys[pos - 1] != n):
                    self.aligned = False
            r = self.line_result(n, obj, "batch")
            add_usage(self.usage, r.get("usage"))
            long_usage(self.usage, [r.get("usage")], self.long_at)
            if spare:
                continue
            # orjson hands back a bytes object still holding its 4 KiB output buffer: kept until the run is
            # spilled, each line is copied to its own size (measured: 4 KiB a line otherwise, 8x the lines)
            line = bytes(memoryview(orjson.dumps(r, option=NL)))
            if keyless:
                if self.keyless is None:
                    self.keyless = tempfile.SpooledTemporaryFile(max_size=RESULT_RUN_BYTES)
                self.keyless.write(line)
            else:
                add(n, line)
        self.pos = pos

    def discard(self) -> None:
        """Let go of what was read (the output was not taken): the keyless spool's file is closed now."""
        if self.keyless is not None:
            self.keyless.close()
            self.keyless = None

    def finish(self, missing: Callable[[int], bytes]) -> tuple[int, int, dict[str, int]]:
        """Write the sidecar: one line per key, the output's or missing(key); (ok, failed, usage)."""
        if self.keyless is not None:
            with self.keyless as f:
                if positions_trusted(self.pos, len(self.keys), self.aligned):
                    f.seek(0)
                    for line in f:
                        self.sorter.add(line_ordinal(line), line)
                else:
                    f.seek(0)
                    self.unattributed += sum(1 for _ in f)
            self.keyless = None
        order = self.keys if isinstance(self.keys, range) else sorted(self.keys)
        ok, failed = self.sorter.finish(order, missing)
        return ok, failed, self.usage


class StoppableRun(Protocol):
    """What a GracefulStop needs of the run it stops (the Engine): no more than this."""

    def in_flight(self) -> int: ...
    def in_flight_bound(self) -> float: ...
    def stop_requested(self) -> None: ...


class GracefulStop:
    """A way to ask a run to stop without throwing away what it paid for (library API: pass one to run_file or
    resume_run as `stop=`, call request() on the run's event loop). From then on the run sends no new request,
    stops its batch work at once (creates, uploads, polls: nothing of it is lost, as on a cancel), waits for the
    real-time requests already sent (Flex, standard) until each is answered and saved in realtime.jsonl, or fails
    (their own client timeout bounds the wait: Flex FLEX_TIMEOUT_S, standard 120 s), then raises Interrupted.
    Requests that were only queued (at the rate limits, or waiting to retry a refusal) are not sent: resume
    sends them. To stop at once instead, cancel the task running the run (those in flight are then lost, and
    sent again on resume)."""

    def __init__(self) -> None:
        self.requested = False
        self.kept = 0  # answers saved after the request
        self._run: StoppableRun | None = None

    def attach(self, run: StoppableRun) -> None:
        """Called by the run's engine as it starts: the run this stop asks, and answers for."""
        self._run = run

    def in_flight(self) -> int:
        """Real-time requests sent and not answered yet (0 before the run's engine starts)."""
        return self._run.in_flight() if self._run is not None else 0

    def wait_bound(self) -> float:
        """The longest the run may wait for the requests in flight: their client timeout (seconds)."""
        return self._run.in_flight_bound() if self._run is not None else 0.0

    def request(self) -> int:
        """Ask the run to stop gracefully; returns how many requests already sent it waits for."""
        self.requested = True
        if self._run is not None:
            self._run.stop_requested()
        return self.in_flight()


class Engine:
    """Drives one prepared run to the end. Never prints, exits or reads the environment."""

    _uploads_failing_since: float | None = None  # uploads failing on the way (network, 5xx, 429) since then, in a row
    _failure: Exception | None = None  # a background task's error, raised by the scheduler
    _refusal: Exception | None = None  # the error the run stops with once it has drained (halt)
    _request_files: RequestFiles | None = None  # (request_files: made on first use)

    def __init__(
        self,
        store: RunStore,
        client: Backend | None,
        reporter: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        hook: Callable[[Hook], None] | None = None,
        stop: GracefulStop | None = None,
        wall: Callable[[], float] = time.time,
        retired: str | None = None,
    ):
        self.store = store
        self.retired = retired  # why nothing new may be sent (the model was shut down): only what the service has is fetched
        self._client = client
        self.stop = stop or GracefulStop()
        self.stop.attach(self)
        self._stoppable: set[asyncio.Task[Any]] = set()  # batch work a stop request cancels
        self.reporter: Reporter = reporter or NullReporter()
        self.clock = clock  # monotonic: every interval the engine measures
        self.wall = wall  # epoch seconds: only what is compared across processes (Job.create_sent_at)
        self.sleep, self.hook = sleep, hook or (lambda point: None)
        self.run = store.load_run()
        self.opts, self.cfg = self.run.run_options, self.run.job_config
        self.damaged: list[str] = []  # job sidecars found unreadable, moved aside; repair() rebuilds them
        self.jobs: dict[str, Job] = {j.name: j for j in store.load_jobs(self.damaged)}
        self.rt_view: RealtimeView | None = None
        self._saved_at: dict[str, float] = {}
        self._progress: dict[str, tuple[float, int]] = {}  # first (clock, requests done) seen while RUNNING
        self._retrieving: set[str] = set()  # jobs whose results are being downloaded beside the scheduler
        self._sorting = asyncio.Semaphore(1)  # one job's output sorted into the bucket at a time (memory: one run)
        self._restaging = asyncio.Lock()  # one request object written again at a time (_restage: one scratch folder)
        self._wake, self._demand = asyncio.Event(), asyncio.Event()  # (batch_phase makes both again, on its own loop)
        self.limit = self.run.plan["effective_limit"]
        self._spec_day, self._spec = -1, run_model_spec(self.run)  # (the wall clock's day, the prices in force): spec
        self._refused_since: float | None = None  # first create refused (429) while nothing of the run was enqueued
        self._refusals: dict[str, int] = {}  # creates of each job refused in a row with nothing of the run enqueued
        self._download_failures: dict[str, tuple[int, float, float | None, int]] = {}  # (rounds, first, refused at, refusals)
        self._no_output_since: dict[str, float] = {}  # job: when a poll first found it SUCCEEDED naming no output
        self._download_retry_at: dict[str, float] = {}
        self._short_outputs: dict[str, int] = {}  # job: downloads that came back shorter than its batchStats
        self._prepared_checked = 0  # what mend_prepared found whole: 1 ids.jsonl, 2 the request files too
        self._poll_streaks: dict[str, tuple[str, int, float]] = {}  # per job: its last polls' answer kind, count, since
        self._flexing: set[str] = set()  # jobs a Flex lane of this process is sending
        self._senders: dict[str, RequestSender] = {}  # one per tier: shared buckets, gate and view
        self._answered_ids: set[int] | None = None  # ordinals with a line in realtime.jsonl (read once, then kept)
        self._rt_errors: set[int] = set()  # ... of those, the ones answered with an error (filled with them)
        self._flex_wake = asyncio.Event()  # a batch became claimable (an upload ended, admission passed it by)
        self._created_at: dict[str, float] = {}  # engine clock at each create of this process
        self._durations: list[float] = []  # create to seen-finished, of the jobs this process created
        self._ambiguous: dict[str, tuple[float, int, float]] = {}  # create answered 5xx/timeout: (at, looks, next look)
        self._interrupted: set[str] = set()  # of those, creates an earlier process sent and never saw answered
        self._cost_capped = False  # a job was not created for --max-cost: the run ends with CostCapError (exit 5)
        self._flex_capped = False  # the same for a Flex lane's request (hybrid): the lanes claim no more batches
        self._timed_out: set[int] = set()  # ordinals whose request got no answer in the client's timeout, this process
        self._jobs_cost: tuple[float, float, float, float] | None = None  # (clock, spent, committed, estimated): jobs
        self._resent: set[str] = set()  # created again after an ambiguous create was not found: look for orphans at the end
        self._orphans_seen: set[str] = set()  # remote jobs cancelled or reported by _settle_orphans

    @property
    def client(self) -> Backend:
        if self._client is None:
            raise UsageError("this step needs the API: give an endpoint and a key")
        return self._client

    @property
    def spec(self) -> ModelSpec:
        """The run's model figures with the prices in force on the wall clock's day (UTC): a run prepared before a
        dated price change (the plan keeps them: price_timeline) and sending after it is costed, and capped by
        --max-cost, at the prices it is billed at. Looked up again when the day changes, so a process that crosses
        the change's date goes on at the new prices. One price for the whole run: the usage is not kept by day, so
        what this run spent before the change is counted at the new prices too: after a rise, more than was billed
        (--max-cost errs on the safe side); after a drop (a models file can date one), less, and --max-cost then lets
        through up to that difference more than it should. The built-in catalog's dated changes are all rises."""
        day = int(self.wall() // 86400)
        if day != self._spec_day:
            self._spec_day, self._spec = day, run_model_spec(self.run, time.strftime("%Y-%m-%d", time.gmtime(day * 86400)))
        return self._spec

    @spec.setter
    def spec(self, value: ModelSpec) -> None:
        self._spec_day, self._spec = int(self.wall() // 86400), value

    def _today(self) -> str:
        """The wall clock's date (UTC), YYYY-MM-DD."""
        return time.strftime("%Y-%m-%d", time.gmtime(self.wall()))

    @property
    def request_files(self) -> RequestFiles:
        """The run's request files: in the run folder, or in the staging bucket (run_requests)."""
        if self._request_files is None:
            self._request_files = run_requests(self.store, self._client)
        return self._request_files

    # -- helpers -------------------------------------------------------------------------------
    def _advance(self, job: Job, state: JobState, **changes: Any) -> Job:
        """Advance a job from its current record (never from a caller's stale copy: a Flex lane may have
        claimed it meanwhile) and persist it."""
        new = advance(self.jobs.get(job.name, job), state, utcnow(), **changes)
        self.store.save_job(new)
        self.jobs[new.name] = new
        if new.lane == "batch" and new.state in (JobState.CREATED, JobState.UPLOADED):
            self._flex_wake.set()  # claimable by the Flex lanes (a refused create, a split part, a retry)
        return new

    def _ordered(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: (j.index, j.attempt))

    def _report(self) -> None:
        views = [
            JobView(
                j.name,
                str(j.state),
                j.done,
                j.request_count,
                j.tokens,
                j.wave,
                j.retry_of is None and (j.start is not None or bool(j.part)),
            )
            for j in self._ordered()
        ]
        self.reporter.update(ProgressView(self.run.name, views, self.rt_view, self.run.records))

    def _log(self, msg: str) -> None:
        self.reporter.log(msg)

    def _batch_spent(self) -> float:
        usage: dict[str, int] = {}
        for j in self.jobs.values():
            add_usage(usage, j.usage)
        return cost_usd(self.spec, usage, "batch")

    def _estimate(self, tokens: int, requests: int, service: str = "batch") -> float:
        """The plan's cost estimate of `requests` requests of `tokens` input tokens in all."""
        return cost_usd(self.spec, expected_usage(self.cfg, self.spec, tokens, requests), service)

    def _cost_standing(self, fresh: bool = False) -> tuple[float, float, float]:
        """(spent, committed, overrun) for cost_cap_allows: what ended (batch jobs with their usage, real-time
        answers), the estimate of what is under way (live jobs, requests in flight), and actual over estimated. The
        jobs' part is summed at most once a second (a Flex request asks before each send: 1,000 jobs each time)."""
        now = self.clock()
        if fresh or self._jobs_cost is None or now - self._jobs_cost[0] >= 1.0:
            ended = [j for j in self.jobs.values() if j.usage]
            committed_jobs = sum(
                self._estimate(j.tokens, j.request_count)
                for j in self.jobs.values()
                if j.state in ACTIVE_STATES or (j.state == JobState.SUCCEEDED and not j.usage)  # done, cost not read yet
            )
            estimated_jobs = sum(self._estimate(j.tokens, j.request_count) for j in ended)
            self._jobs_cost = (now, self._batch_spent(), committed_jobs, estimated_jobs)
        _at, spent, committed, estimated = self._jobs_cost
        for sender in self._senders.values():
            per = self._estimate(int(sender.tokens_per_request), 1, sender.service)
            spent += sender.view.cost_usd
            estimated += sender.view.done * per
            committed += sender.sending * per
        return spent, committed, (spent / estimated if estimated > 0 else 1.0)

    def _cost_allows(self, tokens: int, requests: int, service: str = "batch") -> bool:
        # admission (batch): each create changes what is under way, so the jobs are summed afresh
        spent, committed, overrun = self._cost_standing(fresh=service == "batch")
        return cost_cap_allows(spent, committed, self._estimate(tokens, requests, service), overrun, self.opts.max_cost)

    # -- a graceful stop (GracefulStop) --------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop.requested or self._refusal is not None  # a refusal stops this run, not the caller's stop

    def in_flight(self) -> int:
        return sum(s.sending for s in self._senders.values())

    def in_flight_bound(self) -> float:
        """Seconds until every request in flight is answered or has failed, at most: its client timeout."""
        return max((FLEX_TIMEOUT_S if s.flex else REQUEST_TIMEOUT_S for s in self._senders.values() if s.sending), default=0.0)

    def stop_requested(self) -> None:
        """Batch work is cancelled now; the senders drop what they have not sent; the Flex lanes claim no more."""
        for task in list(self._stoppable):
            task.cancel()
        for sender in self._senders.values():
            sender.drop_unsent()
        self._flex_wake.set()

    async def _stoppable_step(self, step: Coroutine[Any, Any, None]) -> None:
        """Run a step of batch work that a stop request cancels (it holds nothing paid for in flight)."""
        task = asyncio.ensure_future(step)
        self._stoppable.add(task)
        try:
            await task
        except asyncio.CancelledError:
            if task.cancelled() and self.stopping and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._raise_if_stopped()
            raise
        finally:
            self._stoppable.discard(task)
        self._raise_if_stopped()

    def halt(self, error: Exception, why: str | None = None) -> None:
        """An error that ends the run (the account refused: ServiceRefused; the service silent: ServiceSilent; the
        key refused, --max-cost, a write the disk refused, batch refused for good in a hybrid run): stop as a
        graceful stop does (no new request, batch work cancelled, the Flex requests already sent waited for: they are
        paid for), then raise `error`. Raised where it happened instead, it would cancel the tasks holding those
        requests (a TaskGroup cancels the siblings of a failed task), and resume would pay for them again."""
        if self._refusal is None:
            self._refusal = error
            self.stop_requested()  # this engine's own (never the caller's GracefulStop: it may be used again)
            waiting = self.in_flight()
            also = f"; waiting for the {waiting} request(s) already sent (paid for)" if waiting else ""
            self._log(f"stopping: {why or halt_reason(error)} (the reason below); nothing new is sent{also}")

    def _raise_if_stopped(self) -> None:
        if self._refusal is not None:
            self._report()
            raise self._refusal
        if self.stopping:
            self._report()
            raise Interrupted(
                f"stopped as asked: {self.stop.kept} answer(s) arrived and were saved meanwhile", kept=self.stop.kept
            )

    # -- the whole run ---------------------------------------------------------------------------
    async def execute(self) -> Summary:
        if self.run.status == "cancelled":
            # Cancel stops what still runs and keeps what is done: jobs that finished (or finish while being
            # cancelled) are downloaded; nothing is created or retried.
            if any(j.state in REMOTE_LIVE or j.state == JobState.SUCCEEDED for j in self.jobs.values()):
                await self.batch_phase()
            return self.merge()
        if self.run.notes.get("create_refused") and not (self.opts.mode in ("auto", "hybrid") and self.opts.fallback):
            # The last try stopped (exit 3) after creates were refused: this resume tries those batches again.
            del self.run.notes["create_refused"]
            for j in list(self.jobs.values()):
                if j.no_retry and j.state == JobState.FAILED:
                    self.jobs[j.name] = dataclasses.replace(j, no_retry=False)
                    self.store.save_job(self.jobs[j.name])
        self.run.status = "running"
        self.store.save_run(self.run)
        try:
            try:
                return await self._execute()
            except BaseExceptionGroup as eg:  # a TaskGroup's (a Flex request's refusal, say): the error as itself
                raise leading_error(eg) from None
        except (asyncio.CancelledError, KeyboardInterrupt, Interrupted, AuthError, ServiceSilent, OSError):
            self._end_as("interrupted")  # (AuthError: the key or the account refused)
            raise
        except CostCapError:
            self._end_as("refused")
            raise
        except StateError:  # a damaged sidecar, named: stopped until it is mended, not running
            self._end_as("interrupted")
            raise

    async def _batch_side(self) -> None:
        """The batch lane, with the Flex lanes beside it in a hybrid run: admission there leaves batches to Flex once
        Flex is the quicker way, so batch never runs alone in one (a batch left to no lane waits forever)."""
        if self.lanes == "hybrid":
            await self.hybrid_phase()
        else:
            await self._stoppable_step(self.batch_phase())

    def _end_as(self, status: str) -> None:
        """The run's state as it stopped (interrupted, refused), from its sidecar as last saved."""
        with contextlib.suppress(Exception):
            run = self.store.load_run()
            run.status = status
            self.store.save_run(run)

    async def _execute(self) -> Summary:
        if self.retired is not None:
            return await self._collect_only(self.retired)
        if self.opts.max_cost is not None and self.run.plan["estimated_cost_usd"] > self.opts.max_cost:
            raise CostCapError(
                f"the estimated cost {usd(self.run.plan['estimated_cost_usd'])} is above --max-cost "
                f"{usd(self.opts.max_cost)}; nothing was submitted."
            )
        self.mend_prepared()  # before anything reads them: nothing else runs yet
        self._raise_if_stopped()
        if self.opts.mode in ("realtime", "flex"):
            await self.send_requests(None, "flex" if self.opts.mode == "flex" else "standard")
        else:
            await self._stoppable_step(self.repair())
            try:
                await self._batch_side()
                if self.retired is None and self._line_retry_due():  # a retry batch of the ids answered with an error
                    await self._batch_side()
            except BatchRefusedError as e:
                if self.opts.mode not in ("auto", "hybrid") or not self.opts.fallback:
                    raise
                self._log(f"batch refused for good ({e}); finishing through the {self._fallback_tier()} tier")
                self.run.notes["batch_refused"] = str(e)
                self.store.save_run(self.run)
            if self.retired is not None:  # the model was shut down mid-run (create_job): no fallback, exit 2
                return await self._collect_only(self.retired)
            if self._capped and any(j.state not in FINAL_STATES for j in self.jobs.values()):
                self._end_cost_capped()  # the jobs created are collected; the rest waits for a higher cap
            refused = self.run.notes.get("create_refused")
            if refused and not (self.opts.mode in ("auto", "hybrid") and self.opts.fallback):
                self.merge()  # every id has its line (the refused ones an error), yet the run is not done:
                self._end_as("interrupted")  # resume (or the same command) tries those creates again
                raise RemoteError(f"{refused}. Fix: check the project's batch quota in Google AI Studio, then resume.")
            if self.opts.mode in ("auto", "hybrid") and self.opts.fallback:
                todo = self.unresolved() - self._timed_out
                tier = self._fallback_tier()
                if todo and tier == "none":
                    self._log(
                        f"{len(todo)} request(s) not done by batch, and {self.spec.name} has no Flex tier: the standard tier "
                        "costs 2x the batch price, so it is used only with --allow-standard (or --fallback-tier standard); "
                        f"`batchify resume {shlex.quote(self.run.name)} --allow-standard` sends them"
                    )
                elif todo:
                    self._log(f"{len(todo)} request(s) not done by batch: {tier} fallback")
                    await self.send_requests(todo, tier)
        self._raise_if_stopped()  # before the merge: an interrupted run is merged by the resume that finishes it
        spent = self._cost_standing(fresh=True)[0]
        if self.opts.max_cost is not None and spent > self.opts.max_cost:
            self._log(
                f"spent {usd(spent)}, above --max-cost {usd(self.opts.max_cost)}: the work under way when the cap was "
                "reached cost more than estimated (the answers were longer than the plan assumed)"
            )
        return self.merge()

    @property
    def _capped(self) -> bool:
        """--max-cost held something back: a batch job at admission (cleared when a later look admits one) or a Flex
        lane's request (kept: the lanes claim no more)."""
        return self._cost_capped or self._flex_capped

    def _end_cost_capped(self) -> None:
        """A job was not created for --max-cost: what the run has is merged, then CostCapError (exit 5) says how to go on."""
        left = sum(1 for j in self.jobs.values() if j.state not in FINAL_STATES)
        spent, _committed, overrun = self._cost_standing(fresh=True)
        self._raise_if_stopped()
        self.merge()
        raise CostCapError(
            f"stopped at --max-cost {usd(self.opts.max_cost or 0)}: {left} batch(es) not sent (spent "
            f"{usd(spent)}; answers cost {max(1.0, overrun):.1f}x the estimate). Every result so far is saved; "
            f"`batchify resume {shlex.quote(self.run.name)} --max-cost N` with a higher cap sends the rest."
        )

    async def _collect_only(self, why: str) -> Summary:
        """A resume after the run's model was shut down: the jobs already at the service (live, succeeded, or a
        create whose answer was lost) are polled, downloaded and merged; nothing is uploaded, created, retried or
        sent one by one (batch_phase admits nothing: self.retired). Then, if requests are still not done, UsageError
        naming them: they need new sends, which the retired model cannot take."""
        self.mend_prepared(requests=False)
        self._raise_if_stopped()
        await self._stoppable_step(self.repair())  # lost sidecars adopted, lost results downloaded again: no sends
        if any(j.state in REMOTE_LIVE | {JobState.SUCCEEDED, JobState.SUBMITTING} for j in self.jobs.values()):
            await self._stoppable_step(self.batch_phase())
        self._raise_if_stopped()
        summary = self.merge()
        left = self.unresolved()
        if not left:
            return summary
        batches = [f"b{i:04d}" for i, s, e in self._ranges() if any(s <= n < e for n in left)]
        named = ", ".join(batches[:5]) + (", ..." if len(batches) > 5 else "")
        instead = f"--model {self.spec.replacement}" if self.spec.replacement else "another model (`batchify models`)"
        self._end_as("interrupted")  # not done: merge() said so only because nothing more can be sent from here
        raise UsageError(
            f"run {self.run.name!r}: {len(left)} of {self.run.records} request(s) are not done (batch(es) {named}) and "
            f"would need new requests, which this model no longer takes: {why.split(' Fix:')[0]} Everything already at "
            f"the service was downloaded and merged into {summary.out}; the ids not done have status error there. Fix: "
            f"run those ids as a new run with {instead} (resume cannot change a run's model)."
        )

    def _claim_for_flex(self) -> Job | None:
        """The next batch for the Flex lanes (_flex_candidate), claimed on disk before any of its requests is sent,
        so resume never hands a batch Flex started to batch, nor the other way round. No await between the check
        and the claim: the scheduler and the uploader cannot take it meanwhile."""
        j = self._flex_candidate()
        if j is not None and j.lane != "flex":
            j = self._advance(j, j.state, lane="flex")
        return j

    def _flex_candidate(self) -> Job | None:
        """The batch the Flex lanes would take now: one they owned already and did not finish (a resume), else the
        last one batch has not started (the tail; batch admits from the head); none past --max-cost."""
        if self._capped or self.retired is not None:
            return None
        mine = [j for j in self._ordered() if j.lane == "flex" and j.state not in FINAL_STATES and j.name not in self._flexing]
        if mine:
            return mine[0]
        free = [j for j in self._ordered() if j.lane == "batch" and j.state in (JobState.CREATED, JobState.UPLOADED)]
        return free[-1] if free else None

    async def hybrid_phase(self) -> None:
        """Batch from the head of the queue and the Flex lanes from its tail, at once; an error of either is
        raised as itself (not wrapped in an ExceptionGroup). A stop request cancels the batch side at once; the
        Flex lanes wait for the requests they sent."""
        batch: asyncio.Task[None] | None = None
        refused: list[BatchRefusedError] = []
        try:
            async with asyncio.TaskGroup() as tg:
                batch = tg.create_task(self._hybrid_batch_side(refused))
                self._stoppable.add(batch)
                batch.add_done_callback(lambda _t: self._flex_wake.set())  # the lanes' last look
                tg.create_task(self.flex_lanes(batch))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
        finally:
            if batch is not None:
                self._stoppable.discard(batch)
        self._raise_if_stopped()
        if refused:  # the Flex lanes took every batch it left: the fallback (Engine._execute) notes it
            raise refused[0]

    async def _hybrid_batch_side(self, refused: list[BatchRefusedError]) -> None:
        """Hybrid's batch side. Batch refused for good (403 billing, 404 no batch for the model): it ends and the
        Flex lanes take what is left (the error is raised after them, into `refused`). Any other error ends the
        run as a stop does (halt): the Flex requests in flight are waited for, not cancelled with the lanes."""
        try:
            await self.batch_phase()
        except BatchRefusedError as e:
            self._log(f"batch refused for good ({e}); the Flex lanes take the batches it had not started")
            refused.append(e)
        except Interrupted:
            raise  # a stop already under way
        except (BatchifyError, OSError) as e:
            self.halt(e, halt_reason(e))

    async def flex_lanes(self, batch: asyncio.Task[None] | None = None) -> None:
        """Drain whole not-yet-started batches from the tail through Flex, request by request, keeping the
        pipe full: another batch is claimed whenever the gate has a free slot, nobody waits for one, and the
        RPM/TPM buckets have less than two poll intervals of work queued (so the lanes take no more of the
        queue than they can send), until batch and Flex meet in the middle. Each drained batch ends FLEXED
        (its results are in realtime.jsonl). The lanes stay while the batch side (`batch`) runs, though nothing is
        claimable now: a batch can become unstarted again (an ambiguous create not found, a refused create, a
        retry), and admission leaves it to them once Flex is the quicker way."""
        sender = self._sender("flex")
        gate = sender.gate
        running: set[asyncio.Task[None]] = set()
        async with asyncio.TaskGroup() as tg:
            while True:
                while (
                    not self.stopping
                    and gate.room.is_set()
                    and sender.backlog_seconds() < 2 * self.opts.poll
                    and (not self.opts.flex_lanes or len(running) < self.opts.flex_lanes)
                ):
                    job = self._claim_for_flex()
                    if job is None:
                        break
                    running.add(tg.create_task(self._drain(job)))
                    for _ in range(3):  # the lane hands its requests to the gate, they queue at the buckets:
                        await asyncio.sleep(0)  # only then is the backlog worth looking at again
                if not running and (self.stopping or ((batch is None or batch.done()) and self._flex_candidate() is None)):
                    return  # the batch side has ended (settled, or refused for good): nothing more becomes claimable
                # Sleep until something can change the answer: a drain ends, a batch becomes claimable or the
                # backlog runs low (both set _flex_wake), or a gate slot frees (only waited for while there is
                # none: a room that is already there would wake this loop at once, forever); at the latest after
                # a poll interval on the engine's clock (a fake one in tests).
                wakers = [
                    asyncio.ensure_future(self._flex_wake.wait()),
                    asyncio.ensure_future(self.sleep(max(0.05, self.opts.poll))),
                ]
                if not gate.room.is_set():
                    wakers.append(asyncio.ensure_future(gate.room.wait()))
                try:
                    await asyncio.wait([*running, *wakers], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in wakers:
                        w.cancel()
                self._flex_wake.clear()
                running = {t for t in running if not t.done()}

    async def _drain(self, job: Job) -> None:
        self._flexing.add(job.name)
        self._log(f"{job.name}: {job.request_count} request(s) through Flex (the batch price)")
        try:
            await self.send_requests(None, "flex", [job.request_file])  # the job's file holds exactly its requests
        except Interrupted:
            raise  # a stop already under way
        except CostCapError as e:  # the lanes claim no more; the jobs created are collected, then exit 5 (_execute)
            self._log(f"{job.name}: {e}")
            self._flex_capped = True
            return
        except (BatchifyError, OSError) as e:  # the key refused, say: the other lanes' requests in flight are waited for
            self.halt(e, halt_reason(e))
            return
        finally:
            self._flexing.discard(job.name)
        if self.stopping:
            return  # not all of it sent: the lane still owns it, and resume drains the rest
        # what status shows for it (a batch job's counts come from its output): its ids' answers, ok or failed
        ids = job.primary_range or [n for n, _req, _t in self._requests(None, [job.request_file])]
        answered, errors = self._answered(), self._rt_errors
        ok, failed = sum(n in answered and n not in errors for n in ids), sum(n in errors for n in ids)
        self._advance(self.jobs[job.name], JobState.FLEXED, ok=ok, failed=failed)
        self._wake.set()

    def _fallback_tier(self) -> str:
        """Flex (the batch price) where the model offers it, unless told otherwise; the standard tier (2x) only
        when asked for (--allow-standard or --fallback-tier standard), else "none"."""
        tier = self.opts.fallback_tier
        if tier == "auto":
            flex = self.spec.flex and self.opts.backend != "vertex"  # no Flex on Vertex (runs planned before it said so)
            return "flex" if flex else ("standard" if self.opts.allow_standard else "none")
        return tier

    def mend_prepared(self, requests: bool = True) -> None:
        """ids.jsonl and (with `requests`) the request files, when they are not what prepare wrote, are written
        again from the input before anything reads them (rebuild_prepared_files), or StateError names them: a
        damaged request file is never uploaded, a damaged ids.jsonl never merged."""
        level = 2 if requests else 1
        if self._prepared_checked >= level:
            return  # found whole (or mended) once by this engine: an offline reader's merge reads ids.jsonl once
        damaged = damaged_prepared_files(self.store, self.run, requests)
        if damaged:
            rebuild_prepared_files(self.store, self.run, self.spec, damaged)
        self._prepared_checked = level
        if not damaged:
            return
        found = [f"{p}: not what prepare wrote (truncated or gone): rebuilt from {self.run.input_path}" for p in damaged]
        for line in found:
            self._log(f"repair: {line}")
        self.run.notes.setdefault("repairs", []).extend(f"{utcnow()} {line}" for line in found)
        self.store.save_run(self.run)

    # -- batch -----------------------------------------------------------------------------------
    async def repair(self) -> None:
        """Reconcile the sidecars with the service before anything is sent again: a job sidecar deleted or
        damaged is rebuilt from the run's jobs listed by display name (adopted, in the state the service
        reports), a batch with no remote trace is sent again, and a results file that is gone is downloaded
        again. Says what it found; only ids with no remote trace are ever paid for again."""
        ranges = self.run.plan.get("batch_ranges") or []
        indices = {j.index for j in self.jobs.values()}
        missing = [
            i
            for i, (_s, _e, _t, nbytes) in enumerate(ranges, 1)
            if nbytes and i not in indices and self.request_files.exists(f"requests/b{i:04d}.jsonl")
        ]
        talked = any(j.state not in (JobState.CREATED, JobState.UPLOADING, JobState.UPLOADED) for j in self.jobs.values())
        repaired: list[str] = [f"{p}: unreadable, moved aside" for p in self.damaged]
        for j in [j for j in self._ordered() if j.state == JobState.SPLIT]:  # a crash between SPLIT and its parts
            before = len(self.jobs)
            self._make_parts(j)
            if len(self.jobs) > before:
                repaired.append(f"{j.name}: split, {len(self.jobs) - before} of its parts were not made yet: made now")
        if missing or talked or self.damaged:
            repaired += await self._adopt_remote(ranges, missing)
        repaired += await self._mend_results()
        if repaired:
            for line in repaired:
                self._log(f"repair: {line}")
            self.run.notes.setdefault("repairs", []).extend(f"{utcnow()} {line}" for line in repaired)
            self.store.save_run(self.run)

    async def _mend_results(self) -> list[str]:
        """Results sidecars that are gone or not whole (_results_whole) are downloaded again from the job's output;
        an output the service no longer gives leaves the results still there and an error line for each other id
        (_results_lost). What was done, one line a job."""
        done = []
        for j in self._ordered():
            if j.state != JobState.RESULTS_DOWNLOADED or await asyncio.to_thread(self._results_whole, j):
                continue
            what = "gone" if not await asyncio.to_thread(self._results_exist, j) else "cut short"
            try:
                ok, failed, usage = await self._fetch_results(j, expect=0)  # taken as it was the first time
            except RemoteError as e:
                if e.transient:  # the service's bad moment, not an output that is gone: marking its ids lost would
                    raise RemoteError(  # send them again (paid twice); stop here, nothing sent, and resume retries
                        f"{j.name}: results file {what}, and downloading it again failed ({e}). Fix: resume again later.",
                        code=e.code,
                    ) from e
                done.append(self._results_lost(j, f"results file {what}", e))  # a repair, before anything else runs
                continue
            self._advance(j, JobState.RESULTS_DOWNLOADED, ok=ok, failed=failed, usage=usage)
            done.append(f"{j.name}: results file {what}: downloaded {j.output_file} again")
        return done

    def _results_lost(self, job: Job, what: str, e: RemoteError) -> str:
        """A job's results sidecar is damaged or gone and its output is no longer downloadable: the whole results
        lines still there are kept, every other id of the job gets an error line saying why (not "no result"),
        and the job's counts follow, so the fallback sends those ids again where it may."""
        sink, name = self._results_sink(job)
        why = f"result lost: {what} and the output {job.output_file} is no longer downloadable ({e})"
        if isinstance(sink, LocalResults):
            lines = self._results_lines(sink.path(name))
            kept = {n: (r.get("status") == "ok", raw or orjson.dumps(r, option=NL)) for n, r, raw in lines}
        else:  # a results object in the bucket is whole or gone, so gone: the error lines go to results/ (read first)
            kept, sink, name = {}, LocalResults(self.store.dir / "results"), job.name
        keys = self._job_keys(job)
        order = keys if isinstance(keys, range) else sorted(keys)
        sink.put(
            name, (kept[n][1] if n in kept else orjson.dumps(result_record(n, None, why, "batch"), option=NL) for n in order)
        )
        ok = sum(1 for n in order if n in kept and kept[n][0])
        self._advance(job, JobState.RESULTS_DOWNLOADED, ok=ok, failed=len(order) - ok)
        lost = sum(1 for n in order if n not in kept)
        return f"{job.name}: {what} and the output is not downloadable ({e}): {lost} id(s) marked with that error"

    async def _adopt_remote(self, ranges: list[Any], missing: list[int]) -> list[str]:
        """Jobs of this run that the service has and the sidecars do not: adopt them; batches in `missing`
        that the service has never seen: recreate them, to be sent."""
        found = await self._unknown_remote_jobs(len(missing))
        notes = []
        for i in sorted(set(missing) | set(found)):
            chain = sorted(found.get(i, []), key=lambda x: x[0])
            base = self._first_job_of(i, ranges)
            if base is None:
                continue
            if not chain and i in missing:
                self.store.save_job(base)
                self.jobs[base.name] = base
                notes.append(
                    f"{base.name}: sidecar missing and no job at the service: its {base.request_count} request(s) will be sent"
                )
            prev = next((j.name for j in self.jobs.values() if j.index == i and j.attempt < (chain[0][0] if chain else 1)), None)
            for attempt, r in chain:
                name = base.name if attempt == 1 else f"{base.name.split('-')[0]}-r{attempt}"
                j = dataclasses.replace(
                    base,
                    name=name,
                    display_name=r.display_name or "",
                    attempt=attempt,
                    retry_of=prev,
                    state=r.state,
                    remote_job=r.name,
                    start=base.start if attempt == 1 else None,  # a retry's results override its primary's range
                    end=base.end if attempt == 1 else None,
                )
                self.store.save_job(j)
                self.jobs[j.name] = j
                prev = name
                notes.append(f"{name}: sidecar missing; adopted {r.name} ({r.state}) from the service")
        return notes

    async def _unknown_remote_jobs(self, missing: int) -> dict[int, list[tuple[int, RemoteJob]]]:
        """This run's jobs at the service that no sidecar knows, by batch number: [(attempt, job)]. With
        `missing` sidecars, a failure to ask is an error (else it is logged and nothing is found)."""
        prefix = display_name_prefix(self.run.name, self.run.run_id)
        try:
            remote = [r for r in await self.client.list_batches() if (r.display_name or "").startswith(prefix)]
        except AuthError:
            raise
        except RemoteError as e:
            if not missing:
                self._log(f"could not list batches to check the sidecars ({e}); going on with them as they are")
                return {}
            raise RemoteError(
                f"{missing} job sidecar(s) are missing and the service cannot be asked ({e}); resume again later"
            ) from e
        await self._settle_orphans(remote)  # a create that took effect after its record went on without it
        known = {j.display_name for j in self.jobs.values()}
        found: dict[int, list[tuple[int, RemoteJob]]] = {}
        for r in remote:
            m = re.search(r"-b(\d{4,})-a(\d+)$", r.display_name or "")
            if m and r.display_name not in known:
                found.setdefault(int(m.group(1)), []).append((int(m.group(2)), r))
        return found

    def _first_job_of(self, i: int, ranges: list[Any]) -> Job | None:
        """Batch i's first job as prepare made it (from the plan and its request file); None for a retry
        file that is gone."""
        if i <= len(ranges):
            start, end, tokens, nbytes = ranges[i - 1]
            return Job(
                name=f"b{i:04d}",
                index=i,
                display_name=display_name_for(self.run.name, self.run.run_id, i, 1),
                request_file=f"requests/b{i:04d}.jsonl",
                request_count=self.request_files.count(f"requests/b{i:04d}.jsonl"),
                tokens=tokens,
                bytes=nbytes,
                wave=int(self.run.plan.get("wave_of_batch", {}).get(str(i - 1), 0)),
                start=start,
                end=end,
                timestamps={"CREATED": utcnow()},
            )
        rel = f"requests/retry-{i:04d}.jsonl"  # the one extra try of per-line errors: its file says how many
        if not self.request_files.exists(rel):
            return None
        lines = self.request_files.count(rel)
        return Job(f"x{i:04d}", i, display_name_for(self.run.name, self.run.run_id, i, 1), rel, lines, 0, 0)

    async def reconcile(self, settle: bool = True) -> None:
        """A job left in SUBMITTING may or may not exist remotely: find it by display name. One whose create
        answered a timeout or a 5xx in this process (_ambiguous), or that an interrupted process sent less than the
        settle window ago (_settle_resumed; not with `settle` False: cancel), is looked for again, backing off, until
        the window ends (ambiguous_create_verdict) before it is created again; one left by an interruption longer
        ago (or by an older batchify, which kept no time) is created again when not listed. Every listing also
        settles this run's orphans (_settle_orphans)."""
        now = self.clock()
        stuck = [j for j in self._ordered() if j.state == JobState.SUBMITTING]
        if settle:
            self._settle_resumed(stuck, now)
        due = [j for j in stuck if j.name not in self._ambiguous or self._ambiguous[j.name][2] <= now]
        if not due:
            return
        try:
            listed = await self.client.list_batches()
        except AuthError:
            raise
        except RemoteError as e:  # never fatal: the scheduler reconciles again on its next pass
            self._log(f"listing batches to reconcile {len(due)} job(s) failed ({e}); will look again")
            for j in due:  # the next look one base interval on (not at once: no loop of failing lists)
                if j.name in self._ambiguous:
                    since, looks, _ = self._ambiguous[j.name]
                    self._ambiguous[j.name] = (since, looks, now + self.opts.poll)
            return
        await self._settle_orphans(listed)
        now = self.clock()
        for j in due:
            if self.jobs[j.name].state != JobState.SUBMITTING:
                self._ambiguous.pop(j.name, None)  # adopted by _settle_orphans
                continue
            if j.name in self._ambiguous:
                since, looks, _ = self._ambiguous[j.name]
                if ambiguous_create_verdict(False, since, now, self._settle_s) == "wait":
                    first = CREATE_LOOK_FIRST_S * self.opts.retry_scale
                    look = next_create_look(since, looks + 1, now, self._settle_s, first)
                    self._ambiguous[j.name] = (since, looks + 1, look)
                    continue
                del self._ambiguous[j.name]
                why = "the run that sent its create ended" if j.name in self._interrupted else "its create answered an error"
                self._interrupted.discard(j.name)
                self._log(
                    f"{j.name}: {why} and no job named {j.display_name} was listed in {now - since:.0f} s: creating it again"
                )
            self._advance(j, JobState.UPLOADED)  # not listed: taken as never created
            self._resent.add(j.name)  # a create that took effect but is not listed yet: the last listing looks again

    @property
    def _settle_s(self) -> float:
        """CREATE_SETTLE_S scaled by --retry-scale, as every retry delay is (the drills wait a fiftieth of it)."""
        return max(1.0, CREATE_SETTLE_S * self.opts.retry_scale)  # never none at all (--retry-scale 0)

    def _settle_resumed(self, stuck: list[Job], now: float) -> None:
        """Jobs an earlier process left SUBMITTING with their create sent less than the settle window ago by the
        wall clock (Job.create_sent_at, resumed_create_since): looked for as this process's ambiguous creates, until
        the window ends counted from that send, rather than taken as never created at the first listing (the create
        may have taken effect and batches.list lag it). The other jobs go on meanwhile (SUBMITTING is not admitted)."""
        for j in stuck:
            if j.name in self._ambiguous:
                continue
            since = resumed_create_since(j.create_sent_at, self.wall(), now, self._settle_s)
            if since is None:
                continue
            self._ambiguous[j.name] = (since, 0, now)
            self._interrupted.add(j.name)
            self._log(
                f"{j.name}: a run that ended before recording the answer sent its create {now - since:.0f} s ago; looking "
                f"for it by display name for up to {self._settle_s - (now - since):.0f} s more before creating it again"
            )

    async def _sweep_orphans(self) -> None:
        """At the end of a run that created a job again after its ambiguous create was not found: one last listing,
        so that a create which took effect later still is cancelled rather than left running (never fatal)."""
        if not self._resent:
            return
        try:
            await self._settle_orphans(await self.client.list_batches())
        except AuthError:
            raise
        except RemoteError as e:
            self._log(f"warning: could not list batches to look for duplicates of {', '.join(sorted(self._resent))} ({e})")

    async def _settle_orphans(self, listed: list[RemoteJob]) -> None:
        """Jobs listed at the service that carry a display name of this run's records but that no record owns
        (orphan_action): adopted by a record still waiting to be created, else cancelled (never left running,
        paid for, with no one to collect it), and said."""
        by_name = {j.display_name: j.name for j in self.jobs.values()}
        for r in listed:
            if r.name in self._orphans_seen or r.display_name not in by_name:
                continue
            job = self.jobs[by_name[r.display_name]]
            action = orphan_action(job, r)
            if action == "adopt":
                if job.state == JobState.SUBMITTING and (job.name not in self._ambiguous or job.name in self._interrupted):
                    self._log(f"{job.name}: found remote job {r.name} created before the interruption")
                else:
                    self._log(f"{job.name}: its create answered an error but took effect: adopted {r.name}")
                if job.state == JobState.UPLOADED:
                    job = self._advance(job, JobState.SUBMITTING)
                self._advance(job, r.state, remote_job=r.name)
                self._ambiguous.pop(job.name, None)
                self._interrupted.discard(job.name)
                self._wake.set()
                continue
            if action is None:
                continue
            self._orphans_seen.add(r.name)
            owner = f"{job.name} ({job.state}{', ' + job.remote_job if job.remote_job else ''})"
            if action == "paid":
                self._log(
                    f"warning: {r.name} ({r.display_name}) was created by a create that answered an error, and has "
                    f"already succeeded beside {owner}: billed twice, its results are not used"
                )
                continue
            try:
                await self.client.cancel_batch(r.name)
            except AuthError:
                raise
            except RemoteError as e:
                self._orphans_seen.discard(r.name)  # tried again at the next listing
                self._log(f"warning: {r.name} ({r.display_name}) is a duplicate of {owner}; cancelling it failed ({e})")
                continue
            self._log(
                f"warning: cancelled {r.name} ({r.display_name}): a create that answered an error took effect after "
                f"all, and {owner} went on without it"
            )

    def _spawn_retries(self) -> None:
        for j in jobs_to_retry(self.jobs.values(), self.opts.max_attempts, self.run.status == "cancelled"):
            a = j.attempt + 1
            base = j.name.split("-")[0]
            nj = Job(
                name=f"{base}-r{a}",
                index=j.index,
                display_name=display_name_for(self.run.name, self.run.run_id, j.index, a, j.part),
                request_file=j.request_file,
                request_count=j.request_count,
                tokens=j.tokens,
                bytes=j.bytes,
                wave=j.wave,
                attempt=a,
                retry_of=j.name,
                part=j.part,
                timestamps={"CREATED": utcnow()},
            )
            self._log(f"{j.name} ended {j.state}: resubmitting its {j.request_count} request(s) as {nj.name}")
            self.store.save_job(nj)
            self.jobs[nj.name] = nj

    def _line_retry_due(self) -> bool:
        """Without the real-time fallback, the ids still unresolved get one more try in a batch of their own: those a
        finished job (or Flex) answered with an error or left with no answer, never those of a job that ended
        FAILED/EXPIRED after its --max-attempts (attempts mean what the flag says), nor a request that timed out in
        this process (the service may yet answer, and bill, it: resume sends it)."""
        if (self.opts.mode == "auto" and self.opts.fallback) or self.opts.max_attempts < 2:
            return False
        if self.run.notes.get("line_retry_done"):
            return False
        self.run.notes["line_retry_done"] = True
        self.store.save_run(self.run)
        latest: dict[int, Job] = {}
        for j in self._ordered():  # attempts in order: the last one of each batch wins
            latest[j.index] = j
        ended = {idx for idx, j in latest.items() if j.state in ENDED_UNFINISHED}
        spent = [(s, e) for idx, s, e in self._ranges() if idx in ended]
        todo = {n for n in self.unresolved() - self._timed_out if not any(s <= n < e for s, e in spent)}
        if not todo:
            return False
        idx = max(j.index for j in self.jobs.values()) + 1
        rel = f"requests/retry-{idx:04d}.jsonl"
        tokens = nbytes = 0
        with self.request_files.open(rel) as f:
            for n, req, t in self._requests(todo):
                line = orjson.dumps({"key": str(n), "request": req}) + b"\n"
                f.write(self.request_files.encode(line, (str(n), req)))  # the entry in hand: no parse back
                tokens += t
                nbytes += len(line)
        name = f"x{idx:04d}"
        self._log(f"{len(todo)} request(s) ended in error: one more try in batch {name}")
        self.store.save_job(
            Job(
                name=name,
                index=idx,
                display_name=display_name_for(self.run.name, self.run.run_id, idx, 1),
                request_file=rel,
                request_count=len(todo),
                tokens=tokens,
                bytes=nbytes,
                wave=max(j.wave for j in self.jobs.values()) + 1,
                timestamps={"CREATED": utcnow()},
            )
        )
        self.jobs = {j.name: j for j in self.store.load_jobs()}
        return True

    async def batch_phase(self) -> None:
        """Admit, poll and retrieve until every batch job is final; uploads run ahead beside it."""
        await self.reconcile()
        self._wake = asyncio.Event()  # an upload or a retrieval finished: the scheduler looks again
        self._demand = asyncio.Event()  # admission took uploaded files: upload more
        stop = asyncio.Event()
        failure: BaseException | None = None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._uploader(stop))
            try:
                await self._schedule(tg)
            except Exception as e:  # re-raised as itself below, not wrapped in an ExceptionGroup
                failure = e
            finally:
                stop.set()
                self._demand.set()
        if failure is not None:
            raise failure

    def _upload_ahead(self) -> int:
        """How many batches to keep uploaded before they are admitted: as many as could start at once."""
        waiting = [j.tokens for j in self.jobs.values() if j.state in UNSUBMITTED and j.lane == "batch"]
        if not waiting or self.retired is not None:  # a retired model: nothing is uploaded
            return 0
        fits = int(self.limit) // max(1, sum(waiting) // len(waiting))
        return max(2, min(self.opts.max_active_jobs, fits) + 1)

    async def _uploader(self, stop: asyncio.Event) -> None:
        """Keep the next batches in admission order uploaded ahead of admission (the head of the queue is
        never left waiting): up to UPLOADS_IN_FLIGHT at once, the next started the moment one finishes
        or admission takes an uploaded file, not in rounds that wait for their slowest upload."""
        backoff = self.opts.poll
        running: dict[str, asyncio.Task[bool]] = {}
        async with asyncio.TaskGroup() as tg:
            while not stop.is_set():
                window = [j for j in self._ordered() if j.state in UNSUBMITTED and j.lane == "batch"][: self._upload_ahead()]
                for j in window:
                    if len(running) >= UPLOADS_IN_FLIGHT:
                        break
                    if j.state != JobState.UPLOADED and j.name not in running:
                        running[j.name] = tg.create_task(self._upload(j))
                self._demand.clear()  # no await since the window was read: no demand is missed
                if not running:
                    await self._demand.wait()
                    continue
                demand = asyncio.ensure_future(self._demand.wait())
                try:
                    await asyncio.wait([*running.values(), demand], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    demand.cancel()
                    await asyncio.gather(demand, return_exceptions=True)
                failed = False
                for name in [n for n, t in running.items() if t.done()]:
                    failed = not running.pop(name).result() or failed
                if failed:
                    await self._sleep_until(backoff, stop)
                    backoff = min(backoff * 2, self.opts.max_poll_interval)
                else:
                    backoff = self.opts.poll

    async def _upload(self, job: Job) -> bool:
        if self.jobs[job.name].lane != "batch" or self.jobs[job.name].state not in UNSUBMITTED:
            return True  # a Flex lane took it meanwhile (or it was given up on)
        job = self._advance(
            self.jobs[job.name], JobState.UPLOADING
        )  # the intent: a crash from here re-uploads (the orphan file expires)
        self.hook(Hook.BEFORE_UPLOAD)
        try:
            f = await self._remote_file(job)  # on Vertex: the object prepare wrote
        except AuthError:
            raise
        except RemoteError as e:  # the seam already tried as often as the retry policy allows
            if e.code in TRANSIENT_CODES:  # on the way (network, 5xx, 429): not the job's fault, no attempt of it spent
                return self._upload_unanswered(job, e)  # (a 400 "Unsupported MIME type" still fails it, as before)
            if isinstance(e, StagedRequestGone):  # cut during the run (_remote_file): another attempt reads it again
                why = (
                    f"{e.uri}: the request object is gone from the bucket (a lifecycle rule? a deletion?); batchify cut it "
                    "from other objects during the run, not from the input, so it cannot be written again: failed, no "
                    "retry. Fix: keep the staging bucket's objects while a run lasts"
                )
                self._log(f"{job.name}: {why}")
                if self.jobs[job.name].state == JobState.UPLOADING:
                    self._advance(self.jobs[job.name], JobState.FAILED, error=why, no_retry=True)
                self._wake.set()
                return True
            self._log(f"{job.name}: upload refused ({e}); the job failed")
            if self.jobs[job.name].state == JobState.UPLOADING:
                self._advance(self.jobs[job.name], JobState.FAILED, error=f"upload refused: {e}")
            self._wake.set()
            return True
        self._uploads_failing_since = None
        if self.jobs[job.name].state != JobState.UPLOADING:  # given up on while uploading (creates refused too long)
            return True
        self._advance(self.jobs[job.name], JobState.UPLOADED, remote_file=f.name)
        self.hook(Hook.AFTER_UPLOAD)
        self._wake.set()  # the scheduler may admit it now
        self._flex_wake.set()
        return True

    async def _remote_file(self, job: Job) -> RemoteFile:
        """The job's input at the service (RequestFiles.remote_file). A request object prepare staged that is gone
        from the bucket since (StagedRequestGone) is written again from the input first (_restage), once: no attempt
        of the job is spent on it; an input gone or changed stops the run with the fix (StateError), resumably. An
        object the run cut itself (a split's part, the line retry's) is not rebuilt: StagedRequestGone, and _upload
        fails the job once (no retry)."""
        try:
            return await self.request_files.remote_file(self.client, job)
        except StagedRequestGone as e:
            if job.request_file not in self._prepared_request_files():
                raise
            spec = self.spec
            async with self._restaging:
                await asyncio.to_thread(self._restage, job.request_file, e.uri, spec)
            line = f"{e.uri}: gone from the bucket (a lifecycle rule? a deletion?): written again from {self.run.input_path}"
            self._log(f"repair: {line}")
            self.run.notes.setdefault("repairs", []).append(f"{utcnow()} {line}")
            self.store.save_run(self.run)
        try:
            return await self.request_files.remote_file(self.client, job)
        except StagedRequestGone as e:  # gone again at once: refused, as any upload
            raise RemoteError(str(e), code=404) from e

    def _prepared_request_files(self) -> set[str]:
        return {f"requests/b{i:04d}.jsonl" for i in range(1, len(self.run.plan.get("batch_ranges") or []) + 1)}

    def _restage(self, rel: str, uri: str, spec: ModelSpec) -> None:
        """Write prepare's request object `uri` (request file `rel`) again from the input (rebuild_prepared_files,
        into the run folder, then streamed to the bucket as prepare does; the local copy removed)."""
        local = self.store.dir / rel
        gone = f"{uri}: the request object prepare staged is gone from the bucket (a lifecycle rule? a deletion?)"
        try:
            rebuild_prepared_files(self.store, self.run, spec, [local], what=gone)
            with open(local, "rb") as src, self.request_files.open(rel) as dst:
                for line in src:
                    if line.strip():
                        dst.write(self.request_files.encode(line))
        finally:
            local.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                local.parent.rmdir()  # requests/ in the run folder only while it was rebuilt

    def _upload_unanswered(self, job: Job, e: RemoteError) -> bool:
        """An upload that failed on the way after the seam's retries (a laptop awake before its network): the job back
        to CREATED, to be uploaded again after the uploader's back-off (False); failing so for POLL_SILENCE_S in a row
        stops the run, resumably (ServiceSilent). Failing the job instead spent every attempt in a 90 s outage."""
        now = self.clock()
        since = self._uploads_failing_since = self._uploads_failing_since if self._uploads_failing_since is not None else now
        if self.jobs[job.name].state == JobState.UPLOADING:
            self._advance(self.jobs[job.name], JobState.CREATED)
        if now - since >= self._patience(POLL_SILENCE_S):
            kept = "Nothing was created for them; no attempt was spent."
            self.halt(service_silent(f"{job.name}: uploads failed on the way", now - since, e, kept, self.run.name))
            return True
        self._log(f"{job.name}: upload failed on the way ({e}); trying again after a pause")
        return False

    async def _sleep_until(self, delay: float, event: asyncio.Event) -> None:
        """Sleep (through the injected sleep) until the delay passes or the event is set; always yields."""
        if event.is_set() or delay <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self.sleep(delay))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, waiter):
                t.cancel()
            await asyncio.gather(sleeper, waiter, return_exceptions=True)

    async def _retrieve_beside(self, job: Job, next_poll: dict[str, float]) -> None:
        """One retrieval, run beside the scheduler so that polls and admission never wait on a download."""
        try:
            if not await self.retrieve(job):
                next_poll[job.name] = self._download_retry_at.pop(job.name, self.clock() + self.opts.poll)
        except Exception as e:  # handed to the scheduler, which raises it as itself
            self._failure = e
        finally:
            self._retrieving.discard(job.name)
            self._wake.set()

    async def _schedule(self, background: asyncio.TaskGroup) -> None:
        """The run loop: each pass applies the pure decisions (plan_admission, due_for_poll,
        due_for_retrieval, next_wake) to the jobs as they stand, then sleeps until the next one is due or
        something (an upload, a download, a Flex lane) wakes it. Every pass awaits: no busy loop."""
        base = self.opts.poll
        t = _Timers(create_backoff=base)
        while True:
            self._wake.clear()
            if any(j.state == JobState.SUBMITTING for j in self.jobs.values()):
                await self.reconcile()  # a create whose answer was lost, not yet found: look again (never fatal)
            if self.retired is None:  # a retired model: nothing new is created or retried (_collect_only)
                self._spawn_retries()
            self._demand.set()
            if self.clock() >= t.create_after and self.retired is None:
                await self._admit(t)
            due = due_for_poll(self.jobs.values(), t.next_poll, t.timed, self.clock(), base)
            freed = await self._poll_due(due, t)
            for name in due_for_retrieval(self.jobs.values(), set(due), t.next_poll, self.clock(), self._retrieving):
                self._retrieving.add(name)
                background.create_task(self._retrieve_beside(self.jobs[name], t.next_poll))
            if self._failure is not None:
                raise self._failure
            self._report()
            if self._batches_settled():
                await self._sweep_orphans()
                return
            if freed:  # a 429 back-off is moot once capacity has actually changed
                t.create_after, t.create_backoff = 0.0, base
            now = self.clock()
            looks = [look for _since, _n, look in self._ambiguous.values()]  # an ambiguous create's next look
            wake = next_wake(self.jobs.values(), t.next_poll, self._retrieving, now, base, t.create_after, freed, looks)
            await self._sleep_until(wake - now, self._wake)

    async def _admit(self, t: _Timers) -> None:
        """Create the jobs plan_admission picks, in order, stopping at the first the service refuses."""
        self._split_head()
        base = self.opts.poll
        for name in plan_admission(self.jobs.values(), self.limit, self.opts.max_active_jobs, self.opts.barrier):
            job = self.jobs[name]
            if job.lane != "batch" or job.state != JobState.UPLOADED:
                continue  # a Flex lane claimed it while an earlier create was awaited
            if self.lanes == "hybrid" and not self._hybrid_admits():
                self._flex_wake.set()  # the rest is Flex's
                return
            if self.opts.max_cost is not None and any(j.state == JobState.SUCCEEDED and not j.usage for j in self.jobs.values()):
                return  # a job ended whose cost is not read yet: it tells what the next one will cost (its download wakes us)
            if not self._cost_allows(job.tokens, job.request_count):  # the jobs live are collected, then exit 5
                if not self._cost_capped:
                    self._log(f"{job.name}: not created: with it, the run could pass --max-cost {usd(self.opts.max_cost or 0)}")
                self._cost_capped = True
                return
            self._cost_capped = False  # one held back before fits now: the answers so far cost less than estimated
            created = await self.create_job(job)
            self._demand.set()
            if self.jobs[name].state == JobState.SPLIT:  # its parts go next, at once: no back-off
                t.create_after, t.create_backoff = 0.0, base
                return
            if not created:
                t.create_after = self.clock() + t.create_backoff
                t.create_backoff = min(t.create_backoff * 2, self.opts.max_poll_interval)
                return
            t.create_backoff = base
            t.next_poll[name] = self.clock() + base

    @property
    def lanes(self) -> str:
        """batch or hybrid (decided at prepare: lanes_for); runs prepared before it was recorded: from the mode."""
        return str(self.run.plan.get("lanes") or ("hybrid" if self.opts.mode == "hybrid" else "batch"))

    def _hybrid_admits(self) -> bool:
        flex = self._sender("flex")
        unstarted = sum(j.tokens for j in self.jobs.values() if j.lane == "batch" and j.state in UNSUBMITTED)
        return hybrid_admits(unstarted, flex.rate_per_s() * flex.tokens_per_request, self._durations, len(self._created_at))

    async def _poll_due(self, due: list[str], t: _Timers) -> bool:
        """Poll the due jobs at once and set each one's next poll; True when one of them left the enqueued set."""
        if not due:
            return False
        base = self.opts.poll
        before = {name: self.jobs[name].state for name in due}
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = {name: tg.create_task(self.poll(self.jobs[name])) for name in due}
        except ExceptionGroup as eg:  # a poll's own error (a refused key): raised as itself
            raise eg.exceptions[0] from None
        freed = False
        room_wanted = any(j.state == JobState.UPLOADED and j.lane == "batch" for j in self.jobs.values())
        for name in due:
            now_state = self.jobs[name].state
            freed = freed or (before[name] in ACTIVE_STATES and now_state not in ACTIVE_STATES)
            if before[name] in REMOTE_LIVE and now_state not in REMOTE_LIVE and name in self._created_at:
                self._durations.append(self.clock() - self._created_at[name])  # how long a batch job takes, here
            t.interval[name] = next_poll_interval(
                t.interval.get(name, base), tasks[name].result(), base, self.opts.max_poll_interval
            )
            delay = poll_delay(t.interval[name], self._eta(self.jobs[name]), base, room_wanted)
            t.next_poll[name] = self.clock() + delay
            if delay != t.interval[name]:
                t.timed.add(name)
            else:
                t.timed.discard(name)
        return freed

    def _batches_settled(self) -> bool:
        """Every batch job final with no retry due; with a retired model (_collect_only), every job the service
        has is final (those never created stay as they are)."""
        if self.retired is not None or self._capped:  # nothing more is created: the jobs at the service settle it
            return all(j.state in FINAL_STATES | UNSUBMITTED for j in self.jobs.values())
        return all(j.state in FINAL_STATES for j in self.jobs.values()) and not self._retry_pending()

    def _retry_pending(self) -> bool:
        return bool(jobs_to_retry(self.jobs.values(), self.opts.max_attempts, self.run.status == "cancelled"))

    async def create_job(self, job: Job) -> bool:
        """Create the batch job of one uploaded file. False when the service said "not now"."""
        job = self.jobs[job.name]
        if job.lane != "batch" or job.state != JobState.UPLOADED:
            return False  # a Flex lane claimed it since it was chosen: never both (no id paid twice)
        job = self._advance(job, JobState.SUBMITTING, create_sent_at=self.wall())  # the intent, on disk before the call
        self.hook(Hook.AFTER_INTENT)
        try:
            rj = await self.client.create_batch(self.cfg.model, job.remote_file or "", job.display_name)
        except BatchRefusedError as e:
            self._advance(job, JobState.UPLOADED)
            if e.code == 404 and await self._model_shut_down(job, e):
                return False  # nothing more is created or sent: _execute collects what the service has (exit 2)
            raise
        except RemoteError as e:
            if e.code == 429:
                self._advance(job, JobState.UPLOADED)
                return self._create_refused(job, e)
            if e.code in (400, 403) and (e.input_gone if e.input_gone is not None else "file" in str(e).lower()):
                self._log(f"{job.name}: the uploaded file is gone ({e}); uploading again")
                self._advance(self._advance(job, JobState.UPLOADED), JobState.UPLOADING)
                return False
            if e.transient:
                # The create may have gone through, or may still: it stays SUBMITTING (the intent) and is looked
                # for by display name, now and for CREATE_SETTLE_S after (reconcile), before it is sent again.
                now = self.clock()
                self._ambiguous[job.name] = (now, 0, now)
                self._log(f"{job.name}: create answered {e}; looking for it by display name before creating it again")
                await self.reconcile()
                return self.jobs[job.name].state not in (JobState.UPLOADED, JobState.SUBMITTING)
            self._advance(job, JobState.FAILED, error=str(e))
            return True
        self.hook(Hook.AFTER_CREATE)
        self._created_at[job.name] = self.clock()
        self._refused_since = None
        self._refusals.clear()
        self._advance(job, rj.state, remote_job=rj.name)
        self._log(f"{job.name}: created {rj.name} ({job.request_count} requests, ~{job.tokens:,} tokens)")
        return True

    async def _model_shut_down(self, job: Job, e: BatchRefusedError) -> bool:
        """A create answered 404: is the model gone (shut down since the run started: models.get answers 404, or the
        catalog's shutdown date has passed), rather than without a Batch API? Then the run takes the path a resume
        on a retired model takes (self.retired: _collect_only), instead of the fallback's Flex or standard requests,
        each of which would be answered 404 too. A model that is still served keeps the refusal as it was."""
        if self.retired is None:
            try:
                self.retired = await model_retired(self.run, self.client, self._today())
            except RemoteError:  # models.get itself failed: cannot tell, the refusal stands
                return False
            if self.retired is not None:
                self._log(
                    f"{job.name}: create answered {e.code}, and {self.retired.split(' Fix:')[0]} Nothing new is created "
                    "or sent; what the service already has is collected"
                )
        return self.retired is not None

    def _create_refused(self, job: Job, e: RemoteError) -> bool:
        """A create answered 429. With jobs of this run enqueued, that is the enqueued-token limit: wait for
        one to finish. With none enqueued, the job alone does not fit: after SPLIT_AFTER_REFUSALS refusals in a
        row it is split and the limit learned (_split). With none enqueued for longer than --create-timeout,
        waiting will not help (users report persistent 429s under quota): every job not yet created fails, for
        the fallback to finish."""
        now = self.clock()
        if any(x.state in ACTIVE_STATES for x in self.jobs.values()):
            self._refused_since = None
            self._refusals.clear()
            self._log(f"{job.name}: create answered 429 RESOURCE_EXHAUSTED; waiting for capacity")
            return False
        if self._refused_since is None:
            self._refused_since = now
        waited = now - self._refused_since
        refusals = self._refusals[job.name] = self._refusals.get(job.name, 0) + 1
        if waited < self.opts.create_timeout:
            if refusals >= SPLIT_AFTER_REFUSALS and job.request_count > 1:
                # Refused again and again with room for everything it holds: the real limit is below this job
                # (a transient refusal passes within a few tries; the 30-minute give-up below still bounds it all).
                self._split(
                    job,
                    f"a create of ~{job.tokens:,} tokens was refused (429) {refusals} times with nothing of this run enqueued",
                )
                return False
            self._log(f"{job.name}: create answered 429 with nothing of this run enqueued ({waited:.0f} s so far); trying again")
            return False
        reason = (
            f"batch creates refused with 429 for {waited / 60:.1f} min while nothing of this run was enqueued "
            f"(--create-timeout {self.opts.create_timeout:g} s): {e}"
        )
        self._log(reason)
        for j in self._ordered():
            if j.state in UNSUBMITTED and j.lane == "batch":
                self._advance(j, JobState.FAILED, error=reason, no_retry=True)
        self.run.notes["create_refused"] = reason
        self.store.save_run(self.run)
        return True

    def _split(self, job: Job, why: str) -> None:
        """A job the service refused with nothing of this run enqueued is bigger than the account's real
        enqueued-token limit (the one told, or the tier's, was too high): learn a lower limit (half the
        refused size, never below its largest request), and cut the job into parts under it."""
        largest = max((t for _line, t in self._request_sizes(job.request_file)), default=1)
        learned = max(job.tokens // 2, largest)
        if learned < self.limit:
            self.limit = learned
            self.run.plan["effective_limit"] = learned
            self.run.plan["limit_learned"] = f"{learned:,} tokens: {why} ({utcnow()})"
            self.store.save_run(self.run)
            self._log(f"enqueued-token limit lowered to {learned:,}: {why}")
        self._cut_into_parts(job)

    def _split_head(self) -> None:
        """The first job waiting for admission is bigger than the (learned) limit: cut it into parts that fit,
        so admission goes on (only the head: the others are cut when they get there)."""
        for j in self._ordered():
            if j.state in UNSUBMITTED and j.lane == "batch":
                if j.tokens > self.limit and j.request_count > 1 and j.state != JobState.UPLOADING:
                    self._cut_into_parts(j)
                return

    def _request_sizes(self, rel: str) -> Iterator[tuple[bytes, int]]:
        """(raw line, estimated tokens) of each request in a request file, in order (streamed)."""
        cpt = self.run.chars_per_token
        for line in self.request_files.lines(rel):
            tokens = estimate_tokens(request_chars(request_entry(line)[1]), cpt)
            yield (line if line.endswith(b"\n") else line + b"\n"), tokens

    def _cut_into_parts(self, job: Job) -> None:
        """The job ends SPLIT first, recording the cap (the intent: nothing of it can be created any more);
        then its parts are made. A crash in between is mended by repair(), which makes the missing parts
        again: the cut is the same, so no request is ever in two jobs."""
        job = self._advance(
            job, JobState.SPLIT, split_cap=max(1, self.limit), error=f"split into parts of at most {self.limit:,} tokens"
        )
        parts = self._make_parts(job)
        self._log(f"{job.name}: split into {len(parts)} jobs ({', '.join(parts)}), each under {job.split_cap:,} tokens")
        self._wake.set()
        self._demand.set()

    def _make_parts(self, job: Job) -> list[str]:
        """The parts of a SPLIT job, in order, each with its own request file, job and display name; parts
        that exist already are kept as they are. Streams the job's request file twice (sizes, then lines)."""
        sizes = [(len(line), t) for line, t in self._request_sizes(job.request_file)]
        cutter = BatchCutter(len(sizes), job.split_cap, self.opts.max_file_bytes)
        for k, (nbytes, t) in enumerate(sizes):
            cutter.add(k, t, nbytes)
        base, suffix = job.name.split("-")[0], (f"-r{job.attempt}" if job.attempt > 1 else "")
        lines = self._request_sizes(job.request_file)
        names = []
        for k, plan in enumerate(cutter.finish(len(sizes)), 1):
            name = f"{base}.{k}{suffix}"
            names.append(name)
            chunk = itertools.islice(lines, plan.count)
            if name in self.jobs:
                collections.deque(chunk, maxlen=0)
                continue
            rel = f"requests/{name}.jsonl"
            with self.request_files.open(rel, atomic=True) as f:
                for line, _t in chunk:
                    f.write(line)
            part = f"{job.part}.{k}"
            p = Job(
                name=name,
                index=job.index,
                display_name=display_name_for(self.run.name, self.run.run_id, job.index, job.attempt, part),
                request_file=rel,
                request_count=plan.count,
                tokens=plan.tokens,
                bytes=plan.bytes,
                wave=job.wave,
                attempt=job.attempt,
                part=part,
                timestamps={"CREATED": utcnow()},
            )
            self.store.save_job(p)
            self.jobs[name] = p
        return names

    def _eta(self, job: Job) -> float | None:
        """Seconds until a running job should be done, from the progress its batchStats showed so far."""
        if job.state != JobState.RUNNING or not job.stats:
            self._progress.pop(job.name, None)
            return None
        done = job.stats.get("successfulRequestCount", 0) + job.stats.get("failedRequestCount", 0)
        now = self.clock()
        first = self._progress.setdefault(job.name, (now, done))
        return progress_eta(first, (now, done), job.stats.get("requestCount", job.request_count))

    async def poll(self, job: Job) -> bool:
        """One batches.get; True when the job's state moved (progress counts alone do not count: they
        are saved, but a job that is merely progressing keeps backing off, see poll_delay)."""
        try:
            rj = await self.client.get_batch(job.remote_job or "")
            self.hook(Hook.AFTER_POLL)
        except AuthError:
            raise
        except RemoteError as e:
            if e.code == 404:
                return await self._poll_answered_404(job)
            n, since = self._poll_streak(job, "transient" if e.transient else "refused")
            failing_for = self.clock() - since
            patience = self._patience(POLL_SILENCE_S)
            verdict = poll_failure_verdict(e.transient, n, failing_for, patience)
            if verdict == "again":
                self._log(f"{job.name}: poll failed ({e}); will poll again")
                return False
            if verdict == "refused":  # 400/403 on a get, again and again: the job has not ended
                self.halt(poll_refused(job, n, e, self.run.name))
            else:
                self.halt(poll_silent(job, failing_for, e, self.run.name), "the service has not answered for too long")
            if not self._stoppable:  # nothing a stop cancels runs this loop (a cancelled run's polls): end it here
                self._raise_if_stopped()
            return False
        self._poll_streaks.pop(job.name, None)
        if (took := retrieved_state(rj.state, rj.output_file, self.opts.backend == "vertex")) != rj.state:
            if job.state != JobState.SUCCEEDED:
                self._log(
                    f"{job.name}: ended {rj.state} {rj.error or ''} with rows exported to {rj.output_file}: retrieving "
                    "them (they are paid for); only its requests missing from them go again"
                )
            rj = dataclasses.replace(rj, state=took, error=f"ended {rj.state}: {rj.error or 'no reason given'}")
        state = observed_state(job.state, rj.state)
        if state != rj.state:
            self._log(f"{job.name}: the service answered {rj.state} after {job.state} (a stale answer); still {job.state}")
        moved = state != job.state or bool(rj.output_file and not job.output_file)
        if state == JobState.SUCCEEDED and not (rj.output_file or job.output_file):
            moved = self._saved_poll(job, state, rj, moved)
            return self._no_output_yet(self.jobs[job.name]) or moved
        if not moved and rj.stats == job.stats:
            return False
        return self._saved_poll(job, state, rj, moved)

    def _saved_poll(self, job: Job, state: JobState, rj: RemoteJob, moved: bool) -> bool:
        """A poll's answer recorded: the job advanced to `state` with the service's counts, output and error."""
        if state != job.state and state in ENDED_UNFINISHED:
            self._log(f"{job.name}: {state} {rj.error or ''}".rstrip())
        new = advance(
            job, state, utcnow(), stats=rj.stats, output_file=rj.output_file or job.output_file, error=rj.error or job.error
        )
        self.jobs[new.name] = new
        # A state change is saved at once; progress counts alone at most every 10 poll intervals (they
        # are for `status` only, and an fsync per job per poll adds up over 1,000 jobs).
        now = self.clock()
        if moved or now - self._saved_at.get(job.name, -1e18) >= 10 * self.opts.poll:
            self.store.save_job(new)
            self._saved_at[job.name] = now
        return moved

    def _no_output_yet(self, job: Job) -> bool:
        """A job SUCCEEDED at the service that names no output, none found where it was told to write either
        (VertexClient.get_batch looks there): looked for again at each poll, said once, and after OUTPUT_PATIENCE_S
        (x --retry-scale) taken as gone, like an output refused that long: FAILED, its requests sent again (paid
        twice, said loudly). Never a wait without end. True when it was so marked."""
        now = self.clock()
        since = self._no_output_since.setdefault(job.name, now)
        patience = self._patience(OUTPUT_PATIENCE_S)
        if since == now:
            self._log(
                f"{job.name}: SUCCEEDED, but the service names no output for it and none is in its output folder yet; "
                f"looking again at each poll, for up to {patience / 60:.0f} min"
            )
            return False
        if now - since < patience:
            return False
        self._no_output_since.pop(job.name, None)
        self._log(
            f"warning: {job.name}: SUCCEEDED {patience / 60:.0f} min ago by the service's word, but no output of it was "
            "found; its requests go again, and are paid for twice"
        )
        self._advance(job, JobState.FAILED, error=f"SUCCEEDED without any output found for {patience / 60:.0f} min")
        return True

    def _patience(self, seconds: float) -> float:
        """A wait bound (POLL_SILENCE_S, OUTPUT_PATIENCE_S) scaled by --retry-scale, never under a minute: a drill's
        --retry-scale 0 still rides out a blip or a late output."""
        return max(60.0, seconds * self.opts.retry_scale)

    def _poll_streak(self, job: Job, kind: str) -> tuple[int, float]:
        """How many of a job's polls in a row have now answered this `kind` (404, refused, transient), and since when
        (engine clock): any other answer starts the count again, so a job counts as refused, gone or silent only on
        answers in a row."""
        was, n, since = self._poll_streaks.get(job.name, ("", 0, 0.0))
        n, since = (n + 1, since) if was == kind else (1, self.clock())
        self._poll_streaks[job.name] = (kind, n, since)
        return n, since

    async def _poll_answered_404(self, job: Job) -> bool:
        """A job's get answered 404. A job that still runs, answered 404 by a proxy or a routing blip and then
        resubmitted, is paid twice; so it counts as gone (FAILED, and retried) only after POLL_REFUSALS 404s in a
        row and when the service's own list does not show it either. True when it was marked gone."""
        n, _since = self._poll_streak(job, "404")
        if n < POLL_REFUSALS:
            self._log(f"{job.name}: poll answered 404 (not found), {n} of {POLL_REFUSALS} before it counts as gone")
            return False
        try:
            listed = await self.client.list_batches()
        except RemoteError as e:
            self._log(f"{job.name}: poll answered 404 and the list to confirm it failed ({e}); will poll again")
            return False
        if any(r.name == job.remote_job or r.display_name == job.display_name for r in listed):
            self._poll_streaks[job.name] = ("404", 0, self.clock())
            self._log(f"{job.name}: poll answered 404 {n} times but the service lists the job; will poll again")
            return False
        self._advance(job, JobState.FAILED, error=f"the remote job is gone (404 {n} times, and not in the service's list)")
        return True

    async def retrieve(self, job: Job) -> bool:
        """Download, parse and record one finished job's results. False: try again later."""
        try:
            short = self._short_outputs.get(job.name, 0)
            ok, failed, usage = await self._fetch_results(job, expect=0 if short >= SHORT_OUTPUT_ROUNDS - 1 else None)
        except AuthError:
            raise
        except RemoteError as e:
            return await self._download_failed(job, e)
        self._download_failures.pop(job.name, None)
        self._advance(job, JobState.RESULTS_DOWNLOADED, ok=ok, failed=failed, usage=usage)
        return True

    async def _download_failed(self, job: Job, e: RemoteError) -> bool:
        """A failed download of a SUCCEEDED job's output, as download_failure_verdict says: tried again later; taken as
        gone (refused for OUTPUT_PATIENCE_S, or at once when the service says the job ended longer ago than it keeps
        files); or the run stopped, resumably, after failures on the way for POLL_SILENCE_S. Always False."""
        if isinstance(e, ShortOutput):
            self._short_outputs[job.name] = self._short_outputs.get(job.name, 0) + 1
        transient = e.transient or isinstance(e, ShortOutput)
        now = self.clock()
        n, since, refused_at, refusals = self._download_failures.get(job.name, (0, now, None, 0))
        if not transient:
            refused_at, refusals = (now if refused_at is None else refused_at), refusals + 1
            if refusals == RETENTION_LOOK_REFUSALS and await self._ended_before_retention(job):
                refused_at = -math.inf  # an output the service no longer keeps is refused for good: patience spent
        self._download_failures[job.name] = (n + 1, since, refused_at, refusals)
        verdict, delay = download_failure_verdict(
            transient,
            n + 1,
            now - since,
            None if refused_at is None else now - refused_at,
            self.opts.poll,
            self.opts.max_poll_interval,
            self._patience(OUTPUT_PATIENCE_S),
            self._patience(POLL_SILENCE_S),
        )
        if verdict == "gone":
            why = (
                f"the job ended over {OUTPUT_RETENTION_S / 3600:.0f} h ago (the service's endTime), longer than the "
                f"service keeps files, and its output is refused ({n + 1} rounds; last: {e})"
                if refused_at == -math.inf
                else f"it could not be downloaded for {self._patience(OUTPUT_PATIENCE_S) / 60:.0f} min ({n + 1} rounds; last: {e})"
            )
            return await self._output_gone(job, why)
        if verdict == "silent":
            self.halt(download_silent(job, now - since, e, self.run.name), "the service has not answered for too long")
            return False
        self._log(f"{job.name}: output not downloadable yet ({e}); trying again in {delay:.0f} s (the job is paid for)")
        self._download_retry_at[job.name] = now + delay
        return False

    async def _ended_before_retention(self, job: Job) -> bool:
        """Whether the service says the job ended longer ago than it keeps files (OUTPUT_RETENTION_S): a resume days
        later need not wait an hour on an output refused because it was deleted. False when it cannot say, and on
        Vertex (its output is in the user's own bucket: no such retention)."""
        if self.opts.backend == "vertex":
            return False
        try:
            rj = await self.client.get_batch(job.remote_job or "")
        except AuthError:
            raise
        except RemoteError:
            return False
        return rj.ended_at is not None and self.wall() - rj.ended_at > OUTPUT_RETENTION_S

    async def _output_gone(self, job: Job, why: str) -> bool:
        """OUTPUT_PATIENCE_S of refused downloads: ask the service once more for the job (its output may have a new
        name), else the output counts as gone (deleted by retention, a name that never worked): the job FAILED, its
        requests sent again, and said loudly, since its answers were paid for. The other jobs go on meanwhile."""
        try:
            rj = await self.client.get_batch(job.remote_job or "")
        except AuthError:
            raise
        except RemoteError as ge:
            if ge.transient:  # no answer is no proof the output is gone: looked at again, as a poll would be (POLL_SILENCE_S)
                _n, since = self._poll_streak(job, "transient")
                if self.clock() - since >= self._patience(POLL_SILENCE_S):
                    self.halt(poll_silent(job, self.clock() - since, ge, self.run.name))
                self._download_retry_at[job.name] = self.clock() + self.opts.poll
                return False
            rj = None
        self._poll_streaks.pop(job.name, None)
        if rj is not None and rj.output_file and rj.output_file != job.output_file:
            self._log(f"{job.name}: the service names another output for it ({rj.output_file}); downloading that")
            self._advance(job, JobState.SUCCEEDED, output_file=rj.output_file)
            self._download_failures.pop(job.name, None)
            return False
        self._log(
            f"warning: {job.name}: its output {job.output_file} is taken as gone: {why}; its requests go again, and are paid for twice"
        )
        self._advance(job, JobState.FAILED, error=f"output {job.output_file} gone: {why}")
        return True

    async def _fetch_results(self, job: Job, expect: int | None = None) -> tuple[int, int, dict[str, int]]:
        """Stream one finished job's output into its results sidecar in request order; (ok, failed, usage).
        An output with fewer lines than `expect` (None: the job's batchStats, successful + failed, at most its
        requests) raises ShortOutput before anything is written: a download cut short (an empty 200) is not the
        output, and its "missing" ids would be sent again, paid twice.
        Parsing, schema checks and the writes run in worker threads (the event loop stays free for polls and
        admission), a chunk behind the download: the Developer API's one chunk is parsed and written in one go
        after Hook.AFTER_DOWNLOAD, as before. Outputs sorted into the bucket go one job at a time (jobs that end
        together would otherwise each hold a run). The job's output is only read: a crash or an error before
        the sidecar is whole leaves the job SUCCEEDED, to be retrieved again from the same output."""
        sink, name = self._results_sink(job)
        run_bytes = RESULT_RUN_BYTES if isinstance(sink, GsResults) else 1 << 62
        why = f"missing from the output of {job.remote_job}"
        if (job.error or "").startswith("ended "):  # ended FAILED/EXPIRED/CANCELLED with part of its rows exported
            why = f"not answered before its batch job {job.error}"
        recorder: list[ResultsRecorder] = []

        def step(chunk: bytes | None, last: bool) -> tuple[int, int, dict[str, int]]:
            if not recorder:
                keys = self._job_keys(job)
                long_at = self.spec.long_context_threshold
                recorder.append(ResultsRecorder(ExternalSorter(sink, name, run_bytes), keys, self._line_result, long_at))
            if chunk:
                recorder[0].add(chunk)
            if not last:
                return 0, 0, {}
            vertex = self.opts.backend == "vertex"  # its reader drops unlabeled and torn lines: counts never match
            want = expected_output_lines(job.stats, len(recorder[0].keys)) if expect is None and not vertex else expect or 0
            if recorder[0].pos < want:
                recorder[0].discard()
                raise ShortOutput(f"output {job.output_file}: {recorder[0].pos} line(s), batchStats counts {want}", 0)
            return recorder[0].finish(lambda n: orjson.dumps(result_record(n, None, why, "batch"), option=NL))

        pending: bytes | None = None
        async with self._sorting if isinstance(sink, GsResults) else contextlib.nullcontext():
            stream = self.client.download(job.output_file or "")
            try:
                async for chunk in stream:
                    if pending is not None:
                        await asyncio.to_thread(step, pending, False)
                    pending = chunk
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            self.hook(Hook.AFTER_DOWNLOAD)
            done = await asyncio.to_thread(step, pending, True)
        if recorder and recorder[0].unattributed:
            self._log(
                f"{job.name}: {recorder[0].unattributed} output line(s) of {job.remote_job} carry no key, and the output "
                f"({recorder[0].pos} lines for {len(recorder[0].keys)} requests) is not in request order line for line: "
                "they cannot be told apart, so their ids count as missing from the output"
            )
        return done

    def _job_keys(self, job: Job) -> range | list[int]:
        """The ordinals a job was sent, in request order: a primary job's range less the fetch failures in it
        (its requests need not be read), a retry's or a split part's from its request file."""
        if (keys := job.primary_range) is not None:
            failed = {n for n, _r, _raw in self._results_lines(self.store.fetch_errors_path) if n in keys}
            return [n for n in keys if n not in failed] if failed else keys
        return [int(request_entry(line)[0]) for line in self.request_files.lines(job.request_file)]

    @functools.cached_property
    def _bucket_results(self) -> GsResults | None:
        """A Vertex run keeps its primary results in its staging bucket (docs/VERTEX_NOTES.md C2); None: files."""
        settings = vertex_settings(self.opts) if self.opts.backend == "vertex" else None
        return GsResults(vertex_results_prefix(settings[2], self.store.name), settings[0]) if settings else None

    def _results_sink(self, job: Job) -> tuple[ResultsSink, str]:
        """Where a job's results sidecar is, and its name there: a Vertex run's primary job in the bucket (named
        as the job, display name); the rest (and results written before they moved there) in results/."""
        local = LocalResults(self.store.dir / "results")
        if self._bucket_results is None or job.primary_range is None or local.exists(job.name):
            return local, job.name
        return self._bucket_results, job.display_name

    def _results_exist(self, job: Job) -> bool:
        sink, name = self._results_sink(job)
        return sink.exists(name)

    def _results_whole(self, job: Job) -> bool:
        """Whether a job's results sidecar is there and whole: in the bucket, there (an object is written whole or
        not at all); a file, one whole line per result recorded (ok + failed; a cut file has fewer or a torn one)."""
        sink, name = self._results_sink(job)
        if not isinstance(sink, LocalResults):
            return sink.exists(name)
        return _newlines(sink.path(name)) == (job.ok + job.failed or job.request_count, True)

    def _primary_lines(self, job: Job | None) -> io.BufferedReader | io.BytesIO | Generator[bytes, None, None]:
        """A primary job's results lines as bytes, from a file or streamed from the bucket; none if the job has not
        downloaded them or they are gone. Closable (merge closes it). Not a generator for a file: merge reads every
        line through it, and each generator level costs per line."""
        if job is None or job.state != JobState.RESULTS_DOWNLOADED:
            return io.BytesIO()
        sink, name = self._results_sink(job)
        if isinstance(sink, LocalResults):
            path = sink.path(name)
            return open(path, "rb") if path.exists() else io.BytesIO()
        return self._bucket_lines(sink, name)

    @staticmethod
    def _bucket_lines(sink: ResultsSink, name: str) -> Generator[bytes, None, None]:
        try:
            yield from sink.lines(name)
        except RemoteError as e:
            if e.code != 404:
                raise

    def _line_result(self, n: int, obj: dict[str, Any], source: str) -> dict[str, Any]:
        if "response" in obj and isinstance(obj["response"], dict):
            resp = obj["response"]
            usage = {k: v for k, v in (resp.get("usageMetadata") or {}).items() if isinstance(v, int)}
            value, err = parse_answer(resp, self.cfg.schema, self.cfg.accept_truncated)
            return result_record(n, value, err, source, usage or None)
        e = obj.get("error") or obj.get("status") or {}
        msg = e.get("message", "unknown error") if isinstance(e, dict) else str(e)
        code = e.get("code") if isinstance(e, dict) else None
        return result_record(n, None, f"{msg} (code {code})", source)

    # -- resolution and merge ------------------------------------------------------------------
    def _ranges(self) -> list[tuple[int, int, int]]:
        return [(i + 1, s, e) for i, (s, e, *_rest) in enumerate(self.run.plan["batch_ranges"])]

    def _overrides(self) -> dict[int, dict[str, Any]]:
        """Results from retry jobs and the real-time path (small: only what batch left undone)."""
        out: dict[int, dict[str, Any]] = {}
        for j in self._ordered():
            if j.primary_range is None and j.state == JobState.RESULTS_DOWNLOADED:
                for n, r, _raw in self._results_lines(self.store.result_path(j)):
                    out[n] = merge_choice(out.get(n), r)
        for path in (self.store.realtime_path, self.store.fetch_errors_path):
            for n, r, _raw in self._results_lines(path):
                out[n] = merge_choice(out.get(n), r)
        return out

    @staticmethod
    def _results_lines(path: Path) -> Iterator[tuple[int, dict[str, Any], bytes | None]]:
        """A results file's lines in file order: (ordinal, result, the raw line if merge may splice it).

        A line can be spliced into the output as it is when it is one whole line of our own layout
        (RESULT_KEYS in that order, nothing else, "n" an int); anything else is re-encoded.
        """
        if path.exists():
            with open(path, "rb") as f:
                yield from Engine._parse_results(f)

    @staticmethod
    def _parse_results(lines: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any], bytes | None]]:
        """The parsing of _results_lines, for lines from anywhere (the caller closes them)."""
        loads = orjson.loads
        for line in lines:
            try:
                r = loads(line)
                n = r["n"]
            except (orjson.JSONDecodeError, TypeError, KeyError):
                continue  # a blank or torn line (or no result line at all): that request is simply not done
            ours = type(n) is int and tuple(r) == RESULT_KEYS and line.startswith(b'{"n":') and line.endswith(b"\n")
            yield n, r, line if ours else None

    def _batches(self) -> Iterator[tuple[int, int, int, Job | None]]:
        """Each batch of the plan in input order: (index, first ordinal, end ordinal, its primary job if made)."""
        primary = {j.index: j for j in self.jobs.values() if j.primary_range is not None}
        for idx, s, e in self._ranges():
            yield idx, s, e, primary.get(idx)

    def resolve(self, skip: Collection[int] = ()) -> Iterator[tuple[int, dict[str, Any] | None, bytes | None]]:
        """Every ordinal in input order with its best result so far (None: no result yet); the ranges of the
        batches numbered in `skip` are left out.

        The third item is the primary results line the result came from, unchanged (None when the
        result came from elsewhere or was re-decided): merge splices it instead of re-encoding.
        """
        overrides = self._overrides()
        for idx, s, e, j in self._batches():
            if idx not in skip:
                with contextlib.closing(self._primary_lines(j)) as lines:
                    yield from self._resolve_range(s, e, j, self._parse_results(lines), overrides)

    @staticmethod
    def _resolve_range(
        s: int, e: int, j: Job | None, lines: Iterator[tuple[int, dict[str, Any], bytes | None]], overrides: dict[int, Any]
    ) -> Iterator[tuple[int, dict[str, Any] | None, bytes | None]]:
        """resolve() for the ordinals s..e-1 of one batch, `lines` its primary job's (parsed) results lines.

        A primary results file is in request order (ascending ordinals), so it is read alongside the
        range; a line found ahead of its place (an ordinal with no line, or a file out of order) waits
        in a small per-batch dict.
        """
        ahead: dict[int, tuple[int, dict[str, Any], bytes | None]] = {}
        ended = j is not None and j.state in ENDED_UNFINISHED
        for n in range(s, e):
            best: dict[str, Any] | None = None
            raw: bytes | None = None
            got = ahead.pop(n, None) if ahead else None
            if got is None:
                for got in lines:
                    if got[0] == n:
                        break
                    ahead[got[0]] = got
                else:
                    got = None
            if got is not None:
                best, raw = got[1], got[2]
            o = overrides.get(n) if overrides else None
            if o is not None:
                chosen = merge_choice(best, o)
                if chosen is not best:
                    best, raw = chosen, None
            if best is None and ended:
                assert j is not None
                best = result_record(n, None, f"batch job {j.name} ended {j.state}: {j.error or 'no detail'}", "batch")
            yield n, best, raw

    def unresolved(self) -> set[int]:
        """Ordinals with no good result that a request can still mend (a page that could not be fetched has no
        request: its error line is final). A batch whose first attempt answered every request ok has none (an
        ok result is kept whatever else comes for it: merge_choice), so its results are not read back."""
        whole = {
            j.index
            for j in self.jobs.values()
            if j.primary_range is not None and j.state == JobState.RESULTS_DOWNLOADED
            if j.failed == 0 and j.ok == j.request_count
        }
        return {n for n, r, _raw in self.resolve(whole) if r is None or (r["status"] != "ok" and r.get("source") != "fetch")}

    def merge(self) -> Summary:
        """Write the results file: exactly one line per input id, in input order."""
        out = out_location(self.run.out, self.opts.project)
        tally = MergeTally(self.spec.long_context_threshold, schema_categoricals(self.cfg.schema))
        self.mend_prepared(requests=False)
        try:
            self._write_results(out, tally)
        except OutWriteError as e:
            name = self.run.name
            raise OutWriteError(
                f"{e}. Fix: the results are kept in run {name!r}'s sidecars: mend the bucket's permissions and "
                f"`batchify resume {shlex.quote(name)}`, or write them elsewhere, `batchify resume {shlex.quote(name)} --out FILE` (`batchify "
                f"results {name}` prints them).",
                code=e.code,
            ) from e
        tally.sum_usage()
        finished = (
            all(j.state in FINAL_STATES for j in self.jobs.values())
            and tally.ok + tally.err == self.run.records
            and not tally.kinds.get(NO_ANSWER)  # requests with no answer yet: resume (any form of it) sends them
        )
        status = "cancelled" if self.run.status == "cancelled" else ("done" if finished else "interrupted")
        billed: dict[str, int] = {}
        for j in self.jobs.values():
            add_usage(billed, j.usage)
        summary = tally.summary(self.run.name, str(out), self.run.records, status, self.spec, billed)
        self.run.summary = summary.to_dict()
        st = out.stat()
        self.run.summary["out_stat"] = [st.st_size, st.st_mtime_ns]  # how `results` knows the file is still this run's
        self.run.summary["fields"] = tally.fields  # the closing analytics, with no second read of the results file
        self.run.status = status
        self.store.save_run(self.run)
        return summary

    def _write_results(self, out: Path, tally: MergeTally) -> None:
        """merge's pass: one line per input id, in input order, to the results file (results_writer); resolve()'s
        choices, each batch through _splice_in_order as far as its results file allows (nearly always all of it)."""
        hook, overrides = self.hook, self._overrides()
        keys = sorted(k for k in overrides if isinstance(k, int | float) and k == k)  # those an ordinal can equal
        with open(self.store.ids_path, "rb") as ids, results_writer(out) as f:
            write, add = f.write, tally.add
            for _idx, s, e, j in self._batches():
                with contextlib.closing(self._primary_lines(j)) as lines:
                    start, rest = s, iter(lines)
                    if bisect.bisect_left(keys, s) == bisect.bisect_left(keys, e):  # no override in this range
                        start, rest = self._splice_in_order(s, e, rest, ids, write, tally)
                    for n, r, raw in self._resolve_range(start, e, j, self._parse_results(rest), overrides):
                        id_line = next(ids, None)
                        if id_line is None:
                            raise self._ids_mismatch("fewer")
                        r = r or NO_RESULT
                        if raw is not None:  # as _splice_in_order
                            write(b'{"id":' + id_line.rstrip(b"\r\n") + b"," + raw[raw.index(b",", 5) + 1 :])
                        else:
                            write(merged_line(id_line, r))
                        add(r)
                        if n & 15 == 0:
                            hook(Hook.MERGE)
                            if n & 4095 == 0:
                                tally.sum_usage()
            if next(ids, None) is not None:
                raise self._ids_mismatch("more")

    def _ids_mismatch(self, which: str) -> StateError:
        return StateError(
            f"{self.store.ids_path}: {which} ids than the run's {self.run.records} records (changed while merging?). "
            "Fix: run the command again (a damaged ids.jsonl is rebuilt from the input)"
        )

    def _splice_in_order(
        self, n: int, e: int, lines: Iterator[bytes], ids: Iterator[bytes], write: Callable[[bytes], Any], tally: MergeTally
    ) -> tuple[int, Iterator[bytes]]:
        """Merge's fast path. A primary results file of a batch no other result overrides is, nearly always, one line
        of our own layout per ordinal in order, so each line is written as it is read: the id's bytes (ids.jsonl holds
        each id JSON-encoded) spliced before the result's bytes, no decode and encode again, no generator or tuple
        between, the analytics counted on the way (MergeTally). What resolve() would decide for such lines is exactly
        this; at the first line that is not that (torn, out of order, another layout) it stops and returns the ordinal
        it reached and the lines left, that line first, for resolve's general path. What it buys: a sixth of merge's
        instructions (callgrind, bench/merge.py's 50k lines: 37.4k a line through the general path alone, 30.9k with
        it); with the tally counted in bulk, merge went from 1.44x to 1.16x the floor's instructions."""
        loads, add, hook = orjson.loads, tally.add, self.hook
        fields_of, combos, plain, usages = tally.fields_of, tally.combos, tally.plain, tally.pending["batch"]
        for line in lines:
            try:  # the line is ours as _parse_results has it, and the next in order
                r = loads(line)
                if (
                    (m := r["n"]) != n
                    or type(m) is not int
                    or tuple(r) != RESULT_KEYS
                    or not line.startswith(b'{"n":')
                    or not line.endswith(b"\n")
                    or n >= e
                ):
                    return n, itertools.chain((line,), lines)
            except (orjson.JSONDecodeError, TypeError, KeyError):  # torn, not an object, no "n"
                return n, itertools.chain((line,), lines)
            id_line = next(ids, None)
            if id_line is None:
                raise self._ids_mismatch("fewer")
            write(b'{"id":' + id_line.rstrip(b"\r\n") + b"," + line[line.index(b",", 5) + 1 :])
            counted = r["status"] == "ok" and r["source"] == "batch"  # here, as MergeTally's docstring says
            if counted:
                try:
                    key = fields_of(r["result"])
                    if (c := combos.get(key)) is not None:
                        combos[key] = c + 1
                    elif plain(key):
                        combos[key] = 1
                    else:
                        counted = False
                except (TypeError, KeyError):  # no object, a key left out, a list (unhashable)
                    counted = False
            if not counted:
                add(r)
            elif usage := r["usage"]:
                usages.append(usage)
            if n & 15 == 0:
                hook(Hook.MERGE)
                if n & 4095 == 0:
                    tally.sum_usage()
            n += 1
        return n, iter(())

    # -- real time ---------------------------------------------------------------------------------
    def _requests(self, only: set[int] | None, files: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any], int]]:
        cpt = self.run.chars_per_token
        names = files or primary_request_files(self.run.plan["batch_ranges"], only)
        for rel in names:
            if not self.request_files.exists(rel):
                continue  # a range of fetch failures only
            for line in self.request_files.lines(rel):
                key, req = request_entry(line)
                n = int(key)
                if only is None or n in only:
                    yield n, req, estimate_tokens(request_chars(req), cpt)

    async def send_requests(self, only: set[int] | None, tier: str = "standard", files: list[str] | None = None) -> None:
        """Send requests through generateContent: at the standard tier, or through Flex (`serviceTier: flex`,
        the batch price, minutes of latency, requests shed with 503 or 429 under load). Every caller of one
        tier shares its RequestSender: one pair of RPM/TPM buckets, one in-flight gate, one progress view.

        Each result is appended to realtime.jsonl as it arrives; ids already there are never sent again.
        Asked to stop (GracefulStop), it sends nothing more and returns once those already sent are answered.
        """
        if self.stopping:
            return
        service = "flex" if tier == "flex" else "standard"
        done = self._answered()
        # A counting pass first (request files stream; nothing is kept): how many, how many tokens.
        count = tokens = long_docs = long_tokens = 0
        long_at = self.spec.long_context_threshold or 1 << 62
        for n, _req, t in self._requests(only, files):
            if n not in done:
                count += 1
                tokens += t
                if t > long_at:
                    long_docs, long_tokens = long_docs + 1, long_tokens + t
        sender = self._sender(tier)
        self.rt_view = sender.view
        if not count:
            return
        if self.opts.max_cost is not None:
            est = cost_usd(self.spec, expected_usage(self.cfg, self.spec, tokens, count, (long_docs, long_tokens)), service)
            spent = self._batch_spent() + sum(x.view.cost_usd for x in self._senders.values())
            if spent + est > self.opts.max_cost:
                raise CostCapError(
                    f"{usd(spent)} spent and {tier} for {count} more request(s) at about {usd(est)} ({service} price) would "
                    f"pass --max-cost {usd(self.opts.max_cost)}; none of those was sent. Fix: resume with a higher "
                    f"--max-cost (`batchify resume {shlex.quote(self.run.name)} --max-cost N`)."
                )
        sender.view.total += count
        repair_jsonl_tail(self.store.realtime_path)
        gave_up = sender.gave_up
        with open_private(self.store.realtime_path, "ab") as out:
            await sender.send_all((item for item in self._requests(only, files) if item[0] not in done), out)
        self._report()
        if sender.gave_up > gave_up:
            self._log(
                f"{sender.gave_up - gave_up} request(s) got no answer in all their tries ({tier} shed or throttled them, "
                f"or the network failed): `batchify resume {shlex.quote(self.run.name)}` sends them again"
            )
        if sender.capped:
            v = sender.view
            raise CostCapError(
                f"stopped at --max-cost {usd(self.opts.max_cost or 0)}: {v.done} of {v.total} real-time request(s) "
                f"sent ({usd(v.cost_usd)}). Every result so far is saved; `batchify resume {shlex.quote(self.run.name)} "
                "--max-cost N` with a higher cap sends the rest."
            )

    def _answered(self) -> set[int]:
        """Ordinals already answered through generateContent (realtime.jsonl): read from disk once per engine,
        then kept up to date by the senders as they write (a hybrid run drains many batches: one read, not one
        per batch)."""
        if self._answered_ids is None:
            self._answered_ids, self._rt_errors = set(), set()
            for n, r, _raw in self._results_lines(self.store.realtime_path):
                if answered_result(r):
                    self._answered_ids.add(n)
                    (self._rt_errors.add if r.get("status") != "ok" else self._rt_errors.discard)(n)
        return self._answered_ids

    def _sender(self, tier: str) -> RequestSender:
        if tier not in self._senders:
            self._senders[tier] = RequestSender(self, tier)
        return self._senders[tier]


def rpm_bucket(rpm: float, window: float, clock: Callable[[], float], sleep: Callable[[float], Awaitable[Any]]) -> RateLimiter:
    """The real-time path's requests bucket: paced at 99% of the limit from the first request (no burst at the start:
    a process started again mid-window must not burst into what the one before it used), time lost later (a late
    wake-up, a busy loop) made up by up to a 50th of it at once, and a ledger that never lets a window pass 98% of
    it, less a quarter second's worth (at most a tenth) where windows are short (tests and benches scale a minute
    down): requests reach the service later than they were granted, by up to ~0.25 s under load. bench/realtime.py
    (10 s windows, so 97.5%): 0.975 of the limit, no 429; a bucket of one with no ledger lost every late wake-up for
    good (0.86); with a burst at the start, a 99% cap drew 20 429s and 98% five."""
    return RateLimiter(
        rpm * 0.99 / window, max(2.0, rpm * 0.02), clock, sleep, window, rpm * max(0.9, min(0.98, 1 - 0.25 / window)), initial=1.0
    )


def tpm_bucket(tpm: float, window: float, clock: Callable[[], float], sleep: Callable[[float], Awaitable[Any]]) -> RateLimiter:
    """The real-time path's tokens bucket (binding when requests are large): paced at 97%, time lost made up by up
    to a tenth of the limit, never over 98% of it in any window."""
    return RateLimiter(tpm * 0.97 / window, tpm * 0.1, clock, sleep, window, tpm * 0.98)


class RequestSender:
    """Sends requests through generateContent at one tier for one engine: the RPM/TPM buckets (GCRA; the TPM
    one keeps a ledger of its last window: time lost is made up, a refused attempt given back), an
    in-flight gate, the retry policy (a shed or throttled request slows every request down: AIMD), and the
    progress view. For Flex the gate is sized by Little's law from the latency measured (requests take
    minutes, so the pipe holds thousands), never above the open-file limit's share; for the standard tier it
    is --concurrency. Requests stream from their files: memory is bounded by the gate, not by the run."""

    def __init__(self, engine: Engine, tier: str):
        self.engine, self.tier = engine, tier
        self.flex = tier == "flex"
        self.source = "flex" if self.flex else "standard"  # results say which tier (and price) answered
        self.service = "flex" if self.flex else "standard"
        opts = engine.opts
        self.window = opts.rate_window
        limits = realtime_limits(engine.spec, opts.tier, opts.rpm, opts.tpm)
        self.rpm, self.tpm = limits["rpm"], limits["tpm"]
        self.rpm_l = rpm_bucket(self.rpm, self.window, engine.clock, engine.sleep)
        self.tpm_l = tpm_bucket(self.tpm, self.window, engine.clock, engine.sleep) if self.tpm else None
        self.policy = RetryPolicy(attempts=opts.max_attempts, base=0.5, cap=30.0, deadline=3_600.0)
        self.throttled_policy = dataclasses.replace(self.policy, attempts=opts.max_attempts * 4)
        self.ceiling = max(opts.concurrency, in_flight_ceiling())
        self.latency = flex_latency_estimate(0.0, self.window) if self.flex else 1.0  # seconds; then as measured
        self.tokens_per_request = max(1.0, engine.run.plan.get("input_tokens", 0) / max(1, engine.run.records))
        self.gate = Gate(self._target() if self.flex else opts.concurrency)
        self.view = RealtimeView(lane="flex" if self.flex else "real time")
        self.recent: collections.deque[tuple[float, int]] = collections.deque()
        self.recent_tokens = 0
        self.capped = False
        self._reported = 0.0
        self.queued = 0  # requests holding a gate slot but waiting for the RPM/TPM buckets
        self.window_counts = [engine.clock(), 0, 0]  # this rate window's start, attempts sent, attempts shed
        self.latency_max = 0.0
        self.sending = 0  # requests sent and not answered yet (what a graceful stop waits for)
        self.gave_up = 0  # requests whose tries all ended with no answer (NO_ANSWER): resume sends them again
        self._unsent: set[asyncio.Task[Any]] = set()  # requests waiting for the buckets or to retry: not sent

    def _count_attempt(self, now: float) -> None:
        w = self.window_counts
        if now - w[0] >= self.window:
            w[:] = [now, 0, 0]
        w[1] += 1

    def _shedding(self) -> bool:
        """Count a shed attempt; True when sustained shedding (over 20% of at least 20 attempts this window)
        says Flex is at capacity. Random sheds (Google's best effort: a few %) arrive minutes before the answers
        that would restore a rate cut for each of them, so they must not cut it."""
        w = self.window_counts
        w[2] += 1
        return w[1] >= 20 and w[2] > 0.2 * w[1]

    def _buckets(self) -> list[RateLimiter]:
        return [self.rpm_l] if self.tpm_l is None else [self.rpm_l, self.tpm_l]

    def rate_per_s(self) -> float:
        """Requests per second the limits allow (RPM, or TPM over the tokens a request takes, if lower)."""
        per_s = self.rpm_l.rate
        if self.tpm_l is not None:
            per_s = min(per_s, self.tpm_l.rate / self.tokens_per_request)
        return per_s

    def _target(self) -> int:
        return flex_in_flight(self.rate_per_s(), self.latency, self.engine.opts.concurrency, self.ceiling)

    def backlog_seconds(self) -> float:
        """How long the requests already queued at the RPM/TPM buckets keep them busy: the Flex lanes claim
        another batch when this runs low (the pipe stays full, and no more of the queue is taken than that)."""
        return self.queued / max(1e-9, self.rate_per_s())

    async def send_all(self, items: Iterable[tuple[int, dict[str, Any], int]], out: Any) -> None:
        """Send every item (ordinal, request, tokens), each as soon as the gate has a slot; returns when all
        are answered (or given up on). Stops taking new ones at --max-cost, and when the run is asked to stop."""
        capped = self.engine.opts.max_cost is not None
        async with asyncio.TaskGroup() as tg:
            for n, req, t in items:
                if capped and not self.engine._cost_allows(t, 1, self.service):  # with the requests in flight, scaled
                    self.capped = True  # the rest stays unsent; resume with a higher --max-cost sends it
                    break
                if self.engine.stopping or self.engine.retired is not None:  # (the model shut down mid-run)
                    break
                await self.gate.acquire()
                if self.engine.stopping:  # asked to stop while waiting for a slot
                    self.gate.release()
                    break
                tg.create_task(self._send(n, req, t, out))

    def drop_unsent(self) -> None:
        """The run is asked to stop: the requests not sent yet (queued at the buckets, waiting to retry) are
        dropped (a cancelled task ends without a result line: resume sends them); those sent are waited for."""
        for task in list(self._unsent):
            task.cancel()

    async def _send(self, n: int, req: dict[str, Any], t: int, out: Any) -> None:
        """One request, its result appended to realtime.jsonl. An error that ends the run (the key refused, the disk
        refusing the write) halts it: the other requests in flight are answered and saved first (Engine.halt)."""
        try:
            r = await self._one(n, req, t)
            if r is None:  # not sent (the run is stopping): resume sends it
                return
            out.write(orjson.dumps(r, option=NL))
            out.flush()
        except (BatchifyError, OSError) as e:
            self.engine.halt(e, halt_reason(e))
            return
        finally:
            self.gate.release()
        if answered_result(r):
            self.engine._answered().add(n)
            (self.engine._rt_errors.add if r["status"] != "ok" else self.engine._rt_errors.discard)(n)
        else:
            self.gave_up += 1
        if self.engine.stopping:
            self.engine.stop.kept += 1
        v = self.view
        v.done += 1
        v.errors += r["status"] != "ok"
        u = r.get("usage") or {}
        v.cost_usd += request_cost(self.engine.spec, u, self.service)
        now = self.engine.clock()
        self.recent.append((now, u.get("promptTokenCount", t)))
        self.recent_tokens += self.recent[-1][1]
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent_tokens -= self.recent.popleft()[1]
        v.rpm = len(self.recent) * 60.0 / self.window
        v.tpm = self.recent_tokens * 60.0 / self.window
        v.in_flight = self.gate.used
        self.engine.hook(Hook.AFTER_REALTIME)
        if now - self._reported >= 0.5:
            self._reported = now
            self.engine._report()

    def _backoff(self, e: RemoteError, attempt: int, started: float, granted: float, t: int) -> tuple[float, bool] | None:
        """After a refused or failed attempt: None to give up, else (the delay, whether this request sleeps it:
        a 429 pauses the buckets for every request instead)."""
        throttled = e.code == 429  # over the rate limit: the whole window is full
        # Flex sheds with 503 at capacity (and now and then); an overloaded pool answers 500/504 too (seen by the
        # adversarial pass): all three get the shed budget, not the few tries of a real error
        shed = self.flex and e.code in (500, 503, 504)
        policy = self.throttled_policy if throttled or shed else self.policy
        delay = retry_delay(e, attempt, policy, self.engine.clock() - started, random.random())
        if delay is None:
            return None
        delay *= self.engine.opts.retry_scale
        self.view.retries += 1
        if throttled:  # every request waits out the window and the rate drops (AIMD: x0.8, once a window)
            self.view.throttled += 1
            if self.tpm_l is not None:  # the server did not count the refused attempt: neither do we
                self.tpm_l.give_back(granted, t)
            for bucket in self._buckets():  # both: TPM is the binding one when requests are large
                bucket.slow_down(0.8, once_per=self.window)
                bucket.pause(delay)
            return delay, False
        if shed:  # this request backs off; when over a fifth of this window's attempts were shed, the
            self.view.shed += 1  # rate drops too (AIMD, once a window): a shed now and then is not a signal
            if self._shedding():
                for bucket in self._buckets():
                    bucket.slow_down(0.8, once_per=self.window)
        return delay, True

    def _given_up(self, n: int, e: RemoteError, attempt: int) -> dict[str, Any]:
        """The result of a request whose tries are spent: a shed, a throttle or a network error to the end is no
        answer (NO_ANSWER: resume sends it again); a timed-out one is not sent again by this process (the service
        may yet answer, and bill, it: no retry batch, no fallback); any other error is its answer."""
        if not e.transient:
            return result_record(n, None, str(e), self.source)
        if e.timed_out:
            self.engine._timed_out.add(n)
        return result_record(n, None, f"{NO_ANSWER} (after {attempt} tries; resume sends it again): {e}", self.source)

    async def _one(self, n: int, req: dict[str, Any], t: int) -> dict[str, Any] | None:
        """One request's result, through its retries; None when the run was asked to stop before it was sent."""
        attempt = 0
        started = self.engine.clock()
        me = asyncio.current_task()
        assert me is not None
        while True:
            if self.engine.stopping:
                return None
            attempt += 1
            granted = await self._through_buckets(me, t)
            if self.engine.stopping or self.engine.retired is not None:  # (the model found shut down meanwhile)
                return None
            if self.engine.opts.max_cost is not None and not self.engine._cost_allows(t, 1, self.service):
                self.capped = True  # answers that came in while it waited at the buckets (or to retry) reached the cap
                return None  # not sent: resume with a higher --max-cost sends it
            sent = self.engine.clock()
            self._count_attempt(sent)
            self.sending += 1
            try:
                resp = await self.engine.client.generate(self.engine.cfg.model, req, flex=self.flex)
            except AuthError:
                raise
            except RemoteError as e:
                if account_refusal(e):  # every request would get it: stop, not an error recorded against each id
                    self.engine.halt(account_refused(e, self.engine.run.name))
                    return None  # not answered: resume sends it
                # A Flex request unanswered after FLEX_TIMEOUT_S may yet be answered and billed: not sent again now
                # (that paid up to 3x, no result), but a NO_ANSWER that resume sends again, once asked to
                backoff = None if (self.flex and e.timed_out) else self._backoff(e, attempt, started, granted, t)
                if backoff is None:
                    return self._given_up(n, e, attempt)
                if self.engine.stopping:
                    return None  # to be tried again, so not answered: resume sends it
                if backoff[1]:  # this request waits (a throttle pauses the buckets instead)
                    self._unsent.add(me)
                    try:
                        await self.engine.sleep(backoff[0])
                    finally:
                        self._unsent.discard(me)
                continue
            finally:
                self.sending -= 1
            self._answered_after(sent)
            return self.engine._line_result(n, {"response": resp}, self.source)

    async def _through_buckets(self, me: asyncio.Task[Any], t: int) -> float:
        """Wait for the RPM and TPM buckets (meanwhile the request is unsent: a stop drops it); the TPM bucket's grant."""
        self.queued += 1
        self._unsent.add(me)
        try:
            await self.rpm_l.acquire(1)
            return await self.tpm_l.acquire(t) if self.tpm_l is not None else 0.0
        finally:
            self._unsent.discard(me)
            self.queued -= 1
            if self.flex and self.backlog_seconds() < 2 * self.engine.opts.poll:
                self.engine._flex_wake.set()  # the Flex lanes may claim another batch now

    def _answered_after(self, sent: float) -> None:
        """An answer came: the buckets recover, and for Flex the gate follows the latency measured (Little's law: the
        longest seen, not an average, and never below the target's middle: the first answers back are the quick
        ones, and a gate sized for them would leave the buckets idle while the slow ones are still out)."""
        for bucket in self._buckets():
            bucket.recover()
        if self.flex:
            self.latency_max = max(self.latency_max, max(0.0, self.engine.clock() - sent))
            self.latency = flex_latency_estimate(self.latency_max, self.window)
            self.gate.resize(self._target())


def in_flight_ceiling(reserve: int = 256) -> int:
    """Requests in flight at most: each is a socket (HTTP/1.1 through aiohttp), so the open-file limit minus a
    reserve for the run's own files, and never above 20,000."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1_000
    if soft == resource.RLIM_INFINITY:
        return 20_000
    return max(64, min(20_000, soft - reserve))


async def cancel_run(store: RunStore, client: Backend, settle_polls: int = 5) -> list[str]:
    """Cancel every remote job of a run that is still live, then read each one's state back: a job that
    finished before the cancel reached it keeps its results, which are downloaded now. One still
    cancelling remotely keeps its state, marked as cancelled by the user: `resume` (or `run` again) polls it
    to its end and downloads its results if it finished after all. Cancelled jobs are never retried."""
    engine = Engine(store, client)
    if engine.run.status == "done":
        return []  # finished: nothing to cancel, and its state stays as it is
    await engine.reconcile(settle=False)  # no waiting out a resumed create's window: cancel answers at once
    engine.run.status = "cancelled"
    store.save_run(engine.run)
    cancelled = []
    live = []
    for j in engine._ordered():
        if j.state in REMOTE_LIVE and j.remote_job:
            with contextlib.suppress(RemoteError):
                await client.cancel_batch(j.remote_job)
            live.append(engine._advance(j, j.state, cancelled_by_user=True))
        elif j.state in UNSUBMITTED:
            engine._advance(j, JobState.CANCELLED, cancelled_by_user=True)
            cancelled.append(j.name)
    for round_ in range(settle_polls):  # the service takes a moment to cancel (CANCELLING reads as RUNNING)
        for j in live:
            await engine.poll(engine.jobs[j.name])
        live = [j for j in live if engine.jobs[j.name].state in REMOTE_LIVE]
        if not live:
            break
        await engine.sleep(min(2.0, engine.opts.poll) * (round_ + 1))
    await engine._sweep_orphans()  # a create taken as not done (cancel waits out no settle window) listed by now: cancelled
    for j in engine._ordered():
        if j.cancelled_by_user and j.state in REMOTE_LIVE | {JobState.CANCELLED} and j.name not in cancelled:
            cancelled.append(j.name)
        elif j.state == JobState.SUCCEEDED and j.output_file:  # finished before the cancel reached it: paid for, kept;
            await engine.retrieve(j)  # or cancelled after exporting rows (Vertex: billed), kept: the rest are not sent
            if j.cancelled_by_user and (j.error or "").startswith(f"ended {JobState.CANCELLED}"):
                cancelled.append(j.name)
    return cancelled


def _check_cleanable(store: RunStore, run: Run, out: Path, local: bool) -> bool:
    """cleanup's preconditions, UsageError naming the fix unless met: nothing left at the service undownloaded, the
    run finished and merged, its results file whole. Whether that file was replaced by another run's (out_replaced)."""
    pending = [j.name for j in store.load_jobs() if j.state in REMOTE_LIVE or j.state == JobState.SUCCEEDED]
    if pending:
        raise UsageError(
            f"run {store.name!r}: job(s) {', '.join(pending)} finished (or are still ending) at the service and their "
            f"output is not downloaded yet: deleting it would lose paid results. Fix: `batchify resume {shlex.quote(store.name)}` first."
        )
    if run.status not in ("done", "cancelled") or not out.exists():
        raise UsageError(
            f"run {store.name!r} is not finished (status {run.status}); its results are not all merged. "
            f"Fix: `batchify resume {shlex.quote(store.name)}` first."
        )
    if local and store.name.lower() in RESERVED_RUN_NAMES:  # a legacy_run in the folder of in-memory runs' records
        raise UsageError(
            f"run {store.name!r} (named by an older batchify) lives in {store.dir}, the folder that also holds the records "
            "and results files of runs given in memory: --local would delete theirs too. Fix: clean up without --local, "
            f"then delete the run's own files there (run.json, jobs/, requests/, results/, ids.jsonl) yourself."
        )
    replaced = out_replaced(run, out)  # the run's own results are then in its sidecars (and bucket) alone
    if local and replaced:
        raise UsageError(
            f"{out} is not the results file run {store.name!r} wrote (it changed since: another run given the same --out, "
            f"or an edit), so the run's state folder holds the only copy of its results and --local would delete it. Fix: "
            f"keep them first, `batchify results {shlex.quote(store.name)} > {store.name}-results.jsonl` (printed from the state "
            f"folder), then clean up without --local, or delete {store.dir} yourself once they are safe."
        )
    lines = None if replaced else sum(1 for _ in out.open("rb"))
    if lines is not None and lines != run.records:
        raise UsageError(
            f"{out} has {lines} lines for {run.records} records. Fix: `batchify resume {shlex.quote(store.name)}` "
            "to merge again before cleaning up."
        )
    return replaced


async def cleanup_run(store: RunStore, client: Backend, local: bool = False) -> dict[str, int]:
    """Delete a finished run's remote jobs and files (and, with local, its state folder).

    Refuses while any result is missing: a run's remote output is the only copy until merged. When the results
    file is no longer the one the run wrote (out_replaced: another run given the same --out), a Vertex run's
    results objects in the bucket are kept (counts["kept"] = 1): with its sidecars, they are its results' only
    copy, which `batchify results RUN` prints."""
    import shutil

    run = store.load_run()
    out = out_location(run.out, run.run_options.project)
    replaced = _check_cleanable(store, run, out, local)
    counts = {"jobs": 0, "files": 0, "kept": 0}
    requests = run_requests(store, client)  # request objects prepare streamed to the bucket: deleted once, below
    for j in store.load_jobs():
        if j.remote_job:
            with contextlib.suppress(RemoteError):  # already gone is fine
                await client.delete_batch(j.remote_job)
                counts["jobs"] += 1
        for f in {j.remote_file, j.output_file} - {None}:
            if requests.owns(str(f)):
                continue
            with contextlib.suppress(RemoteError):
                await client.delete_file(str(f))
                counts["files"] += 1
    with contextlib.suppress(RemoteError):
        counts["files"] += await requests.delete_all()
    if (vertex := vertex_settings(run.options)) is not None and replaced:  # the only copy of its primary results
        counts["kept"] = 1
    elif vertex is not None:  # the primary results kept in the bucket: this run's (named by its jobs), no other's
        with contextlib.suppress(RemoteError):  # of the name (another state dir's) under the same results/ folder
            await client.delete_file(
                f"{vertex_results_prefix(vertex[2], store.name)}/{display_name_prefix(store.name, run.run_id)}*"
            )
    run.summary = {**run.summary, "cleaned_at": utcnow()}
    store.save_run(run)
    if local:
        shutil.rmtree(store.dir)
    return counts


# ================================================================================================
# 9. Queries: merged results, analytics, status (read-only, no remote calls)
# ================================================================================================


def out_replaced(run: Run, out: Path) -> bool:
    """Whether the results file at `out` is no longer the one the run last merged (summary.out_stat, its size and
    mtime then): another run given the same --out, or an edit. False when it is gone or the run never merged."""
    was = run.summary.get("out_stat")
    if was is None or not out.exists():
        return False
    st = out.stat()
    return bool(was != [st.st_size, st.st_mtime_ns])


def merge_run(state_dir: str | Path, name: str) -> Summary:
    """Write (again) a run's results file from its sidecars alone: no network."""
    return _offline_engine(state_dir, name).merge()


def _offline_engine(state_dir: str | Path, name: str, strict: bool = False) -> Engine:
    """An engine with no client, to read a run's sidecars (ids.jsonl mended first). `strict`: StateError, naming
    them and the fix, when results sidecars the run downloaded are gone or cut short (their answered ids would read
    "no result"); else merge makes do with what is there, as its callers in the library expect."""
    engine = Engine(RunStore(state_dir, name), None)
    engine.mend_prepared(requests=False)
    lost = [j for j in engine._ordered() if strict and j.state == JobState.RESULTS_DOWNLOADED and not engine._results_whole(j)]
    if lost:
        names = ", ".join(str(engine.store.result_path(j)) for j in lost[:5]) + (
            f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
        )
        raise StateError(
            f"run {name!r}: {len(lost)} results sidecar(s) gone or cut short: {names}; their answered ids would read "
            f"'no result'. Fix: `batchify resume {shlex.quote(name)}` downloads them again from the service (and rewrites the results file)."
        )
    return engine


@dataclass(frozen=True)
class Result:
    """One line of a results file, typed."""

    id: Any
    status: str
    result: Any
    error: str | None
    source: str
    usage: dict[str, int] | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def iter_sidecar_results(state_dir: str | Path, name: str, strict: bool = False) -> Iterator[dict[str, Any]]:
    """A run's result lines rebuilt from its sidecars alone (ids and results files), in input order, without
    touching its merged output file (`strict`: see _offline_engine)."""
    engine = _offline_engine(state_dir, name, strict)
    with open(engine.store.ids_path, "rb") as ids:
        for (_n, r, _raw), id_line in zip(engine.resolve(), ids, strict=True):
            r = r or {"status": "error", "result": None, "error": "no result (run not finished)", "source": "none", "usage": None}
            yield {"id": orjson.loads(id_line), **{k: r.get(k) for k in RESULT_KEYS[1:]}}


def iter_results(state_dir: str | Path, name: str) -> Iterator[Result]:
    """A run's merged results in input order, as Result objects (streamed from the results file; merged first
    when it is missing, or, while a live process holds the run, read from the sidecars without writing; read from
    the sidecars too when the file is no longer the one this run wrote: another run given the same --out)."""
    run = RunStore(state_dir, name).load_run()
    out = out_location(run.out, run.run_options.project)
    rows: Iterable[dict[str, Any]] | None = None  # None: the results file itself
    if out_replaced(run, out):
        rows = iter_sidecar_results(state_dir, name)  # streamed: nothing of this run is written
    elif not out.exists():
        with reader_lock(state_dir, name) as free:
            if free:
                merge_run(state_dir, name)
            else:
                rows = list(iter_sidecar_results(state_dir, name))
    for d in rows if rows is not None else iter_jsonl(out):
        yield Result(d["id"], d["status"], d.get("result"), d.get("error"), d.get("source", "batch"), d.get("usage"))


def schema_categoricals(schema: dict[str, Any] | None) -> dict[str, list[Any]]:
    """The enum and boolean fields of a schema (top level, and arrays of enums): what analytics counts."""
    out: dict[str, list[Any]] = {}
    for key, prop in ((schema or {}).get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        items = prop.get("items") if prop.get("type") == "array" and isinstance(prop.get("items"), dict) else None
        src = items or prop
        if "enum" in src:
            out[key] = list(src["enum"])
        elif src.get("type") == "boolean":
            out[key] = [True, False]
    return out


def analytics(state_dir: str | Path, name: str) -> dict[str, Any]:
    """Counts of every enum/boolean schema field, errors by kind, tokens and cost of one run."""
    run = RunStore(state_dir, name).load_run()
    spec = run_model_spec(run, run.updated_at[:10])  # the prices of the day the run was last worked on, as Engine.spec
    fields = schema_categoricals(run.config.get("schema"))
    dist: dict[str, dict[str, int]] = {k: {} for k in fields}
    errors: dict[str, int] = {}
    sources: dict[str, int] = {}
    usage: dict[str, dict[str, int]] = {"batch": {}, "realtime": {}, "flex": {}}
    total = ok = 0
    for r in iter_results(state_dir, name):
        total += 1
        sources[r.source] = sources.get(r.source, 0) + 1
        bucket = "realtime" if r.source in ("realtime", "standard") else "flex" if r.source == "flex" else "batch"
        add_usage(usage[bucket], r.usage)
        long_usage(usage[bucket], [r.usage], spec.long_context_threshold)
        if not r.ok:
            kind = error_kind(r.error)
            errors[kind] = errors.get(kind, 0) + 1
            continue
        ok += 1
        if isinstance(r.result, dict):
            for k in fields:
                v = r.result.get(k)
                for item in v if isinstance(v, list) else [v]:
                    label = json_label(item)
                    dist[k][label] = dist[k].get(label, 0) + 1
    cost_b = cost_usd(spec, usage["batch"], "batch")
    cost_r = cost_usd(spec, usage["realtime"], "standard")
    cost_f = cost_usd(spec, usage["flex"], "flex")
    return {
        "run": name,
        "records": total,
        "ok": ok,
        "errors": total - ok,
        "error_kinds": errors,
        "sources": sources,
        "fields": dist,
        "usage": usage,
        "cost_usd": {
            "batch": round(cost_b, 6),
            "flex": round(cost_f, 6),
            "realtime": round(cost_r, 6),
            "total": round(cost_b + cost_r + cost_f, 6),
        },
    }


def closing_analytics(state_dir: str | Path, summary: Summary) -> dict[str, Any]:
    """What a run's closing report shows (fields and error kinds), as its merge counted them (run.json): the
    results file is not read again (on gs:// a download of all of it). A run merged before the merge counted
    them: analytics() over the results file."""
    fields = RunStore(state_dir, summary.run).load_run().summary.get("fields")
    if not isinstance(fields, dict):
        return analytics(state_dir, summary.run)
    return {"fields": fields, "error_kinds": summary.error_kinds}


def json_label(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def run_sync(coro: Awaitable[Any], stop: GracefulStop | None = None) -> Any:
    """Run a coroutine from sync code, also where an event loop already runs (Jupyter, IPython: on a thread of its
    own). An interrupt there (KeyboardInterrupt: the kernel's interrupt) never leaves the run going on behind the
    caller's back, holding its lock: with `stop`, the run stops as a first Ctrl-C stops the CLI's (the requests in
    flight answered and saved; a second interrupt stops it at once), else at once; then KeyboardInterrupt."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    box: dict[str, Any] = {}
    started, finished = threading.Event(), threading.Event()  # waited on, never Thread.join: an interrupted join
    # marks a live thread stopped (CPython 3.11, bpo-45274's handler releases the lock its thread still holds)

    async def main() -> Any:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        return await coro

    def target() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as e:
            box["error"] = e
        finally:
            started.set()
            finished.set()

    t = threading.Thread(target=target, name="batchify-sync", daemon=True)
    t.start()
    try:
        finished.wait()
    except KeyboardInterrupt:
        started.wait()
        _stop_sync_run(finished, box, stop)
        raise
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _stop_sync_run(finished: threading.Event, box: dict[str, Any], stop: GracefulStop | None) -> None:
    """run_sync was interrupted: ask the run's loop to stop it (gracefully with `stop`; a second interrupt, or no
    `stop`: its task cancelled) and wait until its thread has finished."""
    loop, task = box.get("loop"), box.get("task")
    if loop is None or task is None:
        finished.wait()
        return
    try:
        if stop is None:
            raise KeyboardInterrupt
        with contextlib.suppress(RuntimeError):  # the loop has closed: the run ended meanwhile
            loop.call_soon_threadsafe(stop.request)
        finished.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)
        finished.wait()


def run_status(state_dir: str | Path, name: str | None = None) -> dict[str, Any]:
    """Where every run (or one run's jobs) stands: reads sidecars only, never the network."""
    names = [name] if name else list_runs(state_dir)
    runs = []
    for nm in names:
        store = RunStore(state_dir, nm)
        try:
            run = store.load_run()
            jobs = store.load_jobs()
        except StateError as e:
            if name:  # the one run asked for: its error, with the path and a fix
                raise
            runs.append({"name": nm, "status": "broken", "error": str(e)})  # the others are still listed
            continue
        entry = run_entry(run, jobs)
        entry["status"] = shown_status(store, run)
        if name:
            expiry = None if run.run_options.backend == "vertex" else BATCH_EXPIRY_S  # Vertex: 72 h queued, 24 h running
            entry["job_list"] = [job_entry(j, expiry) for j in jobs]
        runs.append(entry)
    return {"state_dir": str(state_dir), "runs": runs}


@contextlib.contextmanager
def reader_lock(state_dir: str | Path, name: str) -> Iterator[bool]:
    """The run's lock (<state_dir>/.locks/<run>, as run, resume, cancel and cleanup take it) for a reader about to
    write the run's files (results merging a missing results file): True while held; False when a live process
    holds the run, whose run.json and results file the reader must then leave alone (it may print the sidecars)."""
    with RunLock(Path(state_dir) / ".locks" / name) as lock:
        try:
            lock.acquire("results")
        except LockedError:
            yield False
            return
        yield True


def shown_status(store: RunStore, run: Run) -> str:
    """A run's status as `status` and `list` show it: "running" only while a process holds the run (its lock);
    a run whose sidecars say running but whose process is gone (a SIGKILL, an OOM kill, a reboot) is
    "interrupted", as `resume` will find it."""
    if run.status == "running" and RunLock(store.state_dir / ".locks" / store.name).held() is False:
        return "interrupted"
    return run.status


STATUS_PLAN_KEYS = (
    "batches",
    "waves",
    "input_tokens",
    "enqueued_limit",
    "estimated_cost_usd",
    "estimated_cost_realtime_usd",
    "effective_limit",
    "limit_learned",
)


def run_entry(run: Run, jobs: list[Job]) -> dict[str, Any]:
    """One run in `status`: its progress by job state, its plan's headline figures, its batch usage and cost."""
    counts: dict[str, int] = {}
    usage: dict[str, int] = {}
    for j in jobs:
        counts[str(j.state)] = counts.get(str(j.state), 0) + 1
        add_usage(usage, j.usage)
    return {
        "name": run.name,
        "status": run.status,
        "records": run.records,
        "rejected": run.rejected,
        "model": run.config.get("model"),
        "mode": run.run_options.mode,
        "backend": backend_words(run),
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "out": run.out,
        "jobs": len(jobs),
        "job_states": counts,
        "plan": {k: run.plan.get(k) for k in STATUS_PLAN_KEYS},
        "batch_usage": usage,
        "batch_cost_usd": round(cost_usd(run_model_spec(run, run.updated_at[:10]), usage, "batch"), 6),
        "summary": run.summary,
    }


def job_entry(j: Job, expiry_s: float | None = None) -> dict[str, Any]:
    """One job in `status RUN`: waves numbered from 1, as the table and the progress bars show them; `expiry_s`: how
    long the backend lets a job stay at the service before it ends it EXPIRED (None: no one figure, Vertex)."""
    return {
        "name": j.name,
        "wave": j.wave + 1,
        "state": str(j.state),
        "requests": j.request_count,
        "done": j.done,
        "ok": j.ok,
        "failed": j.failed,
        "tokens": j.tokens,
        "remote_job": j.remote_job,
        "lane": j.lane,
        "attempt": j.attempt,
        "error": j.error,
        "since": j.timestamps.get(str(j.state)),
        "at_service_since": min((j.timestamps[k] for k in ("PENDING", "RUNNING") if k in j.timestamps), default=None),
        "expires_after_s": expiry_s,
    }


# ================================================================================================
# 10. Library API: prepare, submit, run_file, resume, cancel, cleanup, results (async and *_sync)
# ================================================================================================


@contextlib.asynccontextmanager
async def _closing(client: GeminiClient, emu: Emulator | None) -> Any:
    """Yield a client; close it, and stop the emulator started for it, however the block ends."""
    try:
        yield client
    finally:
        await client.close()
        if emu is not None:
            await emu.stop()


@contextlib.asynccontextmanager
async def open_client(
    endpoint: str | None,
    api_key: str | None,
    emulator_config: EmulatorConfig | None = None,
    need: bool = True,
    retry_scale: float = 1.0,
    options: RunOptions | dict[str, Any] | None = None,
) -> Any:
    """Yield a client (None when no key and none is needed). "local" starts the emulator in this event loop.
    `options` (a run's): with backend "vertex", a VertexClient (open_vertex_client)."""
    if vertex_settings(options) is not None:
        async with open_vertex_client(endpoint, options, emulator_config, retry_scale) as vx:
            yield vx
        return
    emu = None
    base_url = endpoint
    if endpoint == "local":
        emu = Emulator(emulator_config)
        base_url = await emu.start()
        api_key = api_key or "local-emulator"
    if api_key is not None and not isinstance(api_key, str):
        raise UsageError(f"api_key must be a str, not {type(api_key).__name__}. Fix: pass api_key='...' (the key's text).")
    if not api_key:
        if need:  # the library's words (it reads no environment); the CLI's main() says which variable to set
            raise NoApiKeyError(
                "no API key: the library reads no environment. Fix: pass api_key=... (e.g. "
                "api_key=os.environ['GEMINI_API_KEY']), or endpoint='local' for the built-in emulator."
            )
        yield None
        return
    client = GeminiClient(api_key, base_url if base_url and base_url != "local" else None, retry_scale=retry_scale)
    async with _closing(client, emu) as c:
        yield c


def vertex_settings(options: RunOptions | dict[str, Any] | None) -> tuple[str, str, str] | None:
    """(project, location, bucket) of a run on --backend vertex, None for the Gemini API; a UsageError naming
    what is missing. Only the options count (the CLI's flags take GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION)."""
    o = options.to_dict() if isinstance(options, RunOptions) else dict(options or {})
    if o.get("backend", "gemini") != "vertex":
        return None
    project = o.get("project") or ""
    location = o.get("location") or ""
    bucket = o.get("bucket") or ""
    missing = [n for n, v in (("--project", project), ("--location", location), ("--bucket", bucket)) if not v]
    if missing:
        raise UsageError(
            f"--backend vertex needs {', '.join(missing)} (e.g. --project my-proj --location us-central1 --bucket gs://my-bucket)."
        )
    split_gs_uri(bucket)
    return project, location, bucket


@contextlib.asynccontextmanager
async def open_vertex_client(
    endpoint: str | None,
    options: RunOptions | dict[str, Any] | None,
    emulator_config: EmulatorConfig | None = None,
    retry_scale: float = 1.0,
) -> Any:
    """Yield a VertexClient. endpoint: a URL for the Vertex API (an emulator); "local" starts the emulator in
    this event loop, its jobs reading and writing the Cloud Storage emulator at emulator_config.gcs_endpoint
    (the CLI's STORAGE_EMULATOR_HOST, which the client's google-cloud-storage then uses as well)."""
    settings = vertex_settings(options)
    assert settings is not None
    emu = None
    base_url = endpoint
    if endpoint == "local":
        gcs = emulator_config.gcs_endpoint if emulator_config is not None else None
        if not gcs:
            raise UsageError(
                "--endpoint local with --backend vertex needs a Cloud Storage emulator. Fix: start one (e.g. "
                "`gcp-storage-emulator start --in-memory --port 9023`) and set STORAGE_EMULATOR_HOST=http://127.0.0.1:9023."
            )
        emu = Emulator(dataclasses.replace(emulator_config or EmulatorConfig(), gcs_endpoint=gcs))
        base_url = await emu.start()
    client = VertexClient(*settings, base_url=base_url, retry_scale=retry_scale)
    async with _closing(client, emu) as c:
        yield c


_Arg = TypeVar("_Arg", "RunOptions", "JobConfig")


def _typed_arg(value: Any, kind: type[_Arg], arg: str, fn: str) -> _Arg:
    """`options`/`config` as a library function takes it: a RunOptions/JobConfig (None: the defaults), else
    UsageError with the fix (a dict's keys spelled as the call)."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    given = ", ".join(f"{k}={v!r}" for k, v in value.items()) if isinstance(value, dict) else "..."
    raise UsageError(
        f"{fn}: {arg} must be a batchify.{kind.__name__}, not a {type(value).__name__}. "
        f"Fix: {arg}=batchify.{kind.__name__}({given})."
    )


def _state_dir_arg(state_dir: Any, fn: str, make: bool = False) -> Path:
    """The state dir as a Path, made (`make`) when missing; UsageError naming it when it is no folder one can use
    (a file, under one, where nothing can be made), instead of NotADirectoryError/FileNotFoundError from deep in."""
    if not isinstance(state_dir, (str, os.PathLike)):
        raise UsageError(f"{fn}: state_dir must be a path, not a {type(state_dir).__name__}. Fix: state_dir='batch_jobs'.")
    d = Path(state_dir)
    try:
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is not a folder")
        if make:
            private_dir(d)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
            raise  # the system refused a write (no permission, read-only, full): as any write (the CLI's exit 6)
        raise UsageError(
            f"state dir {str(d)!r} cannot be used ({e.strerror or e}). Fix: give a folder you can write (state_dir=, "
            "--state-dir; it is made when missing)."
        ) from None
    return d


RECORDS_FIX = (
    "Fix: pass a file's path as the input (prepare('a.jsonl') or run_file('a.jsonl')), or the records themselves as "
    "a list of dicts (or of http(s) URLs)."
)


def check_records(records: Any) -> None:
    """UsageError for what is no list of records (dicts) or URLs (strings) but would iterate as one: an open file
    (each line taken as a URL), one string (its characters), a path, one dict (its keys), bytes (integers)."""
    if isinstance(records, (str, bytes, bytearray, os.PathLike, dict)) or hasattr(records, "read"):
        what = "an open file" if hasattr(records, "read") else f"one {type(records).__name__}"
        raise UsageError(f"records must be a list of dicts (or URLs), not {what}. {RECORDS_FIX}")
    if not isinstance(records, Iterable):
        raise UsageError(f"records must be a list of dicts (or URLs), not a {type(records).__name__}. {RECORDS_FIX}")


async def run_file(
    input_path: str | Path,
    config: JobConfig | None = None,
    options: RunOptions | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    endpoint: str | None = None,
    api_key: str | None = None,
    reporter: Reporter | None = None,
    confirm: Callable[[Run], bool] | None = None,
    dry_run: bool = False,
    hook: Callable[[Hook], None] | None = None,
    emulator_config: EmulatorConfig | None = None,
    catalog: Catalog | None = None,
    stop: GracefulStop | None = None,
) -> tuple[Run, Summary | None]:
    """Prepare, plan, submit, poll, retrieve and merge one input file (the `run` command's engine).
    `catalog`: the model catalog with the user's overrides (load_catalog); the built-in one by default.
    `stop`: stop.request() ends the run gracefully (Interrupted, once the real-time requests already sent are
    answered and saved; see GracefulStop); cancelling the task stops it at once."""
    if not isinstance(input_path, (str, os.PathLike)):
        raise UsageError(
            f"run_file takes the input file's path (or a gs:// URI), not a {type(input_path).__name__}. Records in "
            "memory: batchify.prepare(records, name=...), then batchify.submit(name)."
        )
    cfg = _typed_arg(config, JobConfig, "config", "run_file")
    opts = _typed_arg(options, RunOptions, "options", "run_file").checked()
    state_dir = _state_dir_arg(state_dir, "run_file", make=True)
    name = run_name_for(state_dir, opts.name, input_path)
    opts = dataclasses.replace(opts, name=name)  # a copy: the caller's options stay as they were
    opts = pin_backend(opts)  # a Vertex run keeps the project, location and bucket it was made with
    store = RunStore(state_dir, name)
    if endpoint == "local" and catalog is not None and catalog.user_models:  # the built-in emulator serves them too
        emulator_config = dataclasses.replace(emulator_config or EmulatorConfig(), models=catalog.user_models)
    with RunLock(store.state_dir / ".locks" / name) as lock:
        await lock.acquire_async("run")  # another process on this run: exit 4 naming it (one rule for run and resume)
        if store.exists():  # the same command again: continue the run it made, or say what differs
            inp = recorded_input(store, input_location(input_path, opts))  # as resume reads it (a gs:// prefix)
            run = _the_same_run_again(store, inp, cfg, opts, endpoint, dry_run, reporter)
            if dry_run or run.status == "done":
                return run, (summary_of(run) if run.status == "done" and run.summary else None)
            if confirm is not None and run.status == "prepared" and not confirm(run):
                raise Declined(f"nothing submitted. `batchify resume {shlex.quote(name)}` submits the prepared run.")
            async with open_client(
                endpoint or run.endpoint, api_key, emulator_config, retry_scale=opts.retry_scale, options=run.options
            ) as client:
                with _progress(reporter) as shown:
                    return run, await Engine(store, client, shown, hook=hook, stop=stop).execute()
        async with open_client(
            endpoint, api_key, emulator_config, need=not dry_run, retry_scale=opts.retry_scale, options=opts
        ) as client:
            run = await prepare_run(store, input_path, cfg, opts, client, endpoint, hook, catalog, dry_run=dry_run)
            if dry_run:
                return run, None
            if confirm is not None and not confirm(run):
                raise Declined(f"nothing submitted. The run is prepared; `batchify resume {shlex.quote(name)}` submits it.")
            assert client is not None
            with _progress(reporter) as shown:
                summary = await Engine(store, client, shown, hook=hook, stop=stop).execute()
            return run, summary


def _the_same_run_again(
    store: RunStore, inp: Path, cfg: JobConfig, opts: RunOptions, endpoint: str | None, dry_run: bool, reporter: Reporter | None
) -> Run:
    """The run an existing run's command given again continues: UsageError when the command differs in what the plan
    depends on (run_differences); its --endpoint and --out taken (_continue_at); the other flags it sets to other
    values said to be not applied (options_not_applied)."""
    name = store.name
    run = store.load_run()
    if diffs := run_differences(run, inp, cfg, opts):
        resume = f"`batchify resume {shlex.quote(name)}`"
        if all(d.startswith("config (") for d in diffs) and _only_defaults(run, cfg):
            raise UsageError(  # the user changed nothing: batchify's defaults did, since an older batchify made the run
                f"a run named {name!r} already exists in {store.state_dir}, and this command differs from it in "
                f"{'; '.join(diffs)}, where this command has this batchify's defaults: either the run was made with other "
                f"defaults (an older batchify) or with flags this command leaves out. Fix: {resume} finishes it as it was "
                "planned (--name NEW would start a new run with these settings, sending every request again)."
            )
        raise UsageError(
            f"a run named {name!r} already exists in {store.state_dir}, and this command differs from it in: "
            f"{'; '.join(diffs)}. Fix: pass --name NEW to start a new run, or {resume} to finish the existing one."
        )
    run = _continue_at(store, run, endpoint, opts.out, inp, dry_run)
    if (ignored := options_not_applied(run.run_options, opts)) and reporter is not None:
        reporter.log(
            f"run {name!r} exists and goes on with its own options: this command's {', '.join(ignored)} "
            f"{'is' if len(ignored) == 1 else 'are'} not applied (`batchify resume {shlex.quote(name)}` takes --poll-interval, "
            "--max-cost and --allow-standard; for other values, start a new run with --name)"
        )
    return run


async def model_retired(run: Run, client: Backend, today: str | None = None) -> str | None:
    """Before a run that was prepared earlier sends more: why its model may take no new requests now (retired by
    the catalog as of `today`, default the real date, or a 404 from models.get), else None. The engine is then
    told so (Engine's `retired`): what is already at the service is still polled, downloaded and merged, and only
    work that needs new sends stops, with exit 2 naming it, instead of failing every request."""
    if run.status in ("done", "cancelled"):
        return None
    spec = run_model_spec(run)
    cat = builtin_catalog()
    try:
        if spec.name in cat.models:
            resolve_model(cat, spec.name, today or utcnow()[:10])  # retired since the run was prepared: UsageError
        await client.get_model(spec.name, replacement=spec.replacement)
    except UsageError as e:
        return str(e)
    return None


# Options that shape what a run sends; the others (polling, rates, cost cap...) may change between tries.
PLAN_OPTIONS = ("id_field", "text_field", "batch_size", "max_file_bytes", "waves", "tier", "enqueued_limit", "margin", "mode")


def _only_defaults(run: Run, cfg: JobConfig) -> bool:
    """Every config field where the command differs from the run is at this batchify's default in the command."""
    old, new, default = JobConfig.from_dict(run.config).to_dict(), cfg.to_dict(), JobConfig().to_dict()
    return all(new[k] == default.get(k) for k in new if old.get(k) != new[k])


def run_differences(run: Run, input_path: Path, cfg: JobConfig, opts: RunOptions) -> list[str]:
    """What differs between an existing run and the same `run` command given again (empty: the same run)."""
    diffs = []
    if Path(run.input_path) != input_path.resolve() or (input_path.exists() and file_sha256(input_path) != run.input_sha256):
        diffs.append("input file (path or content)")
    old = JobConfig.from_dict(run.config).to_dict()
    changed = [k for k, v in cfg.to_dict().items() if old.get(k) != v]
    if changed:
        diffs.append("config (" + ", ".join(changed) + ")")
    was = run.run_options
    changed = [k for k in PLAN_OPTIONS if getattr(was, k) != getattr(opts, k)] + backend_differences(was, opts)
    if changed:
        diffs.append("options (" + ", ".join(f"--{k.replace('_', '-')}" for k in changed) + ")")
    return diffs


NOT_RUN_OPTIONS = frozenset({"name", "out", "calibrate", "fetch", "skip_invalid", "allow_private_urls"})  # or prepare's


def options_not_applied(was: RunOptions, opts: RunOptions) -> list[str]:
    """The flags the same `run` command given again sets (not the default) to other values than the run's own, which
    the run does not take (it goes on with its own; the plan's are refused by run_differences): to be said, not
    silently dropped."""
    default = RunOptions()
    return [
        f"--{k.replace('_', '-')} {getattr(opts, k)}"
        for k in (f.name for f in dataclasses.fields(RunOptions))
        if k not in PLAN_OPTIONS and k not in NOT_RUN_OPTIONS
        if getattr(opts, k) != getattr(default, k) and getattr(opts, k) != getattr(was, k)
    ]


def _continue_at(
    store: RunStore, run: Run, endpoint: str | None, out: str | None, input_path: Path, dry_run: bool = False
) -> Run:
    """The same `run` command again, with an --endpoint or --out of its own: another endpoint is refused while jobs
    live at the run's (endpoint_switch_problem); another --out is checked (check_out) and the results go there from
    now on (a finished run's are merged there at once)."""
    if endpoint is not None and not same_endpoint(endpoint, run.endpoint):
        try:
            jobs: list[Job] | None = store.load_jobs()
        except StateError:  # a damaged job sidecar may be a live job's: the run's own service must mend it first
            jobs = None
        if (problem := endpoint_switch_problem(store.name, run.endpoint, endpoint, jobs)) is not None:
            raise UsageError(problem)
    if out is None or out_uri(out) == run.out:
        return run
    check_out(out, input_path, store, run.run_options.project, probe=not dry_run)
    if dry_run:  # checked, and nothing changed
        return run
    run = dataclasses.replace(run, out=out_uri(out))
    store.save_run(run)
    if run.status == "done":
        merge_run(store.state_dir, store.name)
        run = store.load_run()
    return run


GEMINI_API_URL = "https://generativelanguage.googleapis.com"  # the SDK's own base URL: what no --endpoint means


def same_endpoint(a: str | None, b: str | None) -> bool:
    """Whether two --endpoint values reach the same service: None is Google's own (GEMINI_API_URL); a URL's scheme
    and host are compared without case and without a trailing /."""

    def norm(e: str | None) -> str:
        if e is None or e == "local":
            return e or GEMINI_API_URL
        u = urllib.parse.urlsplit(e.strip())
        return urllib.parse.urlunsplit((u.scheme.lower(), u.netloc.lower(), u.path.rstrip("/"), u.query, ""))

    return norm(a) == norm(b)


def endpoint_switch_problem(name: str, was: str | None, given: str | None, jobs: list[Job] | None) -> str | None:
    """Why a resume may not move to another endpoint, or None. A job created at one service is unknown to another:
    there every poll answers 404, the job counts as gone and is created again, so its ids would be paid twice (the
    first service still runs and bills them). The built-in local emulator's jobs end with its process: no such job.
    `jobs` None: a job sidecar is damaged (it may be a live job's), so the move is refused too."""
    if given is None or same_endpoint(given, was) or was == "local":
        return None
    where = was or "Google's Gemini API (the default endpoint)"
    if jobs is None:
        return (
            f"run {name!r} has a damaged job sidecar, which may be a job still at {where}; resuming at {given} could "
            f"create it again there and pay for its requests twice. Fix: `batchify resume {shlex.quote(name)}` without --endpoint "
            "first (it mends the sidecars against the service that has the jobs)."
        )
    live = [j.name for j in jobs if j.remote_job and j.state in ACTIVE_STATES | {JobState.SUCCEEDED}]
    live += [j.name for j in jobs if j.state == JobState.SUBMITTING and j.name not in live]
    if not live:
        return None
    return (
        f"run {name!r} has {len(live)} job(s) at {where} ({', '.join(live[:3])}{', ...' if len(live) > 3 else ''}); "
        f"resuming at {given} would create them again there and pay for their requests twice. Fix: resume without "
        f"--endpoint (and without GOOGLE_GEMINI_BASE_URL set to another service); to move the run, `batchify cancel {shlex.quote(name)}` "
        "first."
    )


async def resume_run(
    name: str,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    endpoint: str | None = None,
    api_key: str | None = None,
    reporter: Reporter | None = None,
    hook: Callable[[Hook], None] | None = None,
    poll_interval: float | None = None,
    emulator_config: EmulatorConfig | None = None,
    max_cost: float | None = None,
    allow_standard: bool | None = None,
    stop: GracefulStop | None = None,
    out: str | None = None,
) -> Summary:
    """Continue an unfinished run from its sidecars alone (the input is checked against its hash).
    `poll_interval`, `max_cost`, `allow_standard`: given, they replace the run's own from now on. `out`: the
    results go there from now on (the run's own file was moved away, say). `stop`: as for run_file."""
    out = os.fspath(out) if isinstance(out, os.PathLike) else out
    # the overrides are held to the flags' rules before anything is saved (a poll interval of -1 or inf, a cap of -5)
    told = RunOptions(poll_interval=poll_interval, max_cost=max_cost, allow_standard=allow_standard)  # type: ignore[arg-type]
    told = told.checked("resume_run")
    poll_interval, max_cost = told.poll_interval, told.max_cost
    state_dir = _state_dir_arg(state_dir, "resume_run")
    store = RunStore(state_dir, name)
    with RunLock(store.state_dir / ".locks" / name) as lock:
        await lock.acquire_async("resume")
        run = store.load_run()
        was = run.run_options
        inp = recorded_input(store, input_location(run.input_path, was))
        if inp.exists() and file_sha256(inp) != run.input_sha256:
            raise UsageError(
                f"{inp} changed since run {name!r} was prepared (its hash differs). Fix: restore it, "
                "or start a new run with --name."
            )
        run = _continue_at(store, run, endpoint, out, inp)
        if out is None and (moved := out_moved(run.out)) is not None:
            raise UsageError(
                f"run {name!r}: {moved}. Fix: `batchify resume {shlex.quote(name)} --out FILE` says where the results go now."
            )
        endpoint = endpoint or run.endpoint
        poll_interval = poll_interval or (None if was.poll_interval else default_poll_interval(None, endpoint))
        overrides = (("poll_interval", poll_interval), ("max_cost", max_cost), ("allow_standard", allow_standard))
        changed = {k: v for k, v in overrides if v is not None and v != getattr(was, k)}
        if changed:  # what this resume was told overrides the run's own, from now on (other keys kept as they are)
            store.save_run(dataclasses.replace(run, options={**run.options, **changed}))
        scale = was.retry_scale
        async with open_client(endpoint, api_key, emulator_config, retry_scale=scale, options=run.options) as client:
            retired = await model_retired(run, client)
            with _progress(reporter) as shown:
                return await Engine(store, client, shown, hook=hook, stop=stop, retired=retired).execute()


def write_records(records: Iterable[dict[str, Any] | str], path: Path) -> int:
    """Records (dicts) or URLs (strings, which become {"id": url, "url": url}) to a private JSONL file."""
    check_records(records)  # an open file, one dict, a string...: each would iterate as something else
    n = 0
    with open_private(path) as f:
        for r in records:
            try:
                f.write(orjson.dumps({"id": r, "url": r} if isinstance(r, str) else r) + b"\n")
            except TypeError as e:  # a Decimal, a set, an int over 64 bits, a non-string key
                raise InputError(
                    f"record {n + 1} cannot be written as JSON ({e}). Fix: give plain JSON values (str, int, float, bool, "
                    "None, lists, dicts with string keys; big integers as strings)."
                ) from None
            n += 1
    if not n:
        raise InputError("no records given. Fix: pass at least one record or URL.")
    return n


async def prepare(
    source: str | Path | Iterable[dict[str, Any] | str],
    name: str | None = None,
    config: JobConfig | None = None,
    options: RunOptions | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    endpoint: str | None = None,
    api_key: str | None = None,
) -> Run:
    """Validate and plan a run from a file, or from records (dicts) or URLs (strings); nothing is sent (on
    --backend vertex the request files are written to the staging bucket, where the jobs will read them).

    Records given in memory are written to <state_dir>/inputs/<name>.jsonl first. `submit(name)` runs it."""
    opts = dataclasses.replace(_typed_arg(options, RunOptions, "options", "prepare")).checked()
    cfg = _typed_arg(config, JobConfig, "config", "prepare")
    state_dir = _state_dir_arg(state_dir, "prepare", make=True)
    in_memory = not (isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and re.match(r"^https?://", source)))
    if in_memory and not isinstance(source, str):
        check_records(source)  # an open file is no list of URLs (each of its lines was taken as one)
    if in_memory and name is None:
        raise UsageError("records given in memory need a run name. Fix: pass name=...")
    path = Path(state_dir) / "inputs" / f"{name}.jsonl" if in_memory else Path(str(source))
    opts.name = run_name_for(state_dir, name or opts.name, path)
    store = RunStore(state_dir, opts.name)
    # Claim the name first (the lock, then the exists check), and only then write anything of this request:
    # a request that loses the race writes nothing and leaves the holder's run as it was.
    with RunLock(store.state_dir / ".locks" / opts.name) as lock:
        await lock.acquire_async("prepare")
        if store.exists():
            raise UsageError(f"a run named {opts.name!r} already exists in {state_dir}. Fix: pick another name.")
        try:
            if in_memory:
                write_records([source] if isinstance(source, str) else source, path)  # type: ignore[arg-type]
            async with open_client(endpoint, api_key, need=False, retry_scale=opts.retry_scale, options=opts) as client:
                return await prepare_run(store, path, cfg, opts, client, endpoint)
        except BaseException:
            # A refused payload is not kept on disk; a run that was prepared all the same (cancelled as its client
            # closed, after run.json was written) keeps its input: `submit(name)` runs it.
            if in_memory and not store.exists():
                path.unlink(missing_ok=True)
            raise


async def submit(
    name: str,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    endpoint: str | None = None,
    api_key: str | None = None,
    reporter: Reporter | None = None,
    stop: GracefulStop | None = None,
) -> Summary:
    """Submit a prepared run and drive it to the end (the same as resuming it; `stop` as there)."""
    return await resume_run(name, state_dir, endpoint, api_key, reporter, stop=stop)


def results(name: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> list[Result]:
    """A run's results in input order, typed (`[r.to_dict() for r in ...]` for dicts)."""
    return list(iter_results(state_dir, name))


# Thin sync wrappers over the async API, safe in notebooks (where an event loop already runs).
async def cleanup(
    name: str,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    endpoint: str | None = None,
    api_key: str | None = None,
    local: bool = False,
) -> dict[str, int]:
    """Delete a finished run's remote files and jobs (refused while a finished job's output is not downloaded);
    `local=True` also removes its folder. Counts of what was deleted."""
    store = RunStore(_state_dir_arg(state_dir, "cleanup"), name)
    with RunLock(store.state_dir / ".locks" / name) as lock:
        await lock.acquire_async("cleanup")
        if not store.exists() and load_requests_marker(store) is not None:
            return await _cleanup_unfinished_prepare(store, endpoint, local)
        run = store.load_run()
        async with open_client(
            endpoint or run.endpoint, api_key, options=run.options, retry_scale=run.run_options.retry_scale
        ) as client:
            return await cleanup_run(store, client, local)


async def _cleanup_unfinished_prepare(store: RunStore, endpoint: str | None, local: bool) -> dict[str, int]:
    """cleanup of a run folder that holds only a prepare that never finished (no run.json; the requests.json it
    wrote before its first request object): those objects are deleted (with the Vertex project and location the
    marker recorded), then its leftovers (_clear_unfinished_prepare), and the folder itself once empty (with `local`,
    in any case; else the pages it fetched are kept for the next `run`)."""
    import shutil

    bucket, prefix = load_requests_marker(store) or ("", "")
    d = load_json(store.dir / REQUESTS_MARKER)
    project, location = d.get("project"), d.get("location")
    if not (isinstance(project, str) and project and isinstance(location, str) and location):
        raise UsageError(
            f"run {store.name!r} was interrupted while preparing it, and its requests.json (an older batchify's) does not "
            f"say the Vertex project of the request objects it staged, gs://{bucket}/{prefix}*. Fix: run the same "
            f"`batchify run` command again (it deletes them first), or delete them yourself "
            f"(`gcloud storage rm 'gs://{bucket}/{prefix}*'`) and then the folder {store.dir}."
        )
    opts = {"backend": "vertex", "project": project, "location": location, "bucket": f"gs://{bucket}"}
    async with open_client(endpoint, None, options=opts) as client:
        files = await GsRequests(store, client, bucket, prefix).delete_all()
    (store.dir / REQUESTS_MARKER).unlink()
    _clear_unfinished_prepare(store)
    if local:
        shutil.rmtree(store.dir)
    else:
        with contextlib.suppress(OSError):
            store.dir.rmdir()  # empty: nothing of the prepare is left
    return {"jobs": 0, "files": files, "kept": 0}


async def cancel(
    name: str, state_dir: str | Path = DEFAULT_STATE_DIR, endpoint: str | None = None, api_key: str | None = None
) -> list[str]:
    """Cancel a run's live batch jobs (what already finished is kept, and downloaded by `resume`); the names
    of the jobs cancelled."""
    store = RunStore(_state_dir_arg(state_dir, "cancel"), name)
    with RunLock(store.state_dir / ".locks" / name) as lock:
        await lock.acquire_async("cancel")
        run = store.load_run()
        async with open_client(
            endpoint or run.endpoint, api_key, options=run.options, retry_scale=run.run_options.retry_scale
        ) as client:
            return await cancel_run(store, client)


def _sync(fn: Callable[P, Coroutine[Any, Any, T]], name: str) -> Callable[P, T]:
    """The synchronous twin of a library coroutine: the same signature and docstring (help() shows them),
    run with run_sync (so it also works where an event loop already runs: Jupyter, IPython)."""

    takes_stop = "stop" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        stop = None
        if takes_stop:  # an interrupt stops the run gracefully (run_sync), as the CLI's first Ctrl-C does
            given = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
            stop = given.get("stop")
            if stop is None and "stop" not in given:
                stop = kwargs["stop"] = GracefulStop()
        return cast(T, run_sync(fn(*args, **kwargs), stop))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{fn.__doc__ or ''}\n\n(The synchronous form of `{fn.__name__}`.)"
    return call


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a ZMQ shell)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


@contextlib.contextmanager
def _progress(reporter: Reporter | None) -> Iterator[Reporter | None]:
    """The caller's reporter; none given, in a Jupyter kernel: rich progress bars in the notebook (a run takes
    hours: silence looks like a hang). Pass reporter=NullReporter() for none."""
    if reporter is None and in_notebook():
        with RichReporter() as r:
            yield r
    else:
        yield reporter


run_file_sync = _sync(run_file, "run_file_sync")
prepare_sync = _sync(prepare, "prepare_sync")
submit_sync = _sync(submit, "submit_sync")
resume_sync = _sync(resume_run, "resume_sync")
cancel_sync = _sync(cancel, "cancel_sync")
cleanup_sync = _sync(cleanup, "cleanup_sync")


def validate_file(
    path: str | Path,
    cfg: JobConfig | None = None,
    id_field: str = "id",
    text_field: str = "text",
    tier: int = 1,
    enqueued_limit: int | None = None,
) -> dict[str, Any]:
    """The input checks of `run`, alone: nothing is written or sent. Raises InputError listing problems."""
    import tempfile

    cfg = cfg or JobConfig()
    opts = RunOptions(
        id_field=id_field, text_field=text_field, tier=tier, enqueued_limit=enqueued_limit, calibrate=False, fetch=False
    )
    try:
        with tempfile.TemporaryDirectory() as d:
            run = run_sync(prepare_run(RunStore(d, "validate"), path, cfg, opts))  # works under a running loop too
    except InvalidRecords as e:
        raise InputError(e.checked, e.problems) from None
    return {"file": str(path), "records": run.records, "input_tokens": run.plan["input_tokens"], "valid": True}


# ================================================================================================
# 11. Rendering: reports on stdout; progress bars and logs on stderr
# ================================================================================================

_console: Any = None
_report_console: Any = None


class _HangupSafe:
    """A terminal stream that outlives its terminal: a write or flush answered EIO (the SSH session or terminal
    window is gone; its SIGHUP may come a moment later) goes to /dev/null from then on instead of failing the
    run that is saving the answers it paid for. Everything else is the stream's own."""

    def __init__(self, stream: Any):
        self.stream = stream

    def _gone(self, e: OSError) -> None:
        if e.errno != errno.EIO:
            raise e
        self.stream = open(os.devnull, "w")  # kept for the rest of the process

    def write(self, text: str) -> int:
        try:
            return int(self.stream.write(text))
        except OSError as e:
            self._gone(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self._gone(e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def console() -> Any:
    """Progress, logs and prompts: stderr."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(file=cast(Any, _HangupSafe(sys.stderr))) if sys.stderr.isatty() else Console(stderr=True)
    return _console


def report() -> Any:
    """Human reports (status, summaries, analytics, the plan of a dry run): stdout, so `batchify status | grep` works."""
    global _report_console
    if _report_console is None:
        from rich.console import Console

        _report_console = Console()
    return _report_console


def _esc(text: Any) -> str:
    from rich.markup import escape

    return escape(str(text))


def render_plan(run: Run, out: Any = None) -> None:
    """The plan as a table: on stderr before the confirm prompt, on stdout (`out`) for a dry run."""
    from rich.table import Table

    t = Table(title=f"Plan for run {_esc(run.name)}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in plan_rows(run):
        t.add_row(k, _esc(v))
    (out or console()).print(t)
    for w in run.plan.get("warnings") or []:
        (out or console()).print(f"[yellow]warning:[/] {_esc(w)}", soft_wrap=True)
    if run.endpoint == "local":
        (out or console()).print(f"[yellow]{_esc(EMULATOR_LABEL)}[/]")


def plan_rows(run: Run) -> list[tuple[str, str]]:
    """The plan table's rows, in words: what runs, how big, at what limit, for what money and time."""
    p = run.plan
    n = max(1, run.records)
    mode = run.run_options.mode
    hybrid = " (hybrid: more than one wave, so Flex lanes take the tail at the same price)"
    per_wave = f" (jobs per wave: {_short_list(p['jobs_per_wave'])})" if p.get("jobs_per_wave") else ""
    rows = [
        ("endpoint", backend_words(run)),
        ("model", p["model"] + (f" (catalog as of {p['catalog_as_of']})" if "catalog_as_of" in p else "")),
        ("generation", ", ".join(f"{k} {v}" for k, v in (p.get("generation_config") or {}).items()) or "model defaults"),
        ("mode", str(mode) + (hybrid if mode == "auto" and p.get("lanes") == "hybrid" else "")),
        ("records", f"{run.records:,}" + (f" ({run.rejected} rejected)" if run.rejected else "")),
        ("batches", f"{p['batches']:,}" + (f" of up to {p['batch_size_max']:,} requests" if p.get("batch_size_max") else "")),
        ("waves", f"{p['waves']:,}{per_wave}"),
        (
            "per request (est.)",
            f"{p['input_tokens'] // n:,} tokens in; {p.get('expected_output_tokens', 0) // n:,} answer + "
            f"{p.get('expected_thinking_tokens', 0) // n:,} thinking tokens out assumed",
        ),
        (
            "input tokens (est.)",
            f"{p['input_tokens']:,} ({run.chars_per_token:.2f} chars/token, "
            f"{'calibrated with countTokens' if run.calibrated else 'offline estimate'})",
        ),
        *admission_rows(run),
        *_cost_rows(p),
        ("estimated time", p["estimated_time"]),
        ("results file", run.out),
    ]
    return rows


def _limit_words(p: Plan) -> str:
    return (
        f"{p['enqueued_limit']:,} (planning to {p['effective_limit']:,}"
        + (f", margin {p['margin']:.1%})" if "margin" in p else ")")
        + (f"; from {p['enqueued_limit_source']}" if "enqueued_limit_source" in p else "")
    )


def _cost_rows(p: Plan) -> list[tuple[str, str]]:
    """The plan's money rows: the estimate, the same in real time, the limits and prices used, each mode."""
    share = p.get("realtime_share", 0)
    rows = [
        ("estimated cost", f"{usd(p['estimated_cost_usd'])}" + (" batch price" if share == 0 else f" ({share:.0%} real time)")),
    ]
    if "realtime_limits" in p:
        lim = p["realtime_limits"]
        tpm = f"{lim['tpm']:,} TPM" if lim.get("tpm") else "no TPM bucket"
        rows.append(("real-time limits", f"{lim['rpm']:,} RPM ({lim['rpm_source']}); {tpm} ({lim['tpm_source']})"))
    rows.append(("same in real time", f"{usd(p['estimated_cost_realtime_usd'])}"))
    if "prices_per_1m" in p:
        prices = "; ".join(f"{k} {v['input']:g} in, {v['output']:g} out" for k, v in p["prices_per_1m"].items())
        rows.append(("prices used (USD / 1M)", prices))
    rows += [(f"mode {k}", f"{usd(v['cost_usd'])}, {v['time']}") for k, v in p.get("modes", {}).items()]
    return rows


def _short_list(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if len(xs) <= 8 else ", ".join(map(str, xs[:6])) + f", ... ({len(xs)} waves)"


def render_models(catalog: Catalog, today: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Model catalog as of {catalog.as_of} (USD per 1M tokens, standard; batch/flex 50%)", title_justify="left")
    t.add_column("model", no_wrap=True)
    for col in ("status", "in / out", "batch", "flex", "enq. T1", "thinking"):
        t.add_column(col)
    for r in catalog_rows(catalog, today):
        style = {"retired": "dim", "deprecated": "yellow"}.get(r["status"], "")
        status = r["status"] + (f" {r['shutdown']}" if r["shutdown"] else "")
        yes = {True: "yes", False: "no", None: "?"}
        think = "-" if r["thinking"] == "none" else f"{r['thinking']}: {r['thinking_default_sent']}"
        t.add_row(
            _esc(r["model"] + (" *" if r["default"] else "")),
            _esc(status),
            f"{r['input_price']:g} / {r['output_price']:g}",
            yes[r["batch"]],
            yes[r["flex"]],
            _millions(r["enqueued_tokens"].get("tier1")) if r["enqueued_tokens"] else "?",
            _esc(think),
            style=style,
        )
    out = Console()  # a report: stdout
    out.print(t)
    out.print(
        "* the default model. ?: not published by Google (give the figure in a --models file). `--json` shows every source."
    )


class RichReporter:
    """Progress bars: one overall bar, one per live job, one for the real-time path."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console(),
            transient=False,
        )
        self.overall: Any = None
        self.tasks: dict[str, Any] = {}
        self.rt: Any = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        self.progress.console.print(f"[dim]{datetime.now():%H:%M:%S}[/] {_esc(message)}")

    def update(self, view: ProgressView) -> None:
        p = self.progress
        if self.overall is None:
            self.overall = p.add_task(f"[bold]{_esc(view.run)}[/] overall", total=max(1, view.records))
        done = 0
        for j in view.jobs:
            final = j.state in FINAL_STATES
            if j.state == JobState.RESULTS_DOWNLOADED and j.first:
                done += j.total
            live = j.state in ACTIVE_STATES | {JobState.SUCCEEDED}
            if live and j.name not in self.tasks:
                self.tasks[j.name] = p.add_task("", total=max(1, j.total))
            if j.name in self.tasks:
                tid = self.tasks[j.name]
                p.update(
                    tid, description=f"  {_esc(j.name)} w{j.wave + 1} {j.state.lower()}", completed=j.done, total=max(1, j.total)
                )
                if final:
                    p.update(tid, visible=False)
        if view.realtime is not None:
            r = view.realtime
            if self.rt is None:
                self.rt = p.add_task("", total=max(1, r.total))
            p.update(
                self.rt,
                completed=r.done,
                total=max(1, r.total),
                description=(
                    f"  {r.lane} {r.rpm:,.0f} rpm {r.tpm:,.0f} tpm  in flight {r.in_flight:,}  shed {r.shed}  "
                    f"errors {r.errors} retries {r.retries}  {usd(r.cost_usd)}"
                ),
            )
        p.update(self.overall, completed=min(view.records, done + (view.realtime.done if view.realtime else 0)))


def summary_cost(s: Summary) -> str:
    """A run's cost as the closing report says it: the total, then each price lane that was used (batch and Flex at
    the batch price, standard real time at the full one)."""
    lanes = (("batch", s.cost_batch_usd), ("flex", s.cost_flex_usd), ("standard", s.cost_realtime_usd))
    used = [f"{name} {usd(amount)}" for name, amount in lanes if amount > 0]
    return f"{usd(s.cost_batch_usd + s.cost_flex_usd + s.cost_realtime_usd)}" + (f" ({', '.join(used)})" if used else "")


def render_summary(s: Summary) -> None:
    c = report()
    style = "green" if s.errors == 0 else "yellow"
    c.print(f"[{style}]{s.ok:,} ok, {s.errors:,} error(s)[/] of {s.total:,} -> {_esc(s.out)}")
    srcs = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.by_source.items()))
    c.print(
        f"sources: {_esc(srcs)}; tokens in {s.usage.get('promptTokenCount', 0):,} "
        f"out {s.usage.get('candidatesTokenCount', 0) + s.usage.get('thoughtsTokenCount', 0):,}; "
        f"cost {summary_cost(s)}"
    )
    for kind, n in sorted(s.error_kinds.items(), key=lambda kv: -kv[1])[:10]:
        c.print(f"  [red]{n:,}[/] x {_esc(kind)}")


def render_analytics(a: dict[str, Any], totals: bool = True) -> None:
    from rich.table import Table

    c = report()
    for field_name, counts in a["fields"].items():
        t = Table(title=f"{_esc(field_name)}", title_justify="left")
        t.add_column("value")
        t.add_column("count", justify="right")
        t.add_column("share", justify="right")
        total = sum(counts.values()) or 1
        for value, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            t.add_row(_esc(value), f"{n:,}", f"{n / total:.0%}")
        c.print(t)
    if a["error_kinds"]:
        t = Table(title="errors by kind", title_justify="left")
        t.add_column("kind")
        t.add_column("count", justify="right")
        for kind, n in sorted(a["error_kinds"].items(), key=lambda kv: -kv[1]):
            t.add_row(_esc(kind), f"{n:,}")
        c.print(t)
    if not totals:  # the run summary that follows says them
        return
    u = a["usage"]
    c.print(
        f"{a['ok']:,} ok, {a['errors']:,} error(s) of {a['records']:,}; sources "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(a["sources"].items()))
        + f"; tokens in {u['batch'].get('promptTokenCount', 0) + u['realtime'].get('promptTokenCount', 0):,}"
        + f"; cost {usd(a['cost_usd']['total'])} (batch {usd(a['cost_usd']['batch'])}, real time "
        + f"{usd(a['cost_usd']['realtime'])})"
    )


def render_status(data: dict[str, Any], one: bool) -> None:
    from rich.table import Table

    c = report()
    if not data["runs"]:
        c.print(f"no runs in {_esc(data['state_dir'])}")
        return
    t = Table(title=f"Runs in {_esc(data['state_dir'])}", title_justify="left")
    for col in ("run", "status", "records", "jobs", "cost (est.)", "updated"):
        t.add_column(col, no_wrap=col != "run")
    t.add_column("job states", overflow="fold")
    broken = [r for r in data["runs"] if r["status"] == "broken"]
    for r in data["runs"]:
        if r["status"] == "broken":
            t.add_row(_esc(r["name"]), "[red]broken[/]", "", "", "", "", "see below")
            continue
        states = " ".join(f"{k.lower()}:{v}" for k, v in sorted(r["job_states"].items()))
        cost = (
            sum(r["summary"].get(k, 0) for k in ("cost_batch_usd", "cost_flex_usd", "cost_realtime_usd"))
            if r["summary"]
            else r["batch_cost_usd"]
        )
        t.add_row(
            _esc(r["name"]),
            r["status"],
            f"{r['records']:,}",
            str(r["jobs"]),
            f"{usd(cost)} ({usd(r['plan']['estimated_cost_usd'] or 0)})",
            _esc(_age(r["updated_at"])),
            _esc(states),
        )
    c.print(t)
    for r in broken:
        c.print(f"[red]broken:[/] {_esc(r['error'])}", soft_wrap=True)
    if one:
        r = data["runs"][0]
        jt = Table(title=f"Jobs of {_esc(r['name'])}", title_justify="left")
        for col in ("job", "wave", "lane", "state", "done", "ok/failed", "tokens", "since"):
            jt.add_column(col, no_wrap=True)
        jt.add_column("error", overflow="fold")  # remote job names: `status RUN --json`
        for j in r["job_list"]:
            jt.add_row(
                j["name"],
                str(j["wave"]),
                j["lane"],
                j["state"].lower(),
                f"{j['done']}/{j['requests']}",
                f"{j['ok']}/{j['failed']}",
                f"{j['tokens']:,}",
                _esc(_since_words(j)),
                _esc((j["error"] or "")[:80]),
            )
        c.print(jt)
        c.print(f"endpoint: {_esc(r.get('backend') or 'Gemini API')}")
        if r["plan"].get("limit_learned"):
            c.print(f"[yellow]enqueued-token limit learned:[/] {_esc(r['plan']['limit_learned'])}", soft_wrap=True)
        if r["summary"]:
            s = r["summary"]
            c.print(f"results: {s['ok']:,} ok, {s['errors']:,} error(s) -> {_esc(s['out'])}")


def _seconds_ago(ts: str, now: datetime | None = None) -> int | None:
    """Whole seconds from the stamp `ts` to `now` (default: the wall clock); None for a stamp that is no date."""
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(((now or datetime.now(timezone.utc)) - dt).total_seconds())


def _age(ts: str, now: datetime | None = None) -> str:
    """How long ago the stamp `ts` was, as `status` shows it. Never negative: a stamp ahead of `now` (the wall clock
    was set back since it was written: a VM restored from a snapshot, a clock NTP corrected) is "0s ago", and
    says the clock moved when it is more than a minute ahead."""
    if not ts:
        return ""
    sec = _seconds_ago(ts, now)
    if sec is None:
        return ts
    if sec < 0:
        return "0s ago" if sec > -60 else "0s ago (the clock was set back since)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if sec >= size:
            return f"{sec // size}{unit} ago"
    return f"{sec}s ago"


# A batch job pending or running at the service for longer than this ends EXPIRED with no results (Google's batch
# guide, ai.google.dev/gemini-api/docs/batch-mode, as the project's service notes record it; a job's expirationTime
# is its createTime + 48 h).
BATCH_EXPIRY_S = 48 * 3600


def _since_words(j: dict[str, Any], now: datetime | None = None) -> str:
    """A job's "since" in `status`: its age in its state, and, for a job pending or running at the service for
    longer than its backend allows (BATCH_EXPIRY_S on the Developer API), that it has likely expired (the service
    ends it EXPIRED, with no results)."""
    words = _age(j["since"] or "", now)
    at, expiry = j.get("at_service_since"), j.get("expires_after_s")
    if j["state"] in ("PENDING", "RUNNING") and at and expiry and (_seconds_ago(at, now) or 0) > expiry:
        words += f"; at the service over {expiry / 3600:.0f} h: likely EXPIRED"
    return words


# ================================================================================================
# 12. REST API (FastAPI, optional extra "api"): the same engine behind HTTP
# ================================================================================================

REST_MAX_BODY = 32 * 1024**2  # bytes a REST request body may hold (bigger inputs: the CLI, or a file)


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes answers 413 (by Content-Length, or while read)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def _too_large(self, send: Any) -> None:
        body = orjson.dumps({"detail": f"request body over {self.limit:,} bytes: send a file through the CLI, or split it"})
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(send)
        seen = 0
        started = over = False

        async def counted() -> Any:
            nonlocal seen, over
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge
            return msg

        async def tracked(msg: Any) -> None:
            nonlocal started
            if over:  # the app caught _BodyTooLarge and answers itself (FastAPI: 400 "error parsing the body"): 413
                if not started:
                    started = True
                    await self._too_large(send)
                return
            started = started or msg.get("type") == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)


class _BodyTooLarge(Exception):
    pass


class RestError(Exception):
    """An HTTP answer a REST handler gives instead of a result; make_api turns it into JSON."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers


@functools.cache
def _rest_imports() -> Any:
    """The REST API's one guarded import (FastAPI is the optional extra "api"), with its request models.
    Loaded on first use, so the CLI does not pay for FastAPI or pydantic at start."""
    try:
        import fastapi
        import fastapi.exceptions
        import fastapi.responses
        import fastapi.security
        from pydantic import BaseModel, Field
    except ImportError:
        raise UsageError('the REST API needs FastAPI and uvicorn. Fix: pip install -e ".[api]"') from None

    class SubmitUrls(BaseModel):
        urls: list[str] = Field(min_length=1, max_length=1_000_000)
        batch_name: str | None = Field(default=None, pattern=RUN_NAME_RE)

    class SubmitContents(BaseModel):
        contents: list[dict[str, Any]] = Field(min_length=1, max_length=1_000_000)
        batch_name: str | None = Field(default=None, pattern=RUN_NAME_RE)

    class Submitted(BaseModel):
        job_id: str
        batch_name: str
        status: str
        message: str

    return types.SimpleNamespace(
        fastapi=fastapi,
        security=fastapi.security,
        RequestValidationError=fastapi.exceptions.RequestValidationError,
        JSONResponse=fastapi.responses.JSONResponse,
        SubmitUrls=SubmitUrls,
        SubmitContents=SubmitContents,
        Submitted=Submitted,
    )


class RestApi:
    """The REST API's handlers and the work they started: plain methods over the library API, raising
    RestError; make_api wires them to routes. Long work (fetching, batch jobs) runs in tasks this object
    owns; `shutdown` stops them the way Ctrl-C stops the CLI: nothing new is sent, the real-time requests
    already sent are waited for and saved (bounded by their client timeout), the rest is cancelled; each run
    is left "interrupted", to be resumed."""

    def __init__(
        self,
        state_dir: str | Path,
        endpoint: str | None,
        api_key: str | None,
        config: JobConfig | None,
        options: RunOptions | None,
    ):
        self.state_dir, self.endpoint, self.api_key = state_dir, endpoint, api_key
        self.config, self.options = config, options
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.failures: dict[str, RestError] = {}  # a run's work that ended in an error: what status shows
        self.claimed: set[str] = set()  # names taken by a request here (checked and added with no await between)
        self.stops: dict[str, GracefulStop] = {}  # each running run's graceful stop, asked for at shutdown

    async def shutdown(self) -> None:
        """Drain, then cancel: what was paid for is saved before the server goes."""
        live = [t for t in self.tasks.values() if not t.done()]
        for stop in self.stops.values():
            stop.request()
        bound = max((stop.wait_bound() for stop in self.stops.values()), default=0.0)
        if live and bound > 0:
            await asyncio.wait(live, timeout=bound + 5.0)
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _store(self, name: str) -> RunStore:
        return RunStore(self.state_dir, name)

    def _new_name(self, given: str | None) -> str:
        """Claim a run name. A claim lasts while the name's work runs or its run exists; a submission that failed
        before its run existed gave its claim back (status still tells why, until the name is claimed again)."""
        name = given or f"api-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        try:
            check_run_name(name, "batch_name")  # the one rule (the body's pattern has the format alone)
        except UsageError as e:
            raise RestError(422, str(e)) from None
        if name in self.claimed or self._store(name).exists():
            raise RestError(409, f"a run named {name!r} exists already (or is being prepared)")
        self.claimed.add(name)
        self.failures.pop(name, None)
        return name

    def _start(self, name: str, work: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Interrupted:  # stopped as asked (cancel, shutdown): the run's own status says so
                pass
            except asyncio.CancelledError:
                raise
            except Exception as e:  # kept for status: the server goes on
                self.failures[name] = self.answer(e, name)
            finally:
                if not self._store(name).exists():  # failed before its run existed: the name is free again
                    self.claimed.discard(name)

        self.tasks[name] = asyncio.ensure_future(guarded())

    def say(self, text: str) -> str:
        """A message of the engine's in the API's terms: no server path (the state dir's is left out, so a run's
        files read as RUN/run.json), no CLI flag."""
        for where in {str(Path(self.state_dir).resolve()), str(self.state_dir)}:
            text = text.replace(where + os.sep, "").replace(where, "the server's state dir")
        return text.replace("--skip-invalid", "the server's skip_invalid option")

    def answer(self, e: Exception, name: str | None = None) -> RestError:
        """The one mapping of an error to an HTTP answer (make_api's handler for every BatchifyError a route
        raises, and status for a run's work that failed): bad input 422 with its problems; a name or run in use,
        or a run whose state forbids the step (illegal, damaged) 409; the Gemini API unavailable 503, any other of
        its refusals 502; anything else 500. The message is the engine's, without server paths."""
        if isinstance(e, InputError):
            return self._input_error(e, name)
        if isinstance(e, RemoteError):
            return RestError(503 if e.transient else 502, f"the Gemini API: {self.say(str(e))}")
        if isinstance(e, (UsageError, LockedError, StateError, CostCapError, Interrupted)):
            return RestError(409, self.say(str(e)))
        if isinstance(e, BatchifyError):
            return RestError(500, self.say(str(e)))
        return RestError(500, f"{type(e).__name__}: {self.say(str(e))}")

    def _known(self, name: str) -> None:
        if legacy_run(self.state_dir, name):  # a run an older batchify named outside the rule: GET /batch/jobs lists it
            return
        with contextlib.suppress(UsageError):
            check_run_name(name)
            if self._store(name).exists() or name in self.tasks:
                return
        raise RestError(404, f"no run named {name!r}")

    def _input_error(self, e: InputError, name: str | None) -> RestError:
        """The engine's message in the API's terms: no server path (the run's input is "request body"), no CLI flag."""
        dirs = (Path(self.state_dir).resolve(), self.state_dir)
        where = [str(Path(d) / "inputs" / f"{name}.jsonl") for d in dirs] if name else []

        def say(text: str) -> str:
            for w in where:
                text = text.replace(w, "request body")
            return self.say(text)

        return RestError(422, {"message": say(str(e)), "problems": [say(p) for p in e.problems[:100]]})

    async def _prepare(self, name: str, records: list[Any]) -> Run:
        return await prepare(records, name, self.config, self.options, self.state_dir, self.endpoint, self.api_key)

    async def _submit(self, name: str) -> None:
        self.stops[name] = GracefulStop()
        await submit(name, self.state_dir, self.endpoint, self.api_key, stop=self.stops[name])

    async def resume(self, run: str) -> dict[str, Any]:
        """Go on with a run this server is not driving: one a restart left interrupted (SIGTERM stops runs
        gracefully), or a cost cap, a refusal, a crash. 409 while this server drives it; a finished run stays so."""
        self._known(run)
        task = self.tasks.get(run)
        if task is not None and not task.done():
            raise RestError(409, f"run {run!r} is running on this server already")
        status = self._store(run).load_run().status
        if status in ("done", "cancelled"):
            return {"run": run, "status": status, "message": f"the run is {status}: nothing to resume"}
        self.failures.pop(run, None)
        self._start(run, self._submit(run))
        return {"run": run, "status": "submitted", "message": f"resumed. Poll /batch/status/{run}."}

    async def submit_urls(self, urls: list[str], batch_name: str | None) -> dict[str, str]:
        bad = [u for u in urls if not re.match(r"^https?://[^\s/]+", u)]
        if bad:
            raise RestError(422, {"message": "only http(s) URLs", "problems": bad[:20]})
        name = self._new_name(batch_name)

        async def fetch_then_batch() -> None:
            # fetching and planning off the event loop (200k URLs stalled every other client for ~30 s); a failure
            # here: status says why (answer), the name is free again
            await asyncio.to_thread(asyncio.run, self._prepare(name, list(urls)))
            await self._submit(name)

        self._start(name, fetch_then_batch())
        message = f"{len(urls)} URL(s) accepted: fetching, then batch. Poll /batch/status/{name}."
        return {"job_id": name, "batch_name": name, "status": "submitted", "message": message}

    async def submit_contents(self, contents: list[dict[str, Any]], batch_name: str | None) -> dict[str, str]:
        name = self._new_name(batch_name)
        try:  # validation and planning are CPU work: off the event loop, so other clients are not stalled
            run = await asyncio.to_thread(asyncio.run, self._prepare(name, contents))
        except BaseException as e:  # no run was made: the name is free again (the answer: make_api's, from answer())
            self.claimed.discard(name)
            if isinstance(e, InputError):
                raise self._input_error(e, name) from None
            raise
        self._start(name, self._submit(name))
        message = (
            f"{run.records} record(s) in {run.plan['batches']} batch(es), "
            f"estimated {usd(run.plan['estimated_cost_usd'])}. Poll /batch/status/{name}."
        )
        return {"job_id": name, "batch_name": name, "status": "submitted", "message": message}

    async def status(self, run: str) -> dict[str, Any]:
        self._known(run)
        task = self.tasks.get(run)
        failure = self.failures.get(run)
        error: dict[str, Any] = {"error": None}
        if failure is not None:  # the message, and an input error's problems
            detail = failure.detail
            error = (
                {"error": detail["message"], "problems": detail["problems"]} if isinstance(detail, dict) else {"error": detail}
            )
        if not self._store(run).exists():
            return {"name": run, "status": "failed" if failure else "preparing", **error}
        entry: dict[str, Any] = run_status(self.state_dir, run)["runs"][0]
        entry["working"] = task is not None and not task.done()
        entry.update(error)
        return entry

    async def results(self, run: str, summary: bool = False, partial: bool = False) -> dict[str, Any]:
        """A finished run's results. An unfinished one answers 409 with its progress, unless `partial=true`:
        then only the rows that have their answer already (from the sidecars), with the run's status."""
        self._known(run)
        if not self._store(run).exists():
            raise RestError(409, "the run is still being prepared")
        if summary:
            return analytics(self.state_dir, run)
        st = self._store(run).load_run().status
        if st in ("done", "cancelled"):
            return {"run": run, "status": st, "results": [r.to_dict() for r in iter_results(self.state_dir, run)]}
        if not partial:
            entry = run_status(self.state_dir, run)["runs"][0]
            progress = {k: v for k, v in entry.items() if k in ("status", "records", "jobs", "job_states")}
            raise RestError(409, {"detail": "the run is not finished: poll /batch/status, or ask for ?partial=true", **progress})
        rows = [r for r in iter_sidecar_results(self.state_dir, run) if r["source"] != "none"]
        return {"run": run, "status": st, "partial": True, "results": rows}

    async def jobs(self) -> dict[str, Any]:
        """Every run; one whose sidecars cannot be read is listed as "broken" with its error (as `batchify list`
        shows it), the others as usual."""
        keys = ("name", "status", "records", "jobs", "job_states", "updated_at")
        runs = []
        for r in run_status(self.state_dir)["runs"]:
            entry = {k: r.get(k) for k in keys}
            if "error" in r:
                entry["error"] = self.say(r["error"])
            runs.append(entry)
        return {"runs": runs}

    async def cancel(self, run: str) -> dict[str, Any]:
        """Stop the run's work here as shutdown does (the real-time requests already sent, paid for, are waited for
        and saved), then cancel its remote jobs. A finished run stays finished; a run another process holds (a CLI
        `resume`) answers 409."""
        self._known(run)
        store = self._store(run)
        if store.exists() and store.load_run().status == "done":
            return {"run": run, "cancelled": [], "status": "done", "message": "the run is finished: nothing to cancel"}
        task = self.tasks.get(run)
        if task is not None and not task.done():
            stop = self.stops.get(run)
            if stop is not None:
                stop.request()
                if stop.wait_bound() > 0:
                    await asyncio.wait([task], timeout=stop.wait_bound() + 5.0)
            task.cancel()  # a run being prepared (nothing paid for in flight) or past its bound: at once
            await asyncio.gather(task, return_exceptions=True)
        if not store.exists():
            return {"run": run, "cancelled": [], "status": "cancelled"}
        names = await cancel(run, self.state_dir, self.endpoint, self.api_key)
        status = store.load_run().status
        message = "the run finished before the cancel reached it" if status == "done" else f"cancelled {len(names)} job(s)"
        return {"run": run, "cancelled": names, "status": status, "message": message}


def _typed_route(handler: Callable[..., Awaitable[Any]], model: Any, returns: Any) -> Callable[..., Awaitable[Any]]:
    """A route taking one JSON body of `model` and calling `handler(**fields)`. FastAPI learns the body's type
    from the signature, which it must see as classes: this module's postponed annotations are strings."""

    async def route(body: Any) -> Any:
        return await handler(**dict(body))

    route.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model)], return_annotation=returns
    )
    return route


def make_api(
    state_dir: str | Path,
    token: str,
    endpoint: str | None = None,
    api_key: str | None = None,
    config: JobConfig | None = None,
    options: RunOptions | None = None,
    docs: bool = False,
    max_body: int = REST_MAX_BODY,
) -> Any:
    """A FastAPI app over the engine (the handlers: RestApi). Every route needs `Authorization: Bearer
    <token>`: it spends money. `docs`: serve /docs and /openapi.json (without a token: they show the API's
    shape, never data; off by default, and /docs loads Swagger UI from a CDN). Bodies over `max_body` bytes
    answer 413. Long work runs in tasks the app owns and awaits at shutdown; status is pollable."""
    fa = _rest_imports()
    if not token:
        raise UsageError("the REST API spends money, so it needs a token. Fix: set BATCHIFY_API_TOKEN.")
    api = RestApi(state_dir, endpoint, api_key, config, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        await api.shutdown()

    app = fa.fastapi.FastAPI(
        title="batchify",
        version=__version__,
        lifespan=lifespan,
        description="Run large LLM jobs through the Gemini Batch API. All routes need a bearer token.",
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_exception_handler(fa.RequestValidationError, _invalid_body)
    app.add_exception_handler(RestError, _rest_error)

    async def batchify_error(request: Any, exc: Any) -> Any:  # the one mapping: RestApi.answer
        return await _rest_error(request, api.answer(exc))

    app.add_exception_handler(BatchifyError, batchify_error)
    app.add_middleware(_BodyLimit, limit=max_body)
    guarded = _bearer_guard(fa, token)
    body = {"methods": ["POST"], "response_model": fa.Submitted, **guarded}
    app.add_api_route("/batch/submit", _typed_route(api.submit_urls, fa.SubmitUrls, fa.Submitted), **body)
    app.add_api_route("/batch/submit-contents", _typed_route(api.submit_contents, fa.SubmitContents, fa.Submitted), **body)
    app.add_api_route("/batch/status/{run}", api.status, methods=["GET"], **guarded)
    app.add_api_route("/batch/results/{run}", api.results, methods=["GET"], **guarded)
    app.add_api_route("/batch/jobs", api.jobs, methods=["GET"], **guarded)
    app.add_api_route("/batch/cancel/{run}", api.cancel, methods=["POST"], **guarded)
    app.add_api_route("/batch/resume/{run}", api.resume, methods=["POST"], **guarded)
    return app


def _bearer_guard(fa: Any, token: str) -> dict[str, Any]:
    """The routes' keyword arguments that make them need `Authorization: Bearer <token>`: the bearer scheme as a
    Security dependency, so that FastAPI checks it and the OpenAPI schema declares it."""
    bearer = fa.security.HTTPBearer(auto_error=False)

    async def auth(creds: Any) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise RestError(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    creds = inspect.Parameter(
        "creds",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=fa.fastapi.Security(bearer),
        annotation=fa.security.HTTPAuthorizationCredentials | None,
    )
    auth.__signature__ = inspect.Signature([creds])  # type: ignore[attr-defined]
    return {"dependencies": [fa.fastapi.Depends(auth)]}


async def _invalid_body(request: Any, exc: Any) -> Any:
    """A 422 saying what was wrong, never the body itself echoed back (a 22 MB body made a 22 MB error)."""
    errs = [
        {"loc": list(e.get("loc", ()))[:6], "msg": str(e.get("msg", ""))[:200], "type": e.get("type")} for e in exc.errors()[:20]
    ]
    return _rest_imports().JSONResponse(status_code=422, content={"detail": errs, "errors": len(exc.errors())})


async def _rest_error(request: Any, exc: Any) -> Any:
    """RestError -> its JSON answer ({"detail": ...}, or the detail dict itself when it carries "detail")."""
    content = exc.detail if isinstance(exc.detail, dict) and "detail" in exc.detail else {"detail": exc.detail}
    return _rest_imports().JSONResponse(status_code=exc.status, content=content, headers=exc.headers)


# ================================================================================================
# 13. CLI (click): parse, call one coroutine, render, map errors
# ================================================================================================


def _state_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        envvar="BATCHIFY_STATE_DIR",
        default=DEFAULT_STATE_DIR,
        show_default=True,
        type=click.Path(file_okay=False),
        help="Where run folders live (env BATCHIFY_STATE_DIR).",
    )(f)


def _endpoint_url(ctx: Any, param: Any, value: str | None) -> str | None:
    if value is not None and value != "local" and not re.match(r"^https?://[^\s/:]+(:\d+)?(/\S*)?$", value):
        raise click.BadParameter(f"{value!r} is neither 'local' nor an http(s) URL such as http://127.0.0.1:8765")
    return value


def _endpoint_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--endpoint",
        default=None,
        envvar="GOOGLE_GEMINI_BASE_URL",  # read here, not left to the SDK, so that the run records where its jobs are
        show_envvar=True,
        callback=_endpoint_url,
        metavar="URL|local",
        help="API base URL, or 'local' for the built-in emulator. Default: GOOGLE_GEMINI_BASE_URL (shell or .env), else Google.",
    )(f)


_from_dotenv: set[str] | None = None  # the variables .env set (not the shell), once it was read: named so in messages


def _load_dotenv() -> None:
    """The working directory's .env (as the README says), once, before the options are read (so that
    GOOGLE_GEMINI_BASE_URL there counts as --endpoint); the shell's variables win over it."""
    global _from_dotenv
    if _from_dotenv is not None or not (Path.cwd() / ".env").is_file():
        return
    with contextlib.suppress(ImportError):
        from dotenv import dotenv_values

        _from_dotenv = set()
        for k, v in dotenv_values(Path.cwd() / ".env").items():  # read once; set as load_dotenv would (no override)
            if v is not None and k not in os.environ:
                os.environ[k] = v
                _from_dotenv.add(k)


def _api_key() -> str | None:
    _load_dotenv()
    return os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY")


def _key_source() -> str:
    """Which variable held the key (never its value): GOOGLE_API_KEY wins over GEMINI_API_KEY, as in the SDK."""
    var = "GOOGLE_API_KEY" if os.environ.get("GOOGLE_API_KEY") else "GEMINI_API_KEY"
    return f"{var} (set in .env)" if var in (_from_dotenv or ()) else var


def _gcs_emulator() -> EmulatorConfig | None:
    """--endpoint local on --backend vertex: the built-in emulator's jobs use the Cloud Storage emulator named by
    STORAGE_EMULATOR_HOST (as google-cloud-storage itself does)."""
    gcs = os.environ.get("STORAGE_EMULATOR_HOST")
    return EmulatorConfig(gcs_endpoint=gcs) if gcs else None


def _crash_hook() -> Callable[[Hook], None] | None:
    """BATCHIFY_CRASH_AT=point[:n] kills this process with SIGKILL at the n-th pass of a point (drills)."""
    spec = os.environ.get("BATCHIFY_CRASH_AT")
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    target = int(nth or 1)
    seen = {"n": 0}

    if point not in set(Hook):
        raise UsageError(f"BATCHIFY_CRASH_AT={spec!r}: no such point. Fix: one of {', '.join(Hook)}[:n].")

    def hook(p: Hook) -> None:
        if p == point:
            seen["n"] += 1
            if seen["n"] >= target:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _run_stoppable(work: Coroutine[Any, Any, T], stop: GracefulStop, note: Callable[[str], None] | None = None) -> T:
    """asyncio.run for the commands that drive a run. The first Ctrl-C (or SIGTERM) while real-time requests are
    in flight asks the run to stop gracefully (GracefulStop: nothing new is sent, the answers already paid for are
    saved, at most for their client timeout) and says so; with nothing in flight, and on a second signal, the run
    stops at once, as it always did. main() then says the run is interrupted (exit 130, or 143 for SIGTERM)."""
    signalled = False
    _current_stop[:] = [stop]

    def on_loop(signum: int, main_task: asyncio.Task[Any]) -> None:
        n = stop.in_flight()
        if not n:
            main_task.cancel()  # what asyncio.run does on Ctrl-C
            return
        stop.request()
        why, key = _STOP_WORDS.get(signum, ("interrupted", "Ctrl-C"))
        with contextlib.suppress(OSError):  # a hung-up terminal
            console().print(
                f"\n[yellow]{why}[/]: waiting for {n} request(s) already sent (their answers are paid for; at most "
                f"{stop.wait_bound() / 60:g} min, their client timeout). {key} again to stop now: those {n} would be sent "
                "again on resume, and paid for twice.",
                soft_wrap=True,
            )

    async def supervised() -> T:
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        assert main_task is not None

        def handler(signum: int, frame: Any) -> None:
            nonlocal signalled
            _note_signal(signum)
            # The second signal, or one with nothing paid for in flight, stops now, even in a long synchronous step
            # (prepare's pass, the merge, the "Submit?" prompt), as SIGTERM always did: a supervisor's SIGKILL follows.
            if signalled or not stop.in_flight():
                if signalled:  # "stop now": bounded even if the unwinding it starts gets stuck (no wait is forever)
                    _exit_after(STOP_NOW_GRACE_S, 128 + _terminated if _terminated else 130)
                raise KeyboardInterrupt
            signalled = True
            loop.call_soon_threadsafe(on_loop, signum, main_task)

        previous: dict[signal.Signals, Any] = {}
        with contextlib.suppress(ValueError):  # not the main thread (a test calling main()): leave the handlers alone
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, handler)
        try:
            return await work
        finally:
            for signum, h in previous.items():
                signal.signal(signum, h)

    token = RETRY_NOTE.set(note)  # asyncio.run copies this context into the run's tasks
    try:
        return asyncio.run(supervised())
    except asyncio.CancelledError:
        if signalled:
            raise KeyboardInterrupt from None
        raise
    finally:
        RETRY_NOTE.reset(token)


def _plan_confirmer(ask: bool) -> Callable[[Run], bool]:
    """`run`'s consent: the plan on stderr, then (on a terminal, unless --yes) "Submit? It spends money"."""

    def confirm(r: Run) -> bool:
        render_plan(r)
        return _ask_interruptibly("Submit? It spends money") if ask else True

    return confirm


STOP_NOW_GRACE_S = 10.0  # a second Ctrl-C: the seconds the process has to unwind before it exits regardless


def _exit_after(seconds: float, code: int) -> None:
    """A daemon thread that ends the process with `code` if it is still alive `seconds` from now. A second Ctrl-C
    raises KeyboardInterrupt wherever the main thread is; the cleanup that follows (cancelling tasks, closing the
    HTTP client, the executor's threads) has once been seen to hang. Everything paid for is on disk already
    (realtime.jsonl is flushed per answer, sidecars are written whole), and status shows a dead run as
    interrupted."""

    def watchdog() -> None:
        time.sleep(seconds)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"\nstill stopping after {seconds:g} s: exiting now ({code}); `batchify resume` finishes the run.\n")
            sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="batchify-stop-now", daemon=True).start()


def _ask_interruptibly(prompt: str) -> bool:
    """A yes/no question on the terminal (default no; Ctrl-D is no), its answer read from fd 0 by a daemon thread
    while the main thread waits in short steps. A blocking read in the main thread is not always woken by
    Ctrl-C: the kernel may hand SIGINT to any thread (the progress display's, the executor's), and Python runs its
    handler only when the main thread is back in Python code; the prompt then waited for Enter. The read is
    os.read on the descriptor, not sys.stdin: an abandoned read holding stdin's buffer lock aborts the
    interpreter at exit."""
    click.echo(f"{prompt} [y/N]: ", nl=False, err=True)
    box: list[bytes | BaseException] = []
    done = threading.Event()

    def ask() -> None:
        try:
            box.append(os.read(0, 4096))
        except BaseException as e:  # handed to the main thread, which raises it as itself
            box.append(e)
        finally:
            done.set()

    threading.Thread(target=ask, name="batchify-confirm", daemon=True).start()
    while not done.wait(0.1):
        pass
    answer = box[0]
    if isinstance(answer, BaseException):
        raise answer
    if not answer:  # Ctrl-D
        click.echo("", err=True)
        return False
    return answer.strip().lower() in (b"y", b"yes")


def _emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchify")
def cli() -> None:
    """Run large LLM jobs through the Gemini Batch API at half price, without losing a result."""


RUN_FLAGS = tuple(f.name for f in dataclasses.fields(RunOptions) if "flag" in f.metadata)


def run_option_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """The click options of every RunOptions field that is a flag, in the table's order."""
    for fl in reversed([x for x in dataclasses.fields(RunOptions) if "flag" in x.metadata]):
        decls, help_, kw = fl.metadata["flag"]
        kw = dict(kw)
        if fl.default is not None:
            kw.setdefault("default", fl.default)
            kw.setdefault("show_default", not kw.get("is_flag") and not kw.get("hidden"))
        f = click.option(*(decls or (f"--{fl.name.replace('_', '-')}",)), fl.name, help=help_, **kw)(f)
    return f


@cli.command()
@click.argument("input_file", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Job definition (TOML).")
@click.option(
    "--model", help=f"Model (default {DEFAULT_MODEL}: the catalog's cheapest current Flash with batch; see `batchify models`)."
)
@click.option(
    "--models",
    "models_file",
    envvar="BATCHIFY_MODELS",
    type=click.Path(dir_okay=False),
    help='TOML file of [models."NAME"] tables laid over the model catalog (env BATCHIFY_MODELS).',
)
@click.option("--system-instruction", help="System instruction text.")
@click.option("--prompt-template", help="Prompt with {field} placeholders.")
@click.option(
    "--temperature", type=float, help="Default: the catalog's advice for the model (1.0 for Gemini 3), else the model's own."
)
@click.option(
    "--max-output-tokens", type=int, help="Default: room for the thinking setting plus the answer, within the model's limit."
)
@click.option(
    "--thinking",
    help="Thinking level (Gemini 3 and 4: minimal, low, medium, high, xhigh, as the model allows) or budget in tokens "
    "(2.5; -1 dynamic). Default: the lowest the model allows.",
)
@click.option("--thinking-budget", type=int, hidden=True, help="Old name of --thinking BUDGET.")
@click.option("--accept-truncated", is_flag=True, default=None, help="Schema-less runs: count a MAX_TOKENS (cut) answer as ok.")
@run_option_flags
@click.option("--yes", "-y", is_flag=True, help="Do not ask to confirm the plan.")
@click.option("--dry-run", is_flag=True, help="Write request files and print the plan; upload nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan/summary as JSON on stdout.")
@_endpoint_option
@_state_dir_option
def run(
    input_file: str,
    config_path: str | None,
    model: str | None,
    models_file: str | None,
    system_instruction: str | None,
    prompt_template: str | None,
    temperature: float | None,
    max_output_tokens: int | None,
    thinking: str | None,
    thinking_budget: int | None,
    accept_truncated: bool | None,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    endpoint: str | None,
    state_dir: str,
    **flags: Any,
) -> None:
    """Prepare, plan, submit, poll, retrieve and merge INPUT_FILE (JSONL or a JSON array)."""
    given = {
        "model": model,
        "system_instruction": system_instruction,
        "prompt_template": prompt_template,
        "temperature": temperature,
        "max_output_tokens": max_output_tokens,
        "thinking": thinking if thinking is not None else thinking_budget,
        "accept_truncated": accept_truncated,
    }
    opts = RunOptions(**{k: flags[k] for k in RUN_FLAGS})
    _current_run[:] = [opts.name or default_run_name(input_file, state_dir), str(state_dir)]
    confirm = _plan_confirmer(ask=not yes and sys.stdin.isatty())  # --json too: it changes the output, not the consent

    stop = GracefulStop()
    with RichReporter() if not as_json else contextlib.nullcontext(NullReporter()) as reporter:
        work = run_file(
            input_file,
            load_config(config_path, given),
            opts,
            state_dir,
            endpoint,
            _api_key(),
            reporter,
            confirm,
            dry_run,
            _crash_hook(),
            _gcs_emulator(),
            load_catalog(models_file),
            stop,
        )
        r, summary = _run_stoppable(work, stop, reporter.log)
    if dry_run:
        _render_dry_run(r, as_json, state_dir)
        return
    assert summary is not None
    _finish(summary, as_json, state_dir)


def _render_dry_run(r: Run, as_json: bool, state_dir: str) -> None:
    if as_json:
        keys = {"plan": r.plan, "records": r.records, "rejected": r.rejected, "chars_per_token": r.chars_per_token}
        _emit_json({"run": r.name, "state_dir": state_dir, **keys})
        return
    render_plan(r, report())
    report().print(
        f"dry run: request files in {_esc(Path(state_dir) / r.name / 'requests')}; nothing uploaded. "
        f"To submit: the same command without --dry-run, or `batchify resume {_esc(r.name)}`.",
        soft_wrap=True,
    )


def _finish(summary: Summary, as_json: bool, state_dir: str | None = None) -> None:
    _outcome[:] = [1 if summary.status == "cancelled" or summary.errors else 0]  # the exit code, before any output
    store = RunStore(state_dir, summary.run) if state_dir is not None else None
    rejected = store.load_run().rejected if store is not None and store.exists() else 0
    if as_json:
        _emit_json({**summary.to_dict(), "rejected": rejected})
    else:
        if state_dir is not None and summary.ok:
            render_analytics(closing_analytics(state_dir, summary), totals=False)
        render_summary(summary)
        if rejected and store is not None:  # --skip-invalid: those records have no line in the results
            report().print(
                f"[yellow]{rejected:,} input record(s) set aside[/] (--skip-invalid), not in the results: "
                f"{_esc(store.rejected_path)}",
                soft_wrap=True,
            )
    if summary.status == "cancelled":
        raise SystemExit(1)
    if summary.errors:
        raise SystemExit(1)


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Every figure, with its source, as JSON on stdout.")
@click.option("--markdown", is_flag=True, help="The README's model table.")
@click.option(
    "--models", "models_file", envvar="BATCHIFY_MODELS", type=click.Path(dir_okay=False), help="Overrides, as for `run --models`."
)
def models_cmd(as_json: bool, markdown: bool, models_file: str | None) -> None:
    """The model catalog: prices, limits, thinking rules and lifecycle, with their sources and dates."""
    catalog = load_catalog(models_file)
    today = utcnow()[:10]
    if as_json:
        _emit_json(
            {"as_of": catalog.as_of, "default": DEFAULT_MODEL, "models": catalog_rows(catalog, today), "sources": catalog.sources}
        )
    elif markdown:
        sys.stdout.write(models_markdown(catalog, catalog.as_of))  # the catalog's own date: the README embeds it
    else:
        render_models(catalog, today)


@cli.command()
@click.argument("run_name", required=False)
@click.option("--json", "as_json", is_flag=True, help="As JSON on stdout.")
@_state_dir_option
def status(run_name: str | None, as_json: bool, state_dir: str) -> None:
    """Where every run (or RUN's waves and jobs) stands. Reads sidecars only."""
    data = run_status(state_dir, run_name)
    if as_json:
        _emit_json(data)
    else:
        render_status(data, bool(run_name))


def _pick_run(state_dir: str, run_name: str | None) -> str | None:
    """The run to resume: the one named, else the only unfinished one; None when nothing is left to resume."""
    if run_name:
        return run_name
    unfinished = []
    for n in list_runs(state_dir):
        with contextlib.suppress(StateError):  # a broken run is shown by `status`, never picked
            if RunStore(state_dir, n).load_run().status not in ("done", "cancelled"):
                unfinished.append(n)
    if len(unfinished) == 1:
        return unfinished[0]
    if not unfinished:
        return None
    raise UsageError(f"several unfinished runs ({', '.join(unfinished)}). Fix: name the one to resume.")


@cli.command()
@click.argument("run_name", required=False)
@click.option("--poll-interval", type=FiniteFloatRange(0.05), help="Seconds between polls (default: the run's own).")
@click.option("--max-cost", type=float, callback=_positive_usd, help="A new cost cap (USD, > 0) for what is left.")
@click.option("--allow-standard", is_flag=True, default=None, help="From now on, let the fallback use the standard tier (2x).")
@click.option("--out", help="Write the merged results here from now on (the run's own file was moved away, say).")
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON on stdout.")
@_endpoint_option
@_state_dir_option
def resume(
    run_name: str | None,
    poll_interval: float | None,
    max_cost: float | None,
    allow_standard: bool | None,
    out: str | None,
    as_json: bool,
    endpoint: str | None,
    state_dir: str,
) -> None:
    """Pick up an unfinished run after a crash, Ctrl-C or reboot.

    Without RUN_NAME: the one unfinished run in --state-dir; with several, it asks for a name (exit 2); with
    none, it says so and exits 0."""
    name = _pick_run(state_dir, run_name)
    if name is None and not list_runs(state_dir):
        raise UsageError(
            f"no runs in {state_dir}. Fix: give --state-dir (or BATCHIFY_STATE_DIR) the folder your runs are in "
            "(`batchify list --state-dir DIR` shows them)."
        )
    if name is None:
        report().print(f"nothing to resume in {_esc(state_dir)}: every run there is finished or cancelled (see `batchify list`).")
        return
    _current_run[:] = [name, str(state_dir)]
    stop = GracefulStop()
    with RichReporter() if not as_json else contextlib.nullcontext(NullReporter()) as reporter:
        summary = _run_stoppable(
            resume_run(
                name,
                state_dir,
                endpoint,
                _api_key(),
                reporter,
                _crash_hook(),
                poll_interval,
                _gcs_emulator(),
                max_cost=max_cost,
                allow_standard=allow_standard,
                stop=stop,
                out=out,
            ),
            stop,
            reporter.log,
        )
    _finish(summary, as_json, state_dir)


@cli.command(name="list")
@_state_dir_option
def list_cmd(state_dir: str) -> None:
    """One line per run: name, status, records, results file (tab-separated; a header on a terminal)."""
    if sys.stdout.isatty():
        click.echo("run\tstatus\trecords\tresults file")
    for n in list_runs(state_dir):
        store = RunStore(state_dir, n)
        try:
            r = store.load_run()
        except StateError as e:
            click.echo(f"{n}\tbroken\t-\t{e}")
            continue
        click.echo(f"{n}\t{shown_status(store, r)}\t{r.records}\t{r.out}")


@cli.command(name="results")
@click.argument("run_name")
@click.option(
    "--summary", "summary_only", is_flag=True, help="Analytics instead of the results: field distributions, errors, cost."
)
@click.option("--json", "as_json", is_flag=True, help="With --summary: as JSON on stdout.")
@_state_dir_option
def results_cmd(run_name: str, summary_only: bool, as_json: bool, state_dir: str) -> None:
    """Re-emit RUN's merged results file on stdout (rebuilt from the sidecars if it is missing)."""
    if summary_only:
        data = analytics(state_dir, run_name)
        if as_json:
            _emit_json(data)
        else:
            render_analytics(data)
        return
    run = RunStore(state_dir, run_name).load_run()
    if run.status not in ("done", "cancelled"):
        console().print(
            f"[yellow]note:[/] run {_esc(run_name)} is {_esc(run.status)}, not finished: an id without a result yet reads "
            f"'no result (run not finished)'. `batchify resume {_esc(run_name)}` finishes it.",
            soft_wrap=True,
        )
    out = out_location(run.out, run.run_options.project)
    if out_replaced(run, out):  # something else wrote that file since this run merged it: print this run's results
        return _print_sidecar_results(state_dir, run_name, f"{out} changed since run {run_name} wrote it.")
    if not out.exists():
        try:
            check_out(run.out, input_location(run.input_path, run.run_options), project=run.run_options.project)
        except (UsageError, InputError, RemoteError) as e:  # the results file cannot be made there: from the sidecars
            return _print_sidecar_results(state_dir, run_name, str(e))
        with reader_lock(state_dir, run_name) as free:
            if not free:  # a live process holds the run: its sidecars and results file are its own to write
                why = f"run {run_name} is in use by another process, which writes its results file itself."
                return _print_sidecar_results(state_dir, run_name, why)
            try:  # rebuilt from the sidecars (unfinished ids show as errors; a results file lost: exit 3)
                _offline_engine(state_dir, run_name, strict=True).merge()
            except OutWriteError as e:  # --out gs:// refused the merge: the results are still printed
                return _print_sidecar_results(state_dir, run_name, str(e))
            except OSError as e:  # a full disk, a quota: the results are still printed, and the file not written said
                if e.errno not in _DISK_REFUSALS:
                    raise
                why = f"{out} could not be written ({e.strerror or e}); it was not made."
                return _print_sidecar_results(state_dir, run_name, why)
    with out.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sys.stdout.buffer.write(chunk)


def _print_sidecar_results(state_dir: str, run_name: str, why: str) -> None:
    """A run's results printed from its sidecars (not from its results file), after a note on stderr saying why."""
    console().print(f"[yellow]note:[/] {_esc(why)} Printing run {_esc(run_name)}'s results from its sidecars.", soft_wrap=True)
    for r in iter_sidecar_results(state_dir, run_name, strict=True):
        sys.stdout.buffer.write(orjson.dumps(r, option=NL))


@cli.command(name="cleanup")
@click.argument("run_name")
@click.option("--local", is_flag=True, help="Also delete the run's state folder.")
@_endpoint_option
@_state_dir_option
def cleanup_cmd(run_name: str, local: bool, endpoint: str | None, state_dir: str) -> None:
    """Delete RUN's remote jobs and files once its results are merged (refuses before)."""
    counts = asyncio.run(cleanup(run_name, state_dir, endpoint, _api_key(), local))
    where = " and its state folder" if local else ""
    console().print(f"deleted {counts['jobs']} remote job(s), {counts['files']} remote file(s){where} of {_esc(run_name)}")
    if counts.get("kept"):
        console().print(
            f"[yellow]note:[/] kept run {_esc(run_name)}'s results objects in the bucket: its results file was since "
            f"written by something else (another run given the same --out?), so they are the only copy of its results. "
            f"`batchify results {_esc(run_name)} > FILE` keeps them; then delete the run's results/ objects yourself.",
            soft_wrap=True,
        )


@cli.command(name="cancel")
@click.argument("run_name")
@_endpoint_option
@_state_dir_option
def cancel_cmd(run_name: str, endpoint: str | None, state_dir: str) -> None:
    """Cancel RUN's remote jobs (they stay cancelled on resume)."""
    if RunStore(state_dir, run_name).load_run().status == "done":
        report().print(f"run {_esc(run_name)} is finished: nothing to cancel.")
        return
    names = asyncio.run(cancel(run_name, state_dir, endpoint, _api_key()))
    report().print(f"cancelled {len(names)} job(s) of {_esc(run_name)}; jobs that had finished keep their results")


@cli.command()
@click.argument("input_file", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Job definition (TOML) to check too.")
@click.option("--id-field", default="id", show_default=True, help="The field holding each record's unique id.")
@click.option("--text-field", default="text", show_default=True, help="The field holding each record's document text.")
def validate(input_file: str, config_path: str | None, id_field: str, text_field: str) -> None:
    """Check INPUT_FILE (and --config) as `run` would, without writing or sending anything."""
    res = validate_file(input_file, load_config(config_path), id_field, text_field)
    console().print(f"[green]{_esc(input_file)}: {res['records']:,} valid record(s), ~{res['input_tokens']:,} tokens[/]")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told otherwise).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port to listen on.")
@click.option("--docs", is_flag=True, help="Serve /docs and /openapi.json (answer without a token; Swagger UI loads from a CDN).")
@click.option("--allow-private-urls", is_flag=True, help="Fetch submitted URLs that lead to private/local addresses too.")
@_endpoint_option
@_state_dir_option
def serve(host: str, port: int, endpoint: str | None, state_dir: str, docs: bool, allow_private_urls: bool) -> None:
    """Serve the REST API (needs BATCHIFY_API_TOKEN and pip install -e ".[api]")."""
    opts = RunOptions(allow_private_urls=allow_private_urls)
    app = make_api(state_dir, os.environ.get("BATCHIFY_API_TOKEN", ""), endpoint, _api_key(), options=opts, docs=docs)
    import uvicorn

    where = " (OpenAPI at /docs, without a token)" if docs else ""
    console().print(f"batchify REST API on http://{host}:{port}{where}; state in {_esc(state_dir)}")
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--job-seconds", default=1.0, show_default=True, type=float)
@click.option("--job-seconds-max", type=float, help="Draw durations from [--job-seconds, this].")
@click.option("--time-scale", default=1.0, show_default=True, type=float, help="Simulated seconds per real second.")
@click.option("--pending-fraction", default=0.25, show_default=True, type=float, help="Share of a job's time in PENDING.")
@click.option("--enqueued-limit", type=int, help="Enqueued-token limit per model (default: the catalog's tier 1, else 3M).")
@click.option("--max-active-jobs", default=100, show_default=True, type=int)
@click.option("--token-spread", default=0.0, type=float, help="Each text's tokens off by up to +- this share.")
@click.option("--line-error-rate", default=0.0, type=float)
@click.option("--fail-jobs", default=0, type=int, help="The first N jobs end FAILED.")
@click.option("--expire-jobs", default=0, type=int, help="The next N jobs stay PENDING, then EXPIRE.")
@click.option("--create-429", default=0, type=int, help="The first N creates answer 429.")
@click.option("--forbid-batch", is_flag=True, help="Creates answer 403 (no billing).")
@click.option("--unavailable-rate", default=0.0, type=float, help="Share of API calls answered 503.")
@click.option("--drop-downloads", default=0, type=int, help="The first N downloads drop half-way.")
@click.option("--output-delay", default=0.0, type=float, help="Seconds before a finished job's output is there.")
@click.option(
    "--file-retention",
    "file_retention_s",
    default=OUTPUT_RETENTION_S,
    show_default=True,
    type=float,
    help="Seconds a file is kept.",
)
@click.option("--latency-ms", default=0.0, type=float)
@click.option("--latency-spread-ms", default=0.0, type=float)
@click.option("--rpm", type=int)
@click.option("--tpm", type=int)
@click.option("--rate-window", default=60.0, type=float)
@click.option("--seed", default=0, type=int)
@click.option("--upload-400-mime", default=0, type=int, help='The first N uploads answer 400 "Unsupported MIME type: jsonl".')
@click.option("--upload-no-file", default=0, type=int, help="The first N uploads answer 200 without their file.")
@click.option("--download-403", default=0, type=int, help="The first N output downloads answer 403.")
@click.option("--download-404", default=0, type=int, help="The first N output downloads answer 404.")
@click.option("--list-429", default=0, type=int, help="The first N batches.list calls answer 429.")
@click.option("--reject-key", help="This API key is answered 400 API_KEY_INVALID.")
@click.option("--cache-min-tokens", default=1_024, type=int, help="A repeated system instruction this long is reported cached.")
@click.option("--today", help="The date that decides which models are retired (default: today).")
@click.option("--flex-latency-min", default=0.0, type=float, help="Flex latency, simulated seconds: from this ...")
@click.option("--flex-latency-max", default=0.0, type=float, help="... to this.")
@click.option("--flex-shed-rate", default=0.0, type=float, help="Share of Flex requests shed with 503.")
@click.option("--flex-capacity", type=int, help="Flex requests in flight beyond this are shed with 503.")
@click.option(
    "--models", "models_file", type=click.Path(dir_okay=False), help='[models."NAME"] tables to serve beside the catalog.'
)
@click.option("--gcs-endpoint", help="Vertex batchPredictionJobs read and write this Cloud Storage emulator (a URL).")
def emulator(host: str, port: int, models_file: str | None, **knobs: Any) -> None:
    """Serve the local Gemini API emulator (synthetic answers, fault injection) until Ctrl-C."""
    cfg = EmulatorConfig(**knobs, models=read_models_file(models_file) if models_file else None)

    async def serve() -> None:
        emu = Emulator(cfg)
        url = await emu.start(host, port)
        console().print(f"[yellow]{_esc(EMULATOR_LABEL)}[/] listening on {url}  (GOOGLE_GEMINI_BASE_URL={url})")
        try:
            await asyncio.Event().wait()
        finally:
            await emu.stop()

    asyncio.run(serve())


# ================================================================================================
# 14. main(): the one place errors become exit codes
# ================================================================================================


_current_run: list[str] = []  # the run a command works on and its state dir, for the Ctrl-C/SIGTERM message
_outcome: list[int] = []  # a finished run's exit code, known before its report is written (a reader may close early)
_current_stop: list[GracefulStop] = []  # ... and how it was asked to stop (_run_stoppable)
_terminated = 0  # the signal that stopped the command (SIGTERM, SIGHUP), 0 for Ctrl-C or none
_STOP_WORDS: dict[int, tuple[str, str]] = {
    signal.SIGTERM: ("terminated (SIGTERM)", "SIGTERM"),
    signal.SIGHUP: ("hung up (SIGHUP)", "SIGHUP"),
}


def _note_signal(signum: int) -> None:
    """Remember a SIGTERM/SIGHUP for the exit code (143/129); on SIGHUP the terminal is gone: what batchify would
    still write to it goes to /dev/null instead of failing the drain with EIO."""
    global _terminated
    if signum in _STOP_WORDS:
        _terminated = _terminated or signum
    if signum == signal.SIGHUP:
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                if os.isatty(fd):
                    os.dup2(null, fd)
            os.close(null)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (and SIGHUP: the terminal or SSH session went away) is handled like Ctrl-C: the engine's tasks are
    cancelled, the run is saved as interrupted. (While `run` or `resume` drives a run, _run_stoppable handles these
    signals: the first one waits for the real-time requests already sent.)"""
    _note_signal(signum)
    raise KeyboardInterrupt


def _raise_open_file_limit() -> None:
    """Flex keeps thousands of requests in flight, a socket each: lift this process's soft open-file limit to
    its hard one (at most 65,536), so in_flight_ceiling() has room. A CLI start-up step: the library leaves the
    process's limits to its host."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _limit_malloc_arenas() -> None:
    """glibc gives threads that allocate their own malloc arenas (up to 8 per core), and memory freed in an arena
    stays with it: the worker threads that parse a Vertex job's output (asyncio.to_thread, a chunk at a time, on
    whichever thread is free) each grow one toward the job's working set. Seen at 1M articles (200k-request
    jobs): six anonymous regions of 32-44 MB beside an 85 MB heap, RSS 390 MB in retrieval. Two arenas at most
    (M_ARENA_MAX). A CLI start-up step, as _raise_open_file_limit: the library leaves the allocator to its host."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None).mallopt(-8, 2)  # -8: M_ARENA_MAX (malloc.h); musl has no mallopt


def _interrupted_exit() -> int:
    """Ctrl-C, SIGTERM or SIGHUP: say what is saved and how to go on; 130 (128 + the signal for the others)."""
    which = f"run {_current_run[0]!r}" if _current_run else "the command"
    again = f"`batchify resume {_current_run[0]}`" if _current_run else "the same command again"
    if _current_run and not RunStore(_current_run[1], _current_run[0]).exists():  # stopped before it was prepared
        again = "nothing was sent; the same command again"
    why = _STOP_WORDS[_terminated][0] if _terminated else "interrupted"
    stop = _current_stop[0] if _current_stop else None
    kept = f" ({stop.kept} answer(s) that arrived meanwhile kept)" if stop is not None and stop.requested else ""
    with contextlib.suppress(OSError):  # a hung-up terminal
        console().print(
            f"\n[yellow]{why}[/]: {_esc(which)}: every step so far is saved{kept}; {_esc(again)} finishes it.", soft_wrap=True
        )
    return 128 + _terminated if _terminated else 130


_DISK_REFUSALS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the system allows (a file-size limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
}


def _os_error_exit(e: OSError) -> int:
    """An OSError out of a command: a write the system refused is DISK_EXIT with the path and the fix; anything
    else (a port in use, ...) is said as it is, exit 3, blaming no file it did not name."""
    code = e.errno or 0
    if code not in _DISK_REFUSALS:
        where = f"{e.filename}: " if e.filename else ""
        console().print(f"[red]error:[/] {_esc(where)}{_esc(e.strerror or e)}", soft_wrap=True)
        return 3
    where = e.filename or "the state dir or the results file"
    fix = (
        "mend the permissions of that folder (or, for the results file, point --out at a folder you can write)"
        if code in (errno.EACCES, errno.EPERM)
        else "raise the shell's file-size limit (`ulimit -f unlimited`)"
        if code == errno.EFBIG
        else "free space on that disk (or, for the results file, point --out at another disk)"
    )
    console().print(
        f"[red]error:[/] cannot write {_esc(where)}: {_esc(_DISK_REFUSALS[code])}. Fix: {fix}, then give the same command "
        "again (a `run` again continues its run; nothing already done is lost). Keep the same --state-dir: another one "
        "starts a new run, which pays for every request again.",
        soft_wrap=True,
    )
    return DISK_EXIT


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(ValueError):  # not the main thread (a test calling main()): leave the handler alone
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGHUP, _on_sigterm)
    _load_dotenv()
    _raise_open_file_limit()
    _limit_malloc_arenas()
    try:
        cli.main(args=argv, prog_name="batchify", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort, Interrupted):  # click turns Ctrl-C into Abort
        return _interrupted_exit()
    except click.ClickException as e:
        e.show()
        return 2
    except InputError as e:
        console().print(f"[red]error:[/] {_esc(e)}", soft_wrap=True)
        for p in e.problems:
            console().print(f"  {_esc(p)}", soft_wrap=True)
        return e.exit_code
    except OSError as e:  # the disk, not batchify: full, read-only, no permission
        return _os_error_exit(e)
    except Declined as e:
        console().print(_esc(e), soft_wrap=True)
        return 0
    except BatchifyError as e:
        msg = str(e)
        if isinstance(e, AuthError):  # which variable held the key (never its value)
            msg = msg.replace("refused the API key", f"refused the API key in {_key_source()}", 1)
        if isinstance(e, NoApiKeyError):  # the CLI reads the environment: it names the variable
            msg = "no API key: set GEMINI_API_KEY (or put it in .env), or use --endpoint local for the built-in emulator."
        console().print(f"[red]error:[/] {_esc(msg)}", soft_wrap=True)
        return e.exit_code
    except SystemExit as e:
        cause = e.__context__  # click's answer to EPIPE is exit(1): a reader that closed early (`| head`) chose to;
        if isinstance(cause, OSError) and cause.errno == errno.EPIPE:  # the exit code is the run's outcome, not 1
            return _outcome[0] if _outcome else 0
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


# ================================================================================================
# 15. Emulator: a local Gemini API (wire protocol: docs/GEMINI_PROTOCOL.md). It ships in this file so
#     `--endpoint local` and every test run on a machine with nothing else installed and no network
# ================================================================================================

EMULATOR_LABEL = "batchify local emulator (answers are synthetic, not model output)"
_VER = r"v\d+(?:alpha|beta|main)?\d*"
_GEN_REQUEST_KEYS = {
    "contents",
    "continuationToken",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
    "model",
    "labels",
    "store",
    "serviceTier",
}
_GEN_CONFIG_KEYS = {
    "temperature",
    "topP",
    "topK",
    "candidateCount",
    "maxOutputTokens",
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "thinkingConfig",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "responseModalities",
    "mediaResolution",
    "speechConfig",
    "enableEnhancedCivicAnswers",
    "imageConfig",
}


def _camel(k: str) -> str:
    head, *rest = k.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _mix(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class EmulatorConfig:
    """Behaviour and faults of the emulator. Durations are in simulated seconds / time_scale."""

    job_seconds: float = 1.0  # a demo (--endpoint local) ends in seconds; drills and benches set their own
    job_seconds_max: float | None = None  # draw each job's duration from [job_seconds, job_seconds_max]
    pending_fraction: float = 0.25
    time_scale: float = 1.0
    enqueued_limit: int | None = None  # per model; None: the tier-1 table
    max_active_jobs: int = 100
    chars_per_token: float = 3.6  # the emulator's "tokenizer"
    token_spread: float = 0.0  # each text's chars/token off by up to +- this share (fixed per text), as with real text
    line_error_rate: float = 0.0  # share of batch lines answered with an error status
    fail_jobs: int = 0  # the first N jobs created end FAILED
    expire_jobs: int = 0  # the next N stay PENDING, then EXPIRE
    expire_seconds: float | None = None
    create_429: int = 0  # the first N creates answer 429 whatever the load
    forbid_batch: bool = False  # create answers 403 (no billing)
    unavailable_burst: int = 0  # the next N API calls answer 503
    unavailable_rate: float = 0.0  # each API call answers 503 with this probability
    drop_downloads: int = 0  # the first N downloads drop the connection half-way
    output_delay: float = 0.0  # a SUCCEEDED job's output file is downloadable only after this
    # A file (uploaded input, generated output) is gone this long after it was made, simulated seconds: "Files are stored
    # for 48 hours" (ai.google.dev document-processing note, read 2026-12-02 via discuss.ai.google.dev/t/50428). Users
    # meet it as a 403 "... or it may not exist" on a file their batch was to read. None: kept for ever
    file_retention_s: float | None = OUTPUT_RETENTION_S
    latency_ms: float = 0.0  # generateContent latency: mean
    latency_spread_ms: float = 0.0  # ... and spread
    rpm: int | None = None  # generateContent requests per rate_window
    tpm: int | None = None  # generateContent input tokens per rate_window
    rate_window: float = 60.0
    seed: int = 0
    # The models served, with their limits and thinking rules: the catalog batchify plans with, plus these
    # [models."NAME"] tables; a model retired by `today` (default: the real date) answers 404.
    models: dict[str, Any] | None = None
    today: str | None = None
    cache_min_tokens: int = 1_024  # implicit caching: a repeated system instruction this long is reported cached
    # Faults users report from the real service (REAL_SERVICE_NOTES.md), each for the first N calls:
    upload_400_mime: int = 0  # upload answered 400 "Unsupported MIME type: jsonl" (python-genai#1547)
    upload_no_file: int = 0  # upload answered 200 without its `file` (the SDK raises KeyError, #1248/#1590)
    download_403: int = 0  # output download answered 403
    download_404: int = 0  # output download answered 404 (SUCCEEDED before the output is readable)
    list_429: int = 0  # batches.list answered 429 (seen in a client's CI log)
    create_lost: int = 0  # a create takes effect but is answered 503 (the answer lost on the way back)
    list_foreign_state: str | None = None  # batches.list also shows someone else's job in this state ("": none at all)
    get_404: int = 0  # a job's get answered 404 NOT_FOUND while the job lives (a proxy, a routing blip)
    get_403: int = 0  # a job's get answered 403 PERMISSION_DENIED (billing or project permissions changed mid-run)
    generate_400_location: int = 0  # generateContent answered 400 FAILED_PRECONDITION "User location is not supported"
    generate_cut_short: int = 0  # generateContent answered (and billed), the 200's body cut in half on the way (a proxy)
    continuation_hops: int = 0  # the next N answers stop half-way with finishReason CONTINUATION and a continuationToken
    count_tokens_503: int = 0  # countTokens answered 503 (calibration falls back to the offline guess, and says so)
    reject_key: str | None = None  # this API key answered 400 API_KEY_INVALID on every call
    # Flex (serviceTier "flex"): latency drawn from [min, max] simulated seconds (time-scaled like batch jobs);
    # a request is shed with 503 at this rate, or whenever more than flex_capacity are in flight.
    flex_latency_min: float = 0.0
    flex_latency_max: float = 0.0
    flex_shed_rate: float = 0.0
    flex_capacity: int | None = None
    flex_hold: bool = False  # Flex answers wait (after their latency) until this is set False: requests provably
    # in flight at a moment of a test's choosing, whatever the machine's speed
    flex_shed_code: int = 503  # the status a shed request is answered with (Google's page: 503 at capacity, 429 at
    # the rate limits; an overloaded pool has been seen answering 504 and 500 as well)
    # Vertex AI batchPredictionJobs (--backend vertex): jobs read their input from, and write their output to,
    # this Cloud Storage endpoint (a storage emulator's URL, e.g. gcp-storage-emulator); None: the Vertex
    # routes answer 400 (the emulator never reaches the real Cloud Storage). The fault knobs above apply
    # where Vertex has the same fault: fail_jobs, expire_jobs, line_error_rate, create_429, forbid_batch,
    # unavailable_*, list_429.
    gcs_endpoint: str | None = None
    vertex_shuffle_window: int = 4_096  # output lines are shuffled within windows this long (Vertex keeps no order)
    # A Vertex job that ends FAILED (fail_jobs), EXPIRED (expire_jobs) or is cancelled while it runs first exports
    # this share of its rows, answered (and billed), as the service does with the rows it completed before the end
    # (its 24 h limit, a failure, a cancel: docs/VERTEX_NOTES.md A5). 0: such a job exports nothing.
    vertex_exported_share: float = 0.0
    vertex_output_info: bool = True  # False: a job's resource names no outputInfo (an older surface, a converter
    # that drops it; the SDK documents it only after a successful run): its output is found under its prefix

    def update(self, **kw: Any) -> None:
        for k, v in kw.items():
            if not hasattr(self, k):
                raise ValueError(f"unknown emulator setting {k!r}")
            setattr(self, k, v)


# Thinking tokens the emulator's "model" spends per setting (synthetic: Google publishes none).
EMULATED_THOUGHTS = {"minimal": 0, "low": 48, "medium": 160, "high": 480, "xhigh": 960, "dynamic": 160}


class _EmuError(Exception):
    def __init__(self, code: int, status: str, message: str, details: list[Any] | None = None):
        super().__init__(message)
        self.code, self.status, self.message, self.details = code, status, message, details or []


class Emulator:
    """A Gemini-API-compatible HTTP server for batchify's and the SDK's calls, with fault injection."""

    def __init__(self, config: EmulatorConfig | None = None):
        self.cfg = config or EmulatorConfig()
        self.rng = random.Random(self.cfg.seed)
        # Job durations from their own stream: the n-th job created gets the same duration whatever
        # else drew random numbers before it (uploads, faults), so two runs can be compared job for job.
        self.duration_rng = random.Random(f"durations:{self.cfg.seed}")
        self.files: dict[str, dict[str, Any]] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.gen_window: collections.deque[tuple[float, int]] = collections.deque()  # (arrival, tokens) in the window
        self.gen_tokens = 0  # tokens in gen_window
        self.stats: dict[str, Any] = {
            "requests": 0,
            "uploads": 0,
            "creates": 0,
            "creates_refused_429": 0,
            "creates_by_display_name": {},
            "gets": 0,
            "gets_by_job": {},
            "lists": 0,
            "downloads": 0,
            "downloads_dropped": 0,
            "cancels": 0,
            "deletes": 0,
            "generate_calls": 0,
            "generate_429": 0,
            "count_tokens_calls": 0,
            "injected_503": 0,
            "peak_enqueued_tokens": 0,
            "max_generate_in_window": 0,
            "max_generate_tokens_in_window": 0,
            "label": EMULATOR_LABEL,
        }
        self.created = 0
        self.spent: dict[str, int] = {}  # "first N calls" fault knobs: how many of N have fired (see _fault)
        self.continuations: dict[str, dict[str, Any]] = {}  # continuationToken: the rest of that answer
        self._flex_released = asyncio.Event()  # set while cfg.flex_hold is False
        if not self.cfg.flex_hold:
            self._flex_released.set()
        self._runner: Any = None
        self.url = ""
        self.seen_prefixes: set[tuple[str, str]] = set()
        self._specs: dict[tuple[str, str | None], ModelSpec | None] = {}
        self._specs_for: dict[str, Any] | None = (
            None  # the models table the cached specs were made from  # (model, system instruction) already served
        )
        self.stats["thinking_seen"] = {}  # "model thinkingLevel=LOW" -> requests answered with it
        self.stats.update({"flex_calls": 0, "flex_shed": 0, "flex_in_flight": 0, "flex_peak_in_flight": 0, "standard_calls": 0})
        self.stats["billed"] = {}  # digest of a request's contents -> times it was answered (and billed)
        self.stats["billed_usd"] = {}  # service (batch, flex, standard) -> USD the answers would cost
        self.stats["models_get"] = 0
        self.vjobs: dict[str, dict[str, Any]] = {}  # Vertex batchPredictionJobs by numeric id (see "Vertex AI" below)
        self.stats.update({"vertex_creates": 0, "vertex_creates_by_display_name": {}, "vertex_gets": 0, "vertex_lists": 0})

    # -- server ------------------------------------------------------------------------------------
    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=4 * 1024**3)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        from aiohttp import web

        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def now(self) -> float:
        return time.monotonic()

    def _dur(self, simulated: float) -> float:
        return simulated / max(self.cfg.time_scale, 1e-9)

    async def _dispatch(self, request: Any) -> Any:
        from aiohttp import web

        path, method = request.path, request.method
        routes: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = [
            ("GET", r"^/_emulator/stats$", self._h_stats),
            ("POST", r"^/_emulator/config$", self._h_config),
            ("POST", rf"^/upload/(?P<ver>{_VER})/files$", self._h_upload),
            ("GET", rf"^/(?:download/)?(?P<ver>{_VER})/files/(?P<id>[^/:]+):download$", self._h_download),
            ("GET", rf"^/(?P<ver>{_VER})/files/(?P<id>[^/:]+)$", self._h_file_get),
            ("DELETE", rf"^/(?P<ver>{_VER})/files/(?P<id>[^/:]+)$", self._h_file_delete),
            ("GET", rf"^/(?P<ver>{_VER})/files$", self._h_file_list),
            ("POST", rf"^/(?P<ver>{_VER})/models/(?P<model>[^/:]+):(?P<method>\w+)$", self._h_model),
            ("GET", rf"^/(?P<ver>{_VER})/models/(?P<model>[^/:]+)$", self._h_model_get),
            ("GET", rf"^/(?P<ver>{_VER})/batches/(?P<id>[^/:]+)$", self._h_batch_get),
            ("DELETE", rf"^/(?P<ver>{_VER})/batches/(?P<id>[^/:]+)$", self._h_batch_delete),
            ("POST", rf"^/(?P<ver>{_VER})/batches/(?P<id>[^/:]+):cancel$", self._h_batch_cancel),
            ("GET", rf"^/(?P<ver>{_VER})/batches$", self._h_batch_list),
            *self._vertex_routes(),
        ]
        try:
            for m, pattern, handler in routes:
                match = re.match(pattern, path)
                if match and m == method:
                    if not path.startswith("/_emulator"):
                        self.stats["requests"] += 1
                        chunk = "upload_id" in request.query
                        if not chunk:
                            key = request.headers.get("x-goog-api-key") or request.query.get("key") or self._vx_token(request)
                            if self.cfg.reject_key is not None and key == self.cfg.reject_key:
                                raise _EmuError(
                                    400,
                                    "INVALID_ARGUMENT",
                                    "API key not valid. Please pass a valid API key.",
                                    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
                                )
                            if not key:
                                raise _EmuError(
                                    403,
                                    "PERMISSION_DENIED",
                                    "Method doesn't allow unregistered callers. "
                                    "Please use API Key or other form of API consumer identity to call this API.",
                                )
                            self._maybe_503()
                    return await handler(request, **match.groupdict())
            raise _EmuError(404, "NOT_FOUND", f"The requested URL {path} was not found on this server.")
        except _EmuError as e:
            body = {"error": {"code": e.code, "message": e.message, "status": e.status}}
            if e.details:
                body["error"]["details"] = e.details
            return web.json_response(body, status=e.code)

    def configure(self, **kw: Any) -> None:
        """Change settings (ValueError for an unknown one); a "first N calls" knob given again starts over."""
        self.cfg.update(**kw)
        for k in kw:
            self.spent.pop(k, None)
        if self.cfg.flex_hold:
            self._flex_released.clear()
        else:
            self._flex_released.set()

    def _fault(self, knob: str) -> bool:
        """A "first N calls" fault knob: True while fewer than N (the setting) have fired, counted in stats as
        faults_<knob>. The setting itself is never changed: the config stays what was configured."""
        if self.spent.get(knob, 0) >= getattr(self.cfg, knob):
            return False
        self.spent[knob] = self.spent.get(knob, 0) + 1
        self.stats[f"faults_{knob}"] = self.stats.get(f"faults_{knob}", 0) + 1
        return True

    def _maybe_503(self) -> None:
        if self._fault("unavailable_burst"):
            pass
        elif not (self.cfg.unavailable_rate and self.rng.random() < self.cfg.unavailable_rate):
            return
        self.stats["injected_503"] += 1
        raise _EmuError(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")

    @staticmethod
    async def _json(request: Any) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _EmuError(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {e}") from e
        if not isinstance(data, dict):
            raise _EmuError(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.")
        return data

    def _ok(self, body: Any) -> Any:
        from aiohttp import web

        return web.Response(body=orjson.dumps(body), status=200, content_type="application/json")

    async def _h_stats(self, request: Any) -> Any:
        self._refresh_all()
        return self._ok({**self.stats, "active_jobs": sum(j["state"] in ("PENDING", "RUNNING") for j in self.jobs.values())})

    async def _h_config(self, request: Any) -> Any:
        try:
            self.configure(**(await self._json(request)))
        except (ValueError, TypeError) as e:
            raise _EmuError(400, "INVALID_ARGUMENT", str(e)) from e
        return self._ok(dataclasses.asdict(self.cfg))

    # -- files ---------------------------------------------------------------------------------------
    def _file_resource(self, fid: str) -> dict[str, Any]:
        f = dict(self.files[fid]["resource"])
        return f

    def _new_file(self, fid: str, data: bytes, display_name: str, mime: str, generated: bool) -> dict[str, Any]:
        t = time.time()
        res = {
            "name": f"files/{fid}",
            "displayName": display_name,
            "mimeType": mime,
            "sizeBytes": str(len(data)),
            "createTime": _rfc3339(t),
            "updateTime": _rfc3339(t),
            "expirationTime": _rfc3339(t + self._dur(self.cfg.file_retention_s or 10 * 365 * 86_400.0)),
            "sha256Hash": __import__("base64").b64encode(hashlib.sha256(data).digest()).decode(),
            "uri": f"{self.url}/v1beta/files/{fid}",
            "state": "ACTIVE",
            "source": "GENERATED" if generated else "UPLOADED",
        }
        if generated:
            res["downloadUri"] = f"{self.url}/download/v1beta/files/{fid}:download?alt=media"
        self.files[fid] = {"resource": res, "available_at": 0.0, "made_at": self.now()}
        self.blobs[fid] = data
        return res

    def _file_lines(self, fid: str) -> list[tuple[Any, Any]]:
        """An uploaded JSONL file's (key, request) lines, parsed once and kept (as the service would)."""
        f = self.files[fid]
        if "lines" not in f:
            lines: list[tuple[Any, Any]] = []
            for raw in self.blobs.get(fid, b"").splitlines():
                if raw.strip():
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        obj = {"key": None, "request": None}
                    if isinstance(obj, dict) and "request" in obj:
                        lines.append((obj.get("key"), obj.get("request")))
                    else:
                        lines.append((None, obj))
            f["lines"] = lines
            f["tokens"] = sum(self._tokens(r) if isinstance(r, dict) else 0 for _, r in lines)
        return list(f["lines"])

    def _get_file(self, fid: str) -> dict[str, Any]:
        fid = fid.removeprefix("files/")
        f = self.files.get(fid)
        keep = self.cfg.file_retention_s
        if f is not None and keep is not None and self.now() - f.get("made_at", self.now()) >= self._dur(keep):
            self.files.pop(fid, None)  # past its retention: deleted, as the Files API does after 48 h
            self.blobs.pop(fid, None)
            self.stats["files_expired"] = self.stats.get("files_expired", 0) + 1
            f = None
        if f is None or f["available_at"] > self.now():
            raise _EmuError(403, "PERMISSION_DENIED", f"You do not have permission to access the File {fid} or it may not exist.")
        return f

    async def _h_upload(self, request: Any, ver: str) -> Any:
        from aiohttp import web

        h = request.headers
        uid = request.query.get("upload_id")
        if uid is None:
            if h.get("X-Goog-Upload-Protocol") != "resumable" or h.get("X-Goog-Upload-Command") != "start":
                raise _EmuError(400, "INVALID_ARGUMENT", "Only resumable uploads are supported.")
            meta = (await self._json(request)).get("file") or {}
            if self._fault("upload_400_mime"):
                raise _EmuError(400, "INVALID_ARGUMENT", "Unsupported MIME type: jsonl")
            uid = secrets.token_hex(16)
            self.uploads[uid] = {
                "buf": bytearray(),
                "size": int(h.get("X-Goog-Upload-Header-Content-Length", "0")),
                "display_name": meta.get("display_name") or meta.get("displayName") or "",
                "mime": meta.get("mime_type") or meta.get("mimeType") or h.get("X-Goog-Upload-Header-Content-Type", ""),
            }
            url = f"{request.scheme}://{request.host}/upload/{ver}/files?upload_id={uid}&upload_protocol=resumable"
            return web.Response(
                status=200,
                headers={
                    "X-Goog-Upload-URL": url,
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Chunk-Granularity": "8388608",
                },
            )
        up = self.uploads.get(uid)
        if up is None:
            raise _EmuError(404, "NOT_FOUND", "Upload session not found.")
        cmd = h.get("X-Goog-Upload-Command", "")
        offset = int(h.get("X-Goog-Upload-Offset", "0"))
        if offset != len(up["buf"]):
            raise _EmuError(400, "INVALID_ARGUMENT", f"Upload offset {offset} does not match {len(up['buf'])}.")
        up["buf"] += await request.read()
        if "finalize" not in cmd:
            return web.Response(status=200, headers={"X-Goog-Upload-Status": "active"})
        del self.uploads[uid]
        if self._fault("upload_no_file"):  # 200, final, and no file in the body: the SDK raises KeyError('file')
            return web.Response(
                body=b"{}", status=200, content_type="application/json", headers={"X-Goog-Upload-Status": "final"}
            )
        fid = "".join(self.rng.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        res = self._new_file(fid, bytes(up["buf"]), up["display_name"], up["mime"], generated=False)
        if "jsonl" in str(up["mime"]):
            self._file_lines(fid)  # parse now, off the create path
        self.stats["uploads"] += 1
        return web.Response(
            body=orjson.dumps({"file": res}),
            status=200,
            content_type="application/json",
            headers={"X-Goog-Upload-Status": "final"},
        )

    async def _h_file_get(self, request: Any, ver: str, id: str) -> Any:
        return self._ok(self._file_resource(self._get_file(id)["resource"]["name"].split("/")[1]))

    async def _h_file_delete(self, request: Any, ver: str, id: str) -> Any:
        self._get_file(id)
        self.files.pop(id, None)
        self.blobs.pop(id, None)
        self.stats["deletes"] += 1
        return self._ok({})

    async def _h_file_list(self, request: Any, ver: str) -> Any:
        return self._page(request, [f["resource"] for f in self.files.values()], "files", 10)

    def _page(self, request: Any, items: list[Any], key: str, default: int) -> Any:
        size = min(100, int(request.query.get("pageSize", default) or default))
        start = int(request.query.get("pageToken", "0") or 0)
        body: dict[str, Any] = {}
        if items[start : start + size]:
            body[key] = items[start : start + size]
        if start + size < len(items):
            body["nextPageToken"] = str(start + size)
        return self._ok(body)

    async def _h_download(self, request: Any, ver: str, id: str) -> Any:
        from aiohttp import web

        fid = id.removeprefix("files/")
        try:
            f = self._get_file(fid)
        except _EmuError:
            self.stats["downloads_not_ready"] = self.stats.get("downloads_not_ready", 0) + 1
            raise
        if f["resource"]["source"] != "GENERATED":
            raise _EmuError(400, "INVALID_ARGUMENT", "Only generated files can be downloaded.")
        data = self.blobs[fid]
        self.stats["downloads"] += 1
        for code, knob, status, message in (
            (403, "download_403", "PERMISSION_DENIED", "You do not have permission to access the File or it may not exist."),
            (404, "download_404", "NOT_FOUND", "Requested entity was not found."),
        ):
            if self._fault(knob):
                raise _EmuError(code, status, message)
        if self._fault("drop_downloads"):
            self.stats["downloads_dropped"] += 1
            resp = web.StreamResponse(status=200)
            resp.content_length = len(data)
            resp.content_type = "application/octet-stream"
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()  # drop the connection half-way
            raise asyncio.CancelledError()
        return web.Response(body=data, status=200, content_type="application/octet-stream")

    # -- models: generateContent, countTokens, batchGenerateContent ---------------------------------
    def _spec(self, model: str) -> ModelSpec | None:
        """The served model's catalog entry; None for a model unknown or retired (404)."""
        m = model.removeprefix("models/")
        if self.cfg.models is not self._specs_for:  # the models table was replaced (a config update)
            self._specs, self._specs_for = {}, self.cfg.models
        key = (m, self.cfg.today)
        if key not in self._specs:
            catalog = builtin_catalog()
            if self.cfg.models:
                catalog = catalog.merged(self.cfg.models, "emulator models")
            try:
                self._specs[key] = resolve_model(catalog, m, self.cfg.today or utcnow()[:10])
            except UsageError:
                self._specs[key] = None
        return self._specs[key]

    async def _h_model_get(self, request: Any, ver: str, model: str) -> Any:
        self.stats["models_get"] += 1
        m = self._check_model(model, "get")
        spec = self._spec(m)
        assert spec is not None
        body: dict[str, Any] = {
            "name": f"models/{m}",
            "version": "001",
            "displayName": m,
            "description": EMULATOR_LABEL,
            "supportedGenerationMethods": ["generateContent", "countTokens", "batchGenerateContent"],
            "thinking": spec.thinking != "none",
        }
        if spec.input_token_limit:
            body["inputTokenLimit"] = spec.input_token_limit
        if spec.output_token_limit:
            body["outputTokenLimit"] = spec.output_token_limit
        if spec.temperature is not None:
            body["temperature"] = spec.temperature
        return self._ok(body)

    def _check_model(self, model: str, method: str) -> str:
        m = model.removeprefix("models/")
        if self._spec(m) is None:
            raise _EmuError(
                404,
                "NOT_FOUND",
                f"models/{m} is not found for API version v1beta, or is not supported "
                f"for {method}. Call ListModels to see the list of available models and their supported methods.",
            )
        return m

    def _chars(self, part: Any) -> float:
        """A text part's length as the "tokenizer" sees it: with token_spread, stretched or shrunk by a
        factor fixed by the text itself, so countTokens, batch accounting and usage all agree."""
        text = part.get("text", "") if isinstance(part, dict) else ""
        if not isinstance(text, str):
            return 0.0
        if not self.cfg.token_spread or not text:
            return len(text)
        u = zlib.crc32(text.encode()) / 2**32
        return len(text) * (1.0 + self.cfg.token_spread * (2.0 * u - 1.0))

    def _tokens(self, req: dict[str, Any], contents_only: bool = False) -> int:
        chars = 0.0
        for c in req.get("contents") or []:
            for p in (c or {}).get("parts") or []:
                chars += self._chars(p)
        if not contents_only:
            si = req.get("systemInstruction") or req.get("system_instruction") or {}
            for p in si.get("parts") or []:
                chars += self._chars(p)
        return max(1, math.ceil(chars / self.cfg.chars_per_token)) if chars else 0

    @staticmethod
    def _check_request(req: Any, where: str) -> dict[str, Any]:
        if not isinstance(req, dict):
            raise _EmuError(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {where} must be an object.")
        norm = {_camel(k): v for k, v in req.items()}
        for k in norm:
            if k not in _GEN_REQUEST_KEYS:
                raise _EmuError(
                    400,
                    "INVALID_ARGUMENT",
                    f"Invalid JSON payload received. Unknown name \"{k}\" at '{where}': Cannot find field.",
                )
        gc = norm.get("generationConfig") or {}
        gc = {_camel(k): v for k, v in gc.items()}
        for k in gc:
            if k not in _GEN_CONFIG_KEYS:
                raise _EmuError(
                    400,
                    "INVALID_ARGUMENT",
                    f"Invalid JSON payload received. Unknown name \"{k}\" at '{where}.generation_config': Cannot find field.",
                )
        norm["generationConfig"] = gc
        if not norm.get("contents"):
            raise _EmuError(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
        return norm

    def _check_thinking(self, req: dict[str, Any], model: str) -> str | int | None:
        """The model's thinking rules, as the service applies them (400 for what it refuses): Gemini 3 takes
        thinkingLevel among its levels; 2.5 takes thinkingBudget in its range (Pro: never 0); not both."""
        spec = self._spec(model)
        tc = (req.get("generationConfig") or {}).get("thinkingConfig")
        if spec is None or tc is None:
            return None
        tc = {_camel(k): v for k, v in (tc if isinstance(tc, dict) else {}).items()}
        bad = set(tc) - {"includeThoughts", "thinkingBudget", "thinkingLevel"}
        if bad:
            raise _EmuError(
                400,
                "INVALID_ARGUMENT",
                f"Invalid JSON payload received. Unknown name \"{sorted(bad)[0]}\" at 'generation_config.thinking_config'.",
            )
        level, budget = tc.get("thinkingLevel"), tc.get("thinkingBudget")
        if level is not None and budget is not None:
            raise _EmuError(400, "INVALID_ARGUMENT", "You can only set one of thinking budget and thinking level.")
        if level is not None:
            lv = str(level).lower().removeprefix("thinking_level_")
            if spec.thinking != "level":
                raise _EmuError(400, "INVALID_ARGUMENT", "Thinking level is not supported for this model.")
            if lv not in spec.thinking_levels:
                raise _EmuError(
                    400,
                    "INVALID_ARGUMENT",
                    f"Thinking level {level} is not supported for this model. Supported: {', '.join(spec.thinking_levels)}.",
                )
            return lv
        if budget is None:
            return None
        if spec.thinking == "none" or (spec.thinking == "level" and not spec.legacy_budget):
            raise _EmuError(400, "INVALID_ARGUMENT", "Thinking budget is not supported for this model; use thinking_level.")
        b = int(budget)
        if spec.thinking == "budget":
            if b == 0 and not spec.thinking_budget_zero:
                raise _EmuError(400, "INVALID_ARGUMENT", "Budget 0 is invalid. This model only works in thinking mode.")
            lo, hi = spec.thinking_budget_min or 0, spec.thinking_budget_max or 0
            if not (b == 0 or (b == -1 and spec.thinking_dynamic) or lo <= b <= hi):
                raise _EmuError(
                    400, "INVALID_ARGUMENT", f"The thinking budget {b} is invalid. Please choose a value between {lo} and {hi}."
                )
        return b

    def _answer(self, req: dict[str, Any], model: str, salt: Any = "", service: str = "batch") -> dict[str, Any]:
        """A deterministic response that follows the requested schema, labelled as the emulator's. Thinking
        shares maxOutputTokens with the answer: past it, the answer is cut (finishReason MAX_TOKENS). A system
        instruction of cache_min_tokens or more seen before is reported as cached (implicit caching)."""
        spec = self._spec(model)
        thoughts = self._thoughts(req, model, spec)
        text = " ".join(p.get("text", "") for c in req["contents"] for p in c.get("parts", []) if isinstance(p, dict))
        gc = req.get("generationConfig") or {}
        schema = gc.get("responseJsonSchema") or gc.get("responseSchema")
        seed = _mix(text, salt)
        if schema:
            answer = orjson.dumps(self._fake(schema, seed, text.split() or ["emulated"])).decode()
        else:
            answer = f"[{EMULATOR_LABEL}] " + " ".join(text.split()[:12])
        prompt_tokens = self._tokens(req)
        out_tokens = max(1, math.ceil(len(answer) / self.cfg.chars_per_token))
        finish = "STOP"
        cap = gc.get("maxOutputTokens")
        if isinstance(cap, int) and thoughts + out_tokens > cap:
            finish = "MAX_TOKENS"
            thoughts = min(thoughts, cap)
            out_tokens = cap - thoughts
            answer = answer[: int(out_tokens * self.cfg.chars_per_token)]
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": out_tokens,
            "totalTokenCount": prompt_tokens + out_tokens + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        self._implicit_cache(req, model, usage)
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        parts = [{"text": answer}] if answer else []
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        self.stats["billed"][digest] = self.stats["billed"].get(digest, 0) + 1
        if spec is not None:  # what the service would bill for it, at the tier that answered
            spent = self.stats["billed_usd"]
            spent[service] = spent.get(service, 0.0) + cost_usd(
                spec, {k: v for k, v in usage.items() if isinstance(v, int)}, service
            )
        return {
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}],
            "usageMetadata": usage,
            "modelVersion": f"{model} (batchify-emulator)",
            "responseId": f"emu-{seed % 10**12:012d}",
        }

    def _thoughts(self, req: dict[str, Any], model: str, spec: ModelSpec | None) -> int:
        """Thinking tokens this request spends (synthetic, by level or budget), after checking the thinking
        config the model accepts; the config seen is counted in stats["thinking_seen"]."""
        choice = self._check_thinking(req, model)
        tc = (req.get("generationConfig") or {}).get("thinkingConfig") or {}
        wire = ",".join(f"{_camel(k)}={v}" for k, v in sorted(tc.items())) if isinstance(tc, dict) and tc else "none"
        key = f"{model} {wire}"
        self.stats["thinking_seen"][key] = self.stats["thinking_seen"].get(key, 0) + 1
        if choice is None and spec is not None and spec.thinking != "none":
            choice = spec.thinking_default or ("dynamic" if spec.thinking == "budget" else "medium")
        if isinstance(choice, int):
            return EMULATED_THOUGHTS["dynamic"] if choice < 0 else min(choice, EMULATED_THOUGHTS["medium"])
        return EMULATED_THOUGHTS.get(choice or "minimal", 0)

    def _implicit_cache(self, req: dict[str, Any], model: str, usage: dict[str, Any]) -> None:
        """A system instruction of cache_min_tokens or more seen before is reported as cached."""
        si = req.get("systemInstruction") or {}
        si_tokens = self._tokens({"systemInstruction": si}) if isinstance(si, dict) else 0
        if si_tokens >= self.cfg.cache_min_tokens:
            prefix = (model, hashlib.blake2b(orjson.dumps(si), digest_size=16).hexdigest())
            if prefix in self.seen_prefixes:
                usage["cachedContentTokenCount"] = si_tokens
                usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": si_tokens}]
            self.seen_prefixes.add(prefix)

    def _fake(self, schema: dict[str, Any], seed: int, words: list[str]) -> Any:
        t = schema.get("type", "object" if "properties" in schema else "string")
        t = (t[0] if isinstance(t, list) else t).lower()
        if "enum" in schema:
            return schema["enum"][seed % len(schema["enum"])]
        if t == "object":
            return {k: self._fake(v, _mix(seed, k), words) for k, v in (schema.get("properties") or {}).items()}
        if t == "array":
            return [self._fake(schema.get("items") or {"type": "string"}, _mix(seed, i), words) for i in range(1 + seed % 3)]
        if t == "boolean":
            return seed % 2 == 0
        if t == "integer":
            return int(schema.get("minimum", 0)) + seed % 100
        if t == "number":
            return round((seed % 1000) / 10, 1)
        s = seed % max(1, len(words) - 8)
        return " ".join(words[s : s + 8])

    async def _h_model(self, request: Any, ver: str, model: str, method: str) -> Any:
        body = await self._json(request)
        if method == "countTokens":
            self._check_model(model, method)
            self.stats["count_tokens_calls"] += 1
            if self._fault("count_tokens_503"):
                raise _EmuError(503, "UNAVAILABLE", "The service is currently unavailable.")
            if "generateContentRequest" in body:
                body = body["generateContentRequest"]
            n = self._tokens(body, contents_only=True)
            return self._ok({"totalTokens": n, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": n}]})
        if method == "generateContent":
            return await self._generate(body, self._check_model(model, method))
        if method == "batchGenerateContent":
            return self._create_batch(body, model)
        raise _EmuError(501, "UNIMPLEMENTED", f"{method} is not emulated.")

    async def _generate(self, body: dict[str, Any], model: str) -> Any:
        req = self._check_request(body, "request")
        if "continuationToken" in req:  # the rest of an answer that stopped with CONTINUATION (billed with it)
            rest = self.continuations.get(str(req["continuationToken"]))  # may be asked again (a lost answer)
            if rest is None:
                raise _EmuError(400, "INVALID_ARGUMENT", "Invalid or expired continuation token.")
            self.stats["continuation_hops"] = self.stats.get("continuation_hops", 0) + 1
            return self._ok(rest)
        if self._fault("generate_400_location"):
            raise _EmuError(400, "FAILED_PRECONDITION", "User location is not supported for the API use.")
        tier = str(req.get("serviceTier") or "standard").lower().removeprefix("service_tier_")
        if tier not in ("flex", "standard", "unspecified"):
            raise _EmuError(
                400, "INVALID_ARGUMENT", f"Invalid value at 'service_tier' ({tier}): the emulator serves standard and flex."
            )
        if tier != "flex":
            self.stats["standard_calls"] += 1
        resp = await (self._flex(req, model) if tier == "flex" else self._standard(req, model))
        if self._fault("generate_cut_short"):  # billed by now: only the way back failed
            from aiohttp import web

            return web.Response(body=resp.body[: len(resp.body) // 2], status=200, content_type="application/json")
        if self._fault("continuation_hops"):
            return self._ok(self._continued(orjson.loads(resp.body)))
        return resp

    def _continued(self, answer: dict[str, Any]) -> dict[str, Any]:
        """An answer cut at the per-request output limit: its first half, finishReason CONTINUATION and a token; the
        second half (no usage of its own: the whole was billed) answers the request that sends the token back."""
        cand = answer["candidates"][0]
        parts = cand["content"]["parts"]
        text = parts[-1]["text"]
        token = base64.b64encode(secrets.token_bytes(12)).decode()
        half = len(text) // 2
        self.continuations[token] = {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": text[half:]}]}, "finishReason": cand["finishReason"]}
            ],
            "usageMetadata": {"promptTokenCount": 0, "candidatesTokenCount": 0, "totalTokenCount": 0},
        }
        first = {**cand, "content": {"role": "model", "parts": [*parts[:-1], {"text": text[:half]}]}}
        return {**answer, "candidates": [{**first, "finishReason": "CONTINUATION", "continuationToken": token}]}

    async def _flex(self, req: dict[str, Any], model: str) -> Any:
        """Flex: the general rate limits apply when the request arrives, then shedding (503) at capacity or at
        the shed rate, then a latency of (simulated) minutes."""
        spec = self._spec(model)
        if spec is None or not spec.flex:
            raise _EmuError(400, "INVALID_ARGUMENT", f"Flex inference is not supported for models/{model}.")
        self.stats["flex_calls"] += 1
        self._admit_rate(req)
        over = self.cfg.flex_capacity is not None and self.stats["flex_in_flight"] >= self.cfg.flex_capacity
        if over or (self.cfg.flex_shed_rate and self.rng.random() < self.cfg.flex_shed_rate):
            self.stats["flex_shed"] += 1
            code = self.cfg.flex_shed_code
            status = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 504: "DEADLINE_EXCEEDED"}.get(code, "UNAVAILABLE")
            raise _EmuError(code, status, "The system is currently at capacity. Please try again later. (Flex, emulated)")
        self.stats["flex_in_flight"] += 1
        self.stats["flex_peak_in_flight"] = max(self.stats["flex_peak_in_flight"], self.stats["flex_in_flight"])
        try:
            lo, hi = self.cfg.flex_latency_min, max(self.cfg.flex_latency_min, self.cfg.flex_latency_max)
            if hi > 0:
                await asyncio.sleep(self._dur(lo + (hi - lo) * self.rng.random()))
            await self._flex_released.wait()
            self.stats["generate_calls"] += 1
            self.stats["last_generate_at"] = self.now()
            return self._ok(self._answer(req, model, service="flex"))
        finally:
            self.stats["flex_in_flight"] -= 1

    def _admit_rate(self, req: dict[str, Any]) -> None:
        """The RPM/TPM limits of generateContent (both tiers), per rate_window, checked as a request arrives:
        429 with RetryInfo when it would pass them. Counts the busiest window seen (requests and tokens)."""
        tokens = self._tokens(req)
        now = self.now()
        w = self.cfg.rate_window
        win = self.gen_window
        while win and win[0][0] <= now - w:
            self.gen_tokens -= win.popleft()[1]
        if (self.cfg.rpm and len(win) + 1 > self.cfg.rpm) or (self.cfg.tpm and self.gen_tokens + tokens > self.cfg.tpm):
            self.stats["generate_429"] += 1
            wait = round(max(0.001, win[0][0] + w - now), 3) if win else 1.0  # fractional, as Google sends it ("57.238747106s")
            raise _EmuError(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details. (emulated)",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                            }
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait:g}s"},
                ],
            )
        win.append((now, tokens))
        self.gen_tokens += tokens
        per_window = self.stats.setdefault("generate_tokens_by_window", {})  # tokens admitted, per rate window
        k = str(int((now - self.stats.get("first_generate_at", now)) // w))  # JSON keys are strings
        per_window[k] = per_window.get(k, 0) + tokens
        self.stats.setdefault("first_generate_at", now)
        self.stats["max_generate_in_window"] = max(self.stats["max_generate_in_window"], len(win))
        self.stats["max_generate_tokens_in_window"] = max(self.stats["max_generate_tokens_in_window"], self.gen_tokens)

    async def _standard(self, req: dict[str, Any], model: str) -> Any:
        self.stats["generate_calls"] += 1
        self._admit_rate(req)
        self.stats["last_generate_at"] = self.now()
        if self.cfg.latency_ms or self.cfg.latency_spread_ms:
            delay = max(0.0, self.rng.gauss(self.cfg.latency_ms, self.cfg.latency_spread_ms)) / 1000
            await asyncio.sleep(delay)
        return self._ok(self._answer(req, model, service="standard"))

    # -- batches ---------------------------------------------------------------------------------------
    def _active_tokens(self, model: str) -> tuple[int, int]:
        self._refresh_all()
        live = [j for j in self.jobs.values() if j["state"] in ("PENDING", "RUNNING")]
        return sum(j["tokens"] for j in live if j["model"] == model), len(live)

    def _limit(self, model: str) -> int:
        """The enqueued-token limit: configured, else the catalog's tier 1, else (not published) 3M."""
        spec = self._spec(model)
        return self.cfg.enqueued_limit or (spec.enqueued_tokens.get(1) if spec else None) or 3_000_000

    def _create_batch(self, body: dict[str, Any], model: str) -> Any:
        model = self._check_model(model, "batchGenerateContent")
        spec = self._spec(model)
        if spec is not None and spec.batch is False:
            raise _EmuError(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version v1beta, or is not supported for batchGenerateContent.",
            )
        if self.cfg.forbid_batch:
            raise _EmuError(403, "PERMISSION_DENIED", "Batch API requires a billing-enabled project (emulated).")
        batch = body.get("batch")
        if not isinstance(batch, dict) or set(batch) - {"inputConfig", "displayName", "model", "priority"}:
            raise _EmuError(
                400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Expected {"batch": {inputConfig, displayName}}.'
            )
        ic = batch.get("inputConfig") or {}
        lines, tokens = self._batch_input(ic)
        active = self._admit_batch(model, tokens)
        job = self._new_job(model, batch.get("displayName"), ic, lines, tokens)
        self.stats["peak_enqueued_tokens"] = max(self.stats["peak_enqueued_tokens"], active + tokens)
        lost = self._fault("create_lost")  # the job is made; only its answer is lost
        if job["fate"] != "expire":
            # The service has a job's output ready when its state flips; states here move lazily (on the
            # next look), so flip it, and write its output, at its end time rather than inside the get
            # that happens to look next (which would bill that get for the answers' generation).
            with contextlib.suppress(RuntimeError):  # no running loop: stays lazy
                asyncio.get_running_loop().call_later(job["duration"] + 0.001, self._refresh, job)
        if lost:
            raise _EmuError(503, "UNAVAILABLE", "The service is currently unavailable. (emulated: the job was created)")
        return self._ok(self._operation(job))

    def _batch_input(self, ic: dict[str, Any]) -> tuple[list[tuple[Any, Any]], int]:
        """A batch's (metadata, request) lines and its tokens, from an uploaded file or inlined requests."""
        lines: list[tuple[Any, Any]] = []
        if "fileName" in ic:
            lines = list(self._file_lines(self._get_file(ic["fileName"])["resource"]["name"].split("/")[1]))
        elif "requests" in ic:
            for r in (ic["requests"] or {}).get("requests") or []:
                lines.append((r.get("metadata"), r.get("request")))
        else:
            raise _EmuError(400, "INVALID_ARGUMENT", "inputConfig needs fileName or requests.")
        if not lines:
            raise _EmuError(400, "INVALID_ARGUMENT", "The batch has no requests.")
        if "fileName" in ic:
            return lines, self.files[ic["fileName"].removeprefix("files/")]["tokens"]
        return lines, sum(self._tokens(r) if isinstance(r, dict) else 0 for _, r in lines)

    def _admit_batch(self, model: str, tokens: int) -> int:
        """Refuse a create (429 RESOURCE_EXHAUSTED, as the service words it) over the model's enqueued-token
        limit, over the active-job cap, or while create_429 faults are left; else the tokens already active."""
        active, njobs = self._active_tokens(model)
        limit = self._limit(model)
        forced = self._fault("create_429")
        if not forced and active + tokens <= limit and njobs < self.cfg.max_active_jobs:
            return active
        self.stats["creates_refused_429"] += 1
        what = f"enqueued tokens {active + tokens} > {limit}"
        if forced:
            what = "batch quota (emulated create_429 fault: refused whatever the load)"
        elif njobs >= self.cfg.max_active_jobs and active + tokens <= limit:
            what = f"{njobs} batch jobs pending or running (at most {self.cfg.max_active_jobs})"
        quota = {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaId": "BatchEnqueuedTokensPerModel"}],
        }
        raise _EmuError(429, "RESOURCE_EXHAUSTED", f"You exceeded your current quota: {what} for this model (emulated).", [quota])

    def _new_job(
        self, model: str, dn: str | None, ic: dict[str, Any], lines: list[tuple[Any, Any]], tokens: int
    ) -> dict[str, Any]:
        """Record a created batch job: its fate (the fail_jobs / expire_jobs faults), its simulated duration."""
        self.created += 1
        fate = "succeed"
        if self.created <= self.cfg.fail_jobs:
            fate = "fail"
        elif self.created <= self.cfg.fail_jobs + self.cfg.expire_jobs:
            fate = "expire"
        jid = "".join(self.rng.choice(string.ascii_lowercase + string.digits) for _ in range(36))
        lo = self.cfg.job_seconds
        hi = self.cfg.job_seconds_max or lo
        dur = self._dur(lo + (hi - lo) * self.duration_rng.random())
        t = time.time()
        self.stats.setdefault("first_create_at", self.now())
        self.jobs[jid] = {
            "id": jid,
            "model": model,
            "display_name": dn,
            "input": ic,
            "lines": lines,
            "tokens": tokens,
            "t0": self.now(),
            "duration": dur,
            "fate": fate,
            "state": "PENDING",
            "create_time": t,
            "update_time": t,
            "end_time": None,
            "output": None,
            "ok": 0,
            "failed": 0,
        }
        self.stats["creates"] += 1
        key = dn or "(none)"
        self.stats["creates_by_display_name"][key] = self.stats["creates_by_display_name"].get(key, 0) + 1
        self.stats.setdefault("job_seconds", []).append(round(dur, 4))
        self.stats.setdefault("created_after", []).append(round(self.now() - self.stats["first_create_at"], 4))
        return self.jobs[jid]

    def _refresh_all(self) -> None:
        for j in self.jobs.values():
            self._refresh(j)

    def _timed_state(self, j: dict[str, Any], el: float, succeed_at_end: bool) -> str:
        """A job's state by the clock alone, `el` seconds after its create: EXPIRED (its fate) after the expiry
        time, FAILED (its fate) or SUCCEEDED (`succeed_at_end`: a Vertex job succeeds only once its output is
        written) at its end, RUNNING after its pending share, else as it is."""
        if j["fate"] == "expire":
            after = self.cfg.expire_seconds if self.cfg.expire_seconds is not None else 2 * self.cfg.job_seconds
            return "EXPIRED" if el >= self._dur(after) else str(j["state"])
        if el >= j["duration"] and (j["fate"] == "fail" or succeed_at_end):
            return "FAILED" if j["fate"] == "fail" else "SUCCEEDED"
        if el >= j["duration"] * self.cfg.pending_fraction:
            return "RUNNING"
        return str(j["state"])

    def _refresh(self, j: dict[str, Any]) -> None:
        if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
            return
        el = self.now() - j["t0"]
        new = self._timed_state(j, el, succeed_at_end=True)
        if new != j["state"]:
            j["state"] = new
            j["update_time"] = time.time()
            if new in ("SUCCEEDED", "FAILED", "EXPIRED"):
                j["end_time"] = j["update_time"]
                end = j["t0"] + (j["duration"] if new != "EXPIRED" else el)
                self.stats["last_end_at"] = max(self.stats.get("last_end_at", 0.0), end)
            if new == "SUCCEEDED":
                self._produce_output(j)

    def _produce_output(self, j: dict[str, Any]) -> None:
        outs: list[tuple[Any, Any, Any]] = []
        for i, (key, req) in enumerate(j["lines"]):
            try:
                norm = self._check_request(req, "request")
                if self.cfg.line_error_rate and (_mix(j["id"], i, self.cfg.seed) % 10_000) / 10_000 < self.cfg.line_error_rate:
                    raise _EmuError(500, "INTERNAL", "Internal error encountered. (emulated line error)")
                outs.append((key, self._answer(norm, j["model"]), None))
                j["ok"] += 1
            except _EmuError as e:
                grpc = {400: 3, 403: 7, 404: 5, 429: 8, 500: 13, 503: 14}.get(e.code, 2)
                outs.append((key, None, {"code": grpc, "message": e.message}))
                j["failed"] += 1
        if "fileName" in j["input"]:
            buf = bytearray()
            for key, resp, err in outs:
                line: dict[str, Any] = {} if key is None else {"key": key}
                if resp is not None:
                    line["response"] = resp
                else:
                    line["error"] = err
                buf += orjson.dumps(line) + b"\n"
            fid = f"batch-{j['id']}"
            self._new_file(fid, bytes(buf), f"{j['display_name'] or j['id']}-output", "application/jsonl", generated=True)
            self.files[fid]["available_at"] = self.now() + self._dur(self.cfg.output_delay)
            j["output"] = {"responsesFile": f"files/{fid}"}
        else:
            items = []
            for meta, resp, err in outs:
                item: dict[str, Any] = {"response": resp} if resp is not None else {"error": err}
                if meta:
                    item["metadata"] = meta
                items.append(item)
            j["output"] = {"inlinedResponses": {"inlinedResponses": items}}

    def _operation(self, j: dict[str, Any]) -> dict[str, Any]:
        self._refresh(j)
        n = len(j["lines"])
        state = j["state"]
        if state == "RUNNING":
            frac = min(
                1.0,
                max(
                    0.0,
                    (self.now() - j["t0"] - j["duration"] * self.cfg.pending_fraction)
                    / max(1e-9, j["duration"] * (1 - self.cfg.pending_fraction)),
                ),
            )
            done = int(n * frac)
            ok, failed = done, 0
        elif state == "SUCCEEDED":
            ok, failed = j["ok"], j["failed"]
        else:
            ok = failed = 0
        pending = n - ok - failed if state in ("PENDING", "RUNNING") else 0
        stats = {
            k: str(v)
            for k, v in (
                ("requestCount", n),
                ("successfulRequestCount", ok),
                ("failedRequestCount", failed),
                ("pendingRequestCount", pending),
            )
            if v
        }
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{j['model']}",
            "name": f"batches/{j['id']}",
            "inputConfig": j["input"] if "fileName" in j["input"] else {"requests": {"requests": []}},
            "createTime": _rfc3339(j["create_time"]),
            "updateTime": _rfc3339(j["update_time"]),
            "batchStats": stats,
            "state": f"BATCH_STATE_{state}",
        }
        if j["display_name"] is not None:
            meta["displayName"] = j["display_name"]
        op: dict[str, Any] = {"name": f"batches/{j['id']}", "metadata": meta}
        if state in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
            meta["endTime"] = _rfc3339(j["end_time"] or j["update_time"])
            op["done"] = True
            if state == "SUCCEEDED":
                meta["output"] = j["output"]
                op["response"] = {
                    "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
                    **j["output"],
                }
            else:
                code, msg = {
                    "FAILED": (13, "Batch job failed (emulated)."),
                    "CANCELLED": (1, "Batch job was cancelled."),
                    "EXPIRED": (4, "Batch job expired: not completed within 48 hours (emulated)."),
                }[state]
                op["error"] = {"code": code, "message": msg}
        return op

    def _job(self, id: str) -> dict[str, Any]:
        j = self.jobs.get(id)
        if j is None:
            raise _EmuError(404, "NOT_FOUND", "Requested entity was not found.")
        return j

    async def _h_batch_get(self, request: Any, ver: str, id: str) -> Any:
        self.stats["gets"] += 1
        j = self._job(id)
        if self._fault("get_404"):
            raise _EmuError(404, "NOT_FOUND", "Requested entity was not found.")
        if self._fault("get_403"):
            raise _EmuError(403, "PERMISSION_DENIED", "Permission denied on resource project 1234 (emulated).")
        op = self._operation(j)
        # Polling cost, for tests and benches: gets per job, the shortest gap between two gets of one
        # job, and how long after its end a client first saw a job finished.
        now = self.now()
        if "last_get_at" in j:
            self.stats["min_get_gap"] = min(self.stats.get("min_get_gap", math.inf), now - j["last_get_at"])
        j["last_get_at"] = now
        key = j["display_name"] or j["id"]
        self.stats["gets_by_job"][key] = self.stats["gets_by_job"].get(key, 0) + 1
        if j["state"] in ("SUCCEEDED", "FAILED", "EXPIRED") and "seen_end_at" not in j:
            j["seen_end_at"] = now
            self.stats.setdefault("job_end_seen_after", []).append(round(now - j["t0"] - j["duration"], 4))
        return self._ok(op)

    async def _h_batch_list(self, request: Any, ver: str) -> Any:
        self.stats["lists"] += 1
        if self._fault("list_429"):
            raise _EmuError(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.Help",
                        "links": [{"description": "quota", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
                    }
                ],
            )
        ops = [self._operation(j) for j in self.jobs.values()]
        if self.cfg.list_foreign_state is not None:  # another tool's job in the same project
            meta = {"name": "batches/foreign-1", "displayName": "another-tool-job", "model": "models/x"}
            if self.cfg.list_foreign_state:
                meta["state"] = self.cfg.list_foreign_state
            ops.insert(0, {"name": "batches/foreign-1", "metadata": meta})
        return self._page(request, ops, "operations", 50)

    async def _h_batch_cancel(self, request: Any, ver: str, id: str) -> Any:
        j = self._job(id)
        self._refresh(j)
        if j["state"] in ("PENDING", "RUNNING"):
            j["state"] = "CANCELLED"
            j["update_time"] = j["end_time"] = time.time()
        self.stats["cancels"] += 1
        return self._ok({})

    async def _h_batch_delete(self, request: Any, ver: str, id: str) -> Any:
        self._job(id)
        del self.jobs[id]
        self.stats["deletes"] += 1
        return self._ok({})

    # -- Vertex AI batch prediction (batchPredictionJobs over Cloud Storage) ----------------------------
    # The REST surface google-genai uses in Vertex mode (docs/VERTEX_NOTES.md A1-A2): jobs under
    # /v1beta1/projects/P/locations/L/batchPredictionJobs; the input is one JSONL object in Cloud Storage,
    # lines {"request": GenerateContentRequest}; the output is <outputUriPrefix>/prediction-model-<ts>/
    # predictions.jsonl, lines {"status", "processed_time", "request", "response"} in no particular order
    # (status "" on success, an error text otherwise, with no response), named by outputInfo.gcsOutputDirectory.
    # Jobs move through PENDING, RUNNING and an end state on the same time scale as the Developer API's batches,
    # and their answers come from the same generator (_answer). Cloud Storage is reached through
    # google-cloud-storage pointed at cfg.gcs_endpoint, in worker threads (the client is synchronous).
    _VX_JOBS = r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/batchPredictionJobs"

    def _vertex_routes(self) -> list[tuple[str, str, Callable[..., Awaitable[Any]]]]:
        jobs, models = self._VX_JOBS, r"publishers/google/models/(?P<model>[^/:]+)"
        return [
            ("POST", rf"^/(?P<ver>{_VER})/{jobs}$", self._h_vx_create),
            ("GET", rf"^/(?P<ver>{_VER})/{jobs}$", self._h_vx_list),
            ("GET", rf"^/(?P<ver>{_VER})/{jobs}/(?P<id>\d+)$", self._h_vx_get),
            ("DELETE", rf"^/(?P<ver>{_VER})/{jobs}/(?P<id>\d+)$", self._h_vx_delete),
            ("POST", rf"^/(?P<ver>{_VER})/{jobs}/(?P<id>\d+):cancel$", self._h_vx_cancel),
            ("GET", rf"^/(?P<ver>{_VER})/{models}$", self._h_vx_model_get),
            ("POST", rf"^/(?P<ver>{_VER})/projects/[^/]+/locations/[^/]+/{models}:(?P<method>\w+)$", self._h_vx_model),
        ]

    @staticmethod
    def _vx_token(request: Any) -> str | None:
        """Vertex calls carry an OAuth token (Authorization: Bearer), not an API key: any token is accepted."""
        if "/publishers/" not in request.path and "/batchPredictionJobs" not in request.path:
            return None
        auth = str(request.headers.get("Authorization", ""))
        if not auth.startswith("Bearer "):
            return None
        return auth.removeprefix("Bearer ").strip() or None

    def _gcs(self) -> Any:
        """The emulator's own Cloud Storage client (anonymous, at cfg.gcs_endpoint), made on first use."""
        if not self.cfg.gcs_endpoint:
            raise _EmuError(400, "FAILED_PRECONDITION", "The emulator has no Cloud Storage (set EmulatorConfig.gcs_endpoint).")
        client = getattr(self, "_gcs_client", None)
        if client is None or getattr(self, "_gcs_for", None) != self.cfg.gcs_endpoint:
            from google.api_core.client_options import ClientOptions
            from google.cloud import storage

            client = storage.Client(
                project="batchify-emulator",
                client_options=ClientOptions(api_endpoint=self.cfg.gcs_endpoint),
                use_auth_w_custom_endpoint=False,  # anonymous: no credentials are looked up
            )
            self._gcs_client, self._gcs_for = client, self.cfg.gcs_endpoint
        return client

    def _vx_blob(self, uri: str) -> Any:
        bucket, name = split_gs_uri(uri)
        return self._gcs().bucket(bucket).blob(name)

    def _vx_scan(self, uri: str) -> tuple[int, int]:
        """(lines, tokens) of one input object, read as a stream (worker thread); 400 when it cannot be read."""
        from google.api_core import exceptions as gexc

        blob = self._vx_blob(uri)
        n = tokens = 0
        try:
            blob.reload()
            if (blob.size or 0) > VERTEX_LIMITS["input_bytes_per_job"]:  # the per-job limits batchify plans with
                raise _EmuError(400, "INVALID_ARGUMENT", f"The input file {uri} is larger than 1 GB.")
            with blob.open("r", encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    n += 1
                    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                        req = orjson.loads(line).get("request")
                        tokens += self._tokens(req) if isinstance(req, dict) else 0
        except gexc.GoogleAPICallError as e:
            raise _EmuError(400, "INVALID_ARGUMENT", f"The input file {uri} does not exist or cannot be read ({e.code}).") from e
        return n, tokens

    def _vx_now_iso(self) -> str:
        return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    async def _h_vx_create(self, request: Any, ver: str, project: str, location: str) -> Any:
        body = await self._json(request)
        m, ic, oc, uris, prefix = self._vx_check_create(body)
        if self.cfg.forbid_batch:
            raise _EmuError(403, "PERMISSION_DENIED", "Permission 'aiplatform.batchPredictionJobs.create' denied (emulated).")
        if self._fault("create_429"):
            raise _EmuError(429, "RESOURCE_EXHAUSTED", "Quota exceeded for batch prediction jobs (emulated create_429 fault).")
        n = tokens = 0
        for uri in uris:
            a, b = await asyncio.to_thread(self._vx_scan, str(uri))
            n, tokens = n + a, tokens + b
        if not n:
            raise _EmuError(400, "INVALID_ARGUMENT", "The batch prediction input has no requests.")
        most = VERTEX_LIMITS["requests_per_job"]
        if n > most:
            raise _EmuError(400, "INVALID_ARGUMENT", f"{n} requests: a batch prediction job takes at most {most:,}.")
        self.created += 1  # one count with the Developer API's batches: fail_jobs / expire_jobs are "the first N jobs"
        fate = "succeed"
        if self.created <= self.cfg.fail_jobs:
            fate = "fail"
        elif self.created <= self.cfg.fail_jobs + self.cfg.expire_jobs:
            fate = "expire"
        j = self._vx_new_job(project, location, body.get("displayName"), m, ic, oc, uris, prefix, n, tokens, fate)
        self.stats["vertex_creates"] += 1
        by = self.stats["vertex_creates_by_display_name"]
        by[j["display_name"] or "(none)"] = by.get(j["display_name"] or "(none)", 0) + 1
        if fate != "expire":
            asyncio.get_running_loop().call_later(j["duration"] + 0.001, self._vx_refresh, j)
        return self._ok(self._vx_resource(j))

    def _vx_check_create(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], list[Any], str]:
        """A create's body as the service checks it: (model id, inputConfig, outputConfig, input URIs, output prefix)."""
        bad = set(body) - {"model", "inputConfig", "outputConfig", "displayName", "labels"}
        if bad:
            raise _EmuError(400, "INVALID_ARGUMENT", f'Invalid JSON payload received. Unknown name "{sorted(bad)[0]}".')
        model = str(body.get("model") or "")
        if not model.startswith("publishers/google/models/"):
            raise _EmuError(400, "INVALID_ARGUMENT", f"Model {model!r} is not a publisher model (publishers/google/models/...).")
        m = model.removeprefix("publishers/google/models/")
        spec = self._spec(m)
        if spec is None or spec.batch is False:
            raise _EmuError(404, "NOT_FOUND", f"Publisher Model `{model}` not found or does not support batch prediction.")
        ic, oc = body.get("inputConfig") or {}, body.get("outputConfig") or {}
        uris = (ic.get("gcsSource") or {}).get("uris") or []
        prefix = (oc.get("gcsDestination") or {}).get("outputUriPrefix") or ""
        if ic.get("instancesFormat") != "jsonl" or not uris or not all(str(u).startswith("gs://") for u in uris):
            raise _EmuError(
                400, "INVALID_ARGUMENT", "inputConfig: instancesFormat jsonl with gcsSource.uris (gs://...) is emulated."
            )
        if oc.get("predictionsFormat") != "jsonl" or not prefix.startswith("gs://"):
            raise _EmuError(400, "INVALID_ARGUMENT", "outputConfig: predictionsFormat jsonl with gcsDestination.outputUriPrefix.")
        return m, ic, oc, uris, prefix

    def _vx_new_job(
        self,
        project: str,
        location: str,
        dn: str | None,
        m: str,
        ic: dict[str, Any],
        oc: dict[str, Any],
        uris: list[Any],
        prefix: str,
        n: int,
        tokens: int,
        fate: str,
    ) -> dict[str, Any]:
        """A new job's record (PENDING, its duration drawn), kept in self.vjobs."""
        jid = str(self.rng.randrange(10**17, 10**18))
        lo = self.cfg.job_seconds
        hi = self.cfg.job_seconds_max or lo
        t = time.time()
        j = self.vjobs[jid] = {
            "id": jid,
            "name": f"projects/{project}/locations/{location}/batchPredictionJobs/{jid}",
            "project": project,
            "location": location,
            "model": m,
            "display_name": dn,
            "input": ic,
            "output_config": oc,
            "uris": [str(u) for u in uris],
            "prefix": prefix.rstrip("/"),
            "lines": n,
            "tokens": tokens,
            "t0": self.now(),
            "duration": self._dur(lo + (hi - lo) * self.duration_rng.random()),
            "fate": fate,
            "state": "PENDING",
            "create_time": t,
            "update_time": t,
            "start_time": None,
            "end_time": None,
            "output_dir": None,
            "writing": None,
            "error": None,
            "ok": 0,
            "failed": 0,
        }
        return j

    def _vx_refresh(self, j: dict[str, Any]) -> None:
        """Move a job on by the clock; at its end, a job that succeeds writes its output first (in a worker
        thread) and reads SUCCEEDED only once the output is in the bucket."""
        if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
            return
        el = self.now() - j["t0"]
        new = self._timed_state(j, el, succeed_at_end=False)
        if el >= j["duration"] and j["fate"] == "succeed" and j["writing"] is None:
            j["writing"] = asyncio.get_running_loop().create_task(self._vx_write_output(j))
        if new in ("FAILED", "EXPIRED") and self.cfg.vertex_exported_share > 0:
            if j["writing"] is None:  # the rows done before the end are exported first; the task then ends the job
                j["writing"] = asyncio.get_running_loop().create_task(self._vx_write_output(j, new))
            return
        if new != j["state"]:
            self._vx_move(j, new)

    def _vx_move(self, j: dict[str, Any], new: str) -> None:
        j["state"] = new
        j["update_time"] = time.time()
        if new == "RUNNING":
            j["start_time"] = j["update_time"]
        if new in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
            j["end_time"] = j["update_time"]
            j["error"] = j["error"] or {
                "FAILED": {"code": 13, "message": "Batch prediction job failed (emulated)."},
                "CANCELLED": {"code": 1, "message": "CANCELED"},
                "EXPIRED": {"code": 4, "message": "Batch prediction job expired: not started within 72 hours (emulated)."},
            }.get(new)

    async def _vx_write_output(self, j: dict[str, Any], end: str = "SUCCEEDED") -> None:
        """Write a job's output, then end it `end`: every row for SUCCEEDED, else (vertex_exported_share) the share
        of its rows done before it ended FAILED, EXPIRED or CANCELLED."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out_dir = f"{j['prefix']}/prediction-model-{stamp}"
        rows = None if end == "SUCCEEDED" else int(j["lines"] * min(1.0, self.cfg.vertex_exported_share))
        try:
            ok, failed = await asyncio.to_thread(self._vx_produce, j, f"{out_dir}/predictions.jsonl", rows)
        except Exception as e:  # the bucket went away, or refused the write: the job fails, as on the service
            j["error"] = {"code": 13, "message": f"Failed to write the output to {out_dir}: {type(e).__name__}: {e}"[:300]}
            if j["state"] in ("PENDING", "RUNNING"):
                self._vx_move(j, "FAILED")
            return
        j["ok"], j["failed"], j["output_dir"] = ok, failed, out_dir
        if end in ("FAILED", "EXPIRED") and rows is not None:
            j["error"] = {
                "code": 4,
                "message": "Batch prediction job exceeded 24 hours; its unfinished requests were cancelled (emulated).",
            }
        if j["state"] in ("PENDING", "RUNNING"):  # a cancel that came first wins (the rows written stay)
            self._vx_move(j, end)

    def _vx_produce(self, j: dict[str, Any], out_uri: str, rows: int | None = None) -> tuple[int, int]:
        """Stream the input objects, answer every line (the first `rows` only, if given), write the output lines
        shuffled (worker thread)."""
        rng = random.Random(f"{self.cfg.seed}:{j['id']}")
        ok = failed = 0
        window: list[bytes] = []
        with self._vx_blob(out_uri).open("wb", chunk_size=8 * 1024 * 1024, content_type="application/jsonl") as out:

            def flush() -> None:
                rng.shuffle(window)
                out.write(b"".join(window))
                window.clear()

            i = 0
            for uri in j["uris"]:
                with self._vx_blob(uri).open("r", encoding="utf-8") as f:
                    for raw in f:
                        if not raw.strip():
                            continue
                        if rows is not None and i >= rows:
                            break
                        line, good = self._vx_line(j, i, raw)
                        ok, failed, i = ok + good, failed + (not good), i + 1
                        window.append(orjson.dumps(line) + b"\n")
                        if len(window) >= max(1, self.cfg.vertex_shuffle_window):
                            flush()
            flush()
        return ok, failed

    def _vx_line(self, j: dict[str, Any], i: int, raw: str) -> tuple[dict[str, Any], bool]:
        """One output line: the request echoed as given, status "" and the response, or status an error text.
        Google publishes no schema for `status` on a failed row (docs/VERTEX_NOTES.md A1): a message here."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        req = obj.get("request") if isinstance(obj, dict) else None
        head: dict[str, Any] = {"status": "", "processed_time": self._vx_now_iso(), "request": req if req is not None else obj}
        try:
            if req is None:
                raise _EmuError(400, "INVALID_ARGUMENT", 'Invalid instance: expected a JSON object with a "request" field.')
            norm = self._check_request(req, "request")
            if self.cfg.line_error_rate and (_mix(j["id"], i, self.cfg.seed) % 10_000) / 10_000 < self.cfg.line_error_rate:
                raise _EmuError(500, "INTERNAL", "Internal error encountered. (emulated line error)")
            head["response"] = self._answer(norm, j["model"])
            return head, True
        except _EmuError as e:
            head["status"] = f"{e.status}: {e.message}" if e.status else e.message
            return head, False

    def _vx_resource(self, j: dict[str, Any]) -> dict[str, Any]:
        """The BatchPredictionJob resource, as the REST API returns it (int64 counts as strings)."""
        self._vx_refresh(j)
        n, state = j["lines"], j["state"]
        if state == "RUNNING":
            span = max(1e-9, j["duration"] * (1 - self.cfg.pending_fraction))
            done = min(n, int(n * max(0.0, (self.now() - j["t0"] - j["duration"] * self.cfg.pending_fraction) / span)))
            ok, failed = done, 0
        else:  # the rows exported (every row of a SUCCEEDED job; vertex_exported_share of an ended one; else none)
            ok, failed = j["ok"], j["failed"]
        res: dict[str, Any] = {
            "name": j["name"],
            "model": f"publishers/google/models/{j['model']}",
            "inputConfig": j["input"],
            "outputConfig": j["output_config"],
            "state": f"JOB_STATE_{state}",
            "createTime": _rfc3339(j["create_time"]),
            "updateTime": _rfc3339(j["update_time"]),
            "completionStats": {"successfulCount": str(ok), "failedCount": str(failed), "incompleteCount": str(n - ok - failed)},
        }
        if j["display_name"] is not None:
            res["displayName"] = j["display_name"]
        if j["start_time"] is not None:
            res["startTime"] = _rfc3339(j["start_time"])
        if j["end_time"] is not None:
            res["endTime"] = _rfc3339(j["end_time"])
        if j["output_dir"] is not None and self.cfg.vertex_output_info:
            res["outputInfo"] = {"gcsOutputDirectory": j["output_dir"]}
        if j["error"] is not None:
            res["error"] = j["error"]
        return res

    def _vx_job(self, project: str, location: str, id: str) -> dict[str, Any]:
        j = self.vjobs.get(id)
        if j is None or (j["project"], j["location"]) != (project, location):
            raise _EmuError(404, "NOT_FOUND", f'The BatchPredictionJob "{id}" does not exist.')
        return j

    async def _h_vx_get(self, request: Any, ver: str, project: str, location: str, id: str) -> Any:
        self.stats["vertex_gets"] += 1
        return self._ok(self._vx_resource(self._vx_job(project, location, id)))

    async def _h_vx_list(self, request: Any, ver: str, project: str, location: str) -> Any:
        self.stats["vertex_lists"] += 1
        if self._fault("list_429"):
            raise _EmuError(429, "RESOURCE_EXHAUSTED", "Quota exceeded for aiplatform.googleapis.com/read_requests (emulated).")
        keep = self._vx_filter(str(request.query.get("filter", "")))
        items = [
            self._vx_resource(j) for j in self.vjobs.values() if (j["project"], j["location"]) == (project, location) and keep(j)
        ]
        return self._page(request, items, "batchPredictionJobs", 100)

    @staticmethod
    def _vx_filter(text: str) -> Callable[[dict[str, Any]], bool]:
        """The part of the AIP-160 filter grammar the SDK's tests use: terms joined by AND, each
        display_name / state with =, != or : (":" with a trailing * is a prefix match). Else 400."""
        terms = []
        for term in filter(None, (t.strip() for t in re.split(r"\s+AND\s+", text.strip()))):
            m = re.fullmatch(r'(display_name|displayName|state)\s*(=|!=|:)\s*"?([^"]*)"?', term)
            if not m:
                raise _EmuError(400, "INVALID_ARGUMENT", f"Unsupported filter (emulated grammar): {term!r}")
            terms.append((m.group(1), m.group(2), m.group(3)))

        def keep(j: dict[str, Any]) -> bool:
            for fld, op, value in terms:
                have = f"JOB_STATE_{j['state']}" if fld == "state" else str(j["display_name"] or "")
                hit = have.startswith(value[:-1]) if op == ":" and value.endswith("*") else have == value
                if hit == (op == "!="):
                    return False
            return True

        return keep

    async def _h_vx_cancel(self, request: Any, ver: str, project: str, location: str, id: str) -> Any:
        j = self._vx_job(project, location, id)
        self._vx_refresh(j)
        if j["state"] not in ("PENDING", "RUNNING"):
            raise _EmuError(400, "FAILED_PRECONDITION", f"Cannot cancel a BatchPredictionJob in state JOB_STATE_{j['state']}.")
        if j["state"] == "RUNNING" and self.cfg.vertex_exported_share > 0 and j["writing"] is None:
            j["writing"] = task = asyncio.get_running_loop().create_task(self._vx_write_output(j, "CANCELLED"))
            await task  # the rows done before the cancel are exported (and billed)
        self._vx_move(j, "CANCELLED")
        self.stats["cancels"] += 1
        return self._ok({})

    async def _h_vx_delete(self, request: Any, ver: str, project: str, location: str, id: str) -> Any:
        j = self._vx_job(project, location, id)
        self._vx_refresh(j)
        if j["state"] in ("PENDING", "RUNNING"):
            raise _EmuError(400, "FAILED_PRECONDITION", "The BatchPredictionJob is running: cancel it before deleting it.")
        del self.vjobs[id]
        self.stats["deletes"] += 1
        return self._ok(
            {
                "name": f"projects/{project}/locations/{location}/operations/{self.rng.randrange(10**17, 10**18)}",
                "metadata": {"@type": "type.googleapis.com/google.cloud.aiplatform.v1beta1.DeleteOperationMetadata"},
                "done": True,
                "response": {"@type": "type.googleapis.com/google.protobuf.Empty"},
            }
        )

    async def _h_vx_model_get(self, request: Any, ver: str, model: str) -> Any:
        self.stats["models_get"] += 1
        m = self._check_model(model, "get")
        return self._ok(
            {"name": f"publishers/google/models/{m}", "versionId": "001", "displayName": m, "description": EMULATOR_LABEL}
        )

    async def _h_vx_model(self, request: Any, ver: str, model: str, method: str) -> Any:
        """countTokens and generateContent on a publisher model: the Developer API's handlers (same bodies)."""
        if method not in ("countTokens", "generateContent"):
            raise _EmuError(501, "UNIMPLEMENTED", f"{method} is not emulated on Vertex.")
        return await self._h_model(request, ver, model, method)


class EmulatorThread:
    """Run an Emulator on its own event loop in a thread (for sync callers and tests)."""

    def __init__(self, config: EmulatorConfig | None = None, port: int = 0):
        self.emulator = Emulator(config)
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="batchify-emulator")
        self.url = ""

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.emulator.start(port=self.port), self.loop).result(10)
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the emulator's loop (to read or change its state safely)."""

        async def _do() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_do(), self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.emulator.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


if __name__ == "__main__":
    sys.exit(main())
