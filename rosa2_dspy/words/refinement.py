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
