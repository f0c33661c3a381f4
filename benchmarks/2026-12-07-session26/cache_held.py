"""How much KV-cache memory the continuous decoder holds right after a row leaves (session 26): the moment a
session's weight update runs. ``rows`` rows with prompts of about ``tokens`` tokens decode until the shortest
(budget 2) leaves; then the bytes of every distinct storage the cache layers hold (keys, values and a
``RoomyLayer``'s buffers) against the bytes of the running cache itself. Prints JSON.
Usage: python cache_held.py [model] [rows] [tokens]   (default: tiny 32 1000)"""

import json
import sys

from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.engine.continuous import ContinuousDecoder, Row

spec = sys.argv[1] if len(sys.argv) > 1 else "tiny"
rows_n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
engine = LocalEngine.from_pretrained(spec)
tok = engine.tokenizer
words = tok.encode(" ".join(["seven"] * tokens), add_special_tokens=False)[:tokens]
rows = [Row(words[: tokens - 7 * i], 2 if i == 0 else 8) for i in range(rows_n)]
decoder = ContinuousDecoder(engine.model, tok, engine.eos_token_ids, tok.pad_token_id, max_rows=rows_n)
decoder.step(rows)
left = []
while not left:
    left = decoder.step()


def storages(layer):
    tensors = [layer.keys, layer.values, *(getattr(layer, "_room", None) or ())]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


held = {}
for layer in decoder.cache.layers:
    held.update(storages(layer))
running = sum(layer.keys.nbytes + layer.values.nbytes for layer in decoder.cache.layers)
print(json.dumps({"model": engine.name, "rows": rows_n, "prompt_tokens": tokens, "rows_left": len(left),
                  "running_cache_mib": round(running / 2**20, 1), "held_mib": round(sum(held.values()) / 2**20, 1)}))
