"""Is an update with activation checkpointing the same, to the bit, on a real bf16 model and this CPU's kernels?
apo_zero_unpaired updates (1 step, rejected replies of --tokens tokens, as a comparison's weights step) from the
same start, with and without it, in --order: groups the updates that left the same adapter to the bit, and prints the seconds and the
peak RSS of each (VmHWM reset before each update). Usage, from the repository root:

    .venv/bin/python benchmarks/2026-11-22-session12/checkpointing_exact.py --model smollm2-135m [--tokens 1024]

Session 12 (2026-11-22)."""
import argparse
import json
import time

import torch

from rosa2_dspy.bench_update import _update_rows
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.memory import peak_rss_since_reset_mib, reset_peak_rss
from rosa2_dspy.weights import LoRAUpdater, UpdateConfig, kto_row

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--tokens", type=int, default=1024)
parser.add_argument("--rows", type=int, default=2)
parser.add_argument("--order", default="off,on,off,on", help="the updates, in order: on (checkpointed) or off")
args = parser.parse_args()

engine = LocalEngine.from_pretrained(args.model)
rows = [kto_row(r["prompt"], r["completion"], False)
        for r in _update_rows(limit=args.rows, completion_tokens=args.tokens, tokenizer=engine.tokenizer)]
out = {"model": engine.name, "dtype": str(engine.model.dtype), "rows": len(rows), "completion_tokens": args.tokens}
states = {}
for index, on in enumerate(word == "on" for word in args.order.split(",")):
    config = UpdateConfig(objective="apo_zero_unpaired", steps=1, batch_size=4, learning_rate=2e-4,
                          max_length=args.tokens + 512, activation_checkpointing=on)
    updater = LoRAUpdater(engine, config)
    engine.reset_adapter()
    reset_peak_rss()
    started = time.perf_counter()
    result = updater.update(rows)
    seconds = time.perf_counter() - started
    key = f"{index + 1}_{'checkpointed' if on else 'plain'}"
    states[key] = {k: v.clone() for k, v in engine.adapter_state().items()}
    out[key] = {"seconds": round(seconds, 2), "update_peak_rss_mib": round(peak_rss_since_reset_mib(), 1),
                "l2_shift": round(result.update_shift, 8)}
keys = list(states)  # which updates left the very same adapter (to the bit)
out["bit_equal_groups"] = []
for key in keys:
    group = next((g for g in out["bit_equal_groups"]
                  if all(torch.equal(states[g[0]][k], states[key][k]) for k in states[key])), None)
    if group is None:
        out["bit_equal_groups"].append([key])
    else:
        group.append(key)
print(json.dumps(out, indent=2))
