"""Short jobs: told the true enqueued-token limit vs learning it from 429s.

    python bench/short_jobs.py [--jobs 9] [--per-wave 3] [--docs-per-job 30] [--job-seconds 2.5 --job-seconds-max 3.5]
                               [--repeats 3] [--only short|no-eta|default] [--log]

An emulator whose enqueued-token limit L holds --per-wave jobs at once (each ~1/per-wave of L), jobs of 2.5
to 3.5 s (drawn per job; the n-th job created gets the same duration in both runs of a repeat), and an input
of --jobs such jobs: several waves under L. batchify runs it twice on the same input: told the true limit
(--enqueued-limit L), and told 100 x L, so that it plans one wave and learns the limit from the emulator's
429 refusals. Both runs get the same jobs: the told run's planner cuts the batches (to fill L exactly), the
learned run gets that batch size, and the script checks that both plans list the same batches. --mode batch
for both (in auto mode, told the limit, a model with Flex would run hybrid). Three settings:

  short    polled every second (what a user of short jobs would pass; also the default for --endpoint
           local); jobs show their progress (batchStats) while RUNNING, so polls are timed to the end;
  no-eta   the same, but each job is PENDING for 95% of its time, so there is no progress to time a poll
           by (a job queued at the service, or a service whose counts do not move): polls back off;
           time-scaled 2x;
  default  the default 30 s poll interval (backing off to 300 s), time-scaled 15x so that a run takes
           seconds. (Not more: at 30x a 3 s job lasts 0.1 s, as long as a few creates, and the learned
           run's creates find room that no poll has seen yet, which real 3 s jobs would not allow.)

Figures in simulated seconds (= real ones for short).

Each run has its own emulator process and temp folder; each setting is repeated --repeats times (emulator
seed = the repeat), told then learned, and the medians printed: makespan (first create to the end of
run_file), the whole run_file call (prepare included), creates refused (429, from the emulator), jobs
created, gets, the mean lag from a job's end to the get that saw it. Then the ratio told/learned makespan
per setting; the target ("no slower when told the true limit", issue 13) is <= 1.0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from _common import ROOT, emulator_process, stats

import batchify

LEARNED_FACTOR = 100  # the learned run is told this many times the true limit


@dataclass
class Setting:
    label: str
    scale: float  # emulator time scale: simulated seconds per real second
    poll: float  # simulated seconds between polls
    pending: float  # share of a job's time in PENDING (no progress counts)


SETTINGS = [
    Setting("short", 1.0, 1.0, 0.25),
    Setting("no-eta", 2.0, 1.0, 0.95),
    Setting("default", 15.0, batchify.DEFAULT_POLL_INTERVAL, 0.25),
]


class LogReporter:
    """Prints the engine's log lines with the seconds since the run started (--log)."""

    def __init__(self, scale: float) -> None:
        self.t0, self.scale = time.monotonic(), scale

    def update(self, view: object) -> None:
        pass

    def log(self, message: str) -> None:
        print(f"    {(time.monotonic() - self.t0) * self.scale:7.2f}  {message}", flush=True)


def write_input(path: Path, n: int, words: int) -> None:
    """n copies of one article under distinct ids: every document has the same token count, so a batch
    size in documents gives the same batches whatever limit the planner was told."""
    sys.path.insert(0, str(ROOT / "examples"))
    import make_articles

    art = make_articles.article(0, random.Random(3), words)
    with open(path, "wb") as f:
        for i in range(n):
            f.write(orjson.dumps({**art, "id": f"doc-{i:05d}"}) + b"\n")


def options(s: Setting, limit: int, batch_size: int, name: str, mode: str) -> batchify.RunOptions:
    return batchify.RunOptions(
        name=name,
        batch_size=batch_size,
        enqueued_limit=limit,
        poll_interval=s.poll / s.scale,
        max_poll_interval=batchify.MAX_POLL_INTERVAL / s.scale,
        mode=mode,
    )


def dry_plan(url: str, inp: Path, state: Path, opts: batchify.RunOptions) -> dict:
    run, _ = asyncio.run(batchify.run_file(inp, options=opts, state_dir=state, endpoint=url, api_key="k", dry_run=True))
    return dict(run.plan)


def one_run(a: argparse.Namespace, s: Setting, inp: Path, limit: int, told: int, batch_size: int, tag: str, seed: int) -> dict:
    """One isolated run (its own emulator and temp folder); the figures in simulated seconds."""
    emulator = [
        *("--job-seconds", str(a.job_seconds), "--job-seconds-max", str(max(a.job_seconds, a.job_seconds_max))),
        *("--time-scale", str(s.scale), "--pending-fraction", str(s.pending), "--enqueued-limit", str(limit)),
        *("--seed", str(seed), *a.emulator.split()),
    ]
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d, emulator_process(*emulator) as url:
        run_inp = Path(d) / "in.jsonl"
        run_inp.write_bytes(inp.read_bytes())
        opts = options(s, told, batch_size, tag, a.mode)
        reporter = LogReporter(s.scale) if a.log else batchify.NullReporter()
        if a.log:
            print(f"  -- {s.label} {tag}", flush=True)
        t0 = time.monotonic()
        run, summary = asyncio.run(
            batchify.run_file(run_inp, options=opts, state_dir=Path(d) / "st", endpoint=url, api_key="k", reporter=reporter)
        )
        t1 = time.monotonic()
        st = stats(url)
    assert summary is not None and summary.ok == run.records, summary
    seen = st.get("job_end_seen_after") or [0.0]
    return {
        "makespan": (t1 - st["first_create_at"]) * s.scale,  # emulator and bench share the monotonic clock
        "wall": (t1 - t0) * s.scale,
        "refused": st["creates_refused_429"],
        "jobs": st["creates"],
        "gets": st["gets"],
        "seen_lag": statistics.mean(seen) * s.scale,
        "peak": st["peak_enqueued_tokens"],
        "batches": [r[:2] for r in run.plan["batch_ranges"]],
    }


