"""Does trimming the C heap before a weight update slow what follows (session 29)? Session 28's timed run, the
first with the trim before each update (the engine had trimmed after each one since the issue-6 pilot), was 1.3x
slower in decode and update alike on a host that bench engine also found 1.35x slower; this tells the two apart.

One process per setting, in the order after, both, both, after (A B B A). A setting:
  ``after``: the trim after each update only (sessions 7-27); ``both``: before and after (session 28, the default).
Each process loads the model once, then runs ``cycles`` times: ``steps`` decode steps of a continuous batch of
``rows`` MATH train prompts in the engine's decoder (ms per step), then one weight update of the session's default
config on uneven rejected replies (two of 500 and 800 tokens under a 470-token prompt, session 25's rows), timed,
with the resident memory before it and the kernel's peak during it. The first cycle is a warm-up; the rest are
averaged. Prints JSON.
Usage: python trim_ab.py [--model M] [--cycles C] [--rows R] [--steps S]   (the parent: runs the children)
       python trim_ab.py child SETTING MODEL C R S"""

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


def measure(engine, setting: str, cycles: int, rows: int, steps: int, update=None) -> dict:
    """The cycles of one process on ``engine`` (decode steps, then an update; the first cycle a warm-up), as JSON.
    ``update``: the updates' :class:`~rosa2_dspy.weights.UpdateConfig` (default: the session's). Sessions 30's and
    31's A/Bs measure their processes with this too."""
    from rosa2_dspy.adapters import FORMAT_REMINDER
    from rosa2_dspy.bench import continuous_step_seconds
    from rosa2_dspy.coadapt import session_update_config
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.signatures import Answer
    from rosa2_dspy.weights import LoRAUpdater

    prompts = [engine.encode_chat([{"role": "system", "content": Answer.instructions},
                                   {"role": "user", "content": f"{example.problem}\n\n{FORMAT_REMINDER}"}])
               for example in load_examples("train", levels="1,2,3", limit=rows, seed=1)]
    _, uneven = _session25_rows()(engine.tokenizer)
    updater = LoRAUpdater(engine, update or session_update_config())
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


def child(setting: str, model: str, cycles: int, rows: int, steps: int) -> dict:
    from rosa2_dspy.engine import LocalEngine

    engine = LocalEngine.from_pretrained(model)
    if setting == "after":  # skip the trim before each update: the engine's trims alternate before, after
        trim, calls = engine._release_heap, [0]

        def after_only():
            calls[0] += 1
            return trim() if calls[0] % 2 == 0 else None

        engine._release_heap = after_only
    out = measure(engine, setting, cycles, rows, steps)
    out["heap_trims"], out["heap_released_mib"] = engine.stats["heap_trims"], engine.stats["heap_released_mib"]
    return out


def ab(script: str, order: tuple[str, str, str, str], model: str, cycles: int, rows: int, steps: int) -> dict:
    """Run ``script``'s child for each setting of ``order`` (A B B A) in a fresh process; the summary compares the
    means of B's processes with A's (``B_over_A``)."""
    runs = []
    for setting in order:
        proc = subprocess.run([sys.executable, script, "child", setting, model, str(cycles), str(rows), str(steps)],
                              check=True, capture_output=True, text=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {"runs": runs, "model": model, "cycles": cycles, "rows": rows, "steps": steps}
    first, second = order[:2]
    for key in KEYS:
        a, b = (statistics.mean(r[key] for r in runs if r["setting"] == s) for s in (first, second))
        summary[key] = {first: round(a, 2), second: round(b, 2), f"{second}_over_{first}": round(b / a, 3)}
    return summary


def run_from_argv(script: str, child, order: tuple[str, str, str, str], cycles: int, rows: int, steps: int) -> None:
    """An A/B script's command line: ``child SETTING MODEL C R S`` runs one process, anything else the A B B A
    (``--model``, ``--cycles``, ``--rows``, ``--steps``, defaulting to the numbers given here)."""
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))))
        return

    def arg(name, default):
        return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default
    print(json.dumps(ab(script, order, arg("--model", "default"), arg("--cycles", cycles), arg("--rows", rows),
                        arg("--steps", steps)), indent=1))


if __name__ == "__main__":
    run_from_argv(__file__, child, ("after", "both", "both", "after"), 4, 16, 48)
