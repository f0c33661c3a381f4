"""One 1000-token forward of the default model with the LoRA adapter attached (eval mode), its torch.profiler table, then the same forward with the adapter switched off. Usage: python forward_profile.py

Session 11 (2026-11-22); run from the repository root with .venv/bin/python, nothing else running."""
import time, torch
from rosa2_dspy.engine import LocalEngine
eng = LocalEngine.shared("default", continuous=True)
eng.attach_adapter()
model = eng.peft_model
model.eval()
T = 1000
ids = torch.randint(100, 20000, (1, T))
def fwd():
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
fwd()
t=time.perf_counter(); fwd(); print("fwd eval", time.perf_counter()-t, flush=True)
with torch.profiler.profile() as prof:
    fwd()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
with eng.adapter_disabled():
    t=time.perf_counter(); fwd(); print("fwd adapter off", time.perf_counter()-t, flush=True)
base = eng.model
t=time.perf_counter()
with torch.no_grad(): base.base_model.model(input_ids=ids, logits_to_keep=1) if hasattr(base, "base_model") else None
print("base", time.perf_counter()-t, type(base))
