"""Prepacked float32 weights against plain ones, in fresh processes (session 30). On a CPU without native bf16 the
default model runs in float32, where the engine packs its weights only on request (``--prepack``): a packed product
rounds differently from a plain one, so it is a choice a run folder records. Session 23 measured one unrepeated
1.94x per decode step at batch 16; this measures the decode step and a weight update, A B B A.

One process per setting, in the order plain, packed, packed, plain. Each loads the model once
(``LocalEngine.from_pretrained(model, prepack=...)``), then runs ``cycles`` times: ``steps`` decode steps of a
continuous batch of ``rows`` MATH train prompts in the engine's decoder (ms per step), then one weight update of the
session's default config on session 25's uneven rejected replies (two of 500 and 800 tokens under a 470-token
prompt), timed, with the resident memory before it and the kernel's peak during it. The first cycle is a warm-up;
the rest are averaged. Prints JSON (each child's line on stderr as it ends).
Usage: python prepack_ab.py [--model M] [--cycles C] [--rows R] [--steps S]   (the parent: runs the children)
       python prepack_ab.py child SETTING MODEL C R S"""

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rosa2_dspy.memory import peak_rss_since_reset_mib, reset_peak_rss, rss_and_peak_mib
from rosa2_dspy.models import cpu_description

HERE = Path(__file__).resolve().parent
KEYS = ("decode_step_ms", "update_s", "rss_before_update_mib", "update_peak_mib")


def _session25_rows():
    """uneven_rows from session 25's threshold A/B (one copy of those rows)."""
    path = HERE.parent / "2026-12-07-session25" / "threshold_ab.py"
    spec = importlib.util.spec_from_file_location("threshold_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.uneven_rows


def child(setting: str, model: str, cycles: int, rows: int, steps: int) -> dict:
    from rosa2_dspy.adapters import FORMAT_REMINDER
    from rosa2_dspy.bench import continuous_step_seconds
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.engine import LocalEngine
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.signatures import Answer
    from rosa2_dspy.weights import LoRAUpdater

    engine = LocalEngine.from_pretrained(model, prepack=setting == "packed")
    assert engine.prepacked == (setting == "packed")
    prompts = [engine.encode_chat([{"role": "system", "content": Answer.instructions},
                                   {"role": "user", "content": f"{example.problem}\n\n{FORMAT_REMINDER}"}])
               for example in load_examples("train", levels="1,2,3", limit=rows, seed=1)]
    _, uneven = _session25_rows()(engine.tokenizer)
    updater = LoRAUpdater(engine, session_update_config())
    out = {"setting": setting, "cpu": cpu_description(), "dtype": str(engine.model.dtype), "cycles": []}
    for _ in range(cycles):
        step = continuous_step_seconds(engine, prompts, [None] * len(prompts), steps)
        before = rss_and_peak_mib()
        reset_peak_rss()
        began = time.perf_counter()
        result = updater.update(uneven)
        out["cycles"].append({"decode_step_ms": round(1000 * step, 1),
                              "update_s": round(time.perf_counter() - began, 2),
                              "rss_before_update_mib": round(before[0]) if before else None,
                              "update_peak_mib": round(peak_rss_since_reset_mib() or 0),
                              "shift": round(result.update_shift, 6)})
    timed = out["cycles"][1:]
    out.update({key: round(statistics.mean(c[key] for c in timed), 2) for key in KEYS})
    return out


def main(model: str, cycles: int, rows: int, steps: int) -> None:
    runs = []
    for setting in ("plain", "packed", "packed", "plain"):
        proc = subprocess.run([sys.executable, __file__, "child", setting, model, str(cycles), str(rows), str(steps)],
                              check=True, capture_output=True, text=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {"runs": runs, "model": model, "cycles": cycles, "rows": rows, "steps": steps}
    for key in KEYS:
        a, b = (statistics.mean(r[key] for r in runs if r["setting"] == s) for s in ("plain", "packed"))
        summary[key] = {"plain": round(a, 2), "packed": round(b, 2), "packed_over_plain": round(b / a, 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))))
    else:
        def arg(name, default):
            return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default
        main(arg("--model", "default"), arg("--cycles", 2), arg("--rows", 16), arg("--steps", 32))
