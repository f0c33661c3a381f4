"""Seconds of one 1000-token forward and forward+backward (LoRA attached, train mode) of the default model, then the torch.profiler table of the latter. Usage: python forward_backward.py

Session 11 (2026-11-22); run from the repository root with .venv/bin/python, nothing else running."""
import time, json, torch
from rosa2_dspy.engine import LocalEngine
eng = LocalEngine.shared("default", continuous=True)
eng.attach_adapter()
model = eng.peft_model
T = 1000
ids = torch.randint(100, 20000, (1, T))
def stat(): return [int(x) for x in open('/proc/stat').readline().split()[1:]]
def timed(fn, n=2):
    fn(); a=stat(); t=time.perf_counter()
    for _ in range(n): fn()
    s=(time.perf_counter()-t)/n; b=stat(); d=[y-x for x,y in zip(a,b)]
    return round(s,2), round(d[7]/sum(d),2)
def fwd():
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
def fwdbwd():
    model.train()
    out = model(input_ids=ids, logits_to_keep=1)
    out.logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
flops = 2 * 1.31e9 * T
f, st1 = timed(fwd); fb, st2 = timed(fwdbwd)
print(json.dumps({"tokens": T, "forward_s": f, "forward_gflops": round(flops / f / 1e9), "steal": st1,
                  "fwd_bwd_s": fb, "bwd_over_fwd": round((fb - f) / f, 2), "steal2": st2}))

with torch.profiler.profile() as prof:
    fwdbwd()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
