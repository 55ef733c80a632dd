"""`status --json` on a state dir with 1,000 jobs, against `python -c "import batchify"` alone.

    python bench/status.py [--jobs 1000] [--repeat 7]

status reads sidecars only (no network); the ratio shows what reading 1,000 job sidecars adds to
the interpreter and import start-up. Target: <= 2x. Both sides run the module's cached bytecode, as the
installed `batchify` command does: `python -m batchify status` against `python -c "import batchify"`.
`python batchify.py status` (printed too) compiles the whole file first on every call, as Python does
for any script it is handed (no .pyc for __main__): about 0.3 s more on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from _common import ROOT

import batchify


def timed(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "docs.jsonl"
        inp.write_bytes(b"".join(orjson.dumps({"id": i, "text": f"doc {i}"}) + b"\n" for i in range(a.jobs)))
        opts = batchify.RunOptions(batch_size=1, calibrate=False)
        asyncio.run(batchify.prepare_run(batchify.RunStore(d, "big"), inp, batchify.JobConfig(), opts))
        assert len(list((Path(d) / "big" / "jobs").glob("*.json"))) == a.jobs
        base = timed([sys.executable, "-c", "import batchify"], a.repeat)
        status = timed([sys.executable, "-m", "batchify", "status", "--json", "--state-dir", d], a.repeat)
        one = timed([sys.executable, "-m", "batchify", "status", "big", "--json", "--state-dir", d], a.repeat)
        script = timed([sys.executable, str(ROOT / "batchify.py"), "status", "--json", "--state-dir", d], a.repeat)
    print(
        f"import batchify: {base * 1000:.0f} ms; status --json ({a.jobs} jobs): {status * 1000:.0f} ms; "
        f"status big --json: {one * 1000:.0f} ms; python batchify.py status --json: {script * 1000:.0f} ms "
        f"(medians of {a.repeat})"
    )
    print(f"ratio status/import: {status / base:.2f}")
    print(f"ratio status-one-run/import: {one / base:.2f}")


if __name__ == "__main__":
    main()
