"""Test-time refinement: the user's feedback on a turn becomes a clarified problem for the next turn."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

import dspy

from rosa2_dspy.adapters import BoxedAdapter

from rosa2_dspy.words.gradient import TurnCritique, _call_critic, _clip, _resolve_lm, clean_reply, garbled_reason

logger = logging.getLogger(__name__)

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


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:\.\d+)?", text))


def _lost_problem(problem: str, clarified: str) -> bool:
    """True when the problem has numbers and the clarified statement keeps none of them."""
    numbers = _numbers(problem)
    return bool(numbers) and not any(n in clarified for n in numbers)


# how a restatement is asked for in strict mode: the last line of the Clarify call's user message, where a small
# model heeds an instruction best (the system message alone is not enough: of the 117 rewrites the first design kept
# in the main run's first 47 problems, the 1.5B default's, 116 were solutions or stated answers, against its
# signature's "Do not solve the problem")
RESTATE_REMINDER = ("Reply with the rewritten problem statement only: the problem with everything the user added, "
                    "every number and condition kept. Do not solve it.")
# what a problem statement does not hold and a solution does: a boxed answer, displayed working, numbered steps
_SOLUTION_MARKS = (("a boxed answer", re.compile(r"\\boxed")),
                   ("displayed working", re.compile(r"\\\[|\$\$|\\begin\{(?:align|equation)")),
                   ("solution steps", re.compile(r"(?im)^\s*(?:#+\s*)?(?:\*\*)?step\s*\d|^\s*\d+\.\s+\*\*")),
                   ("a solver's voice", re.compile(r"(?i)\b(?:we|let's|let us)\b")))
# what a problem asks with: a question mark or an imperative (MATH's own: find, compute, express, enter, ...)
_ASKS = re.compile(r"\?|(?i:\b(?:find|compute|calculate|determine|evaluate|simplify|solve|express|enter|give|"
                   r"what|which|how|show|prove|write|list|round)\b)")


def solution_reason(clarified: str, sources: list[str]) -> str | None:
    """Why a clarified problem reads as (the start of) a solution rather than a problem statement, or None:
    it has more of a solution's marks than ``sources``, the texts it restates (the problem, what the user added),
    or is much longer than they are together."""
    for what, pattern in _SOLUTION_MARKS:  # (more of them than the texts restated have: a problem may display math)
        if len(pattern.findall(clarified)) > sum(len(pattern.findall(text)) for text in sources):
            return f"it solves the problem ({what})"
    if not _ASKS.search(clarified) and any(_ASKS.search(text) for text in sources):
        return "it asks nothing (an answer stated, not a problem)"
    limit = 2 * sum(len(text) for text in sources) + 200
    if len(clarified) > limit:
        return f"it solves the problem ({len(clarified)} characters for a statement of at most {limit})"
    return None


def refine(clarify: Any, problem: str, history: list | None, feedback: str, critic_lm: Any = None,
           adapter: dspy.Adapter | None = None, max_tokens: int | None = None,
           revealed: list[str] | None = None, strict: bool = False) -> Refinement:
    """Turn the user's feedback on the last turn into a clarified problem for the next turn.

    The critic (``critic_lm``, else the clarify predictor's LM, else DSPy's) first says what was
    unclear (the critique: the semantic gradient, for the turn's trace); the ``Clarify`` module
    then rewrites the problem with the history, the feedback and the critique as its ``feedback``
    input. An empty or garbled clarification, or one that drops all of the problem's numbers,
    falls back to the original problem with the feedback appended as a note. ``max_tokens`` caps
    each of the two calls (a critique and a restated problem are short; a small model rambles).
    ``revealed``: pieces of the problem the user told after its first message (a sharded user); the
    clarification must keep the numbers of each of them too, and the fallback restates them.

    ``strict``: the Clarify call ends with :data:`RESTATE_REMINDER`, and a clarification must keep *every*
    number of the problem and of what the user added, and must not read as a solution (:func:`solution_reason`);
    otherwise the fallback. Not strict (the first design, kept for the runs made with it): any rewrite that keeps
    one number of each passes, a solution included.
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
    if strict:
        parts.append(RESTATE_REMINDER)
    note = "\n\n".join(parts)
    fallback = None
    try:
        with dspy.context(adapter=adapter or BoxedAdapter()):
            clarified = clean_reply(predictor(problem=problem, feedback=note, config=dict(config))
                                    .get("clarified_problem"))
    except Exception as exc:  # noqa: BLE001 - e.g. an empty reply (AdapterParseError) or an LM error
        clarified, fallback = "", f"the clarify call failed: {type(exc).__name__}"
    if not fallback:
        sources = [problem, *(revealed or [])]
        lost = [text for text in sources if _lost_problem(text, clarified)]
        reason = garbled_reason(clarified) or (
            None if not lost else "it drops every number of the problem" if lost[0] is problem
            else f"it drops every number of what the user added: {_clip(lost[0], 80)!r}")
        if strict and not reason:
            missing = sorted(set().union(*map(_numbers, sources)) - _numbers(clarified), key=len)
            reason = solution_reason(clarified, sources) or (
                f"it drops the number(s) {', '.join(missing[:5])}" if missing else None)
        fallback = f"the clarified problem was rejected: {reason}" if reason else None
    if fallback:
        logger.info("refine: %s; using the original problem with the feedback as a note", fallback)
        added = "".join(f"\n\nThe user added: {text.strip()}" for text in revealed or [])
        note = "" if revealed and revealed[-1].strip() in feedback else \
            f"\n\nNote from the user about an earlier answer: {feedback.strip()}"
        clarified = f"{problem.strip()}{added}{note}"
    return Refinement(clarified_problem=clarified, critique=critique, fallback=fallback)
