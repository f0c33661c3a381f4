"""Words: textual gradients for signature instructions, and test-time refinement.

ROSA2's "semantic gradient" treats the words of a prompt program (its signature instructions)
as parameters and natural-language feedback as the signal that moves them:

* **the loss** is a metric, passed in, that returns a score *and* a feedback text naming what went
  wrong in checkable terms (for MATH, :func:`rosa2_dspy.math.feedback.math_feedback_metric`: no
  ``\\boxed{}`` answer, an answer that does not parse, the wrong form, a wrong value; never the gold);
* **the gradient** is a critique of the words: a critic LM reads one predictor's instruction and
  a minibatch of its inputs, outputs, scores and feedback, and says what in the instruction led
  to these failures (:func:`textual_gradient`);
* **the update** is a rewrite of the instruction from that critique (:func:`apply_gradient`),
  kept only if it is a well-formed instruction (:func:`validate_instruction`: not empty, not
  garbled, under a length cap, keeping required output formats such as ``\\boxed``) and scores
  strictly better on a validation minibatch than the words it would replace.

:class:`TextualGradientOptimizer` runs this loop at compile time on every predictor of a program
(a ``dspy.Teleprompter``, usable as the ``p`` step of ``dspy.BetterTogether``); DSPy's ``GEPA``
takes the same metric (with :func:`plain_text_gepa_proposer` when its reflection LM is a small
local model), so the two can be compared on the same problems. At test time,
:func:`refine` is the same idea applied to one turn: the user's feedback, however vague, becomes a
critique (what was unclear) and the ``Clarify`` module rewrites the problem statement from it.

The critic is any ``dspy.LM``; by default the LM DSPy is configured with (the local engine).
Critic calls go through a plain-text adapter (:class:`~rosa2_dspy.adapters.BoxedAdapter`: the
system message is the instruction, the whole reply is the output), so even a 135M model's raw
text is usable, and whatever it writes is validated before it can change the program.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import dspy
from dspy.teleprompt.bootstrap_trace import FailedPrediction
from dspy.teleprompt.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.adapters import BoxedAdapter
from rosa2_dspy.math.feedback import field_of
from rosa2_dspy.math.grading import last_boxed

if TYPE_CHECKING:
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

logger = logging.getLogger(__name__)

# Output formats an instruction may require; a rewrite must keep each one the old words contain.
FORMAT_MARKERS = ("\\boxed",)
MAX_FIELD_CHARS = 600  # how much of one input/output the critic sees per example
ROLLOUT_TIMEOUT = 1800  # seconds before DSPy's executor resubmits a straggling example (CPU generation is slow)


def judge(metric: Callable, example: Any, prediction: Any, trace: Any = None, pred_name: str | None = None,
          pred_trace: Any = None) -> tuple[float, str]:
    """Call any metric (GEPA's five-argument form, or DSPy's ``(example, pred[, trace])``) and return
    ``(score, feedback)``; a metric that raises scores 0 with the error as its feedback."""
    try:
        params = inspect.signature(metric).parameters
        accepts_all = any(p.kind == p.VAR_POSITIONAL for p in params.values()) or len(params) >= 5
        if accepts_all:
            result = metric(example, prediction, trace, pred_name, pred_trace)
        elif len(params) >= 3:
            result = metric(example, prediction, trace)
        else:
            result = metric(example, prediction)
    except Exception as exc:  # noqa: BLE001 - one unscorable output must not stop a compile
        logger.warning("words: the metric failed: %s: %s", type(exc).__name__, exc)
        return 0.0, f"The output could not be scored ({type(exc).__name__})."
    if isinstance(result, dict) or hasattr(result, "score"):
        score = field_of(result, "score")
        return float(score or 0.0), str(field_of(result, "feedback") or "")
    return float(result or 0.0), ""


# ----------------------------------------------------------------------------- the gradient and the update


class Critique(dspy.Signature):
    """You review the instruction given to a language model for one step of a math-solving program. Below are examples of that step's inputs and outputs, each with a score and feedback saying what went wrong. Explain briefly what in the instruction led to these failures and what the instruction should say instead. Do not solve the problems and do not rewrite the instruction."""

    instruction: str = dspy.InputField(desc="the instruction being reviewed")
    examples: str = dspy.InputField(desc="inputs, outputs, scores and feedback from running the step")
    critique: str = dspy.OutputField(desc="what in the instruction caused the failures, and what to change")


