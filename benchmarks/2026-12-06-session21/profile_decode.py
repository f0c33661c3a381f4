"""Where a prepacked decode step of the default model goes at 1 and 16 rows (issue 14's profile).

Raw greedy ``generate`` as ``rosa2 bench engine`` times it (the 8 bench prompts, repeated to the batch), 24 new
tokens after a one-token warm-up generate, under ``torch.profiler``; prints the step time and the ops by self CPU
time as JSON. Usage: python profile_decode.py [rows ...]"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rosa2_dspy.bench import BENCH_PROMPTS, _generate_exactly
from rosa2_dspy.engine import LocalEngine

engine = LocalEngine.from_pretrained("default")
prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in BENCH_PROMPTS]
out = {"prepacked": engine.prepacked, "threads": torch.get_num_threads(), "batches": {}}
for rows in [int(a) for a in sys.argv[1:]] or [1, 16]:
    batch = [prompts[i % len(prompts)] for i in range(rows)]
    _, prefill = _generate_exactly(engine, batch, 1)
    _, whole = _generate_exactly(engine, batch, 25)
    step = (whole - prefill) / 24
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        _generate_exactly(engine, batch, 25)
        profiled = time.perf_counter() - started
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]
    out["batches"][rows] = {
        "step_ms": round(1000 * step, 1), "profiled_seconds": round(profiled, 2),
        "ops": [{"op": e.key, "calls": e.count, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / 25, 2),
                 "share": round(e.self_cpu_time_total / total, 3)} for e in ops]}
print(json.dumps(out, indent=1))
