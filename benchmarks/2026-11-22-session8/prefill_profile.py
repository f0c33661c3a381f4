import time, torch
from rosa2_dspy.engine import LocalEngine, ContinuousDecoder, Row
engine = LocalEngine.shared("default")
engine.attach_adapter()
msgs = [{"role": "user", "content": "Solve: what is the sum of the first 20 odd numbers? " * 6}]
ids = engine.encode_chat(msgs)
class T:
    class settings: weights=None
def prefill():
    dec = ContinuousDecoder(engine.model, engine.tokenizer, [], engine.tokenizer.pad_token_id, max_rows=8, forward_context=engine._rows_context)
    with torch.inference_mode():
        dec.step([Row(ids, 4, tag=T()), Row(ids[:60], 4, tag=T())])
prefill()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    t=time.perf_counter(); prefill(); print("prefill s", time.perf_counter()-t)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
with torch.inference_mode():
    x = torch.randn(240, 1536, dtype=torch.bfloat16); w = torch.randn(8960, 1536, dtype=torch.bfloat16)
    for _ in range(3): torch.nn.functional.linear(x, w)
    t=time.perf_counter()
    for _ in range(10): torch.nn.functional.linear(x, w)
    dt=(time.perf_counter()-t)/10; print("linear 240x1536x8960 bf16 ms", round(dt*1e3,2), "GFLOP/s", round(2*240*1536*8960/dt/1e9))
