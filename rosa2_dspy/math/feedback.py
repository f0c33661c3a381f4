"""MATH feedback: a score and a feedback text that names the checkable failure, never the gold answer.

The loss of the words step (:mod:`rosa2_dspy.words`) for MATH: :func:`math_feedback_metric` (GEPA's
``dspy.Prediction(score=..., feedback=...)`` convention) says whether the reply has no ``\\boxed{}``
answer, an answer that does not parse, the wrong form (a decimal for an exact answer, an unreduced
fraction or radical) or a wrong value. The simulated users (:mod:`rosa2_dspy.math.users`) speak
the same words.
"""

from __future__ import annotations

import math
import re
from typing import Any

import dspy
from dspy.teleprompt.bootstrap_trace import FailedPrediction

from rosa2_dspy.math.grading import grade, last_boxed

# Feedback texts. None contains a digit, so none can contain a numeric gold answer; the gold
# itself is never formatted into any of them.
FEEDBACK_CORRECT = "Correct: the boxed final answer has the right value."
FEEDBACK_CORRECT_UNBOXED = ("Correct value, but the final answer was not written inside \\boxed{...}; "
                            "always end with the final answer boxed.")
FEEDBACK_NO_PREDICTION = ("No \\boxed{} answer: the reply could not be parsed into a final answer. "
                          "End the reply with the final answer written as \\boxed{...}.")
FEEDBACK_NO_BOXED = ("No \\boxed{} answer: the reply never wrote its final answer inside \\boxed{...}. "
                     "End the reply with the final answer written as \\boxed{...}.")
FEEDBACK_EMPTY_BOXED = "The \\boxed{} is empty: put the final answer itself inside \\boxed{...}."
FEEDBACK_UNPARSEABLE = ("The boxed answer does not parse as a mathematical expression ({why}). "
                        "Box only the final answer: a number or a closed-form expression, no words.")
FEEDBACK_WRONG_FORM = "Wrong answer in the wrong form: {issues}."
FEEDBACK_WRONG_VALUE = ("Wrong value: the boxed answer is a well-formed expression but not the right value. "
                        "Re-check the reasoning and the arithmetic step by step.")
FEEDBACK_CORRECT_FORM_NOTE = " Note the form, though: {issues}."
CLARIFY_PREFIX = "The solver's final answer after this rewritten problem: "

_FORM_ISSUES = {
    "decimal": "the answer is a decimal approximation but this problem expects an exact answer ({kind})",
    "fraction": "the fraction is not in lowest terms (divide numerator and denominator by their common factor)",
    "radical": "the radical is not simplified (take square factors out of the square root)",
}


