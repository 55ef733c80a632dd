"""Prepare speed and memory: batchify building request files vs a plain orjson pass (the floor).

    python bench/prepare.py [--docs 200000] [--small 50000] [--words 1900]

Generates synthetic articles of ~11 KB (~2,800 tokens) each, then, each in a fresh process, times
(1) the floor: read every line with orjson, wrap its text in the same request shape, write it out;
(2) batchify's prepare (validation, prompt template, token estimate, batching, ids, sidecars).
Each of the two is run --rounds times (5), alternating, and its best time kept. Targets: prepare <= 1.5x the floor; peak RSS <= 200 MB and no growth from the small to the full size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from _common import ROOT
from _common import child as run_child

CHILD = r"""
import json, resource, sys, time, asyncio
sys.path.insert(0, {root!r})
import orjson, batchify
mode, inp, outdir = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "floor":
    cfg = batchify.JobConfig()
    cat = batchify.builtin_catalog()
    gc = batchify.generation_config(cfg, cat.spec(cfg.model, cat.as_of))
    si = {{"parts": [{{"text": cfg.system_instruction}}]}}
    with open(inp, "rb", buffering=1 << 20) as f, open(outdir + "/floor.jsonl", "wb", buffering=1 << 20) as out:
        for n, line in enumerate(f):
            rec = orjson.loads(line)
            req = {{"contents": [{{"role": "user", "parts": [{{"text": rec["text"]}}]}}], "systemInstruction": si,
                   "generationConfig": gc}}
            out.write(orjson.dumps({{"key": str(n), "request": req}}) + b"\n")
else:
    opts = batchify.RunOptions(calibrate=False, batch_size=1000)
    run = asyncio.run(batchify.prepare_run(batchify.RunStore(outdir, "bench"), inp, batchify.JobConfig(), opts))
elapsed = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, this process's own peak: ru_maxrss keeps the parent's peak across fork + exec (the bench's ~60 MB)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": elapsed, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_mb": hwm / 1024}}))
"""


def generate(path: Path, docs: int, words: int) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import random

    import make_articles

    rng = random.Random(1)
    pool = [make_articles.article(i, rng, words) for i in range(500)]
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(docs):
            rec = dict(pool[i % len(pool)])
            rec["id"] = f"doc-{i:07d}"
            f.write(orjson.dumps(rec) + b"\n")


def child(mode: str, inp: Path, outdir: Path) -> dict:
    # Each timed run starts on an equal footing: its output from a previous round deleted, every dirty page of
    # earlier runs written back (otherwise whichever runs next pays for that writeback), and the input read once
    # into the page cache (this VM's kernel pages out memory it finds cold, DAMON "pageout": whichever runs after
    # that read the input from disk, 1.3-1.9 s slower).
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    os.sync()
    with open(inp, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return run_child(CHILD, mode, str(inp), str(outdir))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=50_000)
    ap.add_argument("--words", type=int, default=1900)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as d:
        big, small = Path(d) / "big.jsonl", Path(d) / "small.jsonl"
        t0 = time.perf_counter()
        generate(big, a.docs, a.words)
        generate(small, a.small, a.words)
        size = big.stat().st_size
        print(
            f"input: {a.docs:,} docs, {size / 1e9:.2f} GB ({size / a.docs / 1024:.1f} KB/doc), "
            f"generated in {time.perf_counter() - t0:.0f} s"
        )
        # Alternate the two and keep each one's best: 2.4 GB of writes, and the deletion of the round before's
        # (this disk is mounted with `discard`: freed blocks are trimmed as the next round runs), make runs noisy.
        floors, fulls = [], []
        for _ in range(a.rounds):
            floors.append(child("floor", big, Path(d) / "floor"))
            fulls.append(child("batchify", big, Path(d) / "full"))
        floor = min(floors, key=lambda r: r["seconds"])
        full = min(fulls, key=lambda r: r["seconds"])
        part = child("batchify", small, Path(d) / "part")
        tokens = json.loads((Path(d) / "full" / "bench" / "run.json").read_text())["plan"]["input_tokens"]
    print(f"estimated tokens/doc: {tokens / a.docs:,.0f}")
    print(
        f"floor (orjson read+wrap+write): {floor['seconds']:.1f} s (CPU {floor['cpu']:.1f} s), "
        f"peak RSS {floor['maxrss_mb']:.0f} MB"
    )
    print(
        f"batchify prepare {a.docs:,}: {full['seconds']:.1f} s (CPU {full['cpu']:.1f} s, the input's sha256 "
        f"on a second thread included), peak RSS {full['maxrss_mb']:.0f} MB"
    )
    print(f"batchify prepare {a.small:,}: {part['seconds']:.1f} s, peak RSS {part['maxrss_mb']:.0f} MB")
    print(
        f"all rounds, seconds: floor {[round(r['seconds'], 1) for r in floors]}, batchify {[round(r['seconds'], 1) for r in fulls]}"
    )
    print(f"ratio prepare/floor (CPU time): {full['cpu'] / floor['cpu']:.2f}")
    print(f"ratio prepare/floor: {full['seconds'] / floor['seconds']:.2f}")
    print(f"ratio peak RSS {a.docs:,}/{a.small:,}: {full['maxrss_mb'] / part['maxrss_mb']:.2f}")


if __name__ == "__main__":
    main()
