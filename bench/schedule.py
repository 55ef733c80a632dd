"""Rolling admission vs strict waves vs the lower bound, on an emulator with slow, uneven jobs.

    python bench/schedule.py [--docs 12000] [--limit 10000000] [--scale 400] [--batch-size 100]

12,000 articles of ~2,800 tokens (33.6M tokens) under a 10M enqueued-token limit; each emulator job
takes 10 to 40 simulated minutes (uniform, seeded: both runs see the same durations in creation
order), time-scaled so each run takes well under a minute. Prints the makespan (first create to last
job end, in simulated minutes) of rolling admission and of strict waves (--barrier), and the lower
bound: total tokens / limit x mean duration. Targets: rolling <= 0.85x waves and <= 1.3x the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
from pathlib import Path

import orjson
from _common import ROOT, emulator_process, stats

import batchify


def makespan(args: argparse.Namespace, inp: Path, state: Path, barrier: bool) -> tuple[float, dict, int]:
    with emulator_process(
        "--job-seconds",
        "600",
        "--job-seconds-max",
        "2400",
        "--time-scale",
        str(args.scale),
        "--enqueued-limit",
        str(args.limit),
        "--seed",
        "7",
        "--pending-fraction",
        "0.05",
    ) as url:
        # Poll every 30 simulated seconds, backing off to at most 5 simulated minutes.
        opts = batchify.RunOptions(
            batch_size=args.batch_size,
            enqueued_limit=args.limit,
            barrier=barrier,
            poll_interval=30 / args.scale,
            max_poll_interval=300 / args.scale,
            margin=args.margin,
            name="rolling" if not barrier else "waves",
        )
        run, summary = asyncio.run(batchify.run_file(inp, options=opts, state_dir=state, endpoint=url, api_key="k"))
        s = stats(url)
        s["plan"] = run.plan
    if args.dump:
        Path(args.dump + ("-waves" if barrier else "-rolling") + ".json").write_bytes(orjson.dumps(s))
    assert summary is not None and summary.ok == args.docs, summary
    span = (s["last_end_at"] - s["first_create_at"]) * args.scale / 60
    return span, s, run.plan["input_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=12_000)
    ap.add_argument("--limit", type=int, default=10_000_000)
    ap.add_argument("--scale", type=float, default=400.0, help="simulated seconds per real second")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--margin", type=float, default=None, help="default: batchify's (3%% once calibrated)")
    ap.add_argument("--words", type=int, default=1650)
    ap.add_argument("--dump", help="write each run's emulator stats to DUMP-rolling.json / DUMP-waves.json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    import make_articles

    rng = random.Random(3)
    pool = [make_articles.article(i, rng, a.words) for i in range(300)]
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d:
        inp = Path(d) / "articles.jsonl"
        with open(inp, "wb") as f:
            for i in range(a.docs):
                f.write(orjson.dumps({**pool[i % len(pool)], "id": i}) + b"\n")
        rolling, s1, tokens = makespan(a, inp, Path(d) / "st", barrier=False)
        waves, s2, _ = makespan(a, inp, Path(d) / "st", barrier=True)
    served = s1["peak_enqueued_tokens"]
    # The best any admission policy could do with these very durations and slots, at zero overhead:
    # greedy list scheduling (each batch starts the moment a slot frees).
    import heapq

    per_batch = tokens / math.ceil(a.docs / a.batch_size)
    slots = int(s1["plan"]["effective_limit"] // per_batch)
    free = [0.0] * slots
    ideal = 0.0
    for sec in s1["job_seconds"]:
        t = heapq.heappop(free) + sec * a.scale / 60
        heapq.heappush(free, t)
        ideal = max(ideal, t)
    bound = tokens / a.limit * 25.0  # mean of U(10, 40) minutes
    print(
        f"{a.docs:,} docs, ~{tokens / a.docs:,.0f} tokens each, {tokens / 1e6:.1f}M tokens; limit {a.limit / 1e6:.0f}M "
        f"(margin {s1['plan']['margin']:.0%}); batches of {a.batch_size}; jobs 10-40 simulated min"
    )
    print(
        f"peak enqueued tokens: rolling {served / 1e6:.2f}M, waves {s2['peak_enqueued_tokens'] / 1e6:.2f}M; "
        f"429s: {s1['creates_refused_429']} / {s2['creates_refused_429']}"
    )
    print(f"makespan rolling: {rolling:.0f} min   strict waves: {waves:.0f} min   lower bound: {bound:.0f} min")
    print(f"ideal greedy with the same durations and {slots} slots, zero overhead: {ideal:.0f} min")
    print(f"ratio rolling/ideal-greedy: {rolling / ideal:.2f}")
    print(f"ratio rolling/waves: {rolling / waves:.2f}")
    print(f"ratio rolling/lower-bound: {rolling / bound:.2f}")


if __name__ == "__main__":
    main()
