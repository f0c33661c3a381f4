"""Activation checkpointing of an update's large forwards only (``checkpointing_min_tokens``, N = 1024) against
none, under the session's default update (frozen_prompt, reply_tail=128, the adapter in float32, every block):
machine seconds and peak memory of an update, on rows shaped like the main run's. Session 23's
``checkpointing_ab.py`` with its second setting changed from "every forward" to "forwards of at least N gradient
tokens": each setting in its own process (so each peak is its own), in the order off, large, large, off; within a
process every row set runs twice from the same weights and the second is timed (the first builds the trainer).
Row sets: a conversation's first update (one rejected 550-token reply: 1 x 129 gradient tokens), a later one (two
rejected 550-token replies from moved weights: 2 x 129), and a mixed one (a rejected 1,000-token reply beside a
desirable 200-token sample: the batch splits at the short reply's tail, so about 2 x 930 gradient tokens). Each
update's peak is the kernel's (``VmHWM`` after a reset, as `rosa2 bench update` reads it). Prints JSON.
Usage: python checkpointing_large_ab.py            (the parent: runs the children, prints the summary)
       python checkpointing_large_ab.py child large|off"""

import json
import subprocess
import sys
import time

from rosa2_dspy.models import cpu_description
from rosa2_dspy.provenance import peak_rss_since_reset_mib, reset_peak_rss

MIN_TOKENS = 1024


def child(large: bool) -> dict:
    import torch

    from rosa2_dspy.bench_update import _update_rows
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.weights import LoRAUpdater, kto_row

    engine = LocalEngine.from_pretrained("default")
    tok = engine.tokenizer
    r550 = _update_rows(limit=4, completion_tokens=550, tokenizer=tok, prompt_tokens=470)
    r1000 = _update_rows(limit=2, completion_tokens=1000, tokenizer=tok, prompt_tokens=470)
    r200 = _update_rows(limit=3, completion_tokens=200, tokenizer=tok, prompt_tokens=470)
    prompt = r550[0]["prompt"]
    sets = {"first": [kto_row(prompt, r550[1]["completion"], False)],
            "later": [kto_row(prompt, r550[1]["completion"], False), kto_row(prompt, r550[2]["completion"], False)],
            "mixed": [kto_row(prompt, r1000[1]["completion"], False), kto_row(prompt, r200[2]["completion"], True)]}
    config = session_update_config(activation_checkpointing=large,
                                   checkpointing_min_tokens=MIN_TOKENS if large else 0)
    updater = LoRAUpdater(engine, config)
    start = engine.snapshot()
    reset_peak_rss()  # (right after a reset, the peak is the process's memory now)
    base = peak_rss_since_reset_mib()
    out = {"large_only": large, "min_tokens": config.checkpointing_min_tokens, "dtype": str(engine.model.dtype),
           "adapter_dtype": config.adapter_dtype, "threads": torch.get_num_threads(), "cpu": cpu_description(),
           "prepacked": engine.prepacked, "rss_before_updates_mib": round(base)}
    for name, rows in sets.items():
        seconds, peaks = [], []
        for rep in range(2):
            engine.restore(start)
            if name == "later":  # from moved weights, as a conversation's second update is
                updater.update(sets["first"])
            reset_peak_rss()
            began = time.perf_counter()
            result = updater.update(rows)
            seconds.append(time.perf_counter() - began)
            peaks.append(peak_rss_since_reset_mib())
        out[name] = {"seconds": round(seconds[1], 2), "seconds_first_rep": round(seconds[0], 2),
                     "peak_rss_mib": round(max(peaks)), "shift": round(result.update_shift, 6)}
    out["peak_over_before_mib"] = round(max(out[n]["peak_rss_mib"] for n in sets) - base)
    return out


def main() -> None:
    runs = []
    for large in (False, True, True, False):
        proc = subprocess.run([sys.executable, __file__, "child", "large" if large else "off"], check=True,
                              capture_output=True, text=True)
        runs.append(json.loads(proc.stdout))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {"runs": runs}
    for name in ("first", "later", "mixed"):
        mean = {on: sum(r[name]["seconds"] for r in runs if r["large_only"] is on) / 2 for on in (False, True)}
        peak = {on: max(r[name]["peak_rss_mib"] for r in runs if r["large_only"] is on) for on in (False, True)}
        summary[name] = {"off_seconds": round(mean[False], 2), "large_only_seconds": round(mean[True], 2),
                         "large_only_over_off": round(mean[True] / mean[False], 3),
                         "off_peak_rss_mib": peak[False], "large_only_peak_rss_mib": peak[True],
                         "same_shift": len({r[name]["shift"] for r in runs}) == 1}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(sys.argv[2] == "large")))
    else:
        main()
