"""frozen_prompt against whole rows on the default model, interleaved: a conversation's first update (one rejected
reply, from the base weights) and a second one (two rejected replies, from the moved weights, so with its
reference forward), rows shaped like the main run's (a ~470-token prompt, ~550-token replies). Prints JSON.
Usage: python frozen_prompt_ab.py [LAYERS] (adapt only the last LAYERS blocks; default every block)."""

import json
import sys
import time

import torch

from rosa2_dspy.bench_update import _update_rows
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.weights import LoRAUpdater, UpdateConfig, kto_row

layers = int(sys.argv[1]) if len(sys.argv) > 1 else None
engine = LocalEngine.from_pretrained("default")
base = _update_rows(limit=4, completion_tokens=550, tokenizer=engine.tokenizer)


def long(row, times=5):  # the problem repeated: a prompt of the main run's length
    return row["prompt"][:1] + [{"role": "user", "content": (row["prompt"][1]["content"] + "\n\n") * times}]


first = [kto_row(long(base[0]), base[1]["completion"], False)]
second = [kto_row(long(base[0]), base[1]["completion"], False), kto_row(long(base[0]), base[2]["completion"], False)]
prompt_tokens = len(engine.encode_chat(long(base[0])))
updaters = {frozen: LoRAUpdater(engine, UpdateConfig(
    objective="apo_zero_unpaired", steps=1, batch_size=4, max_length=1536, frozen_prompt=frozen,
    activation_checkpointing=True, adapter_dtype="model", layers=layers)) for frozen in (False, True)}
start = engine.snapshot()
times = {frozen: {"first": [], "second": []} for frozen in (False, True)}
for rep in range(3):
    for frozen in ((False, True) if rep % 2 == 0 else (True, False)):
        engine.restore(start)
        for name, rows in (("first", first), ("second", second)):
            began = time.perf_counter()
            updaters[frozen].update(rows)
            times[frozen][name].append(time.perf_counter() - began)
out = {"adapted_blocks": layers or "all", "prompt_tokens": prompt_tokens, "reply_tokens": 550, "reps": 3, "torch_threads": torch.get_num_threads()}
for name in ("first", "second"):
    whole = sum(times[False][name][1:]) / 2  # the first rep pays the trainers' construction
    frozen = sum(times[True][name][1:]) / 2
    out[name] = {"whole_seconds": round(whole, 2), "frozen_seconds": round(frozen, 2),
                 "saving": round(1 - frozen / whole, 3), "all": {str(k): [round(x, 2) for x in v[name]]
                                                                  for k, v in times.items()}}
print(json.dumps(out, indent=1))
