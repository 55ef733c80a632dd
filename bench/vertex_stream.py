"""gs:// in, gs:// out on --backend vertex: batchify's whole run against one plain streaming copy of the same bytes.

    python bench/vertex_stream.py [--scale 100000] [--full] [--batch-size 200000] [--keep]

Articles of ~2 KB (--scale of them; --full: 1,000,000, 2 GB) are written to a Cloud Storage emulator
(gcp-storage-emulator, in memory, its own process) as four objects under gs://bench/corpus/. Then, each in
its own process:

  floor     one plain streaming copy of the same bytes through the same client (google-cloud-storage): read
            the four objects (a 1 MiB BufferedReader over blob.open("rb")) and write them to one object
            (blob.open("wb"), 32 MiB chunks), which is what "stream the input to request objects and the
            results back" costs at least, with no JSON work and no service in between;
  batchify  `batchify run gs://bench/corpus/ --backend vertex --out gs://bench/results/news.jsonl --mode batch`
            against batchify's emulator (Vertex routes; jobs of 0.2 s) on the same storage emulator.

Printed: both times, batchify's peak RSS (target <= 300 MB, flat from 100k to 1M) and the local disk its run used
(state folder, target <= 50 MB); then where batchify's wall time went, from its sidecars (the run's prepare end, each
job's timestamps) and the emulator's own job records (created, output whole): prepare, submit, the service's create
(the emulator reads every request to count it) and job (it answers every line and writes its output), the poll lag,
retrieval (download, sort, results object) and what follows it (error check, merge to gs://, exit), with the peak
RSS of prepare, retrieval and after (sampled every 0.1 s); and the CPU time of batchify, of the storage emulator
(single-threaded Python: one request at a time) and of batchify's emulator (this process). Two ratios against the
floor (target <= 1.5x), last: the whole run, and batchify's own work (the run less the service's create + job,
which the floor does not do). Both are printed so that neither hides the other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import ROOT, cpu_seconds, free_port, serving_process

import batchify

PROJECT, LOCATION, BUCKET = "bench-proj", "us-central1", "bench"

FLOOR = r"""
import io, json, resource, sys, time
from google.api_core.client_options import ClientOptions
from google.cloud import storage
url, bucket = sys.argv[1:3]
c = storage.Client(project="bench", client_options=ClientOptions(api_endpoint=url), use_auth_w_custom_endpoint=False)
t0 = time.perf_counter()
n = 0
with c.bucket(bucket).blob("floor/copy.jsonl").open("wb", chunk_size=32 * 1024 * 1024) as out:
    for b in sorted(c.list_blobs(bucket, prefix="corpus/"), key=lambda b: b.name):
        with io.BufferedReader(b.open("rb"), buffer_size=1 << 20) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                out.write(chunk)
                n += len(chunk)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@contextlib.contextmanager
