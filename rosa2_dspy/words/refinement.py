"""Test-time refinement: the user's feedback on a turn becomes a clarified problem for the next turn."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from decimal import Decimal
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


def _solution_marks(text: str, sources: list[str]) -> str | None:
    """Which of a solution's marks ``text`` has more of than ``sources`` together (a problem may display math)."""
    for what, pattern in _SOLUTION_MARKS:
        if len(pattern.findall(text)) > sum(len(pattern.findall(source)) for source in sources):
            return what
    return None


def solution_reason(clarified: str, sources: list[str]) -> str | None:
    """Why a clarified problem reads as (the start of) a solution rather than a problem statement, or None:
    it has more of a solution's marks than ``sources``, the texts it restates (the problem, what the user added),
    or is much longer than they are together."""
    if what := _solution_marks(clarified, sources):
        return f"it solves the problem ({what})"
    if not _ASKS.search(clarified) and any(_ASKS.search(text) for text in sources):
        return "it asks nothing (an answer stated, not a problem)"
    limit = 2 * sum(len(text) for text in sources) + 200
    if len(clarified) > limit:
        return f"it solves the problem ({len(clarified)} characters for a statement of at most {limit})"
    return None


def as_told(problem: str, history: list[dict] | None) -> str:
    """The conversation in the user's own words: the first message, then every feedback so far (a sharded user's
    revealed conditions are in it). What ``retry`` and ``ttt`` answer, and what the ``append`` words step keeps
    verbatim above its clarification."""
    if not history:
        return problem
    return f"{problem}\n\nFeedback on the earlier answer(s): " + " ".join(h["feedback"] for h in history)


def user_added(text: str) -> str:
    """A piece of the problem the user revealed, as a fallback or kept words add it below the problem."""
    return f"\n\nThe user added: {text.strip()}"


def kept_words(words: str, problem: str, history: list[dict], shown: str | None, mode: str = "replace") -> str:
    """The prompt of a turn that takes no words step after an earlier one did (``pe-then-ttt``'s second half,
    ``words_after = "first"``): ``words``, the last words step's prompt, brought up to date with the conversation.
    Replace mode keeps the rewrite and adds what the user revealed at the last turn (``shown``); append mode keeps
    its promise that the user's words stand verbatim, :func:`as_told` now, with the last clarification below them
    (none when it was refused)."""
    if mode == "append":
        _, header, clarification = words.rpartition(f"\n\n{CLARIFICATION_HEADER} ")
        return as_told(problem, history) + (f"{header}{clarification}" if header else "")
    return words + (user_added(shown) if shown else "")


# how a clarification is asked for in append mode (the last line of the Clarify call's user message)
APPEND_REMINDER = ("Reply with a short clarification to add below the user's words, in one to three sentences: "
                   "what exactly is asked and in what form the answer is wanted, given the feedback. Do not restate "
                   "the problem, do not solve it, and give no number the user did not give.")
CLARIFICATION_HEADER = "Clarification:"
MAX_CLARIFICATION_CHARS = 400  # one to three sentences; a longer reply restates or solves the problem
_LABEL = re.compile(r"(?i)^\W*clarification\W*:\W*")
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,)(?=\d{3}(?!\d))")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)(\d)")
_TURN = re.compile(r"(?i)\b(?:turn|answer|attempt)\s*#?\d+")
_DECIMAL = re.compile(r"\d*\.\d+|\d+")


