"""Decode-step time of a Qwen2 stack with the 1.5B model's shapes (fewer layers, random bf16 weights) inside the
engine's ContinuousDecoder with an adapter attached: plain F.linear against oneDNN-prepacked base linears.
Usage: python prepack_steps.py THREADS LAYERS. Session 14 (2026-12-05), AMD EPYC with avx512_bf16, written before the
engine packed by itself (it now does; this probe builds its engine with prepack=False and packs by hand)."""
import contextlib, json, sys, time, torch
torch.set_num_threads(int(sys.argv[1])); LAYERS = int(sys.argv[2])
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from rosa2_dspy import models
from rosa2_dspy.engine import LocalEngine, ContinuousDecoder, Row, GenSettings
path = models.resolve("default")[0]
tok = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
cfg = Qwen2Config.from_pretrained(path); cfg.num_hidden_layers = LAYERS
model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
eng = LocalEngine(model, tok, name="probe", prepack=False)  # the plain engine; the probe packs by hand
eng.attach_adapter(adapter_dtype="model")
lins = [m for n, m in eng.model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
packs = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None) for m in lins}
print(len(lins), "linears", flush=True)
@contextlib.contextmanager
def packed():
    for m in lins:
        m.forward = (lambda w, b: lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""))(packs[m], m.bias)
    try: yield
    finally:
        for m in lins: del m.forward
base = tok("word " * 700)["input_ids"]
class Tag:
    settings = GenSettings(max_tokens=10**6, do_sample=False, temperature=0.0, top_p=None, top_k=None, seed=None, weights=None)
res = {}
for batch in (1, 16):
    decs = {}
    for name, ctx in (("plain", contextlib.nullcontext), ("packed", packed)):
        d = ContinuousDecoder(eng.model, tok, [], tok.pad_token_id, max_rows=batch, forward_context=eng._rows_context)
        with eng.weights_lock, ctx():
            d.step([Row(base[:600 + 7 * i], 10**6, tag=Tag()) for i in range(batch)]); d.step([])
        decs[name] = (d, ctx)
    times = {"plain": [], "packed": []}
    for r in range(8):
        for name in (("plain", "packed") if r % 2 else ("packed", "plain")):
            d, ctx = decs[name]
            with eng.weights_lock, ctx():
                t = time.perf_counter(); d.step([]); times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    same = decs["plain"][0].rows[0].generated == decs["packed"][0].rows[0].generated
    print(json.dumps({"batch": batch, "plain_ms": round(med["plain"], 1), "packed_ms": round(med["packed"], 1),
                      "ratio": round(med["plain"] / med["packed"], 2), "same_tokens_row0": same}), flush=True)