class Rewrite(dspy.Signature):
    """Rewrite the instruction so that it fixes the problems named in the critique. Keep everything in the instruction that still works, keep every requirement listed, and keep it short. Reply with the new instruction only."""

    instruction: str = dspy.InputField(desc="the current instruction")
    critique: str = dspy.InputField(desc="what is wrong with it")
    requirements: str = dspy.InputField(desc="what the new instruction must keep")
    new_instruction: str = dspy.OutputField(desc="the improved instruction")


class TurnCritique(dspy.Signature):
    """A user was not satisfied with the answer to a math problem. From the problem, the earlier turns and the user's feedback, say briefly what was unclear or missed, and what the user most likely wants instead. Do not solve the problem."""

    problem: str = dspy.InputField(desc="the problem as first asked")
    history: str = dspy.InputField(desc="earlier answers and feedback")
    feedback: str = dspy.InputField(desc="the user's feedback on the last answer")
    critique: str = dspy.OutputField(desc="what was unclear, and what is wanted")


def _resolve_lm(lm: Any = None, program: dspy.Module | None = None) -> Any:
    """The critic: the one given, else DSPy's configured LM, else the program's first predictor LM."""
    if lm is not None:
        return lm
    if dspy.settings.lm is not None:
        return dspy.settings.lm
    if program is not None:
        for predictor in program.predictors():
            if predictor.lm is not None:
                return predictor.lm
    raise ValueError("no critic LM: pass critic_lm, or configure dspy with an LM (dspy.configure(lm=...))")


def clean_reply(text: str | None, field: str | None = None) -> str:
    """A critic's raw reply as plain text: the ``[[ ## field ## ]]`` section when the model wrote
    ChatAdapter markers, without code fences, a leading label or surrounding quotes."""
    text = (text or "").strip()
    if field and f"[[ ## {field} ## ]]" in text:
        text = text.split(f"[[ ## {field} ## ]]", 1)[1].split("[[ ##", 1)[0].strip()
    text = re.sub(r"^```[A-Za-z]*\s*|\s*```$", "", text).strip()
    text = re.sub(r"^(?:new\s+instruction|improved\s+instruction|instruction|critique)\s*:\s*", "", text,
                  flags=re.IGNORECASE).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _call_critic(signature: type[dspy.Signature], critic_lm: Any, output: str, config: dict | None = None,
                 **inputs: str) -> str:
    """Run one critic signature as plain text; a reply that does not parse is taken as raw text.
    ``config``: per-call LM settings (say, a ``max_tokens`` cap)."""
    predictor = dspy.Predict(signature)
    with dspy.context(lm=critic_lm, adapter=BoxedAdapter(), trace=None):
        try:
            text = predictor(**inputs, config=dict(config or {})).get(output)
        except AdapterParseError as exc:  # an empty reply: the raw text (if any) is all there is
            text = exc.lm_response
    return clean_reply(text, output)


def _clip(text: Any, limit: int = MAX_FIELD_CHARS) -> str:
    text = str(text if text is not None else "").strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def format_records(records: list[dict]) -> str:
    """A minibatch of ``{"inputs", "output", "score", "feedback"}`` records as the critic reads it."""
    blocks = []
    for index, record in enumerate(records, 1):
        inputs = record.get("inputs") or {}
        shown = "\n".join(f"{name}: {_clip(value)}" for name, value in inputs.items() if value not in (None, ""))
        blocks.append(f"Example {index}\nInputs:\n{shown}\nOutput:\n{_clip(record.get('output'))}\n"
                      f"Score: {float(record.get('score') or 0.0):g}\nFeedback: {record.get('feedback') or '(none)'}")
    return "\n\n".join(blocks)


def feedback_summary(records: list[dict]) -> str:
    """The records' distinct feedback as a critique of last resort (the metric's words are a gradient too)."""
    seen = []
    for record in records:
        feedback = str(record.get("feedback") or "").strip()
        if feedback and float(record.get("score") or 0.0) < 1.0 and feedback not in seen:
            seen.append(feedback)
    if not seen:
        return ""
    return "The outputs failed in these ways; the instruction should prevent them:\n" + \
        "\n".join(f"- {item}" for item in seen)


