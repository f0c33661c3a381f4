"""reply_tail with frozen_prompt against the session's default update (whole rows) and frozen_prompt alone,
interleaved, on the default model: a conversation's first update (one rejected reply, from the base weights) and a
later one (two rejected replies, from moved weights, so with its reference forward), rows shaped like the main
run's (a ~470-token prompt, ~550-token replies). Prints JSON.
Usage: python reply_tail_ab.py [TAIL] (default 128)."""

import json
import sys
import time

import torch

from rosa2_dspy.bench_update import _update_rows
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.weights import LoRAUpdater, UpdateConfig, kto_row

tail = int(sys.argv[1]) if len(sys.argv) > 1 else 128
engine = LocalEngine.from_pretrained("default")
base = _update_rows(limit=4, completion_tokens=550, tokenizer=engine.tokenizer, prompt_tokens=470)
first = [kto_row(base[0]["prompt"], base[1]["completion"], False)]
second = [kto_row(base[0]["prompt"], base[1]["completion"], False),
          kto_row(base[0]["prompt"], base[2]["completion"], False)]
prompt_tokens = len(engine.encode_chat(base[0]["prompt"]))
paths = {"whole": {}, "frozen": {"frozen_prompt": True}, "tail": {"frozen_prompt": True, "reply_tail": tail}}
# the main run's update: activation checkpointing, the adapter in the model's dtype, every block
updaters = {name: LoRAUpdater(engine, UpdateConfig(objective="apo_zero_unpaired", steps=1, batch_size=4,
                                                    max_length=1536, activation_checkpointing=True,
                                                    adapter_dtype="model", **extra))
            for name, extra in paths.items()}
start = engine.snapshot()
times = {name: {"first": [], "second": []} for name in paths}
shifts = {name: [] for name in paths}
order = list(paths)
for rep in range(3):
    for name in (order if rep % 2 == 0 else order[::-1]):
        engine.restore(start)
        for kind, rows in (("first", first), ("second", second)):
            began = time.perf_counter()
            result = updaters[name].update(rows)
            times[name][kind].append(time.perf_counter() - began)
            shifts[name].append(result.update_shift)
out = {"reply_tail": tail, "prompt_tokens": prompt_tokens, "reply_tokens": 550, "reps": 3,
       "torch_threads": torch.get_num_threads(), "l2_shift_per_update": {n: round(sum(s) / len(s), 5)
                                                                         for n, s in shifts.items()}}
for kind in ("first", "second"):
    mean = {name: sum(times[name][kind][1:]) / 2 for name in paths}  # the first rep pays the trainers' construction
    out[kind] = {f"{name}_seconds": round(v, 2) for name, v in mean.items()}
    out[kind].update({f"whole_over_{name}": round(mean["whole"] / mean[name], 3) for name in ("frozen", "tail")})
    out[kind]["all"] = {name: [round(x, 2) for x in times[name][kind]] for name in paths}
print(json.dumps(out, indent=1))
