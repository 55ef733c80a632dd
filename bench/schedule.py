"""Rolling admission vs strict waves vs the lower bound, on an emulator with slow, uneven jobs.

    python bench/schedule.py [--docs 12000] [--limit 10000000] [--scale 200] [--batch-size 100] [--seeds 7,8,9]

12,000 articles of ~2,800 tokens (~34M tokens) under a 10M enqueued-token limit; each emulator job
takes 10 to 40 simulated minutes (uniform; per seed, the n-th job created gets the same duration in
both runs), time-scaled so each run takes well under a minute. For each seed: the makespan (first
create to last job end, in simulated minutes) of rolling admission and of strict waves (--barrier),
the lower bound (total tokens / limit x mean duration), and what an ideal zero-overhead greedy
scheduler would have made of the very same durations. Then the mean ratios over the seeds, and a
Monte-Carlo of that ideal scheduler over 2,000 duration draws: how far above the bound this job
model leaves even a perfect scheduler. Targets: rolling <= 0.85x waves and <= 1.3x the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import statistics
import sys
import tempfile
from pathlib import Path

import orjson
from _common import ROOT, emulator_process, stats

import batchify

LO, HI = 10.0, 40.0  # job duration range, simulated minutes
MEAN = (LO + HI) / 2


def makespan(args: argparse.Namespace, inp: Path, state: Path, seed: int, barrier: bool) -> tuple[float, dict]:
    with emulator_process(
        "--job-seconds",
        str(LO * 60),
        "--job-seconds-max",
        str(HI * 60),
        "--time-scale",
        str(args.scale),
        "--enqueued-limit",
        str(args.limit),
        "--seed",
        str(seed),
        "--pending-fraction",
        "0.05",
    ) as url:
        # Poll every 30 simulated seconds, backing off to at most 5 simulated minutes.
        opts = batchify.RunOptions(
            mode="batch",  # batch jobs alone: the default (auto) is hybrid, whose Flex lanes take the tail (bench/hybrid.py)
            batch_size=args.batch_size,
            enqueued_limit=args.limit,
            barrier=barrier,
            poll_interval=30 / args.scale,
            max_poll_interval=300 / args.scale,
            margin=args.margin,
            name=f"{'waves' if barrier else 'rolling'}-{seed}",
        )
        run, summary = asyncio.run(batchify.run_file(inp, options=opts, state_dir=state, endpoint=url, api_key="k"))
        s = stats(url)
        s["plan"] = run.plan
    if args.dump:
        Path(f"{args.dump}-{seed}-{'waves' if barrier else 'rolling'}.json").write_bytes(orjson.dumps(s))
    assert summary is not None and summary.ok == args.docs, summary
    return (s["last_end_at"] - s["first_create_at"]) * args.scale / 60, s


def greedy(durations: list[float], slots: int) -> float:
    """Makespan of ideal list scheduling: each job starts the moment a slot frees, at zero overhead."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        t = heapq.heappop(free) + d
        heapq.heappush(free, t)
        end = max(end, t)
    return end


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=12_000)
    ap.add_argument("--limit", type=int, default=10_000_000)
    ap.add_argument("--scale", type=float, default=200.0, help="simulated seconds per real second")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--margin", type=float, default=None, help="default: batchify's (what the countTokens calibration warrants)")
    ap.add_argument("--words", type=int, default=1650)
    ap.add_argument("--seeds", default="7,8,9", help="emulator seeds (job durations), comma-separated")
    ap.add_argument("--dump", help="write each run's emulator stats to DUMP-SEED-rolling.json / -waves.json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    import make_articles

    rng = random.Random(3)
    pool = [make_articles.article(i, rng, a.words) for i in range(300)]
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d:
        inp = Path(d) / "articles.jsonl"
        with open(inp, "wb") as f:
            for i in range(a.docs):
                f.write(orjson.dumps({**pool[i % len(pool)], "id": i}) + b"\n")
        for seed in [int(x) for x in a.seeds.split(",")]:
            rolling, s1 = makespan(a, inp, Path(d) / "st", seed, barrier=False)
            waves, s2 = makespan(a, inp, Path(d) / "st", seed, barrier=True)
            plan = s1["plan"]
            tokens, jobs = plan["input_tokens"], plan["batches"]
            slots = int(plan["effective_limit"] // (tokens / jobs))
            ideal = greedy([sec * a.scale / 60 for sec in s1["job_seconds"]], slots)
            bound = tokens / a.limit * MEAN
            seen = [x * a.scale for x in s1.get("job_end_seen_after", [])]
            fill = s1["created_after"][min(slots, jobs) - 1] * a.scale
            rows.append((rolling, waves, ideal, bound))
            print(
                f"seed {seed}: rolling {rolling:.0f} min, strict waves {waves:.0f} min, lower bound {bound:.0f} min, "
                f"ideal greedy {ideal:.0f} min ({slots} slots); peak enqueued {s1['peak_enqueued_tokens'] / 1e6:.2f}M / "
                f"{s2['peak_enqueued_tokens'] / 1e6:.2f}M; 429s {s1['creates_refused_429']} / {s2['creates_refused_429']}; "
                f"gets {s1['gets']} for {jobs} jobs, ends seen {statistics.mean(seen or [0]):.0f} s after on average, "
                f"first {slots} creates within {fill:.0f} s (simulated)"
            )
    draws = [random.Random(k) for k in range(2000)]
    mc = sorted(greedy([r.uniform(LO, HI) for _ in range(jobs)], slots) / bound for r in draws)
    print(
        f"{a.docs:,} docs, {tokens / 1e6:.1f}M tokens in {jobs} batches of {a.batch_size}; limit {a.limit / 1e6:.0f}M "
        f"(planning to {plan['effective_limit'] / 1e6:.2f}M, margin {plan['margin']:.1%}); jobs {LO:.0f}-{HI:.0f} simulated min"
    )
    print(
        f"ideal greedy with {slots} slots over 2,000 duration draws / lower bound: mean {statistics.mean(mc):.2f}, "
        f"p10 {mc[200]:.2f}, p90 {mc[1800]:.2f}  (the floor this job model leaves any scheduler)"
    )
    ratio = lambda i, j: statistics.mean(r[i] / r[j] for r in rows)  # noqa: E731
    print(f"mean over {len(rows)} seed(s): ideal-greedy/lower-bound {ratio(2, 3):.2f}")
    print(f"ratio rolling/ideal-greedy: {ratio(0, 2):.2f}")
    print(f"ratio rolling/waves: {ratio(0, 1):.2f}")
    print(f"ratio rolling/lower-bound: {ratio(0, 3):.2f}")


if __name__ == "__main__":
    main()
