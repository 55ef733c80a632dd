"""batchify from a notebook (or any Python code), end to end against the built-in local emulator.

    python examples/notebook_usage.py

In Jupyter, paste the cells below as they are: the *_sync functions work where an event loop is
already running. In async code, await batchify.prepare / submit / resume_run / cancel instead.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import batchify

state = Path(tempfile.mkdtemp(prefix="batchify-notebook-"))
articles = [json.loads(line) for line in (Path(__file__).parent / "articles.jsonl").read_text().splitlines()]

# 1. Prepare from records in memory (or a path, or a list of URLs): validated and planned, nothing sent.
run = batchify.prepare_sync(
    articles, name="notebook", state_dir=state, endpoint="local", options=batchify.RunOptions(batch_size=25)
)
print(
    f"plan: {run.records} records, {run.plan['batches']} batches, {run.plan['waves']} wave(s), "
    f"~{run.plan['input_tokens']:,} tokens, estimated ${run.plan['estimated_cost_usd']:.4f}"
)

# 2. Submit and wait (poll, download, merge). With the local emulator, jobs finish in seconds.
summary = batchify.submit_sync("notebook", state_dir=state, endpoint="local")
print(f"{summary.ok} ok, {summary.errors} errors, cost ${summary.cost_batch_usd:.4f} (emulator: synthetic answers)")

# 3. Status reads the sidecars only.
st = batchify.run_status(state, "notebook")["runs"][0]
print("status:", st["status"], st["job_states"])

# 4. Results as typed objects (or dicts), in input order.
results = batchify.results("notebook", state_dir=state)
first = results[0]
print("first:", first.id, first.status, first.result["category"] if first.ok else first.error)
rows = [r.to_dict() for r in results]

# 5. Analytics: distributions of the schema's enum fields, errors, tokens, cost.
a = batchify.analytics(state, "notebook")
print("is_financial:", a["fields"]["is_financial"], "| categories:", len(a["fields"]["category"]))
