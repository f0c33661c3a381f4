"""Decode tokens/s of one engine at THREADS torch threads and BATCH rows of ~700-900-token contexts. Usage: python threads_vs_processes.py THREADS BATCH STEPS (run two at once with THREADS=1 to compare two one-core engines against one two-core engine).

Session 11 (2026-11-22); run from the repository root with .venv/bin/python, nothing else running."""
import sys, time, json, torch
threads, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.bench import continuous_step_seconds, BENCH_PROMPTS
eng = LocalEngine.shared("default", continuous=True)
rows = []
for i in range(batch):
    text = " ".join(BENCH_PROMPTS[(i + j) % len(BENCH_PROMPTS)] for j in range(6))
    ids = eng.encode_chat([{"role": "user", "content": text}])
    rows.append(ids[:700 + 13 * i])
def stat():
    v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    return v
a = stat(); t0 = time.time()
s = continuous_step_seconds(eng, rows, [None] * batch, steps)
b = stat(); d = [y - x for x, y in zip(a, b)]
print(json.dumps({"threads": threads, "batch": batch, "step_s": round(s, 3), "tok_s": round(batch / s, 1),
                  "wall": round(time.time() - t0, 1), "idle": round(d[3] / sum(d), 2), "steal": round(d[7] / sum(d), 2),
                  "user": round(d[0] / sum(d), 2)}), flush=True)
