"""Simulated users for multi-turn MATH sessions. No user ever reveals the gold answer.

* ``oracle``: knows the gold answer; says only "correct" (accepts) or "incorrect".
* ``vague``: knows it; an incorrect answer gets ambiguous natural-language feedback drawn from
  a fixed set with a seeded generator (same problem, seed and turn: same words).
* ``hint``: names the kind of failure: no boxed answer, an answer that does not parse, the
  wrong form, a wrong value (the words of :func:`rosa2_dspy.math.feedback.math_feedback`).
* ``sharded``: poses the problem with one or two of its conditions withheld
  (:mod:`rosa2_dspy.math.shards`); each rejected answer reveals the next withheld shard in vague
  words ("Oh, I should have said: ..."); once nothing is withheld it complains like ``vague``. A
  problem that cannot be split is posed whole (no semantic gap).

Every user opens a conversation with :meth:`User.opening` (the problem, or its sharded first turn)
and may reveal a piece of the problem in a judgement (``Judgement.revealed``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from rosa2_dspy.math.grading import grade
from rosa2_dspy.math.shards import ShardedProblem, seeded_random, shard_example

VAGUE_FEEDBACK = (
    "Hmm, that's not what I asked.",
    "No, that's not right.",
    "That doesn't look right to me.",
    "I don't think that answers my question.",
    "Not quite. Can you try again?",
    "That's not what I was looking for.",
    "Hmm, are you sure? I expected something else.",
    "This isn't the answer I need.",
)


REVEAL_WORDING = (
    "Oh, I should have said: {shard}",
    "I forgot to mention: {shard}",
    "Sorry, I left something out. {shard}",
    "One more thing I should have told you: {shard}",
)


@dataclass
class Judgement:
    accepted: bool
    feedback: str
    correct: bool
    boxed: bool
    revealed: str | None = None  # a piece of the problem the user told only now
    grade_fallback: bool = False  # math-verify could not judge the answer: the strict match decided


class User:
    """Judges the answer a turn shows. ``prediction`` may be None (no parseable answer)."""

    name = "user"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def opening(self, example) -> str:
        """What the user asks at turn 1: the whole problem."""
        return example.problem

    def describe(self, example) -> dict | None:
        """What the record should say about how the problem was posed (None: posed whole, as given)."""
        return None

    def _rng(self, example, turn: int, salt: str = "") -> random.Random:
        return seeded_random(f"{salt}{self.seed}:{example.unique_id}:{turn}")

    def judge(self, example, prediction, turn: int) -> Judgement:
        answer = getattr(prediction, "answer", None) if prediction is not None else None
        judged = grade(answer, example.answer) if answer is not None else None
        correct, boxed = bool(judged and judged.correct), bool(judged and judged.boxed)
        fallback = bool(judged and judged.fallback)
        if correct:
            return Judgement(True, "Correct, thank you.", True, True, grade_fallback=fallback)
        return Judgement(False, self.complaint(example, prediction, turn), False, boxed, grade_fallback=fallback)

    def complaint(self, example, prediction, turn: int) -> str:
        raise NotImplementedError


class OracleUser(User):
    name = "oracle"

    def complaint(self, example, prediction, turn):
        return "Incorrect."


class VagueUser(User):
    name = "vague"

    def complaint(self, example, prediction, turn):
        return self._rng(example, turn).choice(VAGUE_FEEDBACK)


class HintUser(User):
    name = "hint"

    def complaint(self, example, prediction, turn):
        from rosa2_dspy.math.feedback import math_feedback

        return math_feedback(example, prediction)[1]


class ShardedUser(VagueUser):
    """Reveals what it meant, a withheld shard per rejected answer, in the order the problem has them."""

    name = "sharded"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._sharded: dict[str, ShardedProblem] = {}

    def sharded(self, example) -> ShardedProblem:
        key = str(example.unique_id)
        if key not in self._sharded:  # a dict write is atomic: concurrent conversations may both compute it
            self._sharded[key] = shard_example(example, self.seed)
        return self._sharded[key]

    def opening(self, example) -> str:
        return self.sharded(example).opening

    def describe(self, example) -> dict:
        return self.sharded(example).to_dict()

    def judge(self, example, prediction, turn: int) -> Judgement:
        verdict = super().judge(example, prediction, turn)
        shards = self.sharded(example).shards
        if verdict.accepted or turn > len(shards):
            return verdict
        shard = shards[turn - 1]  # turn t's rejection reveals the t-th withheld shard
        wording = self._rng(example, turn, "reveal:").choice(REVEAL_WORDING)
        return replace(verdict, feedback=wording.format(shard=shard), revealed=shard)


USERS = {"oracle": OracleUser, "vague": VagueUser, "hint": HintUser, "sharded": ShardedUser}


def make_user(name: str, seed: int = 0) -> User:
    if name not in USERS:
        raise ValueError(f"unknown user {name!r}; choose from: {', '.join(USERS)}")
    return USERS[name](seed)