def storage_emulator() -> Iterator[tuple[str, int]]:
    """gcp-storage-emulator in memory, in its own process, on a free loopback port: (its URL, its pid)."""
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    cmd = [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"]
    with serving_process(cmd, port, lambda url: list(gcs_client(url).list_buckets())) as (url, proc):  # type: ignore[attr-defined]
        yield url, proc.pid


def gcs_client(url: str) -> object:
    from google.api_core.client_options import ClientOptions
    from google.cloud import storage

    return storage.Client(project="bench", client_options=ClientOptions(api_endpoint=url), use_auth_w_custom_endpoint=False)


def write_corpus(url: str, n: int) -> int:
    """n articles of ~2 KB as four objects under gs://bench/corpus/; bytes written."""
    client = gcs_client(url)
    bucket = client.create_bucket(BUCKET)  # type: ignore[attr-defined]
    words = "markets rates weather council election harbour festival inflation bridge energy".split()
    total, per = 0, -(-n // 4)
    for k in range(4):
        with bucket.blob(f"corpus/part-{k}.jsonl").open("wb", chunk_size=32 * 1024 * 1024) as f:
            buf = bytearray()
            for i in range(k * per, min(n, (k + 1) * per)):
                body = " ".join(words[(i * 7 + j) % len(words)] for j in range(300))[:1950]
                buf += b'{"id":"a%d","text":"article %d: %s"}\n' % (i, i, body.encode())
                if len(buf) >= 1 << 22:
                    f.write(bytes(buf))
                    total += len(buf)
                    buf.clear()
            f.write(bytes(buf))
            total += len(buf)
    return total


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_batchify(gcs: str, gcs_pid: int, work: Path, batch_size: int) -> dict[str, Any]:
    """The CLI run in its own process (its own peak RSS and CPU time, from wait4), against batchify's emulator in
    this one (its CPU time: this process's, whose main thread only waits meanwhile); the storage emulator's CPU
    time from /proc; the emulator's Vertex jobs as it ran them (for the breakdown)."""
    cfg = batchify.EmulatorConfig(job_seconds=0.2, pending_fraction=0.3, gcs_endpoint=gcs)
    with batchify.EmulatorThread(cfg) as emu:
        args = [sys.executable, str(ROOT / "batchify.py"), "run", f"gs://{BUCKET}/corpus/", "--backend", "vertex"]
        args += ["--project", PROJECT, "--location", LOCATION, "--bucket", f"gs://{BUCKET}/staging", "--endpoint", emu.url]
        args += ["--out", f"gs://{BUCKET}/results/news.jsonl", "--mode", "batch", "--yes", "--poll-interval", "0.2"]
        args += ["--batch-size", str(batch_size), "--state-dir", str(work / "st"), "--name", "news"]
        env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs, "GEMINI_API_KEY": "unused"}
        gcs_cpu0, own0 = cpu_seconds(gcs_pid), resource.getrusage(resource.RUSAGE_SELF)
        t0, wall0 = time.perf_counter(), time.time()
        p = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rss: list[tuple[float, float]] = []
        sampler = threading.Thread(target=sample_rss, args=(p.pid, rss), daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(p.pid, 0)
        sampler.join()
        seconds, wall1 = time.perf_counter() - t0, time.time()
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        err = p.stderr.read().decode() if p.stderr else ""
        if status != 0:
            raise SystemExit(f"batchify run failed ({status}): {err[-3000:]}")
        creates = emu.emulator.stats["vertex_creates"]
        vjobs = emu.call(
            lambda: {j["name"]: {k: j[k] for k in ("create_time", "end_time", "lines")} for j in emu.emulator.vjobs.values()}
        )
    return {
        "seconds": seconds,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "disk_mb": du(work / "st") / 1e6,
        "jobs": creates,
        "wall": (wall0, wall1),
        "cpu": {
            "batchify": usage.ru_utime + usage.ru_stime,
            "storage emulator": cpu_seconds(gcs_pid) - gcs_cpu0,
            "batchify's emulator": own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime,
        },
        "vjobs": vjobs,
        "rss": rss,
    }


def sample_rss(pid: int, out: list[tuple[float, float]]) -> None:
    """(time, resident MB) of a process every 0.1 s until it is gone (or a zombie: its memory is freed)."""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), None)
        if kb is None:
            return
        out.append((time.time(), kb / 1024))
        time.sleep(0.1)


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the spans (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def breakdown(work: Path, b: dict[str, Any]) -> dict[str, float]:
    """Where the run's wall time went, from its sidecars (job timestamps, the run's prepare end) and the
    emulator's job records: seconds per phase (spans of several jobs counted once where they overlap)."""
    store = batchify.RunStore(work / "st", "news")
    run, jobs = store.load_run(), store.load_jobs()
    w0, w1 = b["wall"]
    prepared = _epoch(run.created_at)
    ph: dict[str, list[tuple[float, float]]] = {k: [] for k in ("submit", "create", "job", "lag", "retrieval")}
    done = prepared
    for j in jobs:
        ts = {k: _epoch(v) for k, v in j.timestamps.items()}
        v = b["vjobs"].get(j.remote_job or "")
        if v is None or "SUBMITTING" not in ts or "RESULTS_DOWNLOADED" not in ts or v["end_time"] is None:
            continue
        ph["submit"].append((ts.get("UPLOADING", prepared), ts["SUBMITTING"]))
        ph["create"].append((ts["SUBMITTING"], v["create_time"]))
        ph["job"].append((v["create_time"], v["end_time"]))
        ph["lag"].append((v["end_time"], ts["SUCCEEDED"]))
        ph["retrieval"].append((ts["SUCCEEDED"], ts["RESULTS_DOWNLOADED"]))
        done = max(done, ts["RESULTS_DOWNLOADED"])
    out = {"total": w1 - w0, "prepare": prepared - w0, **{k: _union(v) for k, v in ph.items()}, "after": w1 - done}
    peak = {"prepare": [(w0, prepared)], "retrieval": ph["retrieval"], "after": [(done, w1)]}
    for k, spans in peak.items():
        out[f"rss_{k}"] = max((mb for t, mb in b["rss"] if any(a <= t <= z for a, z in spans)), default=0.0)
    out["service"] = _union(ph["create"] + ph["job"])
    out["own"] = out["total"] - out["service"]
    return out


def print_breakdown(d: dict[str, float], cpu: dict[str, float]) -> None:
    rows = [
        (f"prepare: read the input, write the request objects (and start-up); RSS up to {d['rss_prepare']:.0f} MB", d["prepare"]),
        ("submit: the upload look-up, scheduling, up to each create", d["submit"]),
        ("service: create (the emulator reads every request to count it)", d["create"]),
        ("service: the job (0.2 s emulated), then it answers every line and writes its output", d["job"]),
        ("poll lag: output whole -> batchify sees SUCCEEDED", d["lag"]),
        (f"retrieval: download, sort in runs, the results object; RSS up to {d['rss_retrieval']:.0f} MB", d["retrieval"]),
        (f"after retrieval: error check, merge -> gs:// output, exit; RSS up to {d['rss_after']:.0f} MB", d["after"]),
    ]
    print(
        f"where batchify's {d['total']:.1f} s went (wall time; a row's spans over all jobs counted once; rows overlap where jobs do):"
    )
    for what, s in rows:
        print(f"  {s:7.1f} s  {what}")
    print(f"  service (create + job) {d['service']:.1f} s; batchify's own work (the rest) {d['own']:.1f} s")
    cores = os.cpu_count() or 1
    print("CPU over the run: " + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items()) + f" ({cores} cores)")


