"""Where the memory of session 25's uneven later update goes (the kind that set session 27's timed-run peak).

The update of ``threshold_ab.py`` (two rejected replies of 500 and 800 tokens under one 470-token prompt, from moved
weights, the session's default update config: checkpointing at 384 gradient tokens), once untimed, then once under
``torch.profiler`` with ``profile_memory``. A thread samples ``VmRSS`` every 5 ms and names the phase it fell in:
a forward with gradients, one without (the frozen prefix, the reference), or the backward (between the last
forward and the optimizer step). Prints JSON: peak RSS over before per phase, and the ops that allocated most.
Usage: python uneven_update_memory.py"""

import json
import sys
import threading
import time
from pathlib import Path

import torch

from rosa2_dspy.memory import rss_and_peak_mib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "2026-12-07-session25"))
import threshold_ab  # noqa: E402  (session 25's script: its uneven_rows are the rows profiled here)


def main() -> None:
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.weights import LoRAUpdater

    engine = LocalEngine.from_pretrained("default")
    first, uneven = threshold_ab.uneven_rows(engine.tokenizer)
    updater = LoRAUpdater(engine, session_update_config())
    start = engine.snapshot()
    engine.restore(start)
    updater.update(first)
    updater.update(uneven)  # untimed: construction
    engine.restore(start)
    updater.update(first)

    phase = {"now": "other"}
    peaks: dict[str, float] = {}
    model = engine.model

    def pre(module, args, kwargs):
        phase["now"] = "forward with gradients" if torch.is_grad_enabled() else "forward without gradients"

    def post(module, args, kwargs, out):
        phase["now"] = "after a forward (loss, backward, optimizer)" if torch.is_grad_enabled() else "other"

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles += [base.model.register_forward_pre_hook(pre, with_kwargs=True)]
    stop = threading.Event()
    before = rss_and_peak_mib()[0]

    def sample():
        while not stop.is_set():
            rss = rss_and_peak_mib()[0]
            peaks[phase["now"]] = max(peaks.get(phase["now"], 0.0), rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = updater.update(uneven)
    stop.set()
    sampler.join()
    for h in handles:
        h.remove()
    ops = sorted(prof.key_averages(), key=lambda e: -e.cpu_memory_usage)[:15]
    print(json.dumps({"rss_before_mib": round(before), "peak_rss_over_before_mib_by_phase":
                      {k: round(v - before) for k, v in peaks.items()},
                      "update_seconds": round(result.seconds, 2),
                      "ops_by_memory_allocated": [{"op": e.key, "calls": e.count,
                                                   "allocated_mib": round(e.cpu_memory_usage / 2**20),
                                                   "self_net_mib": round(e.self_cpu_memory_usage / 2**20)}
                                                  for e in ops]}, indent=1))


if __name__ == "__main__":
    main()
