"""Seconds to prefill B rows of L tokens joining the continuous decoder (prompt to first token), on the default
model with a LoRA adapter attached (as in every session): the rows on the base weights (the adapter reset, as at a
conversation's turn 1) or each on its own pinned adapter.

    python benchmarks/2026-11-22-session9/prefill_rows.py L B [B ...]   # e.g. 600 1 4

Prints one JSON line per (B, weights): seconds and prompt tokens/s. Run from a checkout (PYTHONPATH=it) to compare.
"""
import json
import sys
import time

from _setup import Tag, engine_with_pins
from rosa2_dspy.engine.continuous import ContinuousDecoder, Row

L, sizes = int(sys.argv[1]), [int(b) for b in sys.argv[2:]]
engine, pins = engine_with_pins(max(sizes))

ids = engine.encode_chat([{"role": "user", "content": "Tell me a long story about numbers. " * L}])[:L]
for b in sizes:
    for label in ("base", "adapters"):
        if label == "base":
            engine.reset_adapter()
        rows = [Row(ids, 1, tag=Tag(None if label == "base" else pins[i], 1)) for i in range(b)]
        dec = ContinuousDecoder(engine.model, engine.tokenizer, [], engine.tokenizer.pad_token_id, max_rows=b,
                                forward_context=engine._rows_context)
        started = time.perf_counter()
        dec.step(rows)
        seconds = time.perf_counter() - started
        print(json.dumps({"rows": b, "weights": label, "prompt_tokens": L, "seconds": round(seconds, 2),
                          "prompt_tokens_per_s": round(b * L / seconds, 1)}), flush=True)
