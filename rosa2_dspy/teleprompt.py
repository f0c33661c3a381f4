"""Compile-time co-adaptation: the ROSA2 teleprompter (rounds of a words step then a weights step on a
trainset) and the sequential baseline p -> w, both ``dspy.Teleprompter``s."""

from __future__ import annotations

import logging

import dspy

from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.weights import LoRAFinetune, UpdateConfig

logger = logging.getLogger(__name__)


class ROSA2(dspy.teleprompt.Teleprompter):
    """Compile-time co-adaptation: rounds of a words step then a weights step on a trainset.

    Each round rewrites the instructions (:class:`~rosa2_dspy.words.TextualGradientOptimizer`,
    one round), then fine-tunes the adapter (:class:`~rosa2_dspy.weights.LoRAFinetune`) on
    traces generated under the just-rewritten instructions. ``history`` has, per round, the
    instructions, the validation accuracy and the adapter's L2 shift.

    ``gate_weights``: keep a round's weights step only when it scores strictly better on the
    validation problems than the words it started from (the rule the words step already follows);
    otherwise the adapter goes back to where the round left it, bit for bit. Without the gate a
    weights step that lowers validation is kept (BENCHMARKS, session 19: 0.675 -> 0.356).
    """

    def __init__(self, metric=None, critic_lm=None, config: UpdateConfig | None = None, rounds: int = 2,
                 num_threads: int = 8, minibatch_size: int = 4, val_size: int = 8, keep: str = "correct",
                 sources: tuple[str, ...] | list[str] = ("bootstrap",), max_instruction_chars: int = 1200,
                 format_credit: float = 0.0, gate_weights: bool = False):
        from rosa2_dspy.evaluation import math_metric
        from rosa2_dspy.math.feedback import math_feedback_metric
        from rosa2_dspy.words import TextualGradientOptimizer

        super().__init__()
        self.rounds = rounds
        self.gate_weights = bool(gate_weights)
        self.words = TextualGradientOptimizer(metric=metric or math_feedback_metric, critic_lm=critic_lm, rounds=1,
                                              minibatch_size=minibatch_size, val_size=val_size,
                                              max_instruction_chars=max_instruction_chars, num_threads=num_threads,
                                              format_credit=format_credit)
        self.weights = LoRAFinetune(math_metric(keep), config=config or UpdateConfig(objective="sft"),
                                    num_threads=num_threads, sources=sources)
        self.history: list[dict] = []

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None, teacher=None):
        from rosa2_dspy.artifacts import instructions_of
        from rosa2_dspy.weights import engine_of
        from rosa2_dspy.words import hold_out

        engine = engine_of(student)
        program = student
        # one split for the whole compile: every round validates on the same problems, never trained on
        train, val = hold_out(trainset, valset, self.words.val_size)
        val = val[: self.words.val_size]
        for round_index in range(1, self.rounds + 1):
            self.words.seed = round_index  # each round critiques a different minibatch
            program = self.words.compile(program, trainset=train, valset=val)
            before = start = None
            if self.gate_weights:  # the words' own validation score when the words step left one
                before = self.words.last_score if self.words.last_score is not None \
                    else self.words.score(program, val)
                start = engine.snapshot()
            trained = self.weights.compile(program, trainset=train)
            scored = self.words.score(trained, val)
            kept = before is None or scored > before
            if kept:
                program = trained
            else:
                engine.restore(start) if start else engine.reset_adapter()  # {}: attached by this step
                logger.info("rosa2: round %d: weights step not kept (validation %.3f -> %.3f)",
                            round_index, before, scored)
            self.history.append({"round": round_index, "instructions": instructions_of(program),
                                 "val_score": scored if kept else before, "val_before_weights": before,
                                 "val_after_weights": scored, "weights_kept": kept,
                                 "l2_shift": engine_shift(engine),
                                 "train_ids": [e.get("unique_id") for e in train],
                                 "val_ids": [e.get("unique_id") for e in val],
                                 "words": self.words.history[-len(program.named_predictors()):],
                                 "weights": self.weights.history[-1]})
        program.words_history = self.history
        return program


class Sequential(dspy.teleprompt.Teleprompter):
    """The sequential baseline p -> w: every words round first, then one weights step."""

    def __init__(self, p: dspy.teleprompt.Teleprompter, w: dspy.teleprompt.Teleprompter):
        super().__init__()
        self.p, self.w = p, w
        self.history: list[dict] = []

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None, teacher=None):
        from rosa2_dspy.words import hold_out

        # the words step validates on problems the weights step never trains on
        trainset, valset = hold_out(trainset, valset, getattr(self.p, "val_size", 8))
        program = self.p.compile(student, trainset=trainset, valset=valset)
        program = self.w.compile(program, trainset=trainset)
        self.history = [{"words": getattr(self.p, "history", None), "weights": getattr(self.w, "history", None)}]
        return program


def engine_shift(engine: LocalEngine) -> float:
    from rosa2_dspy.weights import adapter_shift

    return round(adapter_shift(engine).total, 6)
