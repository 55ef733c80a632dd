"""Real-time limiter: achieved rate / configured rate, and the most requests seen in any window.

    python bench/realtime.py [--requests 6000] [--limit 2000] [--window 10]

The emulator (its own process) enforces `limit` generateContent calls per `window` seconds and answers
with 30 ms +- 10 ms latency; batchify runs the requests in real time with --rpm set to the same limit.
12,000 RPM is scaled as 2,000 per 10 s so the run takes about 30 s. Target: ratio >= 0.97 and zero
windows over the limit (zero 429s).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson
from _common import emulator_process, stats

import batchify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--limit", type=int, default=2000, help="requests per window")
    ap.add_argument("--window", type=float, default=10.0, help="seconds")
    a = ap.parse_args()
    with (
        tempfile.TemporaryDirectory() as d,
        emulator_process(
            "--rpm", str(a.limit), "--rate-window", str(a.window), "--latency-ms", "30", "--latency-spread-ms", "10"
        ) as url,
    ):
        inp = Path(d) / "docs.jsonl"
        with open(inp, "wb") as f:
            for i in range(a.requests):
                f.write(orjson.dumps({"id": i, "text": f"Short item {i}: shares rose after the results."}) + b"\n")
        opts = batchify.RunOptions(mode="realtime", rpm=a.limit, rate_window=a.window, concurrency=64, calibrate=False)
        t0 = time.monotonic()
        _run, summary = asyncio.run(batchify.run_file(inp, options=opts, state_dir=Path(d) / "st", endpoint=url, api_key="k"))
        elapsed = time.monotonic() - t0
        s = stats(url)
    assert summary is not None
    achieved = summary.ok / elapsed * a.window
    span = s["last_generate_at"] - s["first_generate_at"]
    steady = (s["generate_calls"] - 1) / span * a.window if span > 0 else 0.0
    print(f"requests: {a.requests}  ok: {summary.ok}  errors: {summary.errors}  elapsed: {elapsed:.1f} s")
    print(
        f"configured: {a.limit} per {a.window:g} s ({a.limit * 60 / a.window:,.0f} RPM); "
        f"achieved: {steady:,.0f} per {a.window:g} s as the service saw it, {achieved:,.0f} end to end "
        "(prepare and merge included)"
    )
    print(f"429s: {s['generate_429']}  max seen in any {a.window:g} s window: {s['max_generate_in_window']} (limit {a.limit})")
    print(f"ratio end-to-end/configured: {achieved / a.limit:.3f}")
    print(f"ratio achieved/configured: {steady / a.limit:.3f}")
    print(f"ratio max-window/limit: {s['max_generate_in_window'] / a.limit:.3f}")


if __name__ == "__main__":
    main()
