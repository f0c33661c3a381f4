"""The compile-time words optimizer: :class:`TextualGradientOptimizer` (a ``dspy.Teleprompter``)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

import dspy
from dspy.teleprompt.bootstrap_trace import FailedPrediction
from dspy.teleprompt.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.math.feedback import field_of
from rosa2_dspy.math.grading import last_boxed

from rosa2_dspy.words.gradient import (ROLLOUT_TIMEOUT, _resolve_lm, apply_gradient, judge, textual_gradient,
                                       validate_instruction)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the compile-time optimizer


@dataclass
class Rollout:
    """One example run through the program: its prediction, trace, score and feedback."""

    example: Any
    prediction: Any
    trace: list
    score: float
    feedback: str


def _failed_step(program: dspy.Module, exc: AdapterParseError, inputs: dict,
                 failed: FailedPrediction) -> tuple | None:
    """The trace step of a predictor whose reply did not parse (its inputs: the program's, where named alike)."""
    for predictor in program.predictors():
        if exc.signature is not None and predictor.signature.equals(exc.signature):
            own = {name: value for name, value in inputs.items() if name in predictor.signature.input_fields}
            return predictor, own, failed
    return None


def _output_text(outputs: Any) -> str:
    if isinstance(outputs, FailedPrediction):
        return f"(the reply could not be parsed) {outputs.completion_text or ''}".strip()
    try:
        items = dict(outputs.items()) if hasattr(outputs, "items") else dict(outputs)
    except Exception:  # noqa: BLE001
        return str(outputs)
    return "\n".join(f"{name}: {value}" for name, value in items.items())


def hold_out(trainset: list, valset: list | None, size: int, seed: int = 0) -> tuple[list, list]:
    """(training problems, validation problems) for a compile. A given valset is used as it is; without one,
    ``size`` problems (at most half) are held out of the trainset, drawn once with ``seed``. A compile of
    several rounds splits once, so every round validates on the same problems and no step trains on them."""
    trainset = list(trainset)
    if valset:
        return trainset, list(valset)
    if len(trainset) < 2:
        return trainset, trainset
    shuffled = trainset[:]
    random.Random(seed).shuffle(shuffled)
    held = min(size, len(shuffled) // 2)
    return shuffled[held:], shuffled[:held]


class TextualGradientOptimizer(Teleprompter):
    """Compile-time words optimizer: critique and rewrite each predictor's instruction, keep what helps.

    Each round draws a minibatch of the trainset, runs it through the current program and, for
    every predictor the program called, asks the critic for a critique of its instruction from
    those calls' inputs, outputs, scores and feedback, then for a rewrite. A rewrite that passes
    :func:`validate_instruction` is scored on the validation minibatch (``val_size`` examples of
    ``valset``, or held out of the trainset when there is none, fixed for the whole compile) and
    accepted only when it scores strictly better than the current words.

    ``history`` (and the returned program's ``words_history``) has one entry per round and
    predictor: the old instruction, the critique, the candidate, the rejection reason or the
    scores (current vs candidate), whether it was accepted, any critic error or note, and the
    instruction after the step (``instruction_after``).
    """

    def __init__(self, metric: Callable, critic_lm: Any = None, rounds: int = 2,
                 minibatch_size: int = 4, val_size: int = 8, max_instruction_chars: int = 1200,
                 num_threads: int = 4, seed: int = 0, format_credit: float = 0.0):
        super().__init__()
        if not 0.0 <= format_credit < 1.0:
            raise ValueError(f"format_credit must be in [0, 1), got {format_credit}")
        for name, value in (("rounds", rounds), ("minibatch_size", minibatch_size), ("val_size", val_size),
                            ("max_instruction_chars", max_instruction_chars), ("num_threads", num_threads)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.metric = metric
        self.critic_lm = critic_lm
        self.rounds = int(rounds)
        self.minibatch_size = int(minibatch_size)
        self.val_size = int(val_size)
        self.max_instruction_chars = int(max_instruction_chars)
        self.num_threads = int(num_threads)
        self.seed = seed
        # validation score = mean metric + format_credit * (share of replies with a boxed answer): a tie-breaker
        # that lets words which fix the answer format win while a small model still solves nothing
        self.format_credit = float(format_credit)
        self.history: list[dict] = []
        self.compiles = 0
        self.last_score: float | None = None  # the returned program's validation score, set by each compile

    # -- running the program ----------------------------------------------------------------

    def rollouts(self, program: dspy.Module, examples: list) -> list[Rollout]:
        """Run ``examples`` through ``program`` with traces, ``num_threads`` at a time.

        A reply that does not parse ends the trace with a ``FailedPrediction`` step for the predictor
        that wrote it (its raw text is what the critic reads); any other error leaves no step for it.
        Either way the rollout is judged by the metric (a missing prediction scores 0).
        """
        from dspy.utils.parallelizer import ParallelExecutor

        def run(example: Any) -> tuple[Any, list]:
            inputs = example.inputs() if hasattr(example, "inputs") else dict(example)
            with dspy.context(trace=[]):
                try:
                    return program(**inputs), list(dspy.settings.trace)
                except AdapterParseError as exc:
                    failed = FailedPrediction(completion_text=exc.lm_response or "")
                    trace = list(dspy.settings.trace)
                    step = _failed_step(program, exc, dict(inputs), failed)
                    return failed, trace + ([step] if step else [])
                except Exception as exc:  # noqa: BLE001 - one failing example must not stop a compile
                    logger.warning("words: the program failed on an example: %s: %s", type(exc).__name__, exc)
                    return None, list(dspy.settings.trace)

        executor = ParallelExecutor(num_threads=self.num_threads, max_errors=len(examples) + 1,
                                    disable_progress_bar=True, timeout=ROLLOUT_TIMEOUT)
        results = executor.execute(run, list(examples))
        out = []
        for example, result in zip(examples, results):
            prediction, trace = result if result is not None else (None, [])
            score, feedback = judge(self.metric, example, prediction, trace)
            out.append(Rollout(example, prediction, trace, score, feedback))
        return out

    def score(self, program: dspy.Module, examples: list) -> float:
        """Mean metric score of ``program`` on ``examples`` (0..1; a failed run scores 0)."""
        results = self.rollouts(program, examples)
        if not results:
            return 0.0
        score = sum(r.score for r in results) / len(results)
        if self.format_credit:
            boxed = sum(1 for r in results if last_boxed(str(field_of(r.prediction, "answer") or "")) is not None)
            score += self.format_credit * boxed / len(results)
        return score

    def records_for(self, name: str, predictor: dspy.Predict, rollouts: list[Rollout]) -> list[dict]:
        """The calls of one predictor in the rollouts, as critic records (inputs, output, score, feedback)."""
        records = []
        for rollout in rollouts:
            calls = [step for step in rollout.trace if step[0] is predictor]
            if not calls:
                calls = [step for step in rollout.trace if step[0].signature.equals(predictor.signature)]
            if not calls:
                continue
            _, inputs, outputs = calls[-1]
            score, feedback = judge(self.metric, rollout.example, rollout.prediction, rollout.trace, name, calls)
            records.append({"inputs": {k: str(v) for k, v in dict(inputs).items()}, "output": _output_text(outputs),
                            "score": score, "feedback": feedback})
        records.sort(key=lambda r: r["score"])  # failures first
        return records

    # -- the loop ---------------------------------------------------------------------------

    def _split(self, trainset: list, valset: list | None) -> tuple[list, list]:
        """The training pool and the validation minibatch: the first ``val_size`` of the valset (or of the
        problems :func:`hold_out` keeps out of the trainset), the same whatever the seed."""
        train, val = hold_out(trainset, valset, self.val_size)
        return train, val[: self.val_size]

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None,
                teacher: Any = None) -> dspy.Module:
        """Optimize the instructions of ``student``'s predictors; returns a new program (``teacher`` is unused)."""
        if not trainset:
            raise ValueError("TextualGradientOptimizer needs a non-empty trainset")
        rng = random.Random(self.seed)
        self.last_score = None
        program = student.deepcopy()
        critic = _resolve_lm(self.critic_lm, program)
        train, val = self._split(trainset, valset)
        self.compiles += 1
        entries: list[dict] = []
        current = self.score(program, val)
        logger.info("words: baseline validation score %.3f on %d examples", current, len(val))
        for round_index in range(self.rounds):
            batch = rng.sample(train, min(self.minibatch_size, len(train)))
            ran, rollouts = program, self.rollouts(program, batch)
            for name, ran_predictor in ran.named_predictors():
                # records come from the program that ran the minibatch; the words from the current one,
                # which differs from it once an earlier predictor's rewrite was accepted this round
                records = self.records_for(name, ran_predictor, rollouts)
                entry, program, current = self._step(program, name, records, val, current, critic)
                entry.update(compile=self.compiles, round=round_index,
                             instruction_after=dict(program.named_predictors())[name].signature.instructions)
                entries.append(entry)
                self.history.append(entry)
        program.words_history = entries
        program._compiled = True
        self.last_score = current
        return program

    def _step(self, program: dspy.Module, name: str, records: list[dict], val: list, current: float,
              critic: Any) -> tuple[dict, dspy.Module, float]:
        """One critique-and-rewrite step on one predictor; returns (history entry, program, current score)."""
        old = dict(program.named_predictors())[name].signature.instructions
        entry: dict[str, Any] = {"predictor": name, "old_instruction": old, "critique": None, "candidate": None,
                                 "reason": None, "error": None, "note": None, "score_current": current,
                                 "score_candidate": None, "accepted": False}
        entry["records"] = len(records)
        if not records:
            entry["note"] = "not called by the program on this minibatch: left unchanged"
            logger.info("words: %s %s", name, entry["note"])
            return entry, program, current
        if all(r["score"] >= 1.0 for r in records):
            entry["note"] = "no failures in this minibatch: nothing to critique"
            return entry, program, current
        try:
            entry["critique"] = textual_gradient(old, records, critic)
            entry["candidate"] = apply_gradient(old, entry["critique"], critic, self.max_instruction_chars)
        except Exception as exc:  # noqa: BLE001 - a failing critic costs this step, never the run
            entry["error"] = f"critic failed: {type(exc).__name__}: {exc}"[:500]
            logger.warning("words: %s: %s; the instruction is kept", name, entry["error"])
            return entry, program, current
        entry["reason"] = validate_instruction(old, entry["candidate"], self.max_instruction_chars)
        if entry["reason"]:
            logger.info("words: %s: rewrite rejected (%s)", name, entry["reason"])
            return entry, program, current
        candidate_program = program.deepcopy()
        target = dict(candidate_program.named_predictors())[name]
        target.signature = target.signature.with_instructions(entry["candidate"].strip())
        try:
            score = self.score(candidate_program, val)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = f"scoring the candidate failed: {type(exc).__name__}: {exc}"[:500]
            entry["reason"] = "not scored"
            logger.warning("words: %s: %s", name, entry["error"])
            return entry, program, current
        entry["score_candidate"] = score
        if score > current:
            entry["accepted"] = True
            logger.info("words: %s: rewrite accepted (%.3f -> %.3f)", name, current, score)
            return entry, candidate_program, score
        entry["reason"] = f"not better on validation: {score:.3f} <= {current:.3f}"
        logger.info("words: %s: rewrite rejected (%s)", name, entry["reason"])
        return entry, program, current