def field_of(obj: Any, name: str) -> Any:
    """``obj.name`` for Predictions, Examples and dicts alike; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return obj.get(name) if hasattr(obj, "get") else getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a prediction-like object without the field
        return getattr(obj, name, None)


def _exact_kind(gold: str) -> str | None:
    """The kind of exact answer the gold is written as (fraction, radical, pi), else None."""
    if re.search(r"\d\.\d|^\.\d", gold):
        return None  # the gold itself is a decimal
    if "\\pi" in gold or "π" in gold:
        return "an expression in pi"
    if "\\sqrt" in gold or "√" in gold:
        return "a radical"
    if "frac" in gold or re.search(r"\d\s*/\s*\d", gold):
        return "a fraction"
    return None


def _integer_fractions(text: str) -> list[tuple[int, int]]:
    pairs = [(int(a), int(b)) for a, b in re.findall(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}", text)]
    pairs += [(int(a), int(b)) for a, b in re.findall(r"(?<![\d.}])(\d+)\s*/\s*(\d+)(?![\d.])", text)]
    return pairs


def _has_square_factor(n: int) -> bool:
    return any(n % (k * k) == 0 for k in range(2, math.isqrt(n) + 1)) if n >= 4 else False


def form_issues(extracted: str, gold: str) -> list[str]:
    """Checkable form problems of an extracted answer: decimal for an exact gold, unsimplified
    fraction, unsimplified radical. Only the *kind* of the gold is used, never its text."""
    issues = []
    kind = _exact_kind(gold)
    if kind and re.search(r"\d*\.\d+", extracted):
        issues.append(_FORM_ISSUES["decimal"].format(kind=kind))
    if any(b == 0 or b == 1 or b < 0 or math.gcd(a, b) > 1 for a, b in _integer_fractions(extracted)):
        issues.append(_FORM_ISSUES["fraction"])
    roots = [int(n) for n in re.findall(r"\\sqrt\s*\{\s*(\d+)\s*\}", extracted)]
    roots += [int(n) for n in re.findall(r"\\sqrt\s*(\d)(?!\d)", extracted)]
    if any(_has_square_factor(n) for n in roots):
        issues.append(_FORM_ISSUES["radical"])
    return issues


def parse_problem(extracted: str) -> str | None:
    """Why an extracted answer cannot be a mathematical expression (a simple syntactic check), or None."""
    text = extracted.strip()
    if text.count("{") != text.count("}"):
        return "unbalanced braces"
    if text.count("(") + text.count("[") != text.count(")") + text.count("]"):
        return "unbalanced brackets"
    if "..." in text or "?" in text:
        return "it is incomplete"
    if re.search(r"(?:[+*/^=,]|\\cdot|\\times|\\frac|\\sqrt)\s*$", text) or re.match(r"^\s*[*/^=,]", text):
        return "it starts or ends with an operator"
    plain = re.sub(r"\\(?:text|mbox|mathrm|textbf|operatorname)\s*\{[^{}]*\}", " ", text)
    plain = re.sub(r"\\[A-Za-z]+", " ", plain)
    words = [w for w in re.findall(r"[A-Za-z]{2,}", plain)]
    if len(words) >= 3:
        return "it is words, not an expression"
    return None


def math_feedback(example: Any, prediction: Any) -> tuple[float, str]:
    """Score (1.0 or 0.0) and feedback for one MATH prediction against ``example.answer``.

    ``prediction`` may be a ``dspy.Prediction`` with an ``answer`` field, None (the program
    failed), a ``FailedPrediction`` (a parse failure captured in a trace) or anything else
    without an answer. The feedback names the checkable failure and never contains the gold.
    """
    gold = field_of(example, "answer")
    if gold is None:
        raise ValueError("math_feedback needs an example with an 'answer' field (the gold answer)")
    gold = str(gold)
    answer = None if isinstance(prediction, FailedPrediction) else field_of(prediction, "answer")
    if answer is None or not str(answer).strip():
        return 0.0, _scrub(FEEDBACK_NO_PREDICTION, gold)
    answer = str(answer)
    if last_boxed(answer) is None:
        if "\\boxed" in answer or "\\fbox" in answer:
            return 0.0, _scrub(FEEDBACK_UNPARSEABLE.format(why="the \\boxed{} is not closed"), gold)
        judged = grade(answer, gold)
        if judged.correct:  # evaluation counts an unboxed right value as correct: so does the score
            return 1.0, _scrub(FEEDBACK_CORRECT_UNBOXED, gold)
        return 0.0, _scrub(FEEDBACK_NO_BOXED, gold)
    judged = grade(answer, gold)
    if not judged.extracted:
        return 0.0, _scrub(FEEDBACK_EMPTY_BOXED, gold)
    issues = form_issues(judged.extracted, gold)
    if judged.correct:
        note = FEEDBACK_CORRECT_FORM_NOTE.format(issues="; ".join(issues)) if issues else ""
        return 1.0, _scrub(FEEDBACK_CORRECT + note, gold)
    why = parse_problem(judged.extracted)
    if why:
        return 0.0, _scrub(FEEDBACK_UNPARSEABLE.format(why=why), gold)
    if issues:
        return 0.0, _scrub(FEEDBACK_WRONG_FORM.format(issues="; ".join(issues)), gold)
    return 0.0, _scrub(FEEDBACK_WRONG_VALUE, gold)


def _scrub(feedback: str, gold: str) -> str:
    """Belt and braces: the templates hold no digits, but never let a gold answer through."""
    gold = gold.strip()
    if gold and (re.search(r"[\d\\]", gold) or len(gold) > 3) and gold in feedback:
        feedback = feedback.replace(gold, "[withheld]")
    return feedback


def math_feedback_metric(gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None,
                         pred_trace: Any = None) -> dspy.Prediction:
    """The MATH metric in GEPA's convention: ``dspy.Prediction(score=..., feedback=...)``.

    Also usable wherever DSPy sums or compares metric values (``dspy.Evaluate``, ``BetterTogether``):
    a Prediction with a ``score`` converts to float. Note that ``bool()`` of a Prediction is always
    true; code that tests a metric value for truth should use :func:`math_score`.
    """
    score, feedback = math_feedback(gold, pred)
    if pred_name and "clarify" in pred_name:
        feedback = CLARIFY_PREFIX + feedback
    return dspy.Prediction(score=score, feedback=feedback)


def math_score(example: Any, pred: Any, trace: Any = None) -> float:
    """The plain float score of :func:`math_feedback` (for metrics tested for truth)."""
    return math_feedback(example, pred)[0]
