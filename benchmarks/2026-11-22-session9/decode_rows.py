"""Milliseconds per continuous-batching decode step for N rows on N/2 adapters, each row with a context of L
tokens (one row prefilled, its KV cache copied to the others: the step's cost, not the prefill's, is measured).

    python benchmarks/2026-11-22-session9/decode_rows.py L STEPS N [N ...]   # e.g. 800 8 16 32 48 64

Prints one JSON line per N: decode_step_ms and the tokens/s it gives (N / step).
"""
import json
import sys
import time

import torch

from _setup import Tag, engine_with_pins
from rosa2_dspy.engine.continuous import ContinuousDecoder, Row

L, steps, sizes = int(sys.argv[1]), int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
engine, pins = engine_with_pins(max(sizes) // 2)

words = "Tell me a long story about numbers and their friends. "
ids = engine.encode_chat([{"role": "user", "content": words * (L // 10)}])[:L]
for n in sizes:
    dec = ContinuousDecoder(engine.model, engine.tokenizer, [], engine.tokenizer.pad_token_id, max_rows=n,
                            forward_context=engine._rows_context)
    with torch.inference_mode():
        dec.step([Row(ids, 10**6, tag=Tag(pins[0], 10**6))])
        rows = [dec.rows[0]] + [Row(ids, 10**6, tag=Tag(pins[(i // 2) % len(pins)], 10**6)) for i in range(1, n)]
        for layer in dec.cache.layers:
            layer.keys, layer.values = layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1)
        dec.rows, dec.mask = rows, dec.mask.repeat(n, 1)
        dec.positions, dec.next_ids = dec.positions.repeat(n), dec.next_ids.repeat(n)
        dec.step([])
        started = time.perf_counter()
        for _ in range(steps):
            dec.step([])
        per = (time.perf_counter() - started) / steps
    print(json.dumps({"rows": n, "adapters": len({id(r.tag.settings.weights) for r in rows}), "context": len(ids),
                      "decode_step_ms": round(per * 1000, 1), "tokens_per_s": round(n / per, 1)}), flush=True)