def setup(a: argparse.Namespace, d: Path) -> tuple[Path, int, int, dict]:
    """The input and the true limit L: --per-wave jobs of ~docs-per-job documents fill L (as planned by
    batchify told L); the input holds exactly --jobs of them. Returns (input, L, documents per job, plan)."""
    inp = d / "articles.jsonl"
    write_input(inp, a.jobs * a.docs_per_job, a.words)
    s = SETTINGS[0]
    with emulator_process("--enqueued-limit", str(10**12)) as url:
        plan = dry_plan(url, inp, d / "dry0", options(s, 10**12, a.docs_per_job, "dry0", a.mode))
        per_doc = plan["input_tokens"] / a.jobs / a.docs_per_job
        limit = int(a.per_wave * a.docs_per_job * per_doc)
        plan = dry_plan(url, inp, d / "dry1", options(s, limit, a.docs_per_job, "dry1", a.mode))
    start, end = plan["batch_ranges"][0][:2]
    n = end - start
    write_input(inp, a.jobs * n, a.words)
    return inp, limit, n, plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=9)
    ap.add_argument("--per-wave", type=int, default=3, help="jobs the true limit holds at once")
    ap.add_argument("--docs-per-job", type=int, default=30)
    ap.add_argument("--words", type=int, default=1650)
    ap.add_argument("--job-seconds", type=float, default=2.5, help="simulated seconds each job takes, at least")
    ap.add_argument("--job-seconds-max", type=float, default=3.5, help="... and at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=[s.label for s in SETTINGS])
    ap.add_argument("--mode", default="batch", help="batchify's --mode (auto would run hybrid when told the limit)")
    ap.add_argument("--short-poll", type=float, default=1.0, help="the short and no-eta settings' poll interval, seconds")
    ap.add_argument("--emulator", default="", help="more emulator flags for every run, e.g. '--latency-ms 20'")
    ap.add_argument("--log", action="store_true", help="print the engine's log lines, timed (simulated seconds)")
    a = ap.parse_args()
    SETTINGS[0].poll = SETTINGS[1].poll = a.short_poll
    settings = [s for s in SETTINGS if a.only in (None, s.label)]
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d:
        inp, limit, n, plan = setup(a, Path(d))
        print(
            f"{a.jobs} jobs of {n} documents (~{plan['batch_ranges'][0][2]:,} tokens), true limit L = {limit:,} tokens "
            f"(planned to {plan['effective_limit']:,}, margin {plan['margin']:.0%}: {a.per_wave} jobs at once); "
            f"jobs of {a.job_seconds:g}-{a.job_seconds_max:g} simulated s; learned run told {LEARNED_FACTOR} x L; --mode {a.mode}",
            flush=True,
        )
        for rep in range(a.repeats):
            for s in settings:
                for kind, told, bs in (("told", limit, a.docs_per_job), ("learned", LEARNED_FACTOR * limit, n)):
                    r = one_run(a, s, inp, limit, told, bs, f"{kind}-{rep}", seed=rep)
                    results.setdefault((s.label, kind), []).append(r)
                    print(
                        f"  {s.label:7} {kind:7} #{rep}: makespan {r['makespan']:6.1f} s, run_file {r['wall']:6.1f} s, "
                        f"refused {r['refused']}, jobs {r['jobs']}, gets {r['gets']}, end seen after {r['seen_lag']:.2f} s, "
                        f"peak {r['peak'] / limit:.0%} of L",
                        flush=True,
                    )
    if any(r["batches"] != results[(k[0], "told")][0]["batches"] for k, rows in results.items() for r in rows):
        print("WARNING: the runs planned different batches; the comparison is not job for job")
    print(f"medians of {a.repeats} (seconds: simulated, the same as real ones where not time-scaled):")
    ratios = []
    for s in settings:
        rows = {k: results[(s.label, k)] for k in ("told", "learned")}
        med = {
            k: {f: statistics.median(r[f] for r in v) for f in ("makespan", "wall", "refused", "jobs", "gets", "seen_lag")}
            for k, v in rows.items()
        }
        poll = f"poll {s.poll:g} s" + (f", time-scaled {s.scale:g}x" if s.scale != 1 else "")
        for k, m in med.items():
            print(
                f"  {s.label:7} ({poll}) {k:7}: makespan {m['makespan']:6.1f} s, run_file {m['wall']:6.1f} s, "
                f"creates refused {m['refused']:.0f}, jobs {m['jobs']:.0f}, gets {m['gets']:.0f}, end seen after {m['seen_lag']:.2f} s"
            )
        paired = [t["makespan"] / le["makespan"] for t, le in zip(rows["told"], rows["learned"], strict=True)]
        ratios.append((s, med["told"]["makespan"] / med["learned"]["makespan"], paired))
    for s, ratio, paired in ratios:
        print(
            f"ratio told/learned makespan ({s.label}, poll {s.poll:g} s): {ratio:.2f}  "
            f"(per repeat: {', '.join(f'{x:.2f}' for x in paired)}; target <= 1.0)"
        )


if __name__ == "__main__":
    main()
