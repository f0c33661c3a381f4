"""Decode step time with the base linears' weights prepacked for oneDNN (torch.ops.mkldnn._linear_pointwise) against plain F.linear, batch 1 and 16, and whether a greedy reply is the same. Usage: python prepacked_decode.py

Session 11 (2026-11-22); run from the repository root with .venv/bin/python, nothing else running."""
import time, json, torch, contextlib
steps = 8
from rosa2_dspy.engine import LocalEngine, ContinuousDecoder, Row, GenSettings
from rosa2_dspy.bench import BENCH_PROMPTS
eng = LocalEngine.shared("default", continuous=True)
eng.attach_adapter()
text = " ".join(BENCH_PROMPTS * 10)
base = eng.encode_chat([{"role": "user", "content": text}])
class Tag:
    settings = GenSettings(max_tokens=steps + 2, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None, weights=None)
lins = [m for n, m in eng.model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n and m.weight.shape[0] * m.weight.shape[1] > 1e6]
print(len(lins), "linears", flush=True)
t = time.perf_counter()
packs = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None) for m in lins}
print("pack s", round(time.perf_counter() - t, 1), flush=True)
@contextlib.contextmanager
def packed():
    for m in lins:
        w, b = packs[m], m.bias
        m.forward = (lambda w, b: lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))(w, b)
    try: yield
    finally:
        for m in lins: del m.forward
def run(batch, L, ctx):
    rows = [base[:L + 7 * i] for i in range(batch)]
    dec = ContinuousDecoder(eng.model, eng.tokenizer, [], eng.tokenizer.pad_token_id, max_rows=batch, forward_context=eng._rows_context)
    with torch.inference_mode(), eng.weights_lock, ctx():
        dec.step([Row(ids, steps + 5, tag=Tag()) for ids in rows]); dec.step([])
        t = time.perf_counter()
        for _ in range(steps): dec.step([])
        s = (time.perf_counter() - t) / steps
    return dec, s
for batch in (1, 16):
    for name, ctx in (("plain", contextlib.nullcontext), ("packed", packed)):
        _, s = run(batch, 600, ctx)
        print(json.dumps({"batch": batch, "mode": name, "step_ms": round(1000 * s)}), flush=True)
# same tokens?
r1 = [Row(base[:300], 24, tag=Tag())]; r2 = [Row(base[:300], 24, tag=Tag())]
for rows, ctx in ((r1, contextlib.nullcontext), (r2, packed)):
    d = ContinuousDecoder(eng.model, eng.tokenizer, [], eng.tokenizer.pad_token_id, max_rows=1, forward_context=eng._rows_context)
    with torch.inference_mode(), eng.weights_lock, ctx():
        d.run(rows)
print("same tokens:", r1[0].generated == r2[0].generated, sum(a == b for a, b in zip(r1[0].generated, r2[0].generated)), len(r1[0].generated))
