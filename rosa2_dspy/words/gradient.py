"""The pieces of a textual gradient: the metric's judgement, the critique of some words, the rewrite from it
and the checks a rewrite must pass (shared by the compile-time optimizer and the test-time refinement)."""

from __future__ import annotations

import inspect
import logging
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import dspy
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.adapters import BoxedAdapter
from rosa2_dspy.math.feedback import field_of

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
