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

:class:`TextualGradientOptimizer` (``words/optimizer.py``) runs this loop at compile time on every predictor of a program
(a ``dspy.Teleprompter``, usable as the ``p`` step of ``dspy.BetterTogether``); DSPy's ``GEPA``
takes the same metric (with :func:`plain_text_gepa_proposer` when its reflection LM is a small
local model), so the two can be compared on the same problems. At test time,
:func:`refine` (``words/refinement.py``) is the same idea applied to one turn: the user's feedback, however vague, becomes a
critique (what was unclear) and the ``Clarify`` module rewrites the problem statement from it.

The critic is any ``dspy.LM``; by default the LM DSPy is configured with (the local engine).
Critic calls go through a plain-text adapter (:class:`~rosa2_dspy.adapters.BoxedAdapter`: the
system message is the instruction, the whole reply is the output), so even a 135M model's raw
text is usable, and whatever it writes is validated before it can change the program.
"""

from rosa2_dspy.words.gradient import (FORMAT_MARKERS, Critique, Rewrite, TurnCritique, apply_gradient, clean_reply,
                                       feedback_summary, format_records, garbled_reason, judge,
                                       plain_text_gepa_proposer, required_formats, textual_gradient,
                                       validate_instruction)
from rosa2_dspy.words.optimizer import Rollout, TextualGradientOptimizer, hold_out
from rosa2_dspy.words.refinement import Refinement, as_told, format_history, kept_words, refine

__all__ = ["FORMAT_MARKERS", "Critique", "Refinement", "Rewrite", "Rollout", "TextualGradientOptimizer", "TurnCritique", "kept_words",
           "apply_gradient", "as_told", "clean_reply", "feedback_summary", "format_history", "format_records",
           "garbled_reason", "hold_out", "judge", "plain_text_gepa_proposer", "refine", "required_formats",
           "textual_gradient", "validate_instruction"]