def textual_gradient(instruction: str, records: list[dict], critic_lm: Any = None) -> str:
    """The critique of ``instruction`` from a minibatch of records (the gradient).

    ``records`` are dicts with ``inputs`` (a dict), ``output`` (text), ``score`` and ``feedback``.
    The critic is ``critic_lm`` or DSPy's configured LM. When the critic writes nothing usable, the
    records' own feedback is the critique. Errors of the critic LM propagate to the caller.
    """
    critique = _call_critic(Critique, _resolve_lm(critic_lm), "critique", instruction=instruction,
                            examples=format_records(records))
    return critique or feedback_summary(records)


def required_formats(instruction: str) -> list[str]:
    """The output-format markers an instruction contains, which any rewrite of it must keep."""
    return [marker for marker in FORMAT_MARKERS if marker in instruction]


def apply_gradient(instruction: str, critique: str, critic_lm: Any = None, max_chars: int = 1200) -> str:
    """The instruction rewritten from the critique (the update); validate it with :func:`validate_instruction`."""
    keep = [f'it must contain "{marker}{{...}}" exactly as the current instruction does'
            for marker in required_formats(instruction)]
    keep.append(f"at most {max_chars} characters")
    return _call_critic(Rewrite, _resolve_lm(critic_lm), "new_instruction", instruction=instruction,
                        critique=critique, requirements="; ".join(keep))


def garbled_reason(text: str) -> str | None:
    """Why a text is not usable prose (mostly non-letters, too few words, one token repeated), or None."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "empty"
    if "[[ ##" in text:
        return "garbled: it contains prompt-format markers"
    if sum(c.isalpha() for c in chars) / len(chars) < 0.5:
        return "garbled: mostly non-letters"
    words = re.findall(r"[a-z]+", text.lower())
    if len(words) < 3:
        return "garbled: too few words"
    counts = Counter(words)
    if len(words) >= 6 and (counts.most_common(1)[0][1] / len(words) > 0.4 or len(counts) / len(words) < 0.3):
        return "garbled: the same words repeated"
    sentences = [s.strip().lower() for s in re.split(r"[.!?\n]+", text) if s.strip()]
    if len(sentences) >= 3 and len(set(sentences)) <= len(sentences) / 2:
        return "garbled: the same sentence repeated"
    return None


def validate_instruction(old: str, new: str | None, max_chars: int = 1200) -> str | None:
    """Why a rewritten instruction must be rejected, or None when it may be tried.

    Rejected: empty, over-long (more than ``max_chars``), garbled (mostly non-letters, too few words,
    the same token or sentence repeated), format-dropping (a marker such as ``\\boxed`` that the old
    instruction has and the new one lacks) and unchanged rewrites.
    """
    new = (new or "").strip()
    if not new:
        return "empty rewrite"
    if len(new) > max_chars:
        return f"over-long rewrite: {len(new)} characters > {max_chars}"
    garbled = garbled_reason(new)
    if garbled:
        return garbled
    dropped = [marker for marker in required_formats(old) if marker not in new]
    if dropped:
        return f"format-dropping rewrite: it drops {', '.join(dropped)}"
    if new == old.strip():
        return "unchanged rewrite"
    return None


def plain_text_gepa_proposer(max_chars: int | None = None) -> "InstructionProposer":
    """GEPA's own instruction proposer (its reflection prompt), speaking plain text to the reflection LM.

    GEPA's default proposer asks for its ``new_instruction`` through a ``JSONAdapter``; a small
    local model rarely writes that, so every proposal fails to parse and GEPA proposes nothing.
    Pass ``dspy.GEPA(..., instruction_proposer=plain_text_gepa_proposer())`` to take the whole
    reply as the instruction instead, as the words optimizer does.
    """
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    return InstructionProposer(adapter=BoxedAdapter(), max_chars=max_chars)


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


# ----------------------------------------------------------------------------- test-time refinement


@dataclass
class Refinement:
    """The next turn's problem statement, and the critique (semantic gradient) that produced it."""

    clarified_problem: str
    critique: str
    fallback: str | None = None  # why the clarified problem is the original plus a note, if it is

    def to_dict(self) -> dict:
        return asdict(self)