def check_output(gcs: str, n: int) -> None:
    client = gcs_client(gcs)
    blob = client.bucket(BUCKET).blob("results/news.jsonl")  # type: ignore[attr-defined]
    expect = 0
    with blob.open("r") as f:
        for line in f:
            assert line.startswith(f'{{"id":"a{expect}",'), line[:80]
            expect += 1
    assert expect == n, (expect, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=100_000, help="articles (default 100,000)")
    ap.add_argument("--full", action="store_true", help="1,000,000 articles (2 GB)")
    ap.add_argument("--batch-size", type=int, default=200_000)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    n = 1_000_000 if a.full else a.scale
    work = Path(tempfile.mkdtemp(prefix="vertex_stream-"))
    try:
        with storage_emulator() as (gcs, gcs_pid):
            t0 = time.perf_counter()
            size = write_corpus(gcs, n)
            print(f"{n:,} articles, {size / 1e6:,.0f} MB in 4 objects (written in {time.perf_counter() - t0:.1f} s)", flush=True)
            p = subprocess.run([sys.executable, "-c", FLOOR, gcs, BUCKET], capture_output=True, text=True, check=True)
            floor = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"floor: one streaming copy {floor['seconds']:.1f} s ({floor['bytes'] / 1e6 / floor['seconds']:.0f} MB/s)")
            b = run_batchify(gcs, gcs_pid, work, a.batch_size)
            check_output(gcs, n)
            print(
                f"batchify: {b['seconds']:.1f} s, {b['jobs']:.0f} job(s), peak RSS {b['maxrss_mb']:.0f} MB, "
                f"local disk {b['disk_mb']:.1f} MB; every id once, in input order, in gs://{BUCKET}/results/news.jsonl"
            )
        d = breakdown(work, b)
        print_breakdown(d, b["cpu"])
        ratio, own = b["seconds"] / floor["seconds"], d["own"] / floor["seconds"]
        print(f"ratio batchify/floor time, whole run: {ratio:.2f}x (target <= 1.5x; includes the emulated service's work)")
        print(f"ratio batchify/floor time, batchify's own work (the run less the service's create + job): {own:.2f}x")
        print(f"peak RSS: {b['maxrss_mb']:.0f} MB (target <= 300 MB); local disk: {b['disk_mb']:.1f} MB (target <= 50 MB)")
    finally:
        if a.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
