"""Where the timed run's RSS spikes may come from (session 25): a later update of two rejected replies of
different lengths whose gradient columns stay under ``checkpointing_min_tokens`` = 1024 (the default), so none
of its blocks checkpoint. Rows: a rejected 500-token and a rejected 800-token reply under one 470-token prompt
(the batch splits at the shorter reply's tail, so about 2 x 428 = 856 gradient tokens), from moved weights (after
a first update, so the reference forward runs), under the session's default update otherwise. One process per
threshold, in the order 1024, 384, 384, 1024; each times the update ``R`` times after an untimed first and reports
the median, the kernel's peak (``VmHWM`` after a reset) and the shift. Prints JSON.
Usage: python threshold_ab.py [--repeats R]   (the parent: runs the children, prints JSON)
       python threshold_ab.py child N R"""

import json
import statistics
import subprocess
import sys
import time

from rosa2_dspy.models import cpu_description
from rosa2_dspy.memory import peak_rss_since_reset_mib, reset_peak_rss


def uneven_rows(tokenizer) -> tuple[list, list]:
    """A conversation's first update (one rejected 500-token reply) and its uneven later one (that reply and a
    rejected 800-token one), all under one 470-token prompt."""
    from rosa2_dspy.bench_update import _update_rows
    from rosa2_dspy.weights import kto_row

    r500 = _update_rows(limit=2, completion_tokens=500, tokenizer=tokenizer, prompt_tokens=470)
    r800 = _update_rows(limit=3, completion_tokens=800, tokenizer=tokenizer, prompt_tokens=470)
    prompt = r500[0]["prompt"]
    first = [kto_row(prompt, r500[1]["completion"], False)]
    return first, [kto_row(prompt, r500[1]["completion"], False), kto_row(prompt, r800[2]["completion"], False)]


def child(min_tokens: int, repeats: int) -> dict:
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.weights import LoRAUpdater

    engine = LocalEngine.from_pretrained("default")
    first, uneven = uneven_rows(engine.tokenizer)
    config = session_update_config(checkpointing_min_tokens=min_tokens)
    updater = LoRAUpdater(engine, config)
    start = engine.snapshot()
    reset_peak_rss()
    base = peak_rss_since_reset_mib()
    seconds, peaks = [], []
    for _ in range(1 + repeats):
        engine.restore(start)
        updater.update(first)
        reset_peak_rss()
        began = time.perf_counter()
        result = updater.update(uneven)
        seconds.append(time.perf_counter() - began)
        peaks.append(peak_rss_since_reset_mib())
    return {"min_tokens": min_tokens, "checkpointing": config.activation_checkpointing,
            "dtype": str(engine.model.dtype), "cpu": cpu_description(), "rss_before_updates_mib": round(base),
            "seconds": round(statistics.median(seconds[1:]), 2), "seconds_timed": [round(x, 2) for x in seconds[1:]],
            "peak_rss_mib": round(max(peaks)), "peak_over_before_mib": round(max(peaks) - base),
            "shift": round(result.update_shift, 5)}


def main(repeats: int) -> None:
    runs = []
    for n in (1024, 384, 384, 1024):
        proc = subprocess.run([sys.executable, __file__, "child", str(n), str(repeats)], check=True,
                              capture_output=True, text=True)
        runs.append(json.loads(proc.stdout))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    mean = {n: statistics.mean(r["seconds"] for r in runs if r["min_tokens"] == n) for n in (1024, 384)}
    peak = {n: max(r["peak_over_before_mib"] for r in runs if r["min_tokens"] == n) for n in (1024, 384)}
    print(json.dumps({"runs": runs, "seconds_1024": round(mean[1024], 2), "seconds_384": round(mean[384], 2),
                      "384_over_1024": round(mean[384] / mean[1024], 3), "peak_over_before_mib_1024": peak[1024],
                      "peak_over_before_mib_384": peak[384],
                      "same_shift": len({r["shift"] for r in runs}) == 1}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main(int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 2)