def given_numbers(text: str) -> set[str]:
    """The numbers a text states, read alike in the user's words and in a clarification: ``1{,}000`` and
    ``1,000`` are 1000, ``\\frac12`` is 1 and 2, ``.50`` is 0.5; "turn 2" (how the earlier turns are listed to the
    Clarify call) is no number. (Replace mode keeps its own, older reading, :func:`_numbers`, as its runs had it.)"""
    text = _TURN.sub(" ", _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", _THOUSANDS.sub("", text)))
    return {format(Decimal(n).normalize(), "f") for n in _DECIMAL.findall(text)}


def clarification_reason(note: str, told: str, history: list | None) -> str | None:
    """Why a clarification to append is refused in strict mode, or None: it reads as a solution (a solution's marks
    beyond the user's words, or longer than :data:`MAX_CLARIFICATION_CHARS`) or gives a number that neither the
    user nor an earlier answer gave (a computed result: the 1.5B default's rewrites stated answers, right and
    wrong, in most of those session 13 read)."""
    if what := _solution_marks(note, [told]):
        return f"it solves the problem ({what})"
    if len(note) > MAX_CLARIFICATION_CHARS:
        return f"it is no short clarification ({len(note)} characters, at most {MAX_CLARIFICATION_CHARS})"
    given = given_numbers(told).union(*(given_numbers(str(h.get("answer", ""))) for h in history or []
                                        if isinstance(h, dict)))
    new = sorted(given_numbers(note) - given, key=lambda n: (len(n), n))
    return f"it gives the number(s) {', '.join(new[:5])}, which the user did not" if new else None


def _clarify(predictor: dspy.Module, problem: str, note: str, config: dict,
             adapter: dspy.Adapter | None) -> tuple[str | None, str | None]:
    """One Clarify call, in either mode: (its reply, cleaned; or None and why the call failed)."""
    try:
        with dspy.context(adapter=adapter or BoxedAdapter()):
            return clean_reply(predictor(problem=problem, feedback=note, config=dict(config))
                               .get("clarified_problem")), None
    except Exception as exc:  # noqa: BLE001 - e.g. an empty reply (AdapterParseError) or an LM error
        return None, f"the clarify call failed: {type(exc).__name__}"


def _append(predictor: dspy.Module, told: str, note: str, history: list | None, config: dict,
            adapter: dspy.Adapter | None, strict: bool) -> tuple[str, str | None]:
    """The append words step: (the user's words with the Clarify module's clarification below them, or the user's
    words alone and why the clarification was refused)."""
    reply, failed = _clarify(predictor, told, note, config, adapter)
    if failed:
        return told, failed
    clarification = _LABEL.sub("", reply or "")
    reason = garbled_reason(clarification) or (clarification_reason(clarification, told, history) if strict
                                               else None)
    if reason:
        logger.info("refine: the clarification was refused (%s); the user's words alone", reason)
        return told, f"the clarification was rejected: {reason}"
    return f"{told}\n\n{CLARIFICATION_HEADER} {clarification.strip()}", None


def refine(clarify: Any, problem: str, history: list | None, feedback: str, critic_lm: Any = None,
           adapter: dspy.Adapter | None = None, max_tokens: int | None = None,
           revealed: list[str] | None = None, strict: bool = False, mode: str = "replace") -> Refinement:
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

    ``mode="append"``: the user's words stay as they are (:func:`as_told`: the problem and every feedback, the
    prompt ``retry`` answers) and the Clarify module, asked by :data:`APPEND_REMINDER`, writes a clarification that
    goes below them; a refused one (garbled; strict: :func:`clarification_reason`) leaves the user's words alone.
    Why: the rewrites session 14 read dropped what decided the answer (a word, an instruction, the question, that
    the last answer was wrong), which no check on numbers sees; appending cannot lose the user's words.
    ``mode="replace"`` (the design of the main run): the rewrite replaces the statement, as above.
    """
    if mode not in ("replace", "append"):
        raise ValueError(f"refine: mode must be 'replace' or 'append', not {mode!r}")
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
    if mode == "append":
        parts.append(APPEND_REMINDER)
        clarified, fallback = _append(predictor, as_told(problem, history), "\n\n".join(parts), history, config,
                                      adapter, strict)
        return Refinement(clarified_problem=clarified, critique=critique, fallback=fallback)
    if strict:
        parts.append(RESTATE_REMINDER)
    note = "\n\n".join(parts)
    clarified, fallback = _clarify(predictor, problem, note, config, adapter)
    clarified = "" if fallback else clarified
    if not fallback:
        sources = [problem, *(revealed or [])]
        lost = [text for text in sources if _lost_problem(text, clarified)]
        reason = garbled_reason(clarified) or (
            None if not lost else "it drops every number of the problem" if lost[0] is problem
            else f"it drops every number of what the user added: {_clip(lost[0], 80)!r}")
        if strict and not reason:
            missing = sorted(set().union(*map(_numbers, sources)) - _numbers(clarified), key=lambda n: (len(n), n))
            reason = solution_reason(clarified, sources) or (
                f"it drops the number(s) {', '.join(missing[:5])}" if missing else None)
        fallback = f"the clarified problem was rejected: {reason}" if reason else None
    if fallback:
        logger.info("refine: %s; using the original problem with the feedback as a note", fallback)
        added = "".join(user_added(text) for text in revealed or [])
        note = "" if revealed and revealed[-1].strip() in feedback else \
            f"\n\nNote from the user about an earlier answer: {feedback.strip()}"
        clarified = f"{problem.strip()}{added}{note}"
    return Refinement(clarified_problem=clarified, critique=critique, fallback=fallback)
