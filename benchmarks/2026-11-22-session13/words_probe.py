"""The words step alone, on MATH train conversations that failed turn 1: does each design give a restatement of
the problem, or a solution, or fall back? Inputs: a run folder's `single` records under the sharded user (turn 1
on the user's opening, its reply, the user's feedback and what it revealed), here the tuning run on train
problems. Each failed conversation goes through `refine` once lenient (the first design) and once strict, on the
default model, greedy, 128 tokens a call, as a session's words step after turn 1. Prints JSON: per design, how
many rewrites were kept, how many fell back and why, and how many kept ones read as solutions (by
`solution_reason`). Usage, from the repository root (loads the 1.5B model: run nothing heavy beside it):

    .venv/bin/python benchmarks/2026-11-22-session13/words_probe.py runs/tune/lr2e-4 > words_probe.json

Session 13 (2026-11-22)."""
import collections
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy

from rosa2_dspy.adapters import BoxedAdapter
from rosa2_dspy.engine import LocalEngine, LocalLM
from rosa2_dspy.signatures import Clarify
from rosa2_dspy.words import refine
from rosa2_dspy.words.refinement import _numbers, solution_reason

run = Path(sys.argv[1])
records = [json.loads(line) for line in (run / "single" / "results.jsonl").open()]
failed = [r for r in records if not r["solved"]]
engine = LocalEngine.from_pretrained()
lm = LocalLM(engine, max_tokens=128, temperature=0.0)
dspy.configure(lm=lm, adapter=BoxedAdapter())


def words(record, strict):
    turn = record["turns"][0]
    revealed = [turn["revealed"]] if turn.get("revealed") else []
    history = [{"answer": turn["answer"] or "(no boxed answer)", "feedback": turn["feedback"]}]
    with dspy.context(lm=lm):
        result = refine(dspy.Predict(Clarify), turn["statement"], history, turn["feedback"], critic_lm=lm,
                        max_tokens=128, revealed=revealed, strict=strict)
    sources = [turn["statement"], *revealed]
    return {"unique_id": record["unique_id"], "gap": record["semantic_gap"], "strict": strict,
            "fallback": result.fallback, "clarified": result.clarified_problem,
            "reads_as_solution": None if result.fallback else solution_reason(result.clarified_problem, sources),
            "drops_numbers": None if result.fallback else sorted(set().union(*map(_numbers, sources))
                                                                  - _numbers(result.clarified_problem))}


with ThreadPoolExecutor(max_workers=len(failed) * 2) as pool:
    rows = list(pool.map(lambda job: words(*job), [(r, s) for s in (False, True) for r in failed]))
out = {"run": str(run), "model": engine.name, "dtype": str(engine.model.dtype), "conversations": len(failed),
       "gap": sum(r["semantic_gap"] for r in failed)}
for strict in (False, True):
    mine = [r for r in rows if r["strict"] == strict]
    reasons = collections.Counter((r["fallback"] or "").split(": ", 1)[-1].split(" (")[0] for r in mine if r["fallback"])
    out["strict" if strict else "lenient"] = {
        "kept": sum(not r["fallback"] for r in mine), "fell_back": sum(bool(r["fallback"]) for r in mine),
        "fallback_reasons": dict(reasons),
        "kept_reading_as_a_solution": sum(bool(r["reads_as_solution"]) for r in mine),
        "kept_dropping_a_number": sum(bool(r["drops_numbers"]) for r in mine)}
out["rows"] = rows
print(json.dumps(out, indent=1))
