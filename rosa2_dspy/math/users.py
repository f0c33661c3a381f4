"""Simulated users for multi-turn MATH sessions. No user ever reveals the gold answer.

* ``oracle``: knows the gold answer; says only "correct" (accepts) or "incorrect".
* ``vague``: knows it; an incorrect answer gets ambiguous natural-language feedback drawn from
  a fixed set with a seeded generator (same problem, seed and turn: same words).
* ``hint``: names the kind of failure: no boxed answer, an answer that does not parse, the
  wrong form, a wrong value (the words of :func:`rosa2_dspy.words.math_feedback`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from rosa2_dspy.math.grading import grade

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


@dataclass
class Judgement:
    accepted: bool
    feedback: str
    correct: bool
    boxed: bool


class User:
    """Judges the answer a turn shows. ``prediction`` may be None (no parseable answer)."""

    name = "user"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def judge(self, example, prediction, turn: int) -> Judgement:
        answer = getattr(prediction, "answer", None) if prediction is not None else None
        judged = grade(answer, example.answer) if answer is not None else None
        correct, boxed = bool(judged and judged.correct), bool(judged and judged.boxed)
        if correct:
            return Judgement(True, "Correct, thank you.", True, True)
        return Judgement(False, self.complaint(example, prediction, turn), False, boxed)

    def complaint(self, example, prediction, turn: int) -> str:
        raise NotImplementedError


class OracleUser(User):
    name = "oracle"

    def complaint(self, example, prediction, turn):
        return "Incorrect."


class VagueUser(User):
    name = "vague"

    def complaint(self, example, prediction, turn):
        key = f"{self.seed}:{example.unique_id}:{turn}".encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        return rng.choice(VAGUE_FEEDBACK)


class HintUser(User):
    name = "hint"

    def complaint(self, example, prediction, turn):
        from rosa2_dspy.words import math_feedback

        return math_feedback(example, prediction)[1]


USERS = {"oracle": OracleUser, "vague": VagueUser, "hint": HintUser}


def make_user(name: str, seed: int = 0) -> User:
    if name not in USERS:
        raise ValueError(f"unknown user {name!r}; choose from: {', '.join(USERS)}")
    return USERS[name](seed)