def format_history(history: list | None) -> str:
    """Earlier turns (strings, or dicts with ``answer`` / ``feedback`` / ...) as numbered lines."""
    lines = []
    for index, turn in enumerate(history or [], 1):
        if isinstance(turn, dict):
            parts = [f"{key}: {_clip(value, 300)}" for key, value in turn.items() if value not in (None, "")]
            lines.append(f"Turn {index}: " + "; ".join(parts))
        else:
            lines.append(f"Turn {index}: {_clip(turn, 300)}")
    return "\n".join(lines)


def _clarify_predictor(clarify: Any) -> dspy.Module:
    if isinstance(clarify, dspy.Predict):
        return clarify
    inner = getattr(clarify, "clarify", None)
    if isinstance(inner, dspy.Module):
        return inner
    raise TypeError("refine needs a dspy.Predict(Clarify) or a program with a .clarify predictor")


def _lost_problem(problem: str, clarified: str) -> bool:
    """True when the problem has numbers and the clarified statement keeps none of them."""
    numbers = set(re.findall(r"\d+(?:\.\d+)?", problem))
    return bool(numbers) and not any(n in clarified for n in numbers)


def refine(clarify: Any, problem: str, history: list | None, feedback: str, critic_lm: Any = None,
           adapter: dspy.Adapter | None = None, max_tokens: int | None = None,
           revealed: list[str] | None = None) -> Refinement:
    """Turn the user's feedback on the last turn into a clarified problem for the next turn.

    The critic (``critic_lm``, else the clarify predictor's LM, else DSPy's) first says what was
    unclear (the critique: the semantic gradient, for the turn's trace); the ``Clarify`` module
    then rewrites the problem with the history, the feedback and the critique as its ``feedback``
    input. An empty or garbled clarification, or one that drops all of the problem's numbers,
    falls back to the original problem with the feedback appended as a note. ``max_tokens`` caps
    each of the two calls (a critique and a restated problem are short; a small model rambles).
    ``revealed``: pieces of the problem the user told after its first message (a sharded user); the
    clarification must keep the numbers of each of them too, and the fallback restates them.
    """
    predictor = _clarify_predictor(clarify)
    config = {"max_tokens": max_tokens} if max_tokens else {}
    history_text = format_history(history)
    try:
        critic = _resolve_lm(critic_lm or getattr(predictor, "lm", None))
        critique = _call_critic(TurnCritique, critic, "critique", config, problem=problem,
                                history=history_text or "(none)", feedback=feedback)
    except Exception as exc:  # noqa: BLE001 - the turn goes on without a model-written critique
        logger.warning("refine: the critic failed (%s: %s)", type(exc).__name__, exc)
        critique = ""
    if garbled_reason(critique or ""):
        critique = f'The user was not satisfied with the last answer and said: "{feedback}". ' \
                   "The problem statement should say exactly what is asked and in what form."
    parts = []
    if history_text:
        parts.append("Earlier turns:\n" + history_text)
    parts.append(f"Latest feedback from the user: {feedback}")
    parts.append(f"What was unclear: {critique}")
    note = "\n\n".join(parts)
    fallback = None
    try:
        with dspy.context(adapter=adapter or BoxedAdapter()):
            clarified = clean_reply(predictor(problem=problem, feedback=note, config=dict(config))
                                    .get("clarified_problem"))
    except Exception as exc:  # noqa: BLE001 - e.g. an empty reply (AdapterParseError) or an LM error
        clarified, fallback = "", f"the clarify call failed: {type(exc).__name__}"
    if not fallback:
        lost = [text for text in [problem, *(revealed or [])] if _lost_problem(text, clarified)]
        reason = garbled_reason(clarified) or (
            None if not lost else "it drops every number of the problem" if lost[0] is problem
            else f"it drops every number of what the user added: {_clip(lost[0], 80)!r}")
        fallback = f"the clarified problem was rejected: {reason}" if reason else None
    if fallback:
        logger.info("refine: %s; using the original problem with the feedback as a note", fallback)
        added = "".join(f"\n\nThe user added: {text.strip()}" for text in revealed or [])
        note = "" if revealed and revealed[-1].strip() in feedback else \
            f"\n\nNote from the user about an earlier answer: {feedback.strip()}"
        clarified = f"{problem.strip()}{added}{note}"
    return Refinement(clarified_problem=clarified, critique=critique, fallback=fallback)
