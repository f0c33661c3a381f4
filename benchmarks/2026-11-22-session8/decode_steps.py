"""Seconds per continuous-batching decode step with 32 rows on K adapters (2 rows each), on the default model.

    python benchmarks/2026-11-22-session8/decode_steps.py K STEPS PROMPT_WORDS   # e.g. 16 10 60

Run from a checkout (PYTHONPATH=that checkout) to compare commits; prints one JSON line. The committed
`rosa2 bench engine --mixed-weights K` reports the same step as `continuous_decode_step_ms`.
"""
import sys, time, json, torch
from rosa2_dspy.engine import LocalEngine, GenSettings
try:
    from rosa2_dspy.engine.continuous import ContinuousDecoder, Row
except ImportError:
    from rosa2_dspy.decode import ContinuousDecoder, Row
K = int(sys.argv[1]); steps = int(sys.argv[2]); plen = int(sys.argv[3])
engine = LocalEngine.shared("default")
engine.attach_adapter()
g = torch.Generator().manual_seed(0)
pins = []
for _ in range(K):
    with torch.no_grad():
        for name, t in engine.adapter_state().items():
            t.copy_(torch.randn(t.shape, generator=g) * (0.01 if "lora_B" in name else 0.05))
    engine.mark_changed()
    pins.append(engine.pin())
class Tag:
    def __init__(s, w): s.settings = GenSettings(max_tokens=10**6, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None, weights=w)
base = engine.encode_chat([{"role": "user", "content": "Tell me a long story. " * (plen // 6)}])
dec = ContinuousDecoder(engine.model, engine.tokenizer, [], engine.tokenizer.pad_token_id, max_rows=32, forward_context=engine._rows_context)
rows = [Row(base, 10**6, tag=Tag(pins[i % K])) for i in range(32)]
t = time.perf_counter()
with torch.inference_mode():
    dec.step(rows)   # prefill of 32 rows (+ first token)
    prefill = time.perf_counter() - t
    dec.step([])
    t = time.perf_counter()
    for _ in range(steps):
        dec.step([])
    per = (time.perf_counter() - t) / steps
print(json.dumps({"K": K, "prompt_tokens": len(base), "prefill_s": round(prefill, 2), "decode_step_ms": round(per * 1000, 1)}))
