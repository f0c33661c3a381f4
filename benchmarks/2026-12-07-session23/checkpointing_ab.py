"""Activation checkpointing on and off under the session's default update (frozen_prompt, reply_tail=128, the
adapter in float32, every block): machine seconds and peak memory of an update, on rows shaped like the main
run's. Each setting runs in its own process (so each peak is its own), in the order off, on, on, off; within a
process every row set runs twice from the same weights and the second is timed (the first builds the trainer).
Row sets: a conversation's first update (one rejected 550-token reply), a later one (two rejected 550-token
replies, from moved weights: its reference forward runs), and a mixed one (a rejected 1,000-token reply beside a
desirable 200-token sample: the batch splits at the short reply's tail, so the long one's head runs with
gradients). Prints JSON. Each update's peak is the kernel's (``VmHWM`` after a reset, as `rosa2 bench update`
reads it); the committed checkpointing-ab.json came from f03f323's copy of this script, which sampled RSS every
5 ms in a thread instead.
``--min-tokens N`` (session 24): "on" checkpoints only an update forward over at least N gradient tokens
(``UpdateConfig.checkpointing_min_tokens``; rows x the columns that take gradients: about 1 x 129 for a first update,
2 x 129 for a later one, 2 x 930 for the mixed one); 0, the default, every forward, as session 23 ran it.
``--repeats R`` (session 24): R timed repetitions after the untimed first, their median reported (default 1).
Usage: python checkpointing_ab.py [--min-tokens N] [--repeats R]   (the parent: runs the children, prints JSON)
       python checkpointing_ab.py child on|off N R"""

import json
import statistics
import subprocess
import sys
import time

from rosa2_dspy.models import cpu_description
from rosa2_dspy.memory import peak_rss_since_reset_mib, reset_peak_rss


def child(on: bool, min_tokens: int = 0, repeats: int = 1) -> dict:
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
    config = session_update_config(activation_checkpointing=on, checkpointing_min_tokens=min_tokens if on else 0)
    updater = LoRAUpdater(engine, config)
    start = engine.snapshot()
    reset_peak_rss()  # (right after a reset, the peak is the process's memory now)
    base = peak_rss_since_reset_mib()
    out = {"checkpointing": on, "min_tokens": config.checkpointing_min_tokens, "dtype": str(engine.model.dtype),
           "adapter_dtype": config.adapter_dtype, "cpu": cpu_description(), "prepacked": engine.prepacked,
           "threads": torch.get_num_threads(),
           "rss_before_updates_mib": round(base)}
    for name, rows in sets.items():
        seconds, peaks = [], []
        for rep in range(1 + repeats):
            engine.restore(start)
            if name == "later":  # from moved weights, as a conversation's second update is
                updater.update(sets["first"])
            reset_peak_rss()
            began = time.perf_counter()
            result = updater.update(rows)
            seconds.append(time.perf_counter() - began)
            peaks.append(peak_rss_since_reset_mib())
        out[name] = {"seconds": round(statistics.median(seconds[1:]), 2),
                     "seconds_timed": [round(x, 2) for x in seconds[1:]], "seconds_first_rep": round(seconds[0], 2),
                     "peak_rss_mib": round(max(peaks)), "shift": round(result.update_shift, 5)}
    out["peak_over_before_mib"] = round(max(out[n]["peak_rss_mib"] for n in sets) - base)
    return out


def main(min_tokens: int = 0, repeats: int = 1) -> None:
    runs = []
    for on in (False, True, True, False):
        proc = subprocess.run([sys.executable, __file__, "child", "on" if on else "off", str(min_tokens),
                               str(repeats)], check=True,
                              capture_output=True, text=True)
        runs.append(json.loads(proc.stdout))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {"runs": runs}
    for name in ("first", "later", "mixed"):
        mean = {on: sum(r[name]["seconds"] for r in runs if r["checkpointing"] is on) / 2 for on in (False, True)}
        peak = {on: max(r[name]["peak_rss_mib"] for r in runs if r["checkpointing"] is on) for on in (False, True)}
        summary[name] = {"off_seconds": round(mean[False], 2), "on_seconds": round(mean[True], 2),
                         "on_over_off": round(mean[True] / mean[False], 3),
                         "off_peak_rss_mib": peak[False], "on_peak_rss_mib": peak[True],
                         "same_shift": len({r[name]["shift"] for r in runs}) == 1}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(sys.argv[2] == "on", int(sys.argv[3]), int(sys.argv[4]))))
    else:
        flag = lambda name: int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else None  # noqa: E731
        main(flag("--min-tokens") or 0, flag("--repeats") or 1)
